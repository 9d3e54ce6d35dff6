"""The one answer grader: the public surface of extraction, equivalence and the hang-proof process pool.

Stage I curation (docs/method.md §2.3), RL rewards (RLVR baselines, diagnostics) and the math evaluations
(D11) all grade answers through these names, so that "correct" means the same in every table.

Pipeline for one (response, gold) pair:
  1. `extract_answer(response)` (spark_jax.text.answers): the reasoning trace removed by the one think rule;
     the first `Answer:` line; else the last `\\boxed{...}` (nested braces matched); else a short last
     line that looks like math.
  2. `is_equivalent(pred, gold)` (spark_jax.evals.equivalence): normalised string equality first, then
     math_verify with both sides parsed as `$…$`, bounded in time.
  3. `grade_batch` / `GradingPool` (spark_jax.evals.grading_pool): many pairs in worker processes with a
     hard per-answer timeout, so that one pathological answer costs at most `timeout_s` and counts as wrong.
"""

from __future__ import annotations

from spark_jax.evals.equivalence import (DEFAULT_TIMEOUT_S, default_check, is_equivalent, normalize_answer,
                                         normalize_gold)
from spark_jax.evals.grading_pool import GradingPool, default_num_workers, grade_batch, grade_responses
from spark_jax.text.answers import extract_answer, last_boxed

__all__ = ["DEFAULT_TIMEOUT_S", "GradingPool", "default_check", "default_num_workers", "extract_answer",
           "grade_batch", "grade_responses", "is_equivalent", "last_boxed", "normalize_answer", "normalize_gold"]
