"""Sampling: a pure, jit-traceable generation core and a batch engine around it.

* `generate(cfg, params, prompts, *, max_new_tokens, ...)`: the batch job (continuous batching by default,
  restore order, progress bar); returns one list of `Sample`s per prompt.
* `SamplingEngine`: the same with options (mesh, decode rows, buckets, `batching="continuous"|"static"`),
  compiled programs kept, params an argument of every call (`generate(..., params=...)`: new weights of the
  same shapes reuse the programs) and a token budget per prompt (`generate(..., max_new_tokens=[...])`).
* `slots` / `continuous`: continuous batching, the pure programs (admit, decode over slots) and the host loop.
* `generate_core(cfg, params, tokens_BxP, lengths_B, row_keys_N, SamplingParams, stop_table, *, row_active_N,
  row_budget_N, unstack_layers)`:
  arrays in, arrays out, no host round trip: call it inside another `jit` (GRPO rollouts, PRM verification).
"""

from spark_jax.sampling.core import (FINISH_INACTIVE, FINISH_LENGTH, FINISH_STOP_STRING, FINISH_STOP_TOKEN,
                                     CoreOutput, SamplingParams, StopTable, filter_logits, generate_core,
                                     make_stop_table, sample_tokens)
from spark_jax.sampling.engine import (Sample, SamplingEngine, SamplingStats, bucket_length, compile_seconds,
                                       compiled_program_count, generate, plan_batches)

__all__ = [
    "FINISH_INACTIVE", "FINISH_LENGTH", "FINISH_STOP_STRING", "FINISH_STOP_TOKEN", "CoreOutput", "SamplingParams",
    "StopTable", "filter_logits", "generate_core", "make_stop_table", "sample_tokens", "Sample", "SamplingEngine",
    "SamplingStats", "bucket_length", "compile_seconds", "compiled_program_count", "generate", "plan_batches",
]
