"""spark_jax: SPARK reference-free PRMs and RL in JAX."""
