"""SPARK Stage I: prompts, self-consistency aggregation, curation, data-quality table, SFT formats, and the jobs.

  prompts      generator, verifier, critic and merger prompts
  curation     balancing of the solution pool (reference | verifier_majority | none)
  aggregate    majorities (with the step quorum), target selection, variant records, contradiction counts
  quality      label accuracy of each variant against ground truth (diagnostics only)
  formats      one SFT row per reward-model format
  jobs         generate -> verify (+ reference-guided) -> critique -> aggregate, the thin shells around a model

Everything but `jobs` is pure Python (no model, no JAX), so the data pipeline can be built, tested and audited
on a laptop. Verdict parsing and think stripping live in spark_jax.text, shared with the later stages.
"""
