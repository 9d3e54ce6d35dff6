"""The prepared accelerator check (benchmarks/device_check.sh) runs end to end at tiny shapes on this machine.

No accelerator is lent to CI, so the GPU scripts would otherwise only ever run on the day one is, and a broken
script would cost that day's device time: this runs every part with `--smoke` and checks the numbers it
writes, not just the exit status.
"""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_device_check_runs_every_part_at_tiny_shapes(tmp_path):
  env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  proc = subprocess.run(["bash", os.path.join(REPO, "benchmarks", "device_check.sh"), "--smoke"], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
  assert "device check: 0 part(s) failed" in proc.stdout

  rows = json.loads((tmp_path / "sampling.json").read_text())["rows"]
  by_batch = {r["batch"]: r for r in rows}
  assert set(by_batch) == {1, 4}
  assert all(r["ours_tok_s"] > 0 for r in rows)
  assert "decode_step_ms" in by_batch[1], ("batch 1 has no decode step time (the 64-token call was not slower "
                                           "than the 1-token one)", by_batch[1])
  assert by_batch[1]["roofline"] > 0  # batch 1: the roofline column
  assert by_batch[4]["hf_tok_s"] > 0 and by_batch[4]["ratio"] > 0  # HF generate ran at the HF batch

  mixed = (tmp_path / "mixed.txt").read_text()
  for engine in ("continuous", "static", "hf"):
    line = next((ln for ln in mixed.splitlines() if ln.strip().startswith(f"{engine} |")), None)
    assert line is not None, mixed
    assert float(line.split("|")[1]) > 0, line  # useful tokens/s

  rl = json.loads((tmp_path / "rl_step.json").read_text())
  assert rl["micro_batch"] == 4 and rl["prompts"] * rl["group"] == 16
  for key in ("rollout_s", "update_s", "step_s", "tokens_per_s_per_device"):
    assert rl[key] > 0, (key, rl)
  # every row went to the PRM (prm_all_rows) with a packed prompt; reward_s is a difference of two timed
  # programs, too noisy at these shapes to assert on
  assert rl["prm_prompt_len"] > 0
