"""Sampling: a pure, jit-traceable generation core and a batch engine around it.

* `generate(cfg, params, prompts, *, max_new_tokens, ...)`: the batch job (sort, bucket, batch, restore
  order, progress bar); returns one list of `Sample`s per prompt.
* `SamplingEngine`: the same with params placed once and options (mesh, batch rows, buckets).
* `generate_core(cfg, params, tokens_BxP, lengths_B, row_keys_N, SamplingParams, stop_table)`: arrays in,
  arrays out, no host round trip: call it inside another `jit` (GRPO rollouts, PRM verification).
"""

from spark_jax.sampling.core import (FINISH_LENGTH, FINISH_STOP_STRING, FINISH_STOP_TOKEN, CoreOutput,
                                     SamplingParams, StopTable, filter_logits, generate_core, make_stop_table,
                                     sample_tokens)
from spark_jax.sampling.engine import (Sample, SamplingEngine, bucket_length, compile_seconds,
                                       compiled_program_count, generate)

__all__ = [
    "FINISH_LENGTH", "FINISH_STOP_STRING", "FINISH_STOP_TOKEN", "CoreOutput", "SamplingParams", "StopTable",
    "filter_logits", "generate_core", "make_stop_table", "sample_tokens", "Sample", "SamplingEngine",
    "bucket_length", "compile_seconds", "compiled_program_count", "generate",
]
