"""GRPO advantages: group-normalised outcome rewards and the two step-level variants (docs/method.md, Stage III).

Row layout everywhere: N = B x G rollouts, prompt-major (rows g*G ... g*G+G-1 are the G samples of prompt g).
Token arrays are over the response only (R positions, right-padded), with `mask_NxR` True on real response
tokens. Everything here is a pure jnp function (jit/vmap/shard-friendly, no host callbacks).

  * `grpo`         (r - group mean) / (group std + eps), unbiased std; a group of one has mean 0 and std 1
                   (so it keeps r / (1 + eps), as verl does).
  * `scaled`       the same with `scale` = "group" | "batch" (batch std) | "none" (centring only, Dr.GRPO).
  * `selective`    selective advantage: the outcome advantage of a row is zeroed (or halved) on the tokens of
                   policy steps whose PRM verdict disagrees with its sign.
  * `global_step`  0.8 x outcome advantage + 0.2 x a step advantage from per-step rewards +-1/n normalised over
                   all steps of the group and summed from each token to the end (reverse cumulative sum).

Step inputs (from the token automata in rl/automata.py): `step_ends_NxY[i, j]` is the response-token index
that closes policy step j of row i (the token holding the step's last byte), valid for j < num_steps_N[i];
`verdicts_NxY[i, j]` is +1 (correct) / -1 (incorrect) for the PRM's j-th step verdict, valid for
j < num_verdicts_N[i]. Entries past the counts are ignored whatever they hold.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

F32 = jnp.float32
EPS = 1e-6
SCALES = ("group", "batch", "none")


def _groups(x_N: jax.Array, group_size: int) -> jax.Array:
  """[N, ...] -> [N / G, G * prod(...)]: one row per group."""
  n = x_N.shape[0]
  if group_size < 1 or n % group_size:
    raise ValueError(f"group_size={group_size} does not divide the {n} rows of the rewards; the batch must hold "
                     "whole groups (prompts x rollouts per prompt).")
  return x_N.reshape(n // group_size, -1)


def _mean_std(x: jax.Array, axis=None) -> tuple[jax.Array, jax.Array]:
  """Mean and unbiased std; along an axis of length 1 they are 0 and 1 (verl's singleton rule)."""
  n = x.size if axis is None else x.shape[axis]
  if n == 1:
    return jnp.zeros_like(jnp.mean(x, axis=axis)), jnp.ones_like(jnp.mean(x, axis=axis))
  return jnp.mean(x, axis=axis), jnp.std(x, axis=axis, ddof=1)


def grpo(rewards_N: jax.Array, group_size: int, eps: float = EPS) -> jax.Array:
  """GRPO outcome advantages, f32[N]: (r - group mean) / (group std + eps), unbiased std.

  Args:
    rewards_N: one scalar reward per rollout, prompt-major groups of `group_size` rows.
    group_size: G, rollouts per prompt; must divide N.
    eps: added to the std (1e-6 as in verl).
  """
  return scaled(rewards_N, group_size, "group", eps)


def scaled(rewards_N: jax.Array, group_size: int, scale: str = "group", eps: float = EPS) -> jax.Array:
  """Group-centred rewards divided by the group std ("group"), the batch std ("batch") or nothing ("none").

  "batch" divides by the unbiased std of all N rewards (+ eps); "none" leaves the centred rewards unscaled
  (Dr.GRPO). A group of one is centred on 0 in every mode.
  """
  if scale not in SCALES:
    raise ValueError(f"advantage scale {scale!r} is not one of {SCALES}.")
  r_BxA = _groups(rewards_N.astype(F32), group_size)
  mean_B, std_B = _mean_std(r_BxA, axis=1)
  centred = r_BxA - mean_B[:, None]
  if scale == "group":
    centred = centred / (std_B[:, None] + eps)
  elif scale == "batch":
    centred = centred / (_mean_std(rewards_N.astype(F32))[1] + eps)
  return centred.reshape(-1)


def _valid_steps(count_N: jax.Array, K: int) -> jax.Array:
  return jnp.arange(K)[None, :] < count_N[:, None]


def step_token_ids(step_ends_NxY: jax.Array, num_steps_N: jax.Array, R: int, first_step_start: int = 3
                   ) -> jax.Array:
  """Which policy step each response token belongs to, int32[N, R]: j for tokens of step j, -1 elsewhere.

  Step j spans tokens [end_{j-1} + 1, end_j] (inclusive) and step 0 spans [first_step_start, end_0]: the
  released code skips the first three response tokens (the opening `<think>` tag) in step 0. Tokens after
  the last step end (`</think><answer>...`) belong to no step.
  """
  K = step_ends_NxY.shape[1]
  valid_NxY = _valid_steps(num_steps_N, K)
  ends_NxY = jnp.where(valid_NxY, step_ends_NxY, -1)
  t_R = jnp.arange(R)
  # Step of token t = number of valid ends strictly before t (ends are increasing within a row).
  before_NxR = jnp.sum((ends_NxY[:, None, :] < t_R[None, :, None]) & valid_NxY[:, None, :], axis=-1)
  inside_NxR = (before_NxR < num_steps_N[:, None]) & ~((before_NxR == 0) & (t_R[None, :] < first_step_start))
  return jnp.where(inside_NxR, before_NxR, -1).astype(jnp.int32)


def selective(rewards_N: jax.Array, group_size: int, mask_NxR: jax.Array, step_ends_NxY: jax.Array,
              num_steps_N: jax.Array, verdicts_NxY: jax.Array, num_verdicts_N: jax.Array, *, half: bool = False,
              min_steps: int = 4, max_steps: int = 20, first_step_start: int = 3, eps: float = EPS) -> jax.Array:
  """Selective advantage, f32[N, R] (0 off the mask).

  1. Strict penalty: a row whose PRM output has at least one step verdict and whose policy step count is
     < min_steps or > max_steps has its outcome reward forced to 0 (before group normalisation).
  2. A_i = `grpo` of the (penalised) rewards, on every response token.
  3. For j < min(num_steps_N, num_verdicts_N): if A_i >= 0 and step j was judged incorrect, or A_i < 0 and it
     was judged correct, the tokens of step j (`step_token_ids`) get 0 (A_i / 2 when `half`). A row with no
     PRM step verdicts is plain outcome GRPO.

  Args:
    rewards_N: gated outcome rewards (format x PRM-CoT final verdict), f32[N].
    group_size: G.
    mask_NxR: bool[N, R], True on response tokens.
    step_ends_NxY, num_steps_N: policy step ends (token indices) and counts (module docstring).
    verdicts_NxY, num_verdicts_N: PRM step verdicts (+1 / -1) and their counts.
  """
  R = mask_NxR.shape[1]
  has_verdicts_N = num_verdicts_N > 0
  bad_count_N = (num_steps_N < min_steps) | (num_steps_N > max_steps)
  rewards_N = jnp.where(has_verdicts_N & bad_count_N, 0.0, rewards_N.astype(F32))
  a_N = grpo(rewards_N, group_size, eps)
  step_NxR = step_token_ids(step_ends_NxY, jnp.minimum(num_steps_N, num_verdicts_N), R, first_step_start)
  verdict_NxR = jnp.take_along_axis(verdicts_NxY, jnp.maximum(step_NxR, 0), axis=1)
  misaligned_NxR = (step_NxR >= 0) & jnp.where(a_N[:, None] >= 0, verdict_NxR < 0, verdict_NxR > 0)
  factor = 0.5 if half else 0.0
  a_NxR = jnp.where(misaligned_NxR, factor * a_N[:, None], a_N[:, None])
  return jnp.where(mask_NxR, a_NxR, 0.0)


def global_step(rewards_N: jax.Array, group_size: int, mask_NxR: jax.Array, step_ends_NxY: jax.Array,
                num_steps_N: jax.Array, verdicts_NxY: jax.Array, num_verdicts_N: jax.Array, *, penalty: bool = True,
                min_steps: int = 3, max_steps: int = 20, outcome_weight: float = 0.8, eps: float = EPS
                ) -> jax.Array:
  """Global step reward, f32[N, R] = outcome_weight x A_outcome + (1 - outcome_weight) x A_step (0 off mask).

  Per policy step j < num_steps_N[i]: r_ij = c_ij / num_steps_N[i], c = +1 correct / -1 incorrect, where a
  step without a PRM verdict (j >= num_verdicts_N[i]) counts as incorrect. With `penalty`, a row whose step
  count differs from its verdict count or lies outside [min_steps, max_steps] has every r_ij = 0 (the zeros
  still enter the statistics). All r_ij of a group are pooled: mean and unbiased std (one value or none:
  mean 0, std 1); r~ = (r - mean) / (std + eps) is placed at each step's end token, and the step advantage
  of token t is the sum of r~ over step ends at or after t. A_outcome = `grpo(rewards_N)` on every token.
  """
  N, R = mask_NxR.shape
  K = step_ends_NxY.shape[1]
  valid_NxY = _valid_steps(num_steps_N, K)
  c_NxY = jnp.where(_valid_steps(num_verdicts_N, K) & (verdicts_NxY > 0), 1.0, -1.0)
  r_NxY = c_NxY / jnp.maximum(num_steps_N, 1)[:, None].astype(F32)
  if penalty:
    bad_N = (num_steps_N != num_verdicts_N) | (num_steps_N < min_steps) | (num_steps_N > max_steps)
    r_NxY = jnp.where(bad_N[:, None], 0.0, r_NxY)
  r_NxY = jnp.where(valid_NxY, r_NxY, 0.0)
  # Pooled statistics per group over the valid step rewards only.
  v_BxAY = _groups(valid_NxY.astype(F32), group_size)
  r_BxAY = _groups(r_NxY, group_size)
  n_B = jnp.sum(v_BxAY, axis=1)
  mean_B = jnp.sum(r_BxAY, axis=1) / jnp.maximum(n_B, 1.0)
  var_B = jnp.sum(v_BxAY * (r_BxAY - mean_B[:, None]) ** 2, axis=1) / jnp.maximum(n_B - 1.0, 1.0)
  mean_B = jnp.where(n_B > 1, mean_B, 0.0)
  std_B = jnp.where(n_B > 1, jnp.sqrt(var_B), 1.0)
  mean_N, std_N = jnp.repeat(mean_B, group_size), jnp.repeat(std_B, group_size)
  rn_NxY = jnp.where(valid_NxY, (r_NxY - mean_N[:, None]) / (std_N[:, None] + eps), 0.0)
  # Scatter each normalised step reward to its end token, then sum from the end backwards.
  ends_NxY = jnp.clip(step_ends_NxY, 0, R - 1)
  placed_NxR = jnp.zeros((N, R), F32).at[jnp.arange(N)[:, None], ends_NxY].add(rn_NxY)
  step_adv_NxR = jnp.flip(jnp.cumsum(jnp.flip(placed_NxR, axis=1), axis=1), axis=1)
  a_NxR = outcome_weight * grpo(rewards_N, group_size, eps)[:, None] + (1.0 - outcome_weight) * step_adv_NxR
  return jnp.where(mask_NxR, a_NxR, 0.0)
