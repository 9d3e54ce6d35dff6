"""Prompt tests: exact reward-model strings, required markers, worked examples, and the real problem slice."""

from __future__ import annotations

import hashlib
import json
import re

import pytest

from spark_jax.text import verdicts as parsing
from spark_jax.stage1 import prompts
from spark_jax.text import rm
from spark_jax.io import DATA_DIR

SLICE_DIR = DATA_DIR / "skywork_math_8k"
PROBLEM = r"Find $x$ if $\frac{x}{2} = {3}$."
SOLUTION = "Step 1: Multiply both sides by 2: x = 6.\nAnswer: 6"


def test_rm_prompts_exact():
  assert rm.rm_prompt("orm", "Q?", "S.") == "Problem: Q?\n\nSolution: S.\n\nIs the answer correct (Yes/No)?"
  prm = "Problem: Q?\n\nStudent Solution: S.\n\nLet's verify step by step."
  for fmt in ("prm", "prm_cot", "think_prm"):
    assert rm.rm_prompt(fmt, "Q?", "S.") == prm
  # Braces in math must survive untouched (no str.format anywhere).
  assert rm.rm_prompt("prm", PROBLEM, SOLUTION).startswith(f"Problem: {PROBLEM}\n\nStudent Solution: {SOLUTION}")
  with pytest.raises(ValueError, match="unknown reward-model format 'prm-cot'"):
    rm.rm_prompt("prm-cot", "Q", "S")


def test_marker_helpers():
  assert rm.final_verdict_line(True) == "**Verification: Is the answer correct (Yes/No)? Yes**"
  assert rm.final_verdict_line(False) == "**Verification: Is the answer correct (Yes/No)? No**"
  assert rm.step_marker(True) == "**This step is correct.**"
  assert rm.step_marker(False) == "**This step is incorrect.**"
  assert rm.prm_step_line(2, False) == "Step 2: Incorrect"
  with pytest.raises(ValueError):
    rm.prm_step_line(0, True)


def test_generator_prompt():
  text = prompts.generator_prompt(PROBLEM)
  assert f"Problem: {PROBLEM}\n" in text
  assert "(Step 1, Step 2" in text and "Answer: $ANSWER" in text and '"Answer:"' in text
  assert text.endswith("\n\nSolution:")


def test_verifier_prompt_markers_and_ending():
  text = prompts.verifier_prompt(PROBLEM, SOLUTION)
  for marker in ("## Step k: <short title>", "**This step is correct.**", "**This step is incorrect.**",
                 "**Verification: Is the answer correct (Yes/No)? X**", "no partial credit"):
    assert marker in text, marker
  assert text.endswith(f"Question: {PROBLEM}\n\nStudent Solution:\n{SOLUTION}\n\nTeacher Verification:")
  assert "Expected Answer" not in text
  assert text.count("Teacher Verification:") == 3 and text.count("Question:") == 3


def _example_verifications(text):
  """The two worked-example verifications inside a verifier prompt."""
  return re.findall(r"Teacher Verification:\n(.*?)\n\n(?:Example 2|Now grade)", text, re.DOTALL)


def test_verifier_examples_parse_to_the_intended_labels():
  examples = _example_verifications(prompts.verifier_prompt(PROBLEM, SOLUTION))
  assert len(examples) == 2
  assert parsing.parse_verification(examples[0]) == {"steps": [True, True, True], "final": True}
  # Error at step 3, propagated to steps 4 and 5.
  assert parsing.parse_verification(examples[1]) == {"steps": [True, True, False, False, False], "final": False}
  for example in examples:
    assert all(line.startswith("## Step ") for line in example.splitlines() if line.startswith("#"))


def test_reference_guided_prompt_differs_only_by_reference():
  plain = prompts.verifier_prompt(PROBLEM, SOLUTION)
  guided = prompts.verifier_prompt(PROBLEM, SOLUTION, expected_answer="6")
  assert guided.count("Expected Answer:") == 3  # two examples + the query
  assert "use the Expected Answer as a guide" in guided and "use the Expected Answer" not in plain
  assert "Expected Answer: 72\n" in guided and "Expected Answer: $84\n" in guided
  assert guided.endswith(f"Question: {PROBLEM}\n\nExpected Answer: 6\n\nStudent Solution:\n{SOLUTION}\n\n"
                         "Teacher Verification:")
  stripped = re.sub(r"Expected Answer: [^\n]*\n\n", "", guided)
  stripped = re.sub(r"You are also given the expected final answer[^\n]*\n\n", "", stripped)
  assert stripped == plain
  assert _example_verifications(guided) == _example_verifications(plain)


def test_critic_and_merger_prompts():
  verification = "<think>secret reasoning</think>\n\n## Step 1: a\nok\n**This step is correct.**"
  critic = prompts.critic_prompt(PROBLEM, SOLUTION, verification)
  for piece in ("<Problem>\n" + PROBLEM, "<Solution Path>\n" + SOLUTION,
                "<Original Verification>\n## Step 1: a", "Missing errors", "False positives", "Wrong reasoning",
                "Inconsistent final verdict", "**Critique of the original verification**:"):
    assert piece in critic, piece
  assert "secret reasoning" not in critic
  merger = prompts.merger_prompt(PROBLEM, SOLUTION, verification, "<think>hmm</think>The critique text.")
  for piece in ("<Critique of the Verification>\nThe critique text.\n</Critique of the Verification>",
                "## Step 1: <short title>", "**This step is correct.** or **This step is incorrect.**",
                "**Verification: Is the answer correct (Yes/No)? X**"):
    assert piece in merger, piece
  assert "secret reasoning" not in merger and "hmm" not in merger


def test_prompts_use_our_own_wording():
  # Phrases and examples of the authors' prompts (docs/method.md §2.2 / §2.5) must not appear in ours.
  texts = [prompts.generator_prompt("p"), prompts.verifier_prompt("p", "s"), prompts.verifier_prompt("p", "s", "a"),
           prompts.critic_prompt("p", "s", "v"), prompts.merger_prompt("p", "s", "v", "c")]
  for text in texts:
    for phrase in ("grading student work", "Sam is hired", "compound", "42409", "Solve the following math problem",
                   "Use the Expected Answer to help determine", "as if they were generated in one go"):
      assert phrase not in text, phrase


def _slice_rows():
  lines = (SLICE_DIR / "problems_256.jsonl").read_text(encoding="utf-8").splitlines()
  return [json.loads(line) for line in lines]


def test_problem_slice_matches_readme_hash_and_schema():
  data = (SLICE_DIR / "problems_256.jsonl").read_bytes()
  readme = (SLICE_DIR / "README.md").read_text(encoding="utf-8")
  assert f"problems_256.jsonl {hashlib.sha256(data).hexdigest()}" in readme
  rows = _slice_rows()
  assert len(rows) == 256 and [r["row"] for r in rows] == list(range(256))
  assert len({r["id"] for r in rows}) == 256
  for r in rows:
    assert set(r) == {"id", "row", "problem", "answer", "ground_truth", "data_source", "model_difficulty"}
    assert json.loads(r["ground_truth"]) == [r["answer"]] and r["problem"].strip()
  assert rows[0]["answer"] == "1156" and rows[0]["id"] == "skywork8k-8756"


def test_prompts_on_real_problems_keep_text_verbatim():
  for r in _slice_rows():
    assert f"Problem: {r['problem']}\n" in prompts.generator_prompt(r["problem"])
    assert f"\n\nQuestion: {r['problem']}\n\n" in prompts.verifier_prompt(r["problem"], "Step 1: x\nAnswer: 1")
    assert rm.rm_prompt("orm", r["problem"], "s").startswith(f"Problem: {r['problem']}\n\nSolution: s")
