"""The embedded world: a synthetic arithmetic task with exact ground truth (task), its tokenizer
(tokenizer), tiny generator/verifier models trained with the project's SFT job (bootstrap), and the demo
that runs the whole pipeline on them (demo)."""
