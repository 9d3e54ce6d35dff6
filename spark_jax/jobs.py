"""The one job shell: `config.job` names a function `(config) -> summary dict`, imported only when run.

Every job follows one convention: `run_<job>(config)` reads its inputs, writes its outputs under
`config.workdir` (resumably), writes `summary.json` there and returns that summary. This shell adds what every
job shares: library logs (orbax, grain, jax INFO lines) go to `workdir/logs.txt` instead of the console
(`--config.verbose_logs=True` shows them), and the wall time is printed at the end.
"""

from __future__ import annotations

import importlib
import time


JOBS = {
    "inspect_model": "spark_jax.sampling.inspect:run_inspect_model",
    "generate": "spark_jax.stage1.jobs:run_generate",
    "verify": "spark_jax.stage1.jobs:run_verify",
    "verify_reference": "spark_jax.stage1.jobs:run_verify_reference",
    "critique": "spark_jax.stage1.jobs:run_critique",
    "aggregate": "spark_jax.stage1.jobs:run_aggregate",
    "stage1": "spark_jax.stage1.jobs:run_stage1",
    "sft": "spark_jax.train.sft:run_sft",
    "processbench": "spark_jax.evals.processbench_job:run_processbench",
    "demo": "spark_jax.world.demo:run_demo",
    "rl": "spark_jax.rl.loop:run_rl",
    "grid": "spark_jax.grid:run_grid",
    "eval_math": "spark_jax.evals.math_eval:run_eval_math",
}


def run(config) -> dict:
  if config.job not in JOBS:
    raise KeyError(f"config.job={config.job!r} is not a known job; known jobs: {sorted(JOBS)}.")
  module, fn = JOBS[config.job].split(":")
  from spark_jax.train.metrics import library_logs
  start = time.time()
  with library_logs(config.workdir, verbose=bool(config.get("verbose_logs", False))):
    summary = getattr(importlib.import_module(module), fn)(config)
  print(f"job {config.job} finished in {time.time() - start:.1f} s", flush=True)  # our line, not a library log
  return summary
