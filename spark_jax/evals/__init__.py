"""Evaluation: answer grading, math benchmarks and ProcessBench.

Modules:
  grading: the one answer grader (extraction, normalisation, math_verify equivalence, and a process pool
    with hard per-answer timeouts). Stage I curation, RL rewards and math evaluation all call it, so that a
    "correct" answer means the same thing in every part of the pipeline.
  math_benchmarks: loaders for the RL evaluation sets (MATH-500, AIME24/25, AMC23, OlympiadBench,
    Minerva Math) and GSM8K, each reduced to rows {id, problem, answer}.
  processbench: ProcessBench loading, step rendering (decision D8), the critic protocol for instruct
    models, and the F1 metric.

Nothing here imports JAX: grading workers are separate processes, and keeping this package light keeps
their start-up fast.

The data files ship inside the package (spark_jax/data/<set>/, each with its README.md of provenance and
SHA256SUMS); `spark_jax.io.resolve_data_path` is the one rule that turns a configured path such as
`data/processbench` into a file, in a checkout and in an installed wheel alike.
"""

from __future__ import annotations

# The loaders here name the resolver through this package; it lives in spark_jax.io (one implementation).
from spark_jax.io import DATA_DIR, resolve_data_path  # noqa: F401
