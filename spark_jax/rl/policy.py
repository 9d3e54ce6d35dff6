"""The policy's output format, its prompt, and the RL prompt data.

Format (docs/method.md, policy format): the policy thinks inside `<think>`, puts every reasoning step in its own
`<step>...</step>`, closes `</think>`, then gives exactly one `<answer>\\boxed{...}</answer>` and nothing after
it. The format gate (rl/rewards.py, rl/automata.py) and the step detector are built for this layout.

Data: one RL prompt per row of a JSONL / JSON / parquet file (or a directory of them, or a hub dataset id).
A row must carry the raw problem (the PRM sees it, not the rendered prompt); the ground truth is optional and
used only by the `rlvr` reward and by validation. Keys may be dotted paths into nested rows
(`extra_info.question`, `reward_model.ground_truth`), the layout verl's parquet files use.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Sequence

from spark_jax import io

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
STEP_OPEN, STEP_CLOSE = "<step>", "</step>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"

# Our wording of the step-tagged answer format. The worked example shows every tag once in its place.
_INSTRUCTIONS = (
    "Solve the math problem below. Reason first, inside <think> and </think>. Put each separate step of the "
    "reasoning in its own <step> </step> pair. After </think>, write the final result once, as "
    "<answer>\\boxed{result}</answer>, and write nothing after </answer>.\n\n"
    "For instance, for \"What is 15 - 3 * 2?\" a complete reply is:\n"
    "<think><step>Multiplication comes before subtraction.</step><step>3 * 2 = 6.</step>"
    "<step>15 - 6 = 9.</step></think><answer>\\boxed{9}</answer>\n\n")


def policy_user_message(problem: str) -> str:
  """The user turn that asks the policy for a step-tagged solution of `problem`."""
  return f"{_INSTRUCTIONS}Problem: {problem}"


def policy_prompt_ids(tokenizer, problem: str, *, template: str = "chat") -> list[int]:
  """Prompt token ids for one problem.

  template: "chat" renders our policy message with the tokenizer's chat template and opens the assistant
  turn; "plain" writes `User: <message>\\nAssistant:` as raw text (base models without a chat template, the
  way format-SFT data for a base model is laid out); "generator" sends the Stage I generator's message
  through the chat template (a policy format-trained on that prompt, as the embedded world's is); "bare" sends
  the problem alone through the chat template (a policy whose format SFT had no instructions).
  """
  if template == "bare":
    return list(tokenizer.apply_chat_template([{"role": "user", "content": problem}]))
  if template == "generator":
    from spark_jax.stage1.prompts import generator_prompt
    return list(tokenizer.apply_chat_template([{"role": "user", "content": generator_prompt(problem)}]))
  message = policy_user_message(problem)
  if template == "chat":
    return list(tokenizer.apply_chat_template([{"role": "user", "content": message}]))
  if template == "plain":
    return list(tokenizer.encode(f"User: {message}\nAssistant:"))
  raise ValueError(f"policy template={template!r}; use 'chat', 'plain', 'generator' or 'bare'.")


@dataclasses.dataclass(frozen=True)
class RLPrompt:
  """One RL prompt: where it came from (file and row), the raw problem, and the ground truth ("" = none)."""

  index: int
  where: str
  problem: str
  ground_truth: Any


def _lookup(row: dict, key: str) -> tuple[bool, Any]:
  value: Any = row
  for part in key.split("."):
    if isinstance(value, str) and value.startswith("{"):  # nested JSON stored as a string column
      try:
        value = json.loads(value)
      except json.JSONDecodeError:
        return False, None
    if not isinstance(value, dict) or part not in value:
      return False, None
    value = value[part]
  return True, value


def load_rl_prompts(source: str, *, problem_key: str = "problem", answer_key: str = "answer",
                    split: str = "train", limit: int = 0, require_answer: bool = False) -> list[RLPrompt]:
  """Reads RL prompts; a row without `problem_key` (or an empty one) is an error naming the file and row.

  Args:
    source: a .jsonl/.json/.parquet file, a directory of them, or a hub dataset id.
    problem_key: the raw problem's field (a dotted path for nested rows, e.g. "extra_info.question").
    answer_key: the ground truth's field; "" = none. A JSON-encoded list (`'["1156"]'`) is decoded.
    split: split name for a hub id.
    limit: keep the first `limit` rows (0 = all).
    require_answer: a row without the ground truth is an error too (the `rlvr` reward, validation).
  """
  rows = io.read_records(source, split=split, on_error="raise")
  if not rows:
    raise ValueError(f"RL prompts {source!r}: no rows.")
  out = []
  for i, row in enumerate(rows):
    where = f"{source} row {i + 1}"
    found, problem = _lookup(row, problem_key)
    if not found or not isinstance(problem, str) or not problem.strip():
      keys = sorted(row) if isinstance(row, dict) else type(row).__name__
      raise KeyError(f"{where}: no problem text under key {problem_key!r} (row keys: {keys}); set "
                     "config.data.problem_key to the field that holds the raw problem.")
    answer: Any = ""
    if answer_key:
      found, answer = _lookup(row, answer_key)
      if not found or answer in (None, "", []):
        if require_answer:
          raise KeyError(f"{where}: no ground truth under key {answer_key!r}; the rlvr reward and validation "
                         "grade against it. Set config.data.answer_key, or use a reward that needs no answer.")
        answer = ""
      if isinstance(answer, str) and answer.startswith("["):
        try:
          answer = json.loads(answer)
        except json.JSONDecodeError:
          pass
    out.append(RLPrompt(len(out), where, problem, answer))
    if limit and len(out) >= limit:
      break
  return out


def encode_prompts(tokenizer, prompts: Sequence[RLPrompt], *, template: str, max_prompt_tokens: int,
                   ) -> tuple[list[list[int]], list[list[int]]]:
  """(policy prompt ids, raw problem ids) per prompt; a prompt over `max_prompt_tokens` is an error naming it.

  The problem's own ids go to the PRM prompt in the graph, tokenized alone as the PRM's prompt builder
  expects (see text/rm_ids.py).
  """
  from spark_jax.text import rm_ids  # pylint: disable=g-import-not-at-top
  policy_ids, problem_ids = [], []
  for p in prompts:
    ids = policy_prompt_ids(tokenizer, p.problem, template=template)
    if len(ids) > max_prompt_tokens:
      raise ValueError(f"{p.where}: the policy prompt has {len(ids)} tokens, over max_prompt_tokens="
                       f"{max_prompt_tokens}; raise config.max_prompt_tokens or drop the row.")
    policy_ids.append(ids)
    problem_ids.append(rm_ids.problem_ids(tokenizer, p.problem))
  return policy_ids, problem_ids
