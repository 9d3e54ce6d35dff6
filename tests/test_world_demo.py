"""The quick demo from the CLI: every stage runs, the report holds the numbers, a rerun skips finished stages,
and the label table keeps the identities the aggregation guarantees.

Not asserted: the paper's orderings (step-level SC above a single verification, a trained PRM's F1 well above
the untrained one's). At the quick bootstrap settings the world's tiny models learn the formats but not the
content (generator: 0% of steps right; verifier: mostly "correct" whatever the step), so those orderings do not
hold here; the report's claims table states what was measured."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _demo(workdir, *extra):
  cmd = [sys.executable, "-m", "spark_jax.main", "--config=configs/demo.py", "--config.quick=True",
         f"--config.workdir={workdir}", *extra]
  return subprocess.run(cmd, cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=""),
                        capture_output=True, text=True, timeout=1800)


def test_quick_demo_report_numbers(world, tmp_path):
  # `world` trains the bootstrap models into the shared cache first, so the demo's bootstrap stage reuses them.
  workdir = str(tmp_path / "demo")
  result = _demo(workdir)
  assert result.returncode == 0, result.stderr[-4000:]
  assert "wall time" in result.stdout and "report.md" in result.stdout
  with open(os.path.join(workdir, "report.md")) as f:
    report = f.read()
  for section in ("Bootstrap models", "Label accuracy", "ProcessBench-style F1", "claims"):
    assert section in report

  with open(os.path.join(workdir, "labels", "summary.json")) as f:
    labels = json.load(f)["table"]
  n_grid = [str(n) for n in labels["n_grid"]]
  total = labels["solutions"]
  assert total == 32 * 4 and labels["unlabelable"] <= total
  for variant in ("single", "outcome_consistency", "step_consistency"):
    for n in n_grid:
      row = labels["variants"][variant][n]
      assert row["kept"] + row["dropped"] == total - labels["unlabelable"], (variant, n, row)
      assert row["kept"] > 0 and 0.0 <= row["step_accuracy"] <= 1.0 and 0.0 <= row["outcome_accuracy"] <= 1.0
  # One verification: every aggregation is that verification, and "single" never looks past the first one.
  first = labels["variants"]["single"][n_grid[0]]
  assert labels["variants"]["step_consistency"][n_grid[0]]["step_accuracy"] == first["step_accuracy"]
  assert all(labels["variants"]["single"][n] == first for n in n_grid)

  with open(os.path.join(workdir, "processbench", "summary.json")) as f:
    scores = json.load(f)["scores"]
  # Random weights parse nothing, so the untrained PRM-CoT's F1 is ~0; the trained one's is a measured number.
  untrained = scores["random_init/prm_cot"]["f1"]
  assert untrained is not None and untrained < 5, scores
  for name in ("step_consistency/prm_cot", "single/prm_cot"):
    assert scores[name]["f1"] is not None and 0.0 <= scores[name]["f1"] <= 100.0, scores

  # A rerun finds every stage finished and only rewrites the report.
  again = _demo(workdir)
  assert again.returncode == 0, again.stderr[-3000:]
  assert again.stdout.count("already done") == 5
