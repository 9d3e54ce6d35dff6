"""Stage I job shells with a scripted fake chat model: curation modes, critic/merger wiring, upstream checks.

The fake answers by prompt kind (generator, verifier, critic, merger) and records every call, so that the
tests can check what each model saw. Real sampling is covered by tests/test_stage1_determinism.py and the
CLI end-to-end test.
"""

from __future__ import annotations

import json
import os
import re

import pytest

from configs.stage1 import stage1_config
from spark_jax.sampling.chat import Completion
from spark_jax.stage1 import curation, jobs
from spark_jax.text import verdicts as parsing

C, I = "**This step is correct.**", "**This step is incorrect.**"

# Problem k asks for 2k. Solution j of problem k is right when (k + j) is even, except that every solution
# of problem 0 is right (so `reference` curation drops that problem).
NUM_PROBLEMS, NUM_SOLUTIONS = 4, 4


def _verification(steps, final, tag):
  blocks = [f"## Step {k}: {tag}\nchecked\n{C if ok else I}" for k, ok in enumerate(steps, start=1)]
  return (f"<think>thinking about {tag}</think>\n\n" + "\n\n".join(blocks)
          + f"\n\n**Verification: Is the answer correct (Yes/No)? {'Yes' if final else 'No'}**")


class FakeChat:
  """Scripted ChatModel stand-in; `calls` holds (kind, message, prompt index, seed) per prompt."""

  def __init__(self):
    self.calls = []

  def sample(self, messages, *, num_samples=1, seed=0, prompt_indices=None, **unused):
    assert prompt_indices is not None and len(prompt_indices) == len(messages), "jobs must pass prompt_indices"
    out = []
    for message, index in zip(messages, prompt_indices):
      kind = ("merger" if "<Critique of the Verification>" in message else
              "critic" if "<Original Verification>" in message else
              "generator" if message.startswith("Work out the following") else "verifier")
      self.calls.append((kind, message, index, seed))
      out.append([Completion(getattr(self, kind)(message, j), 7, "stop") for j in range(num_samples)])
    return out

  @staticmethod
  def generator(message, j):
    k = int(re.search(r"What is (\d+) doubled", message).group(1))
    right = k == 0 or (k + j) % 2 == 0
    return f"<think>easy</think>Step 1: double {k}.\nStep 2: write it down.\nAnswer: {2 * k if right else 2 * k + 1}"

  @staticmethod
  def verifier(message, j):
    solution = message.rsplit("Student Solution:", 1)[1]
    k = int(re.search(r"double (\d+)", solution).group(1))
    right = f"Answer: {2 * k}\n" in solution + "\n"
    # Verification 1 of every solution disagrees with the others, so the outcome selection is index 0.
    says_right = right if j != 1 else not right
    return _verification([True, says_right], says_right, tag=f"v{j}-p{k}")

  @staticmethod
  def critic(message, j):
    original = message.split("<Original Verification>\n", 1)[1].split("\n</Original Verification>", 1)[0]
    return "CRITIQUE OF " + re.search(r"v\d+-p\d+", original).group(0)

  @staticmethod
  def merger(message, j):
    critique = re.search(r"CRITIQUE OF (v\d+-p\d+)", message).group(1)
    return _verification([True, True], True, tag=f"merged-{critique}")


@pytest.fixture
def fake(monkeypatch):
  model = FakeChat()
  monkeypatch.setattr(jobs, "_chat_model", lambda config, which: model)
  return model


def _config(tmp_path, curation_mode="reference", **overrides):
  data = tmp_path / "problems.jsonl"
  with open(data, "w") as f:
    for k in range(NUM_PROBLEMS):
      f.write(json.dumps({"id": f"p{k}", "problem": f"What is {k} doubled?", "answer": str(2 * k)}) + "\n")
  config = stage1_config("stage1", "demo")
  config.workdir = str(tmp_path / "work")
  config.data = str(data)
  config.limit = 0
  config.shard_size = 3
  config.generate.num_solutions = NUM_SOLUTIONS
  config.generate.curation = curation_mode
  config.generate.curation_cap = 1
  config.verify.num_verifications = 3
  config.verify.reference_num_verifications = 2
  for key, value in overrides.items():
    section, name = key.split("__")
    config[section][name] = value
  return config


def _read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


# ------------------------------------------------------------------------------------------------ curation


def test_balance_keeps_k_of_each_label_in_sampling_order_and_counts_drops():
  problems = [
      {"problem_id": "a", "solutions": [{"id": i, "ok": ok} for i, ok in enumerate([True, False, True, False, True])]},
      {"problem_id": "b", "solutions": [{"id": i, "ok": True} for i in range(3)]},
      {"problem_id": "c", "solutions": [{"id": i, "ok": False} for i in range(2)]},
      {"problem_id": "d", "solutions": [{"id": 0, "ok": None}, {"id": 1, "ok": True}, {"id": 2, "ok": False}]},
      {"problem_id": "e", "solutions": [{"id": 0, "ok": None}]},
  ]
  kept, counts = curation.balance(problems, lambda s: s["ok"], cap=3, seed=0)
  by_problem = {}
  for s in kept:
    by_problem.setdefault(next(p["problem_id"] for p in problems if any(x is s for x in p["solutions"])), []).append(s)
  assert sorted(by_problem) == ["a", "d"]
  a = by_problem["a"]
  assert [s["ok"] for s in a].count(True) == 2 and [s["ok"] for s in a].count(False) == 2
  assert [s["id"] for s in a] == sorted(s["id"] for s in a)  # sampling order kept
  assert [s["id"] for s in by_problem["d"]] == [1, 2]
  assert counts == {"unlabelled_solutions": 2, "problems_kept": 2, "problems_dropped_all_correct": 1,
                    "problems_dropped_all_incorrect": 1, "problems_dropped_all_unlabelled": 1, "solutions_kept": 6}
  capped, _ = curation.balance(problems[:1], lambda s: s["ok"], cap=1, seed=0)
  assert sorted(s["ok"] for s in capped) == [False, True]
  # The shuffle follows the seed: same seed, same choice.
  assert curation.balance(problems, lambda s: s["ok"], cap=1, seed=5)[0] == \
      curation.balance(problems, lambda s: s["ok"], cap=1, seed=5)[0]


def test_curation_reference_balances_on_ground_truth(tmp_path, fake):
  config = _config(tmp_path, "reference")
  summary = jobs.run_generate(config)
  rows = _read_jsonl(os.path.join(config.workdir, "generate", "solutions.jsonl"))
  # Problem 0 has only right solutions and is dropped; problems 1-3 keep 1 right + 1 wrong (cap 1).
  assert sorted({r["problem_id"] for r in rows}) == ["p1", "p2", "p3"]
  for pid in ("p1", "p2", "p3"):
    assert sorted(r["is_correct"] for r in rows if r["problem_id"] == pid) == [False, True]
  assert summary["solutions_generated"] == 16 and summary["solutions_kept"] == 6
  assert summary["curation_counts"]["problems_dropped_all_correct"] == 1


def test_curation_none_keeps_every_solution(tmp_path, fake):
  config = _config(tmp_path, "none")
  summary = jobs.run_generate(config)
  rows = _read_jsonl(os.path.join(config.workdir, "generate", "solutions.jsonl"))
  assert len(rows) == summary["solutions_kept"] == NUM_PROBLEMS * NUM_SOLUTIONS
  assert [r["solution_id"] for r in rows] == [f"p{k}-s{j}" for k in range(NUM_PROBLEMS) for j in range(NUM_SOLUTIONS)]
  assert all(not r["solution"].startswith("<think>") for r in rows)  # the generator's trace is stripped


def test_curation_verifier_majority_balances_on_the_verifiers_verdict(tmp_path, fake):
  config = _config(tmp_path, "verifier_majority", verify__reference=False, critique__enabled=False)
  jobs.run_generate(config)
  assert len(_read_jsonl(os.path.join(config.workdir, "generate", "solutions.jsonl"))) == 16  # balanced later
  jobs.run_verify(config)
  summary = jobs.run_aggregate(config)
  records = _read_jsonl(os.path.join(config.workdir, "aggregate", "records.jsonl"))
  kept_ids = sorted({r["solution_id"] for r in records})
  # The verifiers' majority (2 of 3) equals the truth here; problem 0 (all "Yes") is dropped.
  assert summary["solutions"] == 6 and summary["curation_counts"]["problems_dropped_all_correct"] == 1
  assert {i.split("-")[0] for i in kept_ids} == {"p1", "p2", "p3"}
  truth = {r["solution_id"]: r["is_correct"] for r in _read_jsonl(
      os.path.join(config.workdir, "generate", "solutions.jsonl"))}
  for pid in ("p1", "p2", "p3"):
    assert sorted(truth[i] for i in kept_ids if i.startswith(pid + "-")) == [False, True]


# ------------------------------------------------------------------------------------ critic/merger wiring


def test_critique_job_wires_critic_and_merger(tmp_path, fake):
  config = _config(tmp_path, "none", verify__reference=False)
  jobs.run_generate(config)
  jobs.run_verify(config)
  fake.calls.clear()
  summary = jobs.run_critique(config)
  critic = [(m, i) for kind, m, i, _ in fake.calls if kind == "critic"]
  merger = [(m, i) for kind, m, i, _ in fake.calls if kind == "merger"]
  solutions = _read_jsonl(os.path.join(config.workdir, "generate", "solutions.jsonl"))
  # Two critic calls per solution: verification 0 (meta_critique) and the outcome selection, which is also
  # verification 0 here (verification 1 disagrees, so 0 is the first with the majority verdict).
  assert len(critic) == len(merger) == 2 * len(solutions)
  assert summary["critiqued"] == {"meta_critique": 16, "meta_critique_outcome": 16}
  for row_index, s in enumerate(solutions):
    k = int(s["problem_id"][1:])
    for variant_index, ((cm, ci), (mm, mi)) in enumerate(zip(critic[2 * row_index:2 * row_index + 2],
                                                           merger[2 * row_index:2 * row_index + 2])):
      assert s["solution"] in cm and s["solution"] in mm
      # The critic sees verification 0 without its trace; the merger sees it plus the critic's output.
      assert f"## Step 1: v0-p{k}" in cm and "thinking about" not in cm
      assert f"## Step 1: v0-p{k}" in mm and f"CRITIQUE OF v0-p{k}" in mm
      assert ci == mi == 2 * row_index + variant_index
  records = {r["solution_id"]: r for shard in sorted(os.listdir(os.path.join(config.workdir, "critique")))
             if shard.startswith("critiques-") for r in _read_jsonl(os.path.join(config.workdir, "critique", shard))}
  first = records[solutions[0]["solution_id"]]
  assert first["meta_critique"]["verification_index"] == 0
  assert first["meta_critique"]["critique"] == "CRITIQUE OF v0-p0"
  assert parsing.parse_verification(first["meta_critique"]["merged"]) == {"steps": [True, True], "final": True}


def test_critique_selection_follows_the_outcome_majority(tmp_path, fake, monkeypatch):
  # Verification 0 now disagrees with the majority, so the outcome selection is verification 1.
  def verifier(message, j):
    solution = message.rsplit("Student Solution:", 1)[1]
    k = int(re.search(r"double (\d+)", solution).group(1))
    says_right = j != 0
    return _verification([True, says_right], says_right, tag=f"v{j}-p{k}")
  monkeypatch.setattr(FakeChat, "verifier", staticmethod(verifier))
  config = _config(tmp_path, "none", verify__reference=False)
  jobs.run_generate(config)
  jobs.run_verify(config)
  fake.calls.clear()
  jobs.run_critique(config)
  critic = [m for kind, m, _, _ in fake.calls if kind == "critic"]
  assert "## Step 1: v0-p0" in critic[0] and "## Step 1: v1-p0" in critic[1]
  summary = jobs.run_aggregate(config)
  records = _read_jsonl(os.path.join(config.workdir, "aggregate", "records.jsonl"))
  outcome = [r for r in records if r["variant"] == "meta_critique_outcome"][0]
  assert outcome["kept"] and outcome["selected_index"] == 1
  assert summary["variants"]["meta_critique"]["kept_solutions"] == 16


# --------------------------------------------------------------------------------------- upstream checks


def test_jobs_name_the_upstream_job_to_rerun(tmp_path, fake):
  config = _config(tmp_path, "none", verify__reference=False)
  with pytest.raises(FileNotFoundError, match="generate job has not finished.*--config.job=generate"):
    jobs.run_verify(config)
  jobs.run_generate(config)
  with pytest.raises(FileNotFoundError, match="verify job has not finished.*--config.job=verify"):
    jobs.run_aggregate(config)
  jobs.run_verify(config)
  with pytest.raises(FileNotFoundError, match="critique job has not finished.*--config.job=critique"):
    jobs.run_aggregate(config)
  config.verify.num_verifications = 4  # settings changed after verify ran
  with pytest.raises(ValueError, match="verifications_per_solution = 3, expected 4.*rerun the verify job"):
    jobs.run_critique(config)
  config.verify.num_verifications = 3
  summary_path = os.path.join(config.workdir, "generate", "summary.json")
  with open(summary_path) as f:
    gen = json.load(f)
  with open(summary_path, "w") as f:
    json.dump({**gen, "solutions_kept": 15}, f)
  with pytest.raises(ValueError, match="16 rows but .*solutions_kept=15.*rerun the generate job"):
    jobs.run_critique(config)


def test_a_missing_critique_entry_is_an_error_not_a_drop(tmp_path, fake):
  config = _config(tmp_path, "none", verify__reference=False)
  jobs.run_generate(config)
  jobs.run_verify(config)
  jobs.run_critique(config)
  shard = os.path.join(config.workdir, "critique", sorted(
      f for f in os.listdir(os.path.join(config.workdir, "critique")) if f.startswith("critiques-"))[0])
  rows = _read_jsonl(shard)
  del rows[1]["meta_critique_outcome"]
  with open(shard, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  with pytest.raises(ValueError, match=f"solution {rows[1]['solution_id']}: the critique record has no "
                                       "meta_critique_outcome entry.*rerun the critique job"):
    jobs.run_aggregate(config)
  os.remove(shard)
  with pytest.raises(FileNotFoundError, match="not finished yet"):
    jobs.run_aggregate(config)


def test_aggregate_reads_comma_separated_names_and_refuses_unknown_ones(tmp_path, fake):
  config = _config(tmp_path, "none", verify__reference=False, critique__enabled=False)
  config.aggregate.variants = ("single,step_consistency",)  # what --config.aggregate.variants=a,b gives
  config.aggregate.formats = ("orm, prm",)
  jobs.run_generate(config)
  jobs.run_verify(config)
  summary = jobs.run_aggregate(config)
  assert list(summary["variants"]) == ["single", "step_consistency"]
  assert set(summary["variants"]["single"]["rows"]) == {"orm", "prm"}
  config.aggregate.variants = ("single,step_consistncy",)
  with pytest.raises(ValueError, match=r"config.aggregate.variants=.*unknown \['step_consistncy'\]"):
    jobs.run_aggregate(config)
  with pytest.raises(ValueError, match="unknown"):
    jobs.run_stage1(config)  # before any generation


def test_aggregate_manifest_counts_contradictions_and_step_counts(tmp_path, fake, monkeypatch):
  # Every verification of a wrong solution says: both steps correct, final No (a contradiction).
  def verifier(message, j):
    solution = message.rsplit("Student Solution:", 1)[1]
    k = int(re.search(r"double (\d+)", solution).group(1))
    right = f"Answer: {2 * k}\n" in solution + "\n"
    return _verification([True, True] + ([] if right else [True]), right, tag=f"v{j}-p{k}")
  monkeypatch.setattr(FakeChat, "verifier", staticmethod(verifier))
  config = _config(tmp_path, "reference", verify__reference=False, critique__enabled=False)
  jobs.run_generate(config)
  jobs.run_verify(config)
  summary = jobs.run_aggregate(config)
  manifest = summary["variants"]["step_consistency"]
  assert manifest["contradictions"] == {"prm": 3, "prm_cot": 3, "think_prm": 3}
  # Wrong solutions got 3 step verdicts for their 2 steps: 3 solutions x 3 verifications differ.
  assert manifest["step_count"] == {"solutions_without_step_headers": 0, "verifications_checked": 18,
                                    "verifications_differing": 9, "kept_labels_differing": 3}
  assert summary["data_quality"]["step_consistency"]["contradictions"]["prm"] == 3
  config.aggregate.contradictions = "drop"
  dropped = jobs.run_aggregate(config)["variants"]["step_consistency"]
  assert dropped["kept_solutions"] == 3 and dropped["dropped"] == {"contradiction": 3}
