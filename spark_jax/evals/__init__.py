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

The data files live in the repository's `data/` folder (copied from shared/data with provenance and
SHA256SUMS), so a fresh clone evaluates without anything outside the repository.
"""

from __future__ import annotations

import os
import pathlib

# The directory that contains the `spark_jax` package: data paths default to `<REPO_ROOT>/data/...`
# so that loaders work from any working directory.
REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def resolve_data_path(path: str | os.PathLike[str]) -> pathlib.Path:
  """Resolves a data path: absolute as is; relative against the cwd if it exists there, else the repo root.

  Why both: scripts run from the repository root (or pass their own folder) should just work, and the
  default `data/...` paths must also work when Python runs from elsewhere (tests, notebooks, jobs).
  """
  p = pathlib.Path(path).expanduser()
  if p.is_absolute() or p.exists():
    return p
  return REPO_ROOT / p
