"""The reward model's prompt in the graph: the piecewise construction of `text.rm_ids`, traceable.

The fixed pieces are tokenized once on the host (`build_template`), the problem ids come from the batch
(`text.rm_ids.problem_ids`, right-padded), and each response is cut at the gate's `cut_N` and laid out in the
left-padded prompt layout `sampling.core.generate_core` takes. Decoding a packed row gives exactly the ids
`text.rm_ids.rm_prompt_ids` builds on the host (tests/test_rl_prm_prompt.py).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from spark_jax.text import rm_ids


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PromptTemplate:
  """The fixed pieces of one format's prompt as int32 id vectors (a pytree; lengths are static shapes), and
  `drop_V`: the response ids left out of the prompt (special tokens: `text.rm_ids.visible_ids`)."""

  head: jax.Array
  mid: jax.Array
  tail: jax.Array
  drop_V: jax.Array


def build_template(tokenizer, fmt: str, special_ids=(), vocab_size: int | None = None) -> PromptTemplate:
  """Tokenizes the fixed pieces once (host); `special_ids` (of the policy's vocabulary, `vocab_size` ids) are
  dropped from responses as `text.rm_ids.visible_ids` drops them on the host."""
  head, mid, tail = rm_ids.prompt_pieces(tokenizer, fmt)
  V = int(vocab_size) if vocab_size is not None else len(tokenizer)
  drop = np.zeros(max(V, 1), bool)
  for i in special_ids:
    if not 0 <= int(i) < V:
      raise ValueError(f"build_template: special id {i} is outside the vocabulary of {V} ids.")
    drop[int(i)] = True
  pieces = (jnp.asarray(tokenizer.encode(x), jnp.int32) for x in (head, mid, tail))
  return PromptTemplate(*pieces, jnp.asarray(drop))


def pack(template: PromptTemplate, problem_tokens_BxQ: jax.Array, problem_lengths_B: jax.Array,
         response_tokens_NxR: jax.Array, cut_N: jax.Array, group_size: int, pad_id: int = 0
         ) -> tuple[jax.Array, jax.Array]:
  """Builds every row's reward-model prompt, left-padded (traceable).

  Args:
    template: from `build_template`.
    problem_tokens_BxQ / problem_lengths_B: `problem_ids` of each prompt, right-padded.
    response_tokens_NxR: the policy's responses, right-padded, N = B x group_size rows, prompt-major.
    cut_N: how many response tokens each prompt keeps (the gate's cut: through the last `</answer>`); of
      those, the ids in `template.drop_V` are left out and the rest close up.
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
  cut_N = jnp.clip(cut_N.astype(jnp.int32), 0, R)
  # Stage I stores solutions decoded without special tokens, so the PRM reads the response that way too:
  # kept ids move left over the dropped ones (a stable compaction), and the row's length shrinks.
  resp_NxR = response_tokens_NxR.astype(jnp.int32)
  special_NxR = template.drop_V[jnp.clip(resp_NxR, 0, template.drop_V.shape[0] - 1)]
  keep_NxR = (jnp.arange(R)[None, :] < cut_N[:, None]) & ~special_NxR
  dest_NxR = jnp.where(keep_NxR, jnp.cumsum(keep_NxR, axis=1) - 1, R)
  resp_NxR = jnp.zeros_like(resp_NxR).at[jnp.arange(N)[:, None], dest_NxR].set(resp_NxR, mode="drop")
  c_N = jnp.sum(keep_NxR, axis=1).astype(jnp.int32)
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
        jnp.where(p_NxU < b4, take_rows(resp_NxR, p_NxU - b3),
                  take(template.tail, p_NxU - b4)))))
  return jnp.where(p_NxU >= 0, out, pad_id).astype(jnp.int32), n_N
