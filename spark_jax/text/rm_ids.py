"""The reward model's prompt as token ids: the one piecewise construction every user builds it with.

Tokenizing a whole prompt string and concatenating separately tokenized pieces give different ids (with
Qwen's ranks "Problem: " + "Find x" is ':', ' ', 'Find', ' x' while "Problem: Find x" is ':', ' Find', ' x').
The PRM must see at RL time the ids it saw in training, so the prompt is DEFINED piecewise and every user
(SFT data, ProcessBench, the host reward, the in-graph reward) builds it with `rm_prompt_ids`:

    encode(head) + encode(" " + problem) + encode(mid) + solution ids + encode(tail)

where head / mid / tail are the fixed parts of the chat-rendered `text.rm.rm_prompt` user message (head
ends with "Problem:", mid is "\\n\\nStudent Solution: " or "\\n\\nSolution: ", tail closes the turn and opens
the assistant's). The problem piece keeps its leading space, so with byte-level BPE the boundary after
"Problem:" is the one a whole-string tokenization has for a problem starting with a letter or digit. The
solution piece is the policy's own response ids, cut after the last `</answer>` and without special tokens
(`visible_ids`: Stage I stores solutions decoded that way), otherwise fed as they were sampled (they may be a
non-canonical split of their text: `count_non_canonical` reports how often). Decoding the ids always gives
exactly the chat-rendered prompt string.

The graph half (rl/prm_prompt.py) tokenizes the same fixed pieces once (`prompt_pieces`) and packs problem
and response ids into them inside the jitted RL step. This module sits below train/, evals/, sampling/ and
rl/, which all build the prompt.
"""

from __future__ import annotations

from typing import Sequence

from spark_jax.text import rm as rm_text

_P, _S = "\x00PROBLEM\x00", "\x00SOLUTION\x00"


def prompt_pieces(tokenizer, fmt: str) -> tuple[str, str, str]:
  """(head, mid, tail) text of the chat-rendered prompt of format `fmt`, split around problem and solution."""
  text = tokenizer.apply_chat_template([{"role": "user", "content": rm_text.rm_prompt(fmt, _P, _S)}], tokenize=False)
  if text.count(_P) != 1 or text.count(_S) != 1 or text.find(_P) > text.find(_S):
    raise ValueError(f"the chat template of {getattr(tokenizer, 'source', tokenizer)!r} does not render the "
                     "reward-model prompt's problem and solution once each, in order; it cannot be built piecewise.")
  head, rest = text.split(_P)
  mid, tail = rest.split(_S)
  if not head.endswith(" "):
    raise ValueError(f"rm_prompt({fmt!r}) no longer puts a space before the problem (head ends {head[-20:]!r}); "
                     "update text/rm_ids.py's piece boundaries with it.")
  return head[:-1], mid, tail


def problem_ids(tokenizer, problem: str) -> list[int]:
  """The problem's piece of the prompt: the ids of " " + problem, tokenized alone."""
  return list(tokenizer.encode(" " + problem))


def rm_prompt_ids(tokenizer, fmt: str, problem: str, solution: str | Sequence[int]) -> list[int]:
  """The reward model's chat prompt as ids, built piecewise (module docstring): the one canonical form.

  Args:
    tokenizer: a `spark_jax.tokenizer.Tokenizer` (its chat template renders the user turn).
    fmt: reward-model format (orm | prm | prm_cot | think_prm).
    problem: the raw problem text.
    solution: the solution text (tokenized alone) or its ids (used as they are: the policy's sampled ids).

  Returns:
    ids with `tokenizer.decode(ids)` equal to the chat-rendered `rm_prompt(fmt, problem, solution text)`.
  """
  head, mid, tail = prompt_pieces(tokenizer, fmt)
  sol = list(tokenizer.encode(solution)) if isinstance(solution, str) else [int(i) for i in solution]
  return (list(tokenizer.encode(head)) + problem_ids(tokenizer, problem) + list(tokenizer.encode(mid)) + sol
          + list(tokenizer.encode(tail)))


def count_non_canonical(tokenizer, rows: Sequence[Sequence[int]]) -> int:
  """How many id rows are not what tokenizing their own decoded text gives (sampled non-canonical splits)."""
  return sum(list(tokenizer.encode(tokenizer.decode(list(r)))) != [int(i) for i in r] for r in rows)


def visible_ids(ids: Sequence[int], special_ids: Sequence[int]) -> list[int]:
  """A response's ids without its special tokens: the ids of what a decode with skip_special_tokens spells.

  Stage I stores a generator's solution decoded that way, so the reward model is trained on solutions
  without them; at RL time the policy's sampled response reaches it the same way (on the host here, in the
  graph by `rl.prm_prompt.pack`). With the world tokenizer these are `<think>` / `</think>`."""
  drop = set(int(i) for i in special_ids)
  return [int(i) for i in ids if int(i) not in drop]
