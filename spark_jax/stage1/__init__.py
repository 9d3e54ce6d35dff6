"""SPARK Stage I building blocks: prompts, verification parsers, self-consistency aggregation, SFT formats.

Everything in this package is pure Python (no model, no JAX), so the data pipeline can be built, tested and
audited on a laptop; the generation/verification jobs call these functions around a model.
"""
