"""End to end from the CLI on a tiny random model with the real Qwen2.5 tokenizer: Stage I (all jobs, all
formats, manifests), resume after SIGKILL, ProcessBench with --config.limit, and config errors."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from spark_jax import models
from spark_jax.tokenizer_qwen import build_qwen2_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_chat_model(tmp_path_factory):
  """A 2-layer Qwen2 with random weights, saved as an HF checkpoint with the real Qwen2.5 tokenizer."""
  tokenizer_dir = build_qwen2_tokenizer(str(tmp_path_factory.mktemp("qwen_tok")))
  cfg = models.get_preset("tiny-qwen2").replace(vocab_size=151936, max_position_embeddings=4096)
  out = str(tmp_path_factory.mktemp("tiny_chat"))
  return models.save_pretrained(cfg, models.init_params(cfg, seed=0), out, tokenizer_dir=str(tokenizer_dir))


def _main(args, env=None, **kw):
  cmd = [sys.executable, "-m", "spark_jax.main", *args]
  full_env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", **(env or {}))
  return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, **kw)


def _stage1_args(model_dir, workdir, *extra):
  return ["--config=configs/stage1.py:demo", f"--config.workdir={workdir}",
          f"--config.generator.name={model_dir}", f"--config.verifier.name={model_dir}",
          "--config.limit=8", "--config.shard_size=2", "--config.generate.num_solutions=2",
          "--config.verify.num_verifications=3", "--config.verify.reference_num_verifications=2",
          "--config.generate.max_new_tokens=24", "--config.verify.max_new_tokens=24",
          "--config.critique.max_new_tokens=16", "--config.generate.curation=none",
          # Nucleus filtering sorts the 152k-token vocabulary every step; the sampler's own tests cover it.
          "--config.generate.top_p=1.0", "--config.verify.top_p=1.0", *extra]


def test_stage1_end_to_end_writes_all_formats_and_manifests(tiny_chat_model, tmp_path):
  workdir = str(tmp_path / "stage1")
  result = _main(_stage1_args(tiny_chat_model, workdir), timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  assert set(summary["seconds"]) == {"generate", "verify", "verify_reference", "critique", "aggregate"}
  with open(os.path.join(workdir, "generate", "summary.json")) as f:
    gen = json.load(f)
  assert gen["problems"] == 8 and gen["solutions_generated"] == 16 and gen["solutions_kept"] == 16
  agg_dir = os.path.join(workdir, "aggregate")
  for variant in ("single", "outcome_consistency", "step_consistency", "meta_critique",
                  "meta_critique_outcome", "reference_guided"):
    with open(os.path.join(agg_dir, "datasets", variant, "manifest.json")) as f:
      manifest = json.load(f)
    assert manifest["solutions"] == 16 and manifest["problems"] == 8
    assert manifest["kept_solutions"] + sum(manifest["dropped"].values()) == 16
    for fmt in ("orm", "prm", "prm_cot", "think_prm"):
      path = os.path.join(agg_dir, "datasets", variant, f"{fmt}.jsonl")
      with open(path) as f:
        assert sum(1 for _ in f) == manifest["rows"][fmt]
  # Ground truth is present, so the data-quality table is written.
  assert os.path.exists(os.path.join(agg_dir, "data_quality.md"))
  with open(os.path.join(workdir, "verify", "summary.json")) as f:
    assert json.load(f)["verifications"] == 16 * 3


def _shards(directory):
  return sorted(f for f in os.listdir(directory) if f.startswith("solutions-") and f.endswith(".jsonl"))


def test_generate_resumes_after_sigkill_identically(tiny_chat_model, tmp_path):
  reference_dir, killed_dir = str(tmp_path / "reference"), str(tmp_path / "killed")
  args = lambda w: ["--config=configs/generate.py:demo"] + _stage1_args(tiny_chat_model, w)[1:]
  assert _main(args(reference_dir), timeout=600).returncode == 0
  cmd = [sys.executable, "-m", "spark_jax.main", *args(killed_dir)]
  proc = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=""),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  gen_dir = os.path.join(killed_dir, "generate")
  deadline = time.time() + 600
  while time.time() < deadline and proc.poll() is None:
    if os.path.isdir(gen_dir) and len(_shards(gen_dir)) >= 1:
      break
    time.sleep(0.05)
  assert proc.poll() is None, "the job finished before it could be killed; make the run longer"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  done_before = _shards(gen_dir)
  assert 1 <= len(done_before) < 4
  assert _main(args(killed_dir), timeout=600).returncode == 0
  for name in _shards(os.path.join(reference_dir, "generate")):
    with open(os.path.join(reference_dir, "generate", name)) as a, open(os.path.join(gen_dir, name)) as b:
      assert a.read() == b.read(), name
  with open(os.path.join(reference_dir, "generate", "solutions.jsonl")) as a, \
       open(os.path.join(gen_dir, "solutions.jsonl")) as b:
    rows_a, rows_b = a.read().splitlines(), b.read().splitlines()
  assert rows_a == rows_b and len(rows_b) == len({json.loads(r)["solution_id"] for r in rows_b}) == 16


def test_processbench_with_limit_writes_the_table(tiny_chat_model, tmp_path):
  workdir = str(tmp_path / "pb")
  result = _main(["--config=configs/processbench.py", f"--config.workdir={workdir}",
                  f"--config.model.name={tiny_chat_model}", "--config.limit=20", "--config.max_new_tokens=12",
                  "--config.format=prm_cot"], timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(os.path.join(workdir, "scores.json")) as f:
    scores = json.load(f)
  splits = ("gsm8k", "math", "olympiadbench", "omnimath")
  assert [scores[s]["n"] for s in splits] == [20, 20, 20, 20]
  assert [scores[s]["n_correct"] for s in splits] == [10, 10, 10, 10]  # a balanced slice: F1 is defined
  assert "average" in scores
  with open(os.path.join(workdir, "table.md")) as f:
    assert "F1" in f.read()


def test_unknown_config_key_is_named():
  result = _main(["--config=configs/stage1.py", "--config.generate.num_solution=3"], timeout=120)
  assert result.returncode != 0
  assert "num_solution" in result.stderr


def test_inspect_model_prints_summary_and_continuation(tiny_chat_model, tmp_path):
  result = _main(["--config=configs/inspect_model.py", f"--config.workdir={tmp_path}",
                  f"--config.model.name={tiny_chat_model}", "--config.max_new_tokens=6"], timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "prompt perplexity" in result.stdout and "greedy continuation (6 tokens, length)" in result.stdout
  with open(os.path.join(tmp_path, "summary.json")) as f:
    assert json.load(f)["prompt_tokens"] > 10
