"""Stage III rewards on the host: the reference rules the in-graph automata (rl/automata.py) reproduce on tokens.

Everything here works on decoded text (special tokens skipped) and is meant for tests, for debugging a reward,
for `rlvr` (graded on the host by design) and for the host path (`reward.in_graph=False`). The in-graph
program computes the same values from token ids; tests assert they agree.

Format gate (`format_ok`, docs/method.md D12): valid iff
  1. exactly one box: every `\\boxed{` opener that has a `}` later on its own line counts once, nested or not,
     and an opener preceded by a backslash (a literal `\\\\boxed{`) counts twice, so it is never valid (the
     released code counts `\\\\boxed{..}` under both of its patterns; we keep that);
  2. exactly one `<answer>` and exactly one `</answer>`, the opener first;
  3. nothing but ASCII whitespace (space, tab, newline, CR, VT, FF) after the `</answer>`.
Tags are case-sensitive, as the policy format writes them.

The PRM sees the response up to and including its last `</answer>` (`truncate_after_answer`).

Reward-model outputs (one parser: text/verdicts for the final verdict; the step verdicts are the marker rule
alone, as the reward needs counts, not the step-number bookkeeping of Stage I):
  * final verdict: `parse_final_verdict` (prm, prm_cot), `parse_orm_output` (orm);
  * step verdicts, in order: every `**This step is correct.**` / `**This step is incorrect.**` marker
    (prm_cot, case-insensitive) or every `Step k: Correct|Incorrect` line (prm), after the `<think>` trace.

Reward types (`REWARD_TYPES`; y = final verdict is Yes, gated rewards are 0 when the gate fails):
  orm, prm_outcome, prm_cot_outcome   y
  prm_step_avg, prm_cot_step_avg      0.4 k/n + 0.6 y (k correct of n step verdicts; no verdicts: 0.6 y)
  selective_advantage[_half]          y, forced to 0 when the PRM gave step verdicts and the policy wrote
                                      fewer than 4 or more than 20 steps; advantages: advantages.selective
  global_step[_no_penalty]            y; advantages: advantages.global_step
  random                              a fair coin (ungated rows: 0)
  rlvr                                math_verify against the ground truth; ungated unless rlvr_gate (D12)
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

from spark_jax.text import rm as rm_text
from spark_jax.text import verdicts as verdicts_text

# ------------------------------------------------------------------------------------------------ the gate

_ASCII_WS = " \t\n\r\x0b\x0c"
_BOX_RE = re.compile(r"\\boxed\{(?=[^\n]*\})")
_DOUBLE_BOX_RE = re.compile(r"\\\\boxed\{(?=[^\n]*\})")
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"


def count_boxes(text: str) -> int:
  """Boxes as the gate counts them (module docstring, rule 1)."""
  return len(_BOX_RE.findall(text)) + len(_DOUBLE_BOX_RE.findall(text))


def text_after_answer(text: str) -> bool:
  """Whether anything but whitespace follows the last `</answer>` (the solution-appending monitor)."""
  end = text.rfind(ANSWER_CLOSE)
  return end >= 0 and bool(text[end + len(ANSWER_CLOSE):].strip(_ASCII_WS))


def format_ok(text: str) -> bool:
  """The three-rule format gate on a decoded response (special tokens skipped); module docstring."""
  return (count_boxes(text) == 1 and text.count(ANSWER_OPEN) == 1 and text.count(ANSWER_CLOSE) == 1
          and text.find(ANSWER_OPEN) < text.find(ANSWER_CLOSE) and not text_after_answer(text))


def truncate_after_answer(text: str) -> str:
  """The response up to and including its last `</answer>` (what the PRM sees); the whole text when none."""
  end = text.rfind(ANSWER_CLOSE)
  return text if end < 0 else text[:end + len(ANSWER_CLOSE)]


# ------------------------------------------------------------------------------------------ policy steps

# A step opens at a `<step...>` tag and runs to the next tag, `</think>`, `</answer>` or the end (a regex `$`:
# before a final newline). Written once as a pattern source, compiled for str (host text) and for bytes
# (token ids, where the rule sees exactly the bytes the tokens spell).
_STEP_PATTERN = r"<step[^>]*>(.*?)(?=<step[^>]*>|</think>|</answer>|$)"
_STEP_RE = re.compile(_STEP_PATTERN, re.IGNORECASE | re.DOTALL)
_STEP_RE_BYTES = re.compile(_STEP_PATTERN.encode(), re.IGNORECASE | re.DOTALL)


def policy_step_spans(text: str) -> list[tuple[int, int]]:
  """(start, end) character spans of the policy's steps: from each `<step...>` tag to the end of its body.

  Unlike the released code there are no fallbacks to `**bold**:` lines or `Step N:` headers: the policy
  format requires the tags, and a response without them has no steps (its step count is 0).
  """
  return [(m.start(), m.end(1)) for m in _STEP_RE.finditer(text)]


def step_end_tokens(token_bytes: Sequence[bytes], ids: Sequence[int], special_ids: Sequence[int] = ()) -> list[int]:
  """Per policy step, the index of the token holding the step's last byte (the in-graph step ends).

  The text is the concatenation of the tokens' bytes (special tokens spell nothing); a step with an empty
  span ends on the token holding the byte before it. -1 when no byte precedes.
  """
  special = set(special_ids)
  pieces = [b"" if i in special else token_bytes[i] for i in ids]
  owner = [k for k, p in enumerate(pieces) for _ in p]  # byte offset -> token index
  data = b"".join(pieces)
  return [owner[m.end(1) - 1] if m.end(1) > 0 else -1 for m in _STEP_RE_BYTES.finditer(data)]


# ------------------------------------------------------------------------------------ reward-model outputs

_MARKER_RE = re.compile("|".join(re.escape(m) for m in (rm_text.STEP_CORRECT_MARKER, rm_text.STEP_INCORRECT_MARKER)),
                        re.IGNORECASE)
_INCORRECT = rm_text.STEP_INCORRECT_MARKER.lower()


def step_verdicts(fmt: str, output: str) -> list[bool]:
  """A reward model's step verdicts in order (True = correct): markers (prm_cot) or step lines (prm)."""
  visible = verdicts_text.strip_thinking(output)
  if fmt in ("prm_cot", "think_prm"):
    return [m.group(0).lower() != _INCORRECT for m in _MARKER_RE.finditer(visible)]
  if fmt == "prm":
    lines = verdicts_text._PRM_STEP_LINE_RE.finditer(visible)  # pylint: disable=protected-access  (its one rule)
    return [m.group(2).lower() == "correct" for m in lines]
  if fmt == "orm":
    return []
  raise ValueError(f"unknown reward-model format {fmt!r}; use one of {rm_text.RM_FORMATS}.")


def final_verdict(fmt: str, output: str) -> bool | None:
  """A reward model's final verdict (True = Yes, None = none parsed)."""
  if fmt == "orm":
    return verdicts_text.parse_orm_output(output)
  if fmt in ("prm", "prm_cot", "think_prm"):
    return verdicts_text.parse_final_verdict(output)
  raise ValueError(f"unknown reward-model format {fmt!r}; use one of {rm_text.RM_FORMATS}.")


# ------------------------------------------------------------------------------------------- reward types


@dataclasses.dataclass(frozen=True)
class RewardType:
  """One reward type: which PRM output it reads and how it turns into a reward and advantages.

  output_format: the reward model's output format (None: no reward model). kind: "outcome" (y),
  "step_avg" (0.4 k/n + 0.6 y), "selective", "global_step", "random", "rlvr". orm_prompt_bug: the
  released code sent the ORM prompt for this type (D10; reproduced only with the knob on).
  """

  name: str
  output_format: str | None
  kind: str
  half: bool = False
  penalty: bool = True
  orm_prompt_bug: bool = False

  def prompt_format(self, orm_prompt_bug: bool = False) -> str | None:
    """The prompt format sent to the reward model; the ORM prompt for the D10 types when the knob is on.

    The output is still read as `output_format`: the released code queried its PRM-CoT model with the ORM
    prompt and parsed the answer as PRM-CoT.
    """
    if self.output_format is None:
      return None
    return "orm" if orm_prompt_bug and self.orm_prompt_bug else self.output_format


REWARD_TYPES: dict[str, RewardType] = {t.name: t for t in (
    RewardType("orm", "orm", "outcome"),
    RewardType("prm_outcome", "prm", "outcome"),
    RewardType("prm_cot_outcome", "prm_cot", "outcome"),
    RewardType("prm_step_avg", "prm", "step_avg"),
    RewardType("prm_cot_step_avg", "prm_cot", "step_avg"),
    RewardType("selective_advantage", "prm_cot", "selective", orm_prompt_bug=True),
    RewardType("selective_advantage_half", "prm_cot", "selective", half=True, orm_prompt_bug=True),
    RewardType("global_step", "prm_cot", "global_step", orm_prompt_bug=True),
    RewardType("global_step_no_penalty", "prm_cot", "global_step", penalty=False),
    RewardType("random", None, "random"),
    RewardType("rlvr", None, "rlvr"),
)}

STEP_AVG_STEP_WEIGHT = 0.4
SELECTIVE_MIN_STEPS, GLOBAL_MIN_STEPS, MAX_STEPS = 4, 3, 20


def reward_type(name: str) -> RewardType:
  """The reward type called `name`; an unknown name is an error listing the known ones."""
  if name not in REWARD_TYPES:
    raise ValueError(f"reward type {name!r} does not exist; use one of {tuple(REWARD_TYPES)}.")
  return REWARD_TYPES[name]


def step_avg(final: bool | None, steps: Sequence[bool], step_weight: float = STEP_AVG_STEP_WEIGHT) -> float:
  """0.4 k/n + 0.6 y: k correct of n step verdicts (step part 0 when there are none), y the final verdict."""
  frac = sum(steps) / len(steps) if steps else 0.0
  return step_weight * frac + (1.0 - step_weight) * float(final is True)


def rm_reward(name: str, output: str | None) -> float:
  """The ungated reward a reward-model output gives under reward type `name` (0 when `output` is None).

  For the selective and global-step types this is the outcome y before the strict step-count penalty
  (which needs the policy's step count: see `host_reward`).
  """
  spec = reward_type(name)
  if spec.output_format is None:
    raise ValueError(f"reward type {name!r} reads no reward-model output.")
  if output is None:
    return 0.0
  final = final_verdict(spec.output_format, output)
  if spec.kind == "step_avg":
    return step_avg(final, step_verdicts(spec.output_format, output))
  return float(final is True)


@dataclasses.dataclass(frozen=True)
class HostReward:
  """One rollout's reward on the host, and the inputs of its token advantages.

  reward: the scalar reward (gated; strict penalty applied for the selective types). format_ok: the gate.
  final / prm_steps: the reward model's verdicts (None / () when it was not queried). policy_steps: the
  response's step count.
  """

  reward: float
  format_ok: bool
  final: bool | None
  prm_steps: tuple[bool, ...]
  policy_steps: int


def rlvr_correct(response: str, ground_truth: Any) -> bool:
  """math_verify grading of the response's final answer against the ground truth (the one grader)."""
  from spark_jax.evals import grading  # pylint: disable=g-import-not-at-top  (math_verify is heavy)
  return grading.is_equivalent(grading.extract_answer(response), ground_truth)


def host_reward(name: str, response: str, rm_output: str | None = None, ground_truth: Any = None, *,
                rlvr_gate: bool = False, coin: bool | None = None, min_steps: int | None = None,
                max_steps: int = MAX_STEPS) -> HostReward:
  """The reward of reward type `name` for one rollout, on text.

  Args:
    response: the decoded policy response (special tokens skipped).
    rm_output: the reward model's output for this response (queried only when the gate passed; None when it
      was not queried). Ignored by random and rlvr.
    ground_truth: the gold answer (rlvr).
    rlvr_gate: apply the format gate to rlvr too (D12).
    coin: the random reward's draw for this row (random only; drawn by the caller so that host and graph
      can share one key).
    min_steps / max_steps: the selective strict penalty's bounds (default 4 and 20).
  """
  spec = reward_type(name)
  ok = format_ok(response)
  n_policy = len(policy_step_spans(response))
  if spec.kind == "rlvr":
    gated = ok or not rlvr_gate
    return HostReward(float(gated and rlvr_correct(response, ground_truth)), ok, None, (), n_policy)
  if spec.kind == "random":
    if coin is None:
      raise ValueError("host_reward('random', ...) needs coin= (this row's fair-coin draw).")
    return HostReward(float(ok and bool(coin)), ok, None, (), n_policy)
  if not ok or rm_output is None:
    return HostReward(0.0, ok, None, (), n_policy)
  final = final_verdict(spec.output_format, rm_output)
  steps = tuple(step_verdicts(spec.output_format, rm_output))
  reward = rm_reward(name, rm_output)
  if spec.kind == "selective":
    low = SELECTIVE_MIN_STEPS if min_steps is None else min_steps
    if steps and not low <= n_policy <= max_steps:
      reward = 0.0
  return HostReward(reward, ok, final, steps, n_policy)
