"""The reward-model formats: their output markers and the prompt that queries them.

These strings are a format, not prose: the Stage I parsers, the Stage II training targets, ProcessBench and
the Stage III rewards (host and in-graph) all depend on them byte for byte, so they are defined once here.

  * step block header        `## Step k: <title>`
  * step verdict             `**This step is correct.**` / `**This step is incorrect.**`
  * final verdict            `**Verification: Is the answer correct (Yes/No)? Yes|No**`
  * PRM (no CoT) step line   `Step k: Correct` / `Step k: Incorrect`
"""

from __future__ import annotations

# Reward-model output formats (Stage II). ThinkPRM is queried with the PRM prompt; only its target differs.
RM_FORMATS = ("orm", "prm", "prm_cot", "think_prm")

STEP_CORRECT_MARKER = "**This step is correct.**"
STEP_INCORRECT_MARKER = "**This step is incorrect.**"
FINAL_VERDICT_QUESTION = "Verification: Is the answer correct (Yes/No)?"


def step_marker(is_correct: bool) -> str:
  """The bold verdict line that closes one `## Step k` block of a teacher verification."""
  return STEP_CORRECT_MARKER if is_correct else STEP_INCORRECT_MARKER


def final_verdict_line(is_correct: bool) -> str:
  """The final verdict line shared by the verifier, PRM and PRM-CoT formats."""
  return f"**{FINAL_VERDICT_QUESTION} {'Yes' if is_correct else 'No'}**"


def prm_step_line(step_number: int, is_correct: bool) -> str:
  """One line of the no-CoT PRM target, e.g. `Step 3: Incorrect` (1-based step numbers)."""
  if step_number < 1:
    raise ValueError(f"PRM step numbers start at 1; got {step_number}.")
  return f"Step {step_number}: {'Correct' if is_correct else 'Incorrect'}"


def rm_prompt(fmt: str, problem: str, solution: str) -> str:
  """The user message that queries a generative reward model of format `fmt` (one of RM_FORMATS)."""
  if fmt == "orm":
    return f"Problem: {problem}\n\nSolution: {solution}\n\nIs the answer correct (Yes/No)?"
  if fmt in ("prm", "prm_cot", "think_prm"):
    return f"Problem: {problem}\n\nStudent Solution: {solution}\n\nLet's verify step by step."
  raise ValueError(f"unknown reward-model format {fmt!r}; use one of {RM_FORMATS}.")
