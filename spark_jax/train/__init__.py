"""Stage II training: the grain SFT input pipeline, the pure optimizer step and the SFT loop."""
