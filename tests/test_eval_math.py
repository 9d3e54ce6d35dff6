"""The eval_math job: scores from scripted answers (known rates), resume, settings guard, and a tiny real model."""

import json
import os
import re
import sys

import jax
import numpy as np
import pytest

from spark_jax import jobs, models
from spark_jax.evals import math_benchmarks, math_eval
from spark_jax.sampling.chat import Completion

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from configs import eval_math as eval_math_config  # noqa: E402


def _config(workdir, **overrides):
  config = eval_math_config.get_config()
  config.workdir = str(workdir)
  config.limit = 4
  config.shard_size = 6
  config.grading_workers = 0  # in-process grading: a worker's start-up (sympy) would dominate these tests
  for key, value in overrides.items():
    config[key] = value
  return config


class ScriptedModel:
  """Answers by the problem's global index: greedy is right for even indices; sample j is right iff j < index % 4.

  With 4 problems per benchmark (indices 4b..4b+3) every benchmark gets pass@1 = 50%, avg@4 = (0+1+2+3)/16 =
  37.5% and pass@4 = 75%. Every third response is cut by the token budget (finish_reason "length").
  """

  def __init__(self, items, fail_on_call=None):
    self.by_index = {it["_index"]: it for it in items}
    self.calls, self.fail_on_call, self.messages = 0, fail_on_call, []

  def sample(self, user_messages, *, num_samples=1, temperature=0.0, top_p=1.0, max_new_tokens=512, seed=0,
             prompt_indices=None, enable_thinking=None):
    self.calls += 1
    if self.fail_on_call == self.calls:
      raise RuntimeError("simulated preemption")
    self.messages.extend(user_messages)
    out = []
    for message, index in zip(user_messages, prompt_indices):
      item = self.by_index[index]
      assert item["problem"] in message  # the prompt carries the problem, in the order given
      per = []
      for j in range(num_samples):
        right = index % 2 == 0 if temperature == 0.0 else j < index % 4
        answer = item["answer"] if right else "-987654321"
        text = f"<think><step>Work.</step></think><answer>\\boxed{{{answer}}}</answer>"
        if index % 5 == 4:  # text after </answer> breaks the format gate, not the grade
          text += " Done."
        per.append(Completion(text, 10 + j, "length" if (index + j) % 3 == 0 else "stop"))
      out.append(per)
    return out


def _items(config):
  return math_eval.load_items(config)


def test_scores_follow_the_scripted_answers(tmp_path):
  config = _config(tmp_path / "e", grading_workers=1)  # the job's default path: a worker pool
  model = ScriptedModel(_items(config))
  summary = math_eval.run_eval_math(config, model=model)
  scores = json.load(open(tmp_path / "e" / "scores.json"))
  assert list(scores) == list(math_benchmarks.BENCHMARKS) + ["average"]
  for name in math_benchmarks.BENCHMARKS:
    assert scores[name]["n"] == 4
    assert scores[name]["pass@1"] == 50.0
    assert scores[name]["avg@4"] == 37.5
    assert scores[name]["pass@4"] == 75.0
  assert scores["average"]["n"] == 24 and scores["average"]["pass@1"] == 50.0
  # Truncation: over the 24 problems x (1 greedy + 4 samples), (index + j) % 3 == 0 marks a response.
  expected = sum((i % 3 == 0) + sum((i + j) % 3 == 0 for j in range(4)) for i in range(24)) / (24 * 5) * 100
  assert scores["average"]["truncated"] == pytest.approx(expected)
  table = open(tmp_path / "e" / "table.md").read().splitlines()
  # The format gate: problems with index % 5 == 4 append text after </answer> (4 of the 24 problems).
  assert [scores[b]["format_ok"] for b in math_benchmarks.BENCHMARKS] == [100.0, 75.0, 75.0, 75.0, 75.0, 100.0]
  assert scores["average"]["format_ok"] == pytest.approx(100 * 20 / 24)
  assert table[0] == "| benchmark | n | pass@1 (%) | avg@4 (%) | pass@4 (%) | format_ok (%) | truncated (%) |"
  assert table[2].startswith("| math500 | 4 | 50.0 | 37.5 | 75.0 |") and table[-1].startswith("| **average** | 24 |")
  assert summary["average"]["avg@4"] == 37.5 and summary["problems"] == 24
  # The policy prompt by default: the step-tagged format is requested.
  assert all("<step>" in m and "<answer>" in m for m in model.messages)
  records = [json.loads(line) for f in sorted(os.listdir(tmp_path / "e")) if f.startswith("predictions-")
             for line in open(tmp_path / "e" / f)]
  assert len(records) == 24 and records[0]["samples"][0]["extracted"] == "-987654321"
  assert records[0]["greedy"]["correct"] and not records[1]["greedy"]["correct"]


def test_generator_template_and_greedy_only(tmp_path):
  config = _config(tmp_path / "e", prompt_template="generator", num_samples=0, benchmarks=("aime24", "amc23"))
  model = ScriptedModel(_items(config))
  scores = math_eval.run_eval_math(config, model=model)["scores"]
  assert list(scores) == ["aime24", "amc23", "average"] and list(scores["average"]) == ["n", "pass@1", "truncated"]
  assert all("Answer:" in m and "<step>" not in m for m in model.messages)


def test_samples_only(tmp_path):
  config = _config(tmp_path / "e", greedy=False, num_samples=4, benchmarks=("math500",))
  model = ScriptedModel(_items(config))
  scores = math_eval.run_eval_math(config, model=model)["scores"]
  assert list(scores["average"]) == ["n", "avg@4", "pass@4", "format_ok", "truncated"] and model.calls == 1
  assert scores["math500"]["avg@4"] == 37.5 and scores["math500"]["pass@4"] == 75.0


def test_resume_after_a_crash_runs_only_missing_shards(tmp_path):
  config = _config(tmp_path / "e")
  items = _items(config)
  with pytest.raises(RuntimeError, match="simulated preemption"):
    math_eval.run_eval_math(config, model=ScriptedModel(items, fail_on_call=5))  # 2 calls per shard of 6
  done = [f for f in os.listdir(tmp_path / "e") if f.startswith("predictions-") and f.endswith(".jsonl")]
  assert len(done) == 2
  model = ScriptedModel(items)
  summary = math_eval.run_eval_math(config, model=model)
  assert summary["shards_run"] == 2 and model.calls == 4 and summary["average"]["pass@1"] == 50.0
  again = ScriptedModel(items)
  assert math_eval.run_eval_math(config, model=again)["shards_run"] == 0 and again.calls == 0
  with pytest.raises(ValueError, match=r"other settings \(num_samples: 4 -> 2\)"):
    math_eval.run_eval_math(_config(tmp_path / "e", num_samples=2), model=again)


def test_bad_settings_are_named(tmp_path):
  with pytest.raises(ValueError, match=r"unknown \['aime2024'\]"):
    math_eval.run_eval_math(_config(tmp_path / "a", benchmarks=("aime2024",)), model=None)
  with pytest.raises(ValueError, match="prompt_template='chat'"):
    math_eval.run_eval_math(_config(tmp_path / "b", prompt_template="chat"), model=None)
  with pytest.raises(ValueError, match="greedy=False, config.num_samples=0"):
    math_eval.run_eval_math(_config(tmp_path / "c", greedy=False, num_samples=0), model=None)
  with pytest.raises(ValueError, match="temperature=0.0"):
    math_eval.run_eval_math(_config(tmp_path / "d", temperature=0.0), model=None)


def test_tiny_random_model_end_to_end(tmp_path):
  """The registered job on a real (random) checkpoint: the table's structure, not its (near-zero) scores."""
  # The world's 512-id tokenizer: a 152k-row embedding would make this test a minute longer on CPU.
  from spark_jax.world.tokenizer import build_tokenizer, vocab_size_needed
  tokenizer_dir = build_tokenizer(str(tmp_path / "tok"))
  cfg = models.get_preset("tiny-qwen2").replace(vocab_size=vocab_size_needed(tokenizer_dir),
                                                max_position_embeddings=4096)
  rng = np.random.default_rng(0)  # numpy init: jax.random per leaf compiles slowly on CPU
  params = jax.tree.map(lambda a: (rng.normal(size=a.shape) * 0.05).astype(np.float32), models.abstract_params(cfg))
  model_dir = models.save_pretrained(cfg, params, str(tmp_path / "model"), tokenizer_dir=str(tokenizer_dir))
  # Two benchmarks with short problems keep prefill small; the other loaders are covered above.
  config = _config(tmp_path / "e", limit=2, num_samples=2, max_new_tokens=4, top_p=1.0, max_batch_rows=8,
                   benchmarks=("aime24", "amc23"), shard_size=4)
  config.model.name = str(model_dir)
  config.model.init = "pretrained"
  summary = jobs.run(config)
  scores = summary["scores"]
  assert list(scores) == ["aime24", "amc23", "average"]
  assert scores["aime24"]["n"] == scores["amc23"]["n"] == 2 and scores["average"]["n"] == 4
  assert set(scores["average"]) == {"n", "pass@1", "avg@2", "pass@2", "format_ok", "truncated"}
  # 4 new tokens cannot end a chat turn on random weights unless the end-of-turn token is drawn.
  assert scores["average"]["truncated"] > 50.0
  records = [json.loads(line) for f in sorted(os.listdir(tmp_path / "e")) if re.match(r"predictions-.*\.jsonl$", f)
             for line in open(tmp_path / "e" / f)]
  assert len(records) == 4 and all(len(r["samples"]) == 2 and r["greedy"]["num_tokens"] <= 4 for r in records)
