"""The reward model's prompt as token ids: one piecewise construction, on the host and in the graph.

Tokenizing a whole prompt string and concatenating separately tokenized pieces give different ids (with
Qwen's ranks "Problem: " + "Find x" is ':', ' ', 'Find', ' x' while "Problem: Find x" is ':', ' Find', ' x').
The PRM must see at RL time the ids it saw in training, so the prompt is DEFINED piecewise and every user
(SFT data, ProcessBench, the host reward, the in-graph reward) builds it with `rm_prompt_ids`:

    encode(head) + encode(" " + problem) + encode(mid) + solution ids + encode(tail)

where head / mid / tail are the fixed parts of the chat-rendered `text.rm.rm_prompt` user message (head
ends with "Problem:", mid is "\\n\\nStudent Solution: " or "\\n\\nSolution: ", tail closes the turn and opens
the assistant's). The problem piece keeps its leading space, so with byte-level BPE the boundary after
"Problem:" is the one a whole-string tokenization has for a problem starting with a letter or digit. The
solution piece is the policy's own response ids, cut after the last `</answer>`, fed as they were sampled
(they may be a non-canonical split of their text: `count_non_canonical` reports how often). Decoding the ids
always gives exactly the chat-rendered prompt string.

In the graph (`pack`) the fixed pieces are tokenized once (`build_template`), the problem ids come from the
batch (`problem_ids`, right-padded), and each response is cut at the gate's `cut_N` and laid out in the
left-padded prompt layout `sampling.core.generate_core` takes.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp

from spark_jax.text import rm as rm_text

_P, _S = "\x00PROBLEM\x00", "\x00SOLUTION\x00"


def _render(tokenizer, fmt: str) -> tuple[str, str, str]:
  """(head, mid, tail) text of the chat-rendered prompt of format `fmt`, split around problem and solution."""
  text = tokenizer.apply_chat_template([{"role": "user", "content": rm_text.rm_prompt(fmt, _P, _S)}], tokenize=False)
  if text.count(_P) != 1 or text.count(_S) != 1 or text.find(_P) > text.find(_S):
    raise ValueError(f"the chat template of {getattr(tokenizer, 'source', tokenizer)!r} does not render the "
                     "reward-model prompt's problem and solution once each, in order; it cannot be built piecewise.")
  head, rest = text.split(_P)
  mid, tail = rest.split(_S)
  if not head.endswith(" "):
    raise ValueError(f"rm_prompt({fmt!r}) no longer puts a space before the problem (head ends {head[-20:]!r}); "
                     "update rl/prm_prompt.py's piece boundaries with it.")
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
  head, mid, tail = _render(tokenizer, fmt)
  sol = list(tokenizer.encode(solution)) if isinstance(solution, str) else [int(i) for i in solution]
  return (list(tokenizer.encode(head)) + problem_ids(tokenizer, problem) + list(tokenizer.encode(mid)) + sol
          + list(tokenizer.encode(tail)))


def count_non_canonical(tokenizer, rows: Sequence[Sequence[int]]) -> int:
  """How many id rows are not what tokenizing their own decoded text gives (sampled non-canonical splits)."""
  return sum(list(tokenizer.encode(tokenizer.decode(list(r)))) != [int(i) for i in r] for r in rows)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PromptTemplate:
  """The fixed pieces of one format's prompt as int32 id vectors (a pytree; lengths are static shapes)."""

  head: jax.Array
  mid: jax.Array
  tail: jax.Array


def build_template(tokenizer, fmt: str) -> PromptTemplate:
  """Tokenizes the fixed pieces once (host)."""
  head, mid, tail = _render(tokenizer, fmt)
  return PromptTemplate(*(jnp.asarray(tokenizer.encode(x), jnp.int32) for x in (head, mid, tail)))


def pack(template: PromptTemplate, problem_tokens_BxQ: jax.Array, problem_lengths_B: jax.Array,
         response_tokens_NxR: jax.Array, cut_N: jax.Array, group_size: int, pad_id: int = 0
         ) -> tuple[jax.Array, jax.Array]:
  """Builds every row's reward-model prompt, left-padded (traceable).

  Args:
    template: from `build_template`.
    problem_tokens_BxQ / problem_lengths_B: `problem_ids` of each prompt, right-padded.
    response_tokens_NxR: the policy's responses, right-padded, N = B x group_size rows, prompt-major.
    cut_N: how many response tokens each prompt keeps (the gate's cut: through the last `</answer>`).
    group_size: rollouts per prompt.
    pad_id: the id written in the left padding (masked by length downstream).

  Returns:
    (prompt_tokens_NxU, prompt_lengths_N), L = |head| + Q + |mid| + R + |tail|; row i's prompt occupies its
    last prompt_lengths_N[i] positions.
  """
  B, Q = problem_tokens_BxQ.shape
  N, R = response_tokens_NxR.shape
  if N != B * group_size:
    raise ValueError(f"pack: {N} responses for {B} problems x group_size {group_size}; they must match.")
  H, M, T = template.head.shape[0], template.mid.shape[0], template.tail.shape[0]
  L = H + Q + M + R + T
  q_N = jnp.repeat(problem_lengths_B.astype(jnp.int32), group_size)
  c_N = jnp.clip(cut_N.astype(jnp.int32), 0, R)
  n_N = H + q_N + M + c_N + T
  problems_NxQ = jnp.repeat(problem_tokens_BxQ.astype(jnp.int32), group_size, axis=0)
  p_NxU = jnp.arange(L)[None, :] - (L - n_N)[:, None]  # position inside the row's prompt
  b1, b2, b3, b4 = H, H + q_N[:, None], H + q_N[:, None] + M, H + q_N[:, None] + M + c_N[:, None]

  def take(vec, idx):
    return vec[jnp.clip(idx, 0, vec.shape[0] - 1)] if vec.shape[0] else jnp.zeros_like(idx)

  def take_rows(mat, idx):
    return jnp.take_along_axis(mat, jnp.clip(idx, 0, mat.shape[1] - 1), axis=1) if mat.shape[1] else jnp.zeros_like(idx)

  out = jnp.where(p_NxU < b1, take(template.head, p_NxU),
        jnp.where(p_NxU < b2, take_rows(problems_NxQ, p_NxU - b1),
        jnp.where(p_NxU < b3, take(template.mid, p_NxU - b2),
        jnp.where(p_NxU < b4, take_rows(response_tokens_NxR.astype(jnp.int32), p_NxU - b3),
                  take(template.tail, p_NxU - b4)))))
  return jnp.where(p_NxU >= 0, out, pad_id).astype(jnp.int32), n_N
