"""The pure, jitted optimizer step shared by SFT and (later) the RL update.

`make_train_step(...)` returns `step(state, batch) -> (state, metrics)`, one jitted call per *global* batch:
the batch carries a leading accumulation axis A (A x B x T) and a `lax.scan` over it sums gradients of the
micro-batches before one AdamW update, so accumulation costs no extra dispatches and no host round trips.

The loss is pluggable. A `LossFn(params, micro_batch) -> (loss_sum, (weight_sum, aux))` returns *sums*;
the step divides by the global weight sum, so the update is the exact token-mean over the whole global batch
(however it is split into micro-batches or devices) — the property the 1-vs-8-device and accumulation tests
check. SFT's loss is `sft_loss` (assistant-token cross-entropy); GRPO will pass its clipped-ratio loss with
the response mask as weights.

Precision: the optimizer keeps fp32 master parameters and moments (an lr of 1e-5 is below bf16's resolution
relative to O(1) weights, so bf16 master weights would not move); the loss casts them to `compute_dtype`
inside the differentiated function, so activations run in bf16 and gradients arrive in fp32.

Memory: the vocabulary projection is computed in sequence chunks under `jax.checkpoint` (`head_logprobs`,
behind `token_logprobs`), so at most one B x C x V fp32 logits chunk (and its gradient) is live: a 151k
vocab x 8192 positions never materialises.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding

from spark_jax import sharding as shd
from spark_jax.models import ModelConfig, hidden_states, logits_from_hidden, param_logical_axes
from spark_jax.models.decoder import abstract_params
from spark_jax.models.load import param_shardings

Params = dict[str, Any]
Batch = Mapping[str, jax.Array]
State = dict[str, Any]  # {"step": int32 scalar, "params": Params (fp32 master), "opt_state": optax state}
LossFn = Callable[[Params, Batch], tuple[jax.Array, tuple[jax.Array, dict[str, jax.Array]]]]
F32 = jnp.float32


# ----------------------------------------------------------------------------------------------- the loss


def head_logprobs(cfg: ModelConfig, params: Params, hidden_BxTxD: jax.Array, targets_BxT: jax.Array, *,
                  chunk: int = 1024) -> tuple[jax.Array, jax.Array]:
  """(log p(target) B×T fp32 under the full softmax, target-is-argmax B×T bool), the head run `chunk` positions
  at a time.

  Each chunk's logits are recomputed in the backward pass (jax.checkpoint around the scan body), so memory
  holds one B x chunk x V fp32 block instead of B x T x V. The target logit is picked with a compare-and-sum
  over the vocabulary instead of a gather, which stays local when the vocabulary is sharded over "tensor".
  Ties with the maximum count as argmax hits (fine for an accuracy metric).
  """
  B, T, D = hidden_BxTxD.shape
  c = max(1, min(chunk, T))
  pad = (-T) % c
  if pad:
    hidden_BxTxD = jnp.pad(hidden_BxTxD, ((0, 0), (0, pad), (0, 0)))
    targets_BxT = jnp.pad(targets_BxT, ((0, 0), (0, pad)))
  n = (T + pad) // c
  h_JxBxCxD = hidden_BxTxD.reshape(B, n, c, D).swapaxes(0, 1)  # J sequence chunks of C positions
  t_JxBxC = targets_BxT.reshape(B, n, c).swapaxes(0, 1)

  @functools.partial(jax.checkpoint, prevent_cse=False)
  def chunk_logprobs(h_BxCxD, t_BxC):
    logits_BxCxV = logits_from_hidden(cfg, params, h_BxCxD)
    lse_BxC = jax.nn.logsumexp(logits_BxCxV, axis=-1)
    vocab_V = jnp.arange(logits_BxCxV.shape[-1], dtype=t_BxC.dtype)
    target_BxC = jnp.sum(jnp.where(vocab_V == t_BxC[..., None], logits_BxCxV, 0.0), axis=-1)
    hit_BxC = jax.lax.stop_gradient(target_BxC >= jnp.max(logits_BxCxV, axis=-1))
    return target_BxC - lse_BxC, hit_BxC

  if n == 1:  # one chunk: no loop (and a faster compile)
    logp_BxT, hit_BxT = chunk_logprobs(h_JxBxCxD[0], t_JxBxC[0])
  else:
    _, (logp_JxBxC, hit_JxBxC) = jax.lax.scan(lambda carry, xs: (carry, chunk_logprobs(*xs)), None,
                                              (h_JxBxCxD, t_JxBxC))
    logp_BxT = logp_JxBxC.swapaxes(0, 1).reshape(B, n * c)
    hit_BxT = hit_JxBxC.swapaxes(0, 1).reshape(B, n * c)
  return logp_BxT[:, :T].astype(F32), hit_BxT[:, :T]


def token_logprobs(cfg: ModelConfig, params: Params, tokens_BxT: jax.Array, targets_BxT: jax.Array, *,
                   positions_BxT: jax.Array | None = None, mask_BxT: jax.Array | None = None,
                   chunk: int = 1024) -> jax.Array:
  """log p(targets[b, t] | tokens[b, :t+1]) B×T fp32 under the full softmax, without a B×T×V array.

  The shared log-probability of SFT (its loss is -logprobs * weights) and the RL update (policy and reference
  log-probs of the sampled response). `mask_BxT` (1 = real token) and `positions_BxT` are the decoder's;
  positions where the mask is 0 hold values the caller must weight out.
  """
  hidden_BxTxD = hidden_states(cfg, params, tokens_BxT, positions=positions_BxT, mask=mask_BxT)
  return head_logprobs(cfg, params, hidden_BxTxD, jnp.asarray(targets_BxT), chunk=chunk)[0]


def sft_loss(cfg: ModelConfig, params: Params, batch: Batch, *, logits_chunk: int = 1024):
  """Assistant-token cross-entropy as sums: (nll_sum, (loss_tokens, {"accuracy_sum": hits, "seq_tokens": n})).

  batch: tokens, targets, weights, mask (B×T); weights[t] = 1 where target t is an assistant token. The same
  computation as `token_logprobs` (one hidden-state pass, the chunked head), plus the argmax hits for accuracy.
  """
  hidden_BxTxD = hidden_states(cfg, params, batch["tokens"], mask=batch["mask"])
  logp_BxT, hit_BxT = head_logprobs(cfg, params, hidden_BxTxD, batch["targets"], chunk=logits_chunk)
  weights_BxT = batch["weights"].astype(F32)
  nll = -jnp.sum(logp_BxT * weights_BxT)
  correct = jnp.sum(hit_BxT.astype(F32) * weights_BxT)
  return nll, (jnp.sum(weights_BxT), {"accuracy_sum": correct, "seq_tokens": jnp.sum(batch["mask"].astype(F32))})


# ----------------------------------------------------------------------------------------------- optimizer


def warmup_cosine(peak_lr: float, total_steps: int, warmup_steps: int, end_lr: float = 0.0) -> optax.Schedule:
  """Linear warm-up to `peak_lr` over `warmup_steps` updates (the first update already uses peak/warmup, not
  0, so no update is wasted), then cosine decay to `end_lr` at `total_steps`."""
  warm = max(0, int(warmup_steps))
  decay = max(1, int(total_steps) - warm)

  def schedule(step):
    step = jnp.asarray(step, F32)
    warm_lr = peak_lr * (step + 1.0) / max(warm, 1)
    progress = jnp.clip((step - warm) / decay, 0.0, 1.0)
    cos_lr = end_lr + 0.5 * (peak_lr - end_lr) * (1.0 + jnp.cos(jnp.pi * progress))
    return jnp.where(step < warm, warm_lr, cos_lr)

  return schedule


def weight_decay_mask(cfg: ModelConfig) -> Params:
  """True for matrices (>= 2 axes besides the stacked `layers` axis); norms and biases are not decayed."""
  is_axes = lambda x: isinstance(x, tuple) and all(isinstance(e, (str, type(None))) for e in x)
  return jax.tree.map(lambda ax: sum(a != "layers" for a in ax) >= 2, param_logical_axes(cfg), is_leaf=is_axes)


def make_optimizer(cfg: ModelConfig, *, lr: float, total_steps: int, warmup_ratio: float = 0.03,
                   weight_decay: float = 0.0, grad_clip: float = 1.0, b1: float = 0.9, b2: float = 0.999,
                   eps: float = 1e-8, end_lr_ratio: float = 0.0,
                   schedule: str = "cosine") -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW (+ global-norm clipping when grad_clip > 0) with the D9 warm-up + cosine schedule.

  schedule: "cosine" (D9) or "constant" (the RL update's D10 default, lr held after warm-up).
  """
  if total_steps <= 0:
    raise ValueError(f"total_steps={total_steps}: the schedule needs at least one update.")
  warmup = int(math.ceil(warmup_ratio * total_steps)) if warmup_ratio > 0 else 0
  if schedule == "cosine":
    sched = warmup_cosine(lr, total_steps, warmup, end_lr_ratio * lr)
  elif schedule == "constant":
    sched = warmup_cosine(lr, total_steps, warmup, lr)
  else:
    raise ValueError(f"schedule={schedule!r}; use 'cosine' or 'constant'.")
  parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip and grad_clip > 0 else []
  parts.append(optax.adamw(sched, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                           mask=weight_decay_mask(cfg)))
  return optax.chain(*parts), sched


# ------------------------------------------------------------------------------------------------ sharding


def state_shardings(cfg: ModelConfig, tx: optax.GradientTransformation, mesh, rules=shd.DEFAULT_RULES) -> State:
  """Shardings of {"step", "params", "opt_state"}: moments follow their parameter, counters replicate."""
  p_sh = param_shardings(cfg, mesh, rules)
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, F32), abstract_params(cfg))
  opt_abstract = jax.eval_shape(tx.init, abstract)
  rep = shd.replicated(mesh)
  opt_sh = optax.tree_map_params(tx, lambda _, s: s, opt_abstract, p_sh,
                                 transform_non_params=lambda _: rep,
                                 is_leaf=lambda x: isinstance(x, NamedSharding))
  return {"step": rep, "params": p_sh, "opt_state": opt_sh}


def abstract_state(cfg: ModelConfig, tx: optax.GradientTransformation, mesh, rules=shd.DEFAULT_RULES) -> State:
  """ShapeDtypeStructs (with shardings) of the train state: the orbax restore target, no memory used."""
  sh = state_shardings(cfg, tx, mesh, rules)
  params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, F32), abstract_params(cfg))
  shapes = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": params,
            "opt_state": jax.eval_shape(tx.init, params)}
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, sh)


def init_state(cfg: ModelConfig, params: Params, tx: optax.GradientTransformation, mesh,
               rules=shd.DEFAULT_RULES) -> State:
  """Train state from parameters: fp32 master copy, fresh optimizer moments, all placed on the mesh."""
  sh = state_shardings(cfg, tx, mesh, rules)

  def init(p):
    p = jax.tree.map(lambda x: x.astype(F32), p)
    return {"step": jnp.zeros((), jnp.int32), "params": p, "opt_state": tx.init(p)}

  return jax.jit(init, out_shardings=sh)(params)


def batch_sharding(mesh, accum: bool = True, rules=shd.DEFAULT_RULES) -> NamedSharding:
  """A×B×T (or B×T) batches: rows over ("data", "fsdp"), the accumulation and length axes unsharded."""
  axes = (None, "batch", "length") if accum else ("batch", "length")
  return NamedSharding(mesh, shd.logical_to_spec(axes, rules))


# ------------------------------------------------------------------------------------------------ the step


def _cast(params: Params, dtype) -> Params:
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


def make_train_step(cfg: ModelConfig, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    loss_fn: LossFn, mesh, *, compute_dtype: str | None = None, rules=shd.DEFAULT_RULES,
                    donate: bool = True):
  """Jitted `step(state, batch) -> (state, metrics)`; batch leaves are A×B×T (A = accumulation steps).

  Metrics (replicated fp32 scalars): loss (token mean over the global batch), grad_norm (before clipping),
  lr (of this update), tokens (loss weight sum), plus the loss's aux values summed over micro-batches: an aux
  key "<name>_sum" is reported as "<name>" divided by `tokens` (e.g. accuracy), any other key as its total
  (e.g. seq_tokens). Trace under `sharding.use_mesh(mesh)` so the model's activation constraints apply.
  """
  dtype = jnp.dtype(compute_dtype or cfg.dtype)
  sh = state_shardings(cfg, tx, mesh, rules)
  p_sh = sh["params"]

  def step(state: State, batch: Batch):
    params = state["params"]

    def micro_loss(p32, micro):
      num, (den, aux) = loss_fn(_cast(p32, dtype), micro)
      return num, (den, aux)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def body(carry, micro):
      g_acc, num_acc, den_acc, aux_acc = carry
      (num, (den, aux)), g = grad_fn(params, micro)
      g_acc = jax.lax.with_sharding_constraint(jax.tree.map(jnp.add, g_acc, g), p_sh)
      aux_acc = jax.tree.map(jnp.add, aux_acc, aux)
      return (g_acc, num_acc + num, den_acc + den, aux_acc), None

    first = jax.tree.map(lambda x: x[0], batch)
    aux0 = jax.tree.map(lambda x: jnp.zeros(x.shape, F32), jax.eval_shape(micro_loss, params, first)[1][1])
    g0 = jax.lax.with_sharding_constraint(jax.tree.map(jnp.zeros_like, params), p_sh)
    zero = jnp.zeros((), F32)
    (g_sum, num, den, aux), _ = jax.lax.scan(body, (g0, zero, zero, aux0), batch)
    scale = 1.0 / jnp.maximum(den, 1.0)
    grads = jax.tree.map(lambda g: g * scale, g_sum)
    grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(F32))) for g in jax.tree.leaves(grads)))
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    metrics = {"loss": num * scale, "grad_norm": grad_norm, "lr": jnp.asarray(schedule(state["step"]), F32),
               "tokens": den}
    for k, v in aux.items():  # "<name>_sum" -> per-token mean "<name>"; other aux values stay totals
      metrics[k[:-4] if k.endswith("_sum") else k] = v * scale if k.endswith("_sum") else v
    new_state = {"step": state["step"] + 1, "params": new_params, "opt_state": opt_state}
    return new_state, metrics

  return jax.jit(step, out_shardings=(sh, shd.replicated(mesh)), donate_argnums=(0,) if donate else ())


def make_eval_step(cfg: ModelConfig, loss_fn: LossFn, mesh, *, compute_dtype: str | None = None):
  """Jitted `eval(params, batch) -> {"loss_sum", "tokens", aux sums}` on a B×T batch (sums: add over batches)."""
  dtype = jnp.dtype(compute_dtype or cfg.dtype)

  def evaluate(params: Params, batch: Batch):
    num, (den, aux) = loss_fn(_cast(params, dtype), batch)
    return {"loss_sum": num, "tokens": den, **aux}

  return jax.jit(evaluate, out_shardings=shd.replicated(mesh))

