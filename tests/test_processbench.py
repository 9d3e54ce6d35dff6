"""ProcessBench: data integrity, loader, D8 rendering, critic protocol, voting and the F1 metric."""

from __future__ import annotations

import hashlib
import json
import pathlib

import pytest

from spark_jax.io import DATA_DIR
from spark_jax.evals import processbench as pb

DATA = DATA_DIR / "processbench"


def _check_sha256sums(folder: pathlib.Path) -> None:
  """Every data file in `folder` is listed in SHA256SUMS and matches it."""
  listed = {}
  for line in (folder / "SHA256SUMS").read_text().splitlines():
    digest, name = line.split(maxsplit=1)
    listed[name.lstrip("*")] = digest
  data_files = {p.name for p in folder.iterdir() if p.name not in ("README.md", "SHA256SUMS")}
  assert data_files == set(listed), f"{folder}: files {sorted(data_files)} vs SHA256SUMS {sorted(listed)}"
  for name, digest in listed.items():
    actual = hashlib.sha256((folder / name).read_bytes()).hexdigest()
    assert actual == digest, f"{folder / name}: sha256 {actual} != {digest} in SHA256SUMS"


def test_processbench_checksums():
  _check_sha256sums(DATA)
  assert (DATA / "README.md").read_text().count("ee5ae00f2d32205df00655cf9ebbc3caddce0646") == 1


@pytest.fixture(scope="module")
def rows():
  return pb.load_processbench()


def test_loader_counts_and_labels(rows):
  by_split = {s: [r for r in rows if r["split"] == s] for s in pb.SPLITS}
  assert {s: len(v) for s, v in by_split.items()} == {"gsm8k": 400, "math": 1000, "olympiadbench": 1000,
                                                      "omnimath": 1000}
  # Counts of all-correct cases from the data README (= the ProcessBench paper).
  assert {s: sum(r["label"] == -1 for r in v) for s, v in by_split.items()} == {
      "gsm8k": 193, "math": 406, "olympiadbench": 339, "omnimath": 241}
  assert len({r["id"] for r in rows}) == 3400
  for r in rows:
    assert -1 <= r["label"] < len(r["steps"])
    assert r["problem"] and r["steps"] and all(isinstance(s, str) for s in r["steps"])
    assert r["id"].startswith(r["split"] + "-")


def test_loader_splits_limit_and_cwd_independence(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # The default root resolves against the repository, not the cwd.
  small = pb.load_processbench(splits=["math", "gsm8k"], limit=3)
  assert [r["split"] for r in small] == ["math"] * 3 + ["gsm8k"] * 3
  assert pb.load_processbench(root=DATA, splits=["gsm8k"], limit=0) == []
  with pytest.raises(ValueError, match="unknown ProcessBench split"):
    pb.load_processbench(splits=["gsm8k", "aime"])


def test_loader_errors_name_file_row_and_key(tmp_path):
  good = json.loads((DATA / "gsm8k.json").read_text())[:3]
  bad = [dict(r) for r in good]
  bad[2]["label"] = len(bad[2]["steps"])
  (tmp_path / "gsm8k.json").write_text(json.dumps(bad))
  with pytest.raises(ValueError, match=r"gsm8k\.json: row 2 \(id 'gsm8k-2'\): key 'label' = \d+ is out of range"):
    pb.load_processbench(root=tmp_path, splits=["gsm8k"])
  del bad[2]["label"]
  bad[1]["steps"] = []
  (tmp_path / "gsm8k.json").write_text(json.dumps(bad))
  with pytest.raises(ValueError, match=r"row 1 .*key 'steps'"):
    pb.load_processbench(root=tmp_path, splits=["gsm8k"])
  with pytest.raises(FileNotFoundError, match=r"math\.json does not exist"):
    pb.load_processbench(root=tmp_path, splits=["math"])


def test_render_steps():
  assert pb.render_steps(["a = 1.", "  So b = 2.\n"]) == "Step 1: a = 1.\n\nStep 2: So b = 2."
  with pytest.raises(ValueError):
    pb.render_steps([])


@pytest.mark.parametrize("verdicts, num_steps, expected", [
    ([True, True, True], 3, -1),
    ([True, False, True], 3, 1),
    ([False], 3, 0),  # Shorter, but the earliest error is determined.
    ([True, True], 3, None),  # Shorter and all correct: the unjudged step might be wrong.
    ([True, True, True, False], 3, -1),  # Verdicts past the last step are ignored.
    ([True, None, False], 3, None),  # Unparsed verdict before any error.
    ([True, False, None], 3, 1),
    ([], 3, None),
    (None, 3, None),
])
def test_prediction_from_verdicts(verdicts, num_steps, expected):
  assert pb.prediction_from_verdicts(verdicts, num_steps) == expected


def test_critic_prompt_tags_paragraphs_from_zero():
  prompt = pb.critic_prompt("What is 1+1?", ["1+1=3.", "So the answer is 3."])
  assert "<paragraph_0>\n1+1=3.\n</paragraph_0>\n\n<paragraph_1>\nSo the answer is 3.\n</paragraph_1>" in prompt
  assert "What is 1+1?" in prompt and "-1" in prompt and "\\boxed{}" in prompt
  assert "paragraph_2" not in prompt


@pytest.mark.parametrize("text, num_steps, expected", [
    ("The first error is in paragraph 3. \\boxed{3}", None, 3),
    ("All fine. $\\boxed{-1}$", None, -1),
    ("\\boxed{1} wait, no: \\boxed{2}", None, 2),
    ("\\boxed{\\text{4}}", None, 4),
    ("\\boxed{paragraph_4}", None, 4),
    ("<think>maybe \\boxed{1}</think>Final: \\boxed{0}", None, 0),
    ("<think>maybe \\boxed{1}</think>I am not sure.", None, None),
    ("\\boxed{two}", None, None),
    ("no box at all", None, None),
    ("\\boxed{5}", 3, None),  # Out of range for 3 steps.
    ("\\boxed{-2}", 3, None),
    ("\\boxed{2}", 3, 2),
    ("", None, None),
])
def test_parse_critic_output(text, num_steps, expected):
  assert pb.parse_critic_output(text, num_steps=num_steps) == expected


@pytest.mark.parametrize("preds, expected", [
    ([1, 1, 2], 1),
    ([2, 1], 2),  # Tie: first in sampling order.
    ([None, None, 3], 3),  # Unparsed samples do not vote.
    ([None, None], None),
    ([], None),
    ([-1, 0, -1, 0, 0], 0),
])
def test_vote(preds, expected):
  assert pb.vote(preds) == expected


def _ex(split, labels):
  return [{"id": f"{split}-{i}", "split": split, "label": lab} for i, lab in enumerate(labels)]


def test_f1_hand_computed():
  examples = (
      _ex("math", [-1, -1, 2, 0, 1])  # correct 1/2, error 2/3, one parse failure
      + _ex("gsm8k", [-1, 3])  # all predictions right
      + _ex("omnimath", [-1, 1])  # both accuracies 0 -> F1 0
      + _ex("olympiadbench", [-1, -1])  # only all-correct cases: acc_error undefined
  )
  preds = [-1, 0, 2, None, 1] + [-1, 3] + [0, None] + [-1, 0]
  s = pb.f1_scores(examples, preds)
  assert list(s) == ["gsm8k", "math", "olympiadbench", "omnimath", "average"]
  m = s["math"]
  assert m["acc_correct"] == pytest.approx(50.0)
  assert m["acc_error"] == pytest.approx(200 / 3)
  assert m["f1"] == pytest.approx(2 * 50 * (200 / 3) / (50 + 200 / 3))  # 57.142857...
  assert m["f1"] == pytest.approx(400 / 7)
  assert (m["n"], m["n_error"], m["n_correct"], m["n_parse_failures"]) == (5, 3, 2, 1)
  assert m["parse_failure_rate"] == pytest.approx(20.0)
  assert s["gsm8k"]["f1"] == pytest.approx(100.0) and s["gsm8k"]["parse_failure_rate"] == 0.0
  assert s["omnimath"]["f1"] == 0.0 and s["omnimath"]["parse_failure_rate"] == pytest.approx(50.0)
  o = s["olympiadbench"]
  assert o["acc_error"] is None and o["f1"] is None and o["acc_correct"] == pytest.approx(50.0)
  avg = s["average"]
  assert avg["f1"] == pytest.approx((400 / 7 + 100 + 0) / 3)
  assert avg["n_splits_f1"] == 3
  assert avg["acc_correct"] == pytest.approx((50 + 100 + 50 + 0) / 4)
  assert avg["n"] == 11 and avg["n_parse_failures"] == 2
  table = pb.markdown_table(s)
  assert "| MATH | 66.7 | 50.0 | 57.1 | 5 (3 / 2) | 20.0% |" in table
  assert "| OlympiadBench | n/a | 50.0 | n/a |" in table
  assert table.strip().splitlines()[-1].startswith("| **Average** |")
  json.dumps(s)  # JSON-serialisable (no NaN).


def test_f1_accepts_id_mapping_and_checks_inputs():
  examples = _ex("gsm8k", [-1, 0])
  assert pb.f1_scores(examples, {"gsm8k-0": -1, "gsm8k-1": 0})["gsm8k"]["f1"] == 100.0
  with pytest.raises(ValueError, match="no entry for 1 example"):
    pb.f1_scores(examples, {"gsm8k-0": -1})
  with pytest.raises(ValueError, match="2 examples but 1 predictions"):
    pb.f1_scores(examples, [-1])
  with pytest.raises(ValueError, match="not an int or None"):
    pb.f1_scores(examples, [-1, "0"])


def test_f1_on_real_data_trivial_predictors(rows):
  # "Always -1" gets every all-correct case and no error case: F1 = 0 on every split.
  s = pb.f1_scores(rows, [-1] * len(rows))
  assert all(s[sp]["acc_correct"] == 100.0 and s[sp]["f1"] == 0.0 for sp in pb.SPLITS)
  # The oracle gets 100.
  assert pb.f1_scores(rows, [r["label"] for r in rows])["average"]["f1"] == pytest.approx(100.0)


def test_prm_mode_sends_the_piecewise_prompt_ids(tmp_path, monkeypatch):
  """The PRM is asked with the ids it was trained on (text/rm_ids.rm_prompt_ids), not the whole string's."""
  from configs.processbench import get_config
  from spark_jax.evals import processbench_job
  from spark_jax.text.rm_ids import rm_prompt_ids
  from spark_jax.sampling import chat
  from spark_jax.text.rm import rm_prompt
  from spark_jax.tokenizer_qwen import load_qwen2_tokenizer

  qwen = load_qwen2_tokenizer()
  sent = []

  class Model:  # no `sample`: the prm mode must not go through the user-message path
    tokenizer = qwen

    def sample_ids(self, prompts, **settings):
      sent.extend(prompts)
      return [[chat.Completion("Step 1: Correct\n**Verification: Is the answer correct (Yes/No)? Yes**", 12, "stop")]
              for _ in prompts]

  monkeypatch.setattr(chat.ChatModel, "load", classmethod(lambda cls, *args, **kwargs: Model()))
  config = get_config()
  config.workdir, config.splits, config.limit, config.format = str(tmp_path), ("gsm8k",), 2, "think_prm"
  summary = processbench_job.run_processbench(config)
  cases = processbench_job._limited(pb.load_processbench(splits=["gsm8k"]), 2)
  expected = [rm_prompt_ids(qwen, "think_prm", c["problem"], pb.render_steps(c["steps"])) for c in cases]
  assert summary["cases"] == 2 and sent == expected
  whole = qwen.apply_chat_template([{"role": "user", "content": rm_prompt("think_prm", cases[0]["problem"],
                                                                          pb.render_steps(cases[0]["steps"]))}])
  assert sent[0] != whole and qwen.decode(sent[0]) == qwen.decode(whole)
