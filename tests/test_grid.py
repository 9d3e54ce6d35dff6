"""The grid job: resume after a crash, static worker split, table/plot, override errors, config file."""

import csv
import json
import os
import sys
import textwrap

import pytest
from ml_collections import ConfigDict

from spark_jax import grid as grid_lib
from spark_jax import jobs

_CALLS = "calls.log"


def toy_job(config) -> dict:
  """A job whose result is a known function of its config; it logs each call and can crash on demand."""
  with open(os.path.join(os.path.dirname(os.path.dirname(config.workdir)), _CALLS), "a") as f:
    f.write(os.path.basename(config.workdir) + "\n")
  crash = os.path.join(os.path.dirname(os.path.dirname(config.workdir)), "crash")
  if os.path.exists(crash) and open(crash).read() == os.path.basename(config.workdir):
    raise RuntimeError("simulated crash")
  os.makedirs(config.workdir, exist_ok=True)
  value = config.model.n * (2.0 if config.mode == "step" else 1.0) + config.scale
  with open(os.path.join(config.workdir, "metrics.jsonl"), "w") as f:
    for step in range(3):
      f.write(json.dumps({"step": step, "loss": value / (step + 1)}) + "\n")
    f.write(json.dumps({"step": 3, "eval_acc": 0.5}) + "\n")
  return {"job": "toy", "result": {"value": value, f"by_{config.mode}": value * 10}, "sizes": [config.model.n]}


@pytest.fixture
def toy(tmp_path, monkeypatch):
  monkeypatch.setitem(jobs.JOBS, "grid_toy", f"{__name__}:toy_job")
  base = tmp_path / "toy_config.py"
  base.write_text(textwrap.dedent("""
      from ml_collections import ConfigDict

      def get_config(variant=""):
        c = ConfigDict({"job": "grid_toy", "workdir": "", "seed": 0, "model": {"n": 1, "name": "toy"},
                        "mode": "outcome", "scale": 0.0, "tags": ("a",)})
        if variant == "big":
          c.scale = 100.0
        c.lock()
        return c
  """))
  return tmp_path, str(base)


def _config(workdir, base, *, worker=0, num_workers=1, mode="run", cells=None, metrics=None, plot_x="",
            plot_metrics=None):
  cells = cells if cells is not None else grid_lib.with_overrides(
      grid_lib.product({"model.n": (1, 4, 16), "mode": {"outcome": {"mode": "outcome"}, "step": {"mode": "step"}}}),
      {"scale": 0.5})
  config = ConfigDict({"job": "grid", "workdir": str(workdir), "seed": 0, "name": "toy", "base": base,
                       "cells": cells, "mode": mode, "worker": worker, "num_workers": num_workers,
                       "metrics": metrics or (("value", "result.value"), ("by_mode", "result.by_{mode}"),
                                              ("final_loss", "metrics.jsonl:loss"), ("eval", "metrics.jsonl:eval_acc"),
                                              ("size", "sizes.0")),
                       # One panel keeps these tests fast (a PNG of five panels takes seconds on a busy CPU).
                       "plot": {"x": plot_x, "metrics": plot_metrics if plot_metrics is not None else
                                ("value",) if metrics is None else ()}})
  config.lock()
  return config


def _calls(root):
  path = os.path.join(root, _CALLS)
  return open(path).read().split() if os.path.exists(path) else []


def _table(workdir):
  with open(os.path.join(workdir, "table.csv")) as f:
    return list(csv.reader(f))


def test_product_names_and_table(toy):
  root, base = toy
  summary = jobs.run(_config(root / "g", base, plot_x="model.n", plot_metrics=()))  # () = every numeric metric
  assert summary["pending"] == [] and len(summary["ran"]) == 6
  rows = _table(root / "g")
  assert rows[0] == ["cell", "model.n", "mode", "value", "by_mode", "final_loss", "eval", "size"]
  # Row-major order, the last axis fastest; values follow from the overrides (scale 0.5 from with_overrides).
  assert [r[0] for r in rows[1:]] == ["n=1__mode=outcome", "n=1__mode=step", "n=4__mode=outcome",
                                      "n=4__mode=step", "n=16__mode=outcome", "n=16__mode=step"]
  assert [float(r[3]) for r in rows[1:]] == [1.5, 2.5, 4.5, 8.5, 16.5, 32.5]
  assert [float(r[4]) for r in rows[1:]] == [15.0, 25.0, 45.0, 85.0, 165.0, 325.0]
  # metrics.jsonl: the last row holding the key (loss at step 2 = value / 3; eval only in the last row).
  assert float(rows[2][5]) == pytest.approx(2.5 / 3, rel=1e-3) and rows[2][6] == "0.5"
  assert [r[7] for r in rows[1:]] == ["1", "1", "4", "4", "16", "16"]
  md = open(root / "g" / "table.md").read()
  assert "| n=16__mode=step | 16 | step | 32.5 |" in md
  with open(root / "g" / "grid.png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert json.load(open(root / "g" / "summary.json"))["rows"][0]["value"] == 1.5


def test_crash_and_restart_runs_only_missing_cells(toy):
  root, base = toy
  os.makedirs(root / "g")
  (root / "g" / "crash").write_text("n=4__mode=step")  # the toy job dies in this cell while the file exists
  with pytest.raises(RuntimeError, match="simulated crash"):
    jobs.run(_config(root / "g", base))
  assert _calls(root / "g") == ["n=1__mode=outcome", "n=1__mode=step", "n=4__mode=outcome", "n=4__mode=step"]
  assert not os.path.exists(root / "g" / "table.csv")
  os.remove(root / "g" / "crash")
  os.remove(root / "g" / _CALLS)
  summary = jobs.run(_config(root / "g", base))
  assert _calls(root / "g") == ["n=4__mode=step", "n=16__mode=outcome", "n=16__mode=step"]
  assert summary["ran"] == _calls(root / "g") and len(_table(root / "g")) == 7
  # Finished: a third run runs nothing and rewrites the same table.
  os.remove(root / "g" / _CALLS)
  before = _table(root / "g")
  assert jobs.run(_config(root / "g", base))["ran"] == []
  assert _calls(root / "g") == [] and _table(root / "g") == before


def test_metric_absent_in_some_cells_is_blank(toy):
  root, base = toy
  metrics = (("value", "result.value"), ("step_only", "result.by_step"), ("late", "nope.jsonl:x"))
  cells = grid_lib.product({"mode": ("outcome", "step")})
  with pytest.raises(grid_lib.MetricMissing, match=r"nope.jsonl does not exist"):  # absent everywhere: a typo
    jobs.run(_config(root / "g", base, cells=cells, metrics=metrics))
  summary = jobs.run(_config(root / "g", base, cells=cells, metrics=metrics[:2], mode="collect"))
  assert [r["step_only"] for r in summary["rows"]] == [None, 20.0]
  assert summary["missing"] == {"step_only": ["mode=outcome"]}
  assert _table(root / "g")[1:] == [["mode=outcome", "outcome", "1", ""], ["mode=step", "step", "2", "20"]]


def test_cell_started_under_another_config_is_refused(toy):
  root, base = toy
  cells = [{"labels": {"n": 4}, "overrides": {"model.n": 4, "scale": 1.0}}]
  metrics = (("value", "result.value"),)
  jobs.run(_config(root / "g", base, cells=cells, metrics=metrics))
  cells[0]["overrides"]["scale"] = 2.0
  with pytest.raises(ValueError, match=r"n=4/grid_cell.json: .*scale: 1.0 -> 2.0.*delete .*n=4"):
    jobs.run(_config(root / "g", base, cells=cells, metrics=metrics))
  with pytest.raises(ValueError, match=r"scale: 1.0 -> 2.0"):
    jobs.run(_config(root / "g", base, cells=cells, metrics=metrics, mode="collect"))


def test_two_workers_make_the_same_table_as_one(toy):
  root, base = toy
  jobs.run(_config(root / "one", base))
  s0 = jobs.run(_config(root / "two", base, worker=0, num_workers=2))
  # Worker 0 ran cells 0, 2, 4 and cannot write the table yet.
  assert s0["ran"] == ["n=1__mode=outcome", "n=4__mode=outcome", "n=16__mode=outcome"]
  assert len(s0["pending"]) == 3 and not os.path.exists(root / "two" / "table.csv")
  with pytest.raises(RuntimeError, match="3 cell\\(s\\) not finished"):
    jobs.run(_config(root / "two", base, mode="collect"))
  s1 = jobs.run(_config(root / "two", base, worker=1, num_workers=2))
  assert s1["ran"] == ["n=1__mode=step", "n=4__mode=step", "n=16__mode=step"] and s1["pending"] == []
  assert _table(root / "two") == _table(root / "one")
  os.remove(root / "two" / "table.csv")
  jobs.run(_config(root / "two", base, mode="collect"))
  assert _table(root / "two") == _table(root / "one")


def test_bad_override_key_names_it(toy):
  root, base = toy
  with pytest.raises(KeyError, match=r"cell 1 .*override 'model.nn': model has no field 'nn'"):
    jobs.run(_config(root / "g", base, cells=[{"model.n": 2}, {"model.nn": 3}]))
  with pytest.raises(KeyError, match=r"override 'nope.x': <top level> has no field 'nope'"):
    jobs.run(_config(root / "g", base, cells=[{"nope.x": 3}]))
  with pytest.raises(TypeError, match=r"override 'model.n' = 'four'"):
    jobs.run(_config(root / "g", base, cells=[{"model.n": "four"}]))
  assert not os.path.exists(root / "g" / "cells")  # validated before any cell ran
  with pytest.raises(KeyError, match=r"placeholder \{variant\} is not an axis of cell n=2"):
    jobs.run(_config(root / "h", base, cells=[{"model.n": 2}], metrics=(("x", "result.by_{variant}"),)))
  assert not os.path.exists(root / "h" / "cells")
  with pytest.raises(grid_lib.MetricMissing,
                     match=r"metric 'result.nope'.* has no 'result.nope'.*keys \['by_outcome', 'value'\]"):
    jobs.run(_config(root / "g", base, cells=[{"model.n": 2}], metrics=(("x", "result.nope"),)))
  with pytest.raises(ValueError, match="same labels"):
    grid_lib.Grid(_config(root / "i", base, cells=[{"model.n": 2}, {"model.n": 2}]))
  with pytest.raises(ValueError, match=r"columns \['mode'\] clash"):
    grid_lib.Grid(_config(root / "i", base, metrics=(("mode", "result.value"),)))
  with pytest.raises(KeyError, match="plot.x='N' is not an axis"):
    grid_lib.Grid(_config(root / "i", base, plot_x="N"))
  with pytest.raises(ValueError, match="worker=2, config.num_workers=2"):
    grid_lib.Grid(_config(root / "i", base, worker=2, num_workers=2))


def test_overrides_and_names():
  cfg = ConfigDict({"a": {"b": 1, "t": (1, 2)}, "f": 0.5})
  cfg.lock()
  grid_lib.apply_overrides(cfg, {"a.b": 3, "a.t": [4], "f": 2})
  assert cfg.a.b == 3 and cfg.a.t == (4,) and cfg.f == 2.0
  assert grid_lib.cell_name({"verify.num_verifications": 4, "variants": ("x", "y/z")}) == \
      "num_verifications=4__variants=x+y_z"
  long = grid_lib.cell_name({"k": "v" * 300})
  assert len(long) <= 96 and long != grid_lib.cell_name({"k": "v" * 301})
  with pytest.raises(ValueError, match="another axis also sets"):
    grid_lib.product({"x": {"p": {"a.b": 1}}, "y": {"q": {"a.b": 2}}})


def test_grid_config_file_loads_and_validates():
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from configs import grid as grid_configs
  for name in grid_configs.GRIDS:
    config = grid_configs.get_config(name)
    g = grid_lib.Grid(config)  # loads the base config and applies every cell's overrides
    assert len(g.cells) >= 2 and len({c["dir"] for c in g.cells}) == len(g.cells)
  world = grid_lib.Grid(grid_configs.get_config("world_n_x_aggregation"))
  assert [c["name"] for c in world.cells] == [f"N={n}__aggregation={a}" for n in (1, 4, 16)
                                              for a in ("outcome", "step")]
  assert world.cells[5]["config"].quick_settings.stage1.num_verifications == 16
  with pytest.raises(ValueError, match="is not a grid"):
    grid_configs.get_config("nope")


# ------------------------------------------------------------------------------------------------ plots

_PNG = b"\x89PNG\r\n\x1a\n"


def _is_png(path):
  with open(path, "rb") as f:
    return f.read(8) == _PNG and os.path.getsize(path) > 1000


def test_plot_helpers_write_pngs(tmp_path):
  from spark_jax import plots
  acc = {"step": ([1, 4, 16], [0.7, 0.8, 0.9]), "outcome": ([1, 4, 16], [0.7, 0.75, None])}
  assert _is_png(plots.line_plot(str(tmp_path / "a" / "acc_vs_n.png"), acc, xlabel="N", ylabel="accuracy"))
  assert _is_png(plots.line_plot(str(tmp_path / "cat.png"), {"x": (["prm", "orm"], [1.0, 2.0])}))
  assert _is_png(plots.bar_chart(str(tmp_path / "f1.png"), {"single": 31.0, "step_consistency": 44.5, "none": None},
                                 ylabel="F1"))
  grouped = {"gsm8k": {"prm": 40.0, "prm_cot": 45.0}, "math": {"prm": 30.0, "prm_cot": 33.0}}
  assert _is_png(plots.bar_chart(str(tmp_path / "f1_split.png"), grouped, ylabel="F1"))
  log = tmp_path / "metrics.jsonl"
  log.write_text("\n".join(json.dumps(r) for r in [{"step": 1, "reward": 0.1}, {"step": 2, "reward": 0.3},
                                                    {"step": 2, "eval_acc": 0.4}, {"step": 4, "reward": 0.5}]))
  series = plots.read_metrics_jsonl(str(log), ["reward", "eval_acc"])
  assert series == {"reward": ([1, 2, 4], [0.1, 0.3, 0.5]), "eval_acc": ([2], [0.4])}
  runs = {"reward": {"rlvr": series["reward"], "random": ([1, 2, 4], [0.0, 0.1, 0.0])},
          "accuracy": {"rlvr": ([0, 10], [0.2, 0.5]), "random": ([0, 10], [0.2, 0.21])}}
  assert _is_png(plots.curves(str(tmp_path / "rl.png"), runs))
  assert sorted(os.listdir(tmp_path)) == ["a", "cat.png", "f1.png", "f1_split.png", "metrics.jsonl", "rl.png"]


def test_plot_helpers_reject_bad_input(tmp_path):
  from spark_jax import plots
  with pytest.raises(ValueError, match="series 'a': 2 x values but 1 y values"):
    plots.line_plot(str(tmp_path / "x.png"), {"a": ([1, 2], [0.5])})
  with pytest.raises(TypeError, match="series 'a': y values must be numbers"):
    plots.line_plot(str(tmp_path / "x.png"), {"a": ([1], ["high"])})
  with pytest.raises(ValueError, match="no series"):
    plots.line_plot(str(tmp_path / "x.png"), {})
  with pytest.raises(TypeError, match="mix of plain and grouped"):
    plots.bar_chart(str(tmp_path / "x.png"), {"a": 1.0, "b": {"c": 2.0}})
  with pytest.raises(TypeError, match="group '' has non-numeric values \\{'a': 'x'\\}"):
    plots.bar_chart(str(tmp_path / "x.png"), {"a": "x"})
  assert not os.path.exists(tmp_path / "x.png")  # nothing half-written


def test_cli_runs_the_smoke_grid_with_two_workers(tmp_path):
  """`python -m spark_jax.main --config=configs/grid.py:smoke` as two workers on one workdir, then `collect`."""
  import subprocess
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")

  def main(*extra):
    result = subprocess.run([sys.executable, "-m", "spark_jax.main", "--config=configs/grid.py:smoke",
                             f"--config.workdir={tmp_path}", *extra], cwd=repo, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result

  first = main("--config.worker=0", "--config.num_workers=2")
  assert "still to run by worker(s) [1]" in first.stdout  # one cell each and not os.path.exists(tmp_path / "table.csv")
  main("--config.worker=1", "--config.num_workers=2")
  rows = _table(tmp_path)
  assert rows[0] == ["cell", "model.name", "prompt_tokens", "prompt_perplexity", "finish_reason"]
  assert [r[:3] for r in rows[1:]] == [["name=tiny-llama", "tiny-llama", "51"], ["name=tiny-qwen2", "tiny-qwen2", "51"]]
  # Random weights: a perplexity well above 1, different per model (each cell ran its own model).
  assert all(float(r[3]) > 10 for r in rows[1:]) and rows[1][3] != rows[2][3]
  os.remove(tmp_path / "table.csv")
  assert "csv -> " in main("--config.mode=collect").stdout and _table(tmp_path) == rows
  assert _is_png(tmp_path / "grid.png")
