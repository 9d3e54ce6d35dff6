"""The GRPO policy loss: clipped surrogate with dual clip, KL to a reference, loss aggregation.

All inputs are per response token, shape [N, R] (N rollouts, R response positions), with `mask_NxR` True on
the tokens that count. Log-probs are float32 log p(token) of the sampled tokens: `logprobs_NxR` under the
policy being optimised (differentiated), `old_logprobs_NxR` under the policy that sampled (pi_old, constant),
`ref_logprobs_NxR` under the frozen reference (constant; only read when beta > 0).

Per token, with ratio = exp(logp - old_logp) (log-ratio clamped to [-20, 20] before exp) and advantage A:
  pg      = max(-A * ratio, -A * clip(ratio, 1 - clip_low, 1 + clip_high))
  pg      = min(pg, -A * dual_clip)   where A < 0 and dual_clip > 0 (dual clip: caps the loss of a negative
                                      advantage when the ratio explodes)
  kl      = k1: logp - ref_logp;  k2: (logp - ref_logp)^2 / 2;
            k3: exp(ref_logp - logp) - (ref_logp - logp) - 1, clamped to [-10, 10] (the low-variance estimator)
  loss    = agg(pg) + beta * agg(kl)

Aggregation (`agg`) over the mask:
  token-mean                sum(x) / number of tokens                                   (default)
  seq-mean-token-mean       mean over rows of (row's token sum / row's token count)
  seq-mean-token-sum-norm   mean over rows of (row's token sum / norm_length)           (Dr.GRPO; norm_length
                                                                                        defaults to R)
`num_tokens` / `num_rows` replace the denominators (the counts over the whole batch) when a batch is split
into micro-batches whose gradients are summed, so that the sum equals the loss of the whole batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

F32 = jnp.float32
KL_TYPES = ("k1", "k2", "k3")
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def kl_penalty(logprobs_NxR: jax.Array, ref_logprobs_NxR: jax.Array, kl_type: str = "k3") -> jax.Array:
  """Per-token estimate of KL(pi || pi_ref) from the sampled tokens' log-probs (module docstring)."""
  if kl_type not in KL_TYPES:
    raise ValueError(f"kl_type={kl_type!r} is not one of {KL_TYPES}.")
  log_ratio = logprobs_NxR.astype(F32) - ref_logprobs_NxR.astype(F32)
  if kl_type == "k1":
    return log_ratio
  if kl_type == "k2":
    return 0.5 * jnp.square(log_ratio)
  return jnp.clip(jnp.exp(-log_ratio) + log_ratio - 1.0, -10.0, 10.0)


def aggregate(x_NxR: jax.Array, mask_NxR: jax.Array, agg: str = "token-mean", *, num_tokens=None, num_rows=None,
              norm_length: int | None = None) -> jax.Array:
  """Reduces per-token values to a scalar with one of AGGREGATIONS (module docstring)."""
  if agg not in AGGREGATIONS:
    raise ValueError(f"loss aggregation {agg!r} is not one of {AGGREGATIONS}.")
  m = mask_NxR.astype(F32)
  x = jnp.where(mask_NxR, x_NxR.astype(F32), 0.0)
  if agg == "token-mean":
    den = jnp.sum(m) if num_tokens is None else num_tokens
    return jnp.sum(x) / jnp.maximum(den, 1.0)
  rows = x.shape[0] if num_rows is None else num_rows
  if agg == "seq-mean-token-mean":
    per_row = jnp.sum(x, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
  else:
    per_row = jnp.sum(x, axis=1) / float(x.shape[1] if norm_length is None else norm_length)
  return jnp.sum(per_row) / jnp.maximum(rows, 1)


def grpo_loss(logprobs_NxR: jax.Array, old_logprobs_NxR: jax.Array, advantages_NxR: jax.Array, mask_NxR: jax.Array,
              *, ref_logprobs_NxR: jax.Array | None = None, clip_low: float = 0.2, clip_high: float = 0.2,
              dual_clip: float = 3.0, beta: float = 0.0, kl_type: str = "k3", agg: str = "token-mean",
              entropy_NxR: jax.Array | None = None, entropy_coef: float = 0.0, num_tokens=None, num_rows=None,
              norm_length: int | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The GRPO loss and its metrics (module docstring for the formulas).

  Args:
    logprobs_NxR, old_logprobs_NxR, advantages_NxR: f32[N, R]; advantages are constants (no gradient flows
      into them or into old/ref log-probs: they are wrapped in stop_gradient here).
    mask_NxR: bool[N, R].
    ref_logprobs_NxR: required when beta > 0; ignored (and may be None: no reference model) when beta == 0.
    clip_low, clip_high: the ratio is clipped to [1 - clip_low, 1 + clip_high].
    dual_clip: c > 1 of the dual clip; 0 disables it.
    entropy_NxR: optional per-token policy entropy; its aggregate is reported as `entropy` and, with
      entropy_coef > 0, subtracted from the loss (an entropy bonus).
    num_tokens, num_rows, norm_length: denominators for micro-batching (module docstring).

  Returns:
    (loss, metrics): loss is a f32 scalar; metrics has pg_loss, kl (0 when beta == 0), clip_frac (share of
    tokens where the clipped term is the active one), dual_clip_frac, approx_kl (token-mean of old - new
    log-prob, the drift from pi_old) and, given entropy_NxR, entropy.
  """
  if clip_low < 0 or clip_high < 0:
    raise ValueError(f"clip_low={clip_low}, clip_high={clip_high}: clip ranges must be >= 0.")
  if dual_clip and dual_clip <= 1.0:
    raise ValueError(f"dual_clip={dual_clip}: the dual clip constant must be > 1 (or 0 to disable it).")
  if beta < 0:
    raise ValueError(f"beta={beta}: the KL coefficient must be >= 0.")
  if beta > 0 and ref_logprobs_NxR is None:
    raise ValueError(f"beta={beta} > 0 needs ref_logprobs_NxR (the reference model's log-probs); pass them or "
                     "set beta=0.")
  shape = logprobs_NxR.shape
  for name, x in (("old_logprobs_NxR", old_logprobs_NxR), ("advantages_NxR", advantages_NxR),
                  ("mask_NxR", mask_NxR), ("ref_logprobs_NxR", ref_logprobs_NxR), ("entropy_NxR", entropy_NxR)):
    if x is not None and x.shape != shape:
      raise ValueError(f"grpo_loss: {name} has shape {x.shape}, logprobs_NxR has {shape}; they must match.")
  kw = dict(num_tokens=num_tokens, num_rows=num_rows, norm_length=norm_length)
  logp = logprobs_NxR.astype(F32)
  old = jax.lax.stop_gradient(old_logprobs_NxR.astype(F32))
  adv = jax.lax.stop_gradient(advantages_NxR.astype(F32))
  log_ratio = jnp.clip(logp - old, -20.0, 20.0)
  ratio = jnp.exp(log_ratio)
  pg_plain = -adv * ratio
  pg_clipped = -adv * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
  pg = jnp.maximum(pg_plain, pg_clipped)
  dual_active = jnp.zeros(shape, bool)
  if dual_clip:
    pg_dual = jnp.minimum(pg, -adv * dual_clip)
    dual_active = (adv < 0) & (pg > -adv * dual_clip)
    pg = jnp.where(adv < 0, pg_dual, pg)
  pg_loss = aggregate(pg, mask_NxR, agg, **kw)
  metrics = {
      "pg_loss": pg_loss,
      "clip_frac": aggregate((pg_clipped > pg_plain).astype(F32), mask_NxR, "token-mean", num_tokens=num_tokens),
      "dual_clip_frac": aggregate(dual_active.astype(F32), mask_NxR, "token-mean", num_tokens=num_tokens),
      "approx_kl": aggregate(-log_ratio, mask_NxR, "token-mean", num_tokens=num_tokens),
  }
  loss = pg_loss
  kl = jnp.zeros((), F32)
  if beta > 0:
    kl = aggregate(kl_penalty(logp, jax.lax.stop_gradient(ref_logprobs_NxR), kl_type), mask_NxR, agg, **kw)
    loss = loss + beta * kl
  metrics["kl"] = kl
  if entropy_NxR is not None:
    entropy = aggregate(entropy_NxR, mask_NxR, agg, **kw)
    metrics["entropy"] = entropy
    if entropy_coef:
      loss = loss - entropy_coef * entropy
  return loss, metrics
