"""Ablation grids: one base config, cells of dotted-key overrides, one table (see spark_jax/grid.py).

  python -m spark_jax.main --config=configs/grid.py:<name>
  python -m spark_jax.main --config=configs/grid.py:<name> --config.worker=0 --config.num_workers=2  # machine 0
  python -m spark_jax.main --config=configs/grid.py:<name> --config.worker=1 --config.num_workers=2  # machine 1
  python -m spark_jax.main --config=configs/grid.py:<name> --config.mode=collect  # table of finished cells

Grids:
  world_n_x_aggregation         N in {1, 4, 16} x aggregation in {outcome, step} on the embedded toy world
                                (configs/demo.py, quick sizes): label accuracy of the aggregated labels
                                against the exact truth, and the held-out ProcessBench-style F1 of the PRM-CoT
                                trained on them. The bootstrap models are cached, so only the first cell
                                trains them.
  stage1_demo_n_x_aggregation   N in {1, 4} x aggregation in {outcome, step}: Stage I's label accuracy
                                against the ground truth (configs/stage1.py:demo, SmolLM2-135M; slow on CPU)
  smoke                         two random tiny presets through inspect_model: the grid machinery end to end
                                in a minute (what the CLI test runs)

A new grid is a function below that returns `grid_config(...)`, added to GRIDS.
"""

from configs import common
from spark_jax.grid import product, with_overrides

# Label accuracy of the kept solutions of one aggregation variant (aggregate's data_quality table): the final
# label, and the verdict derived from the step labels, against the ground-truth correctness.
_LABEL_METRICS = (
    ("kept", "aggregate/summary.json:data_quality.{aggregation}_consistency.kept"),
    ("final_accuracy", "aggregate/summary.json:data_quality.{aggregation}_consistency.final.all.accuracy"),
    ("step_derived_accuracy",
     "aggregate/summary.json:data_quality.{aggregation}_consistency.step_derived.all.accuracy"),
)


def grid_config(name: str, base: str, cells: list, metrics: tuple, *, plot_x: str = "",
                plot_metrics: tuple = ()) -> "common.ConfigDict":
  """`base`: a config as for --config (`configs/<job>.py[:variant]`); `cells`: see spark_jax.grid."""
  config = common.base("grid", workdir=f"runs/grid/{name}")
  config.name = name
  config.base = base
  config.cells = list(cells)
  config.metrics = tuple(metrics)  # (column, "file:dotted.path") pairs; the file defaults to summary.json
  config.mode = "run"  # run | collect
  config.worker = 0
  config.num_workers = 1
  config.plot = common.ConfigDict({"x": plot_x, "metrics": tuple(plot_metrics)})
  return config


def stage1_demo_n_x_aggregation():
  cells = product({
      "N": {n: {"verify.num_verifications": n} for n in (1, 4)},
      "aggregation": {a: {"aggregate.variants": (f"{a}_consistency",)} for a in ("outcome", "step")},
  })
  # One SFT format is enough to score labels; no critique and no reference-guided pass keep cells short.
  cells = with_overrides(cells, {"aggregate.formats": ("prm",), "critique.enabled": False,
                                 "verify.reference": False})
  return grid_config("stage1_demo_n_x_aggregation", "configs/stage1.py:demo", cells, _LABEL_METRICS,
                     plot_x="N")


# The demo's per-stage summaries: `labels` aggregates the first n of the N verifications (n = N here), and
# `processbench` scores every PRM trained in Stage II by "<variant>/<format>".
_WORLD_METRICS = (
    ("step_label_accuracy", "labels/summary.json:table.variants.{aggregation}_consistency.{N}.step_accuracy"),
    ("outcome_label_accuracy",
     "labels/summary.json:table.variants.{aggregation}_consistency.{N}.outcome_accuracy"),
    ("first_error_accuracy",
     "labels/summary.json:table.variants.{aggregation}_consistency.{N}.first_error_accuracy"),
    ("kept", "labels/summary.json:table.variants.{aggregation}_consistency.{N}.kept"),
    ("prm_cot_f1", "processbench/summary.json:scores.{aggregation}_consistency/prm_cot.f1"),
)


def world_n_x_aggregation():
  # The demo runs with quick=True, which replaces its sizes by `quick_settings`; the swept knobs are set there
  # so that the quick merge does not undo them.
  q = "quick_settings."
  cells = product({
      "N": {n: {f"{q}stage1.num_verifications": n,
                f"{q}stage1.n_grid": (n,),
                f"{q}stage1.reference_num_verifications": min(n, 4)} for n in (1, 4, 16)},
      "aggregation": {a: {f"{q}stage2.variants": (f"{a}_consistency",), f"{q}stage2.formats": ("prm_cot",)}
                      for a in ("outcome", "step")},
  })
  cells = with_overrides(cells, {"quick": True, f"{q}rl.rewards": ()})  # labels and PRMs only: no RL stage
  return grid_config("world_n_x_aggregation", "configs/demo.py", cells, _WORLD_METRICS, plot_x="N")


def smoke():
  cells = product({"model.name": ("tiny-llama", "tiny-qwen2")})
  cells = with_overrides(cells, {"model.init": "random", "model.dtype": "float32", "max_new_tokens": 2})
  metrics = (("prompt_tokens", "prompt_tokens"), ("prompt_perplexity", "prompt_perplexity"),
             ("finish_reason", "finish_reason"))
  return grid_config("smoke", "configs/inspect_model.py", cells, metrics)


GRIDS = {
    "smoke": smoke,
    "world_n_x_aggregation": world_n_x_aggregation,
    "stage1_demo_n_x_aggregation": stage1_demo_n_x_aggregation,
}


def get_config(name: str = ""):
  if name not in GRIDS:
    raise ValueError(f"configs/grid.py:{name!r} is not a grid; use configs/grid.py:<name> with one of "
                     f"{sorted(GRIDS)}.")
  config = GRIDS[name]()
  config.lock()
  return config
