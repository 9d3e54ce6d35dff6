"""The decoder family (Qwen2/2.5, Qwen3 dense, Llama-3/SmolLM2) as Flax NNX modules, used functionally.

Modules define the parameters and the math; callers never hold a live module. Every public function takes
`(cfg, params)` where `params` is a plain nested dict of arrays (`nnx.split` + `to_pure_dict` at the
boundary), so policy, reference and reward-model parameters can sit side by side in one jitted graph.

Layers are stored stacked (leading `layers` axis) and run under `lax.scan`, so compile time does not grow
with depth; `scan_layers=False` unrolls them instead (for shallow models on CPU, where the scan's stacked
residual buffers cost more than the extra compile time). Norms, softmax and logits are computed in fp32 whatever the parameter dtype.

Arrays carry their shape in their names (q_BxKxGxTxE); each letter has one meaning across the package,
listed once in docs/shapes.md.
"""

from __future__ import annotations

import dataclasses
import math
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from spark_jax.models.config import ModelConfig
from spark_jax.sharding import constrain

Params = dict[str, Any]
F32 = jnp.float32


def _param(shape, dtype, axes, stack: int | None):
  if stack is not None:
    shape, axes = (stack, *shape), ("layers", *axes)
  return nnx.Param(jnp.zeros(shape, dtype), logical_axes=axes)


class RMSNorm(nnx.Module):
  def __init__(self, dim: int, eps: float, dtype, stack: int | None = None):
    self.scale = _param((dim,), dtype, ("norm",), stack)
    self.eps = eps

  def __call__(self, x):
    return rms_norm(x, self.scale[...], self.eps)


def rms_norm(x, scale, eps: float):
  """RMSNorm in fp32, cast back before the scale (the HF order of operations)."""
  x32 = x.astype(F32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (y.astype(x.dtype) * scale).astype(x.dtype)


class Proj(nnx.Module):
  """A linear map over a multi-dimensional kernel (e.g. D×H×E), fp32 accumulation.

  `equation` names the map, "bt<contracted>,<contracted><kept>->bt<kept>" (e.g. "btd,dhe->bthe"); it runs as
  one 2D matmul, (B·T)×C by C×K, with C and K the products of the contracted and kept kernel dims (reshapes
  of row-major arrays: no copies). On XLA:CPU the 3D einsum's backward pass transposed the B×T×F activation
  gradient for the weight gradient, fused with the elementwise work before it: a training step of the
  world's 4-layer model ran 2x slower in the MLP than with the 2D form."""

  def __init__(self, equation: str, kernel_shape, kernel_axes, bias_shape, bias_axes, dtype,
               stack: int | None = None):
    lhs, rest = equation.split(",")
    rhs, out = rest.split("->")
    contracted = lhs[2:]
    if not (lhs[:2] == out[:2] == "bt" and rhs == contracted + out[2:]):
      raise ValueError(f"Proj equation {equation!r}: expected 'bt<contracted>,<contracted><kept>->bt<kept>'.")
    self.equation = equation
    self.num_contracted = len(contracted)
    self.kernel = _param(kernel_shape, dtype, kernel_axes, stack)
    self.bias = _param(bias_shape, dtype, bias_axes, stack) if bias_shape is not None else None

  def __call__(self, x):
    kernel = self.kernel[...]
    c = self.num_contracted
    kept = kernel.shape[c:]
    B, T = x.shape[:2]
    y = jnp.dot(x.reshape(B * T, math.prod(kernel.shape[:c])), kernel.reshape(-1, math.prod(kept)),
                preferred_element_type=F32).reshape(B, T, *kept)
    if self.bias is not None:
      y = y + self.bias[...].astype(F32)
    return y.astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> jax.Array:
  e = cfg.head_dim
  inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, e, 2, dtype=F32) / e))
  if cfg.rope_scaling is not None and dict(cfg.rope_scaling).get("rope_type") == "llama3":
    s = dict(cfg.rope_scaling)
    factor, lo, hi, old = s["factor"], s["low_freq_factor"], s["high_freq_factor"], s["original_max_position_embeddings"]
    wavelen = 2 * jnp.pi / inv
    smooth = (old / wavelen - lo) / (hi - lo)
    scaled = jnp.where(wavelen > old / lo, inv / factor, inv)
    mid = (1 - smooth) * inv / factor + smooth * inv
    inv = jnp.where((wavelen <= old / lo) & (wavelen >= old / hi), mid, scaled)
  return inv


def apply_rope(x_BxTxHxE, positions_BxT, inv_freq_E2):
  """Rotary embedding in the HF (rotate-half) layout, computed in fp32 (keys pass K heads in place of H)."""
  angles = positions_BxT.astype(F32)[..., None] * inv_freq_E2  # B×T×E/2
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  x = x_BxTxHxE.astype(F32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxTxHxE.dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
  """Per-layer keys (stored transposed: faster decode dot products) and values, plus valid-slot flags.

  All rows write at the same slot index (prompts are left-padded to one length), so a decode step is one
  dynamic_update_slice per layer; `valid_BxS` marks padding slots that attention must ignore.
  """

  k_LxBxKxExS: jax.Array
  v_LxBxKxSxE: jax.Array
  valid_BxS: jax.Array

  @property
  def max_length(self) -> int:
    return self.valid_BxS.shape[1]


def init_cache(cfg: ModelConfig, batch: int, max_length: int, dtype=None) -> KVCache:
  dtype = jnp.dtype(dtype or cfg.dtype)
  L, K, E = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
  return KVCache(
      k_LxBxKxExS=jnp.zeros((L, batch, K, E, max_length), dtype),
      v_LxBxKxSxE=jnp.zeros((L, batch, K, max_length, E), dtype),
      valid_BxS=jnp.zeros((batch, max_length), jnp.bool_),
  )


class Attention(nnx.Module):
  def __init__(self, cfg: ModelConfig, stack: int | None = None):
    d, h, k, e, dt = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, jnp.dtype(cfg.dtype)
    bias = cfg.qkv_bias
    self.q_proj = Proj("btd,dhe->bthe", (d, h, e), ("embed", "heads", "head_dim"),
                       (h, e) if bias else None, ("heads", "head_dim"), dt, stack)
    self.k_proj = Proj("btd,dke->btke", (d, k, e), ("embed", "kv_heads", "head_dim"),
                       (k, e) if bias else None, ("kv_heads", "head_dim"), dt, stack)
    self.v_proj = Proj("btd,dke->btke", (d, k, e), ("embed", "kv_heads", "head_dim"),
                       (k, e) if bias else None, ("kv_heads", "head_dim"), dt, stack)
    self.o_proj = Proj("bthe,hed->btd", (h, e, d), ("heads", "head_dim", "embed"), None, None, dt, stack)
    if cfg.qk_norm:
      self.q_norm = RMSNorm(e, cfg.rms_norm_eps, dt, stack)
      self.k_norm = RMSNorm(e, cfg.rms_norm_eps, dt, stack)
    self.cfg = cfg

  def __call__(self, x_BxTxD, positions_BxT, mask_BxTxS, cache_kv=None, write_index=None, prefix_kv=None):
    cfg = self.cfg
    q = self.q_proj(x_BxTxD)
    k = self.k_proj(x_BxTxD)
    v = self.v_proj(x_BxTxD)
    if cfg.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    inv_freq = rope_inv_freq(cfg)
    q = apply_rope(q, positions_BxT, inv_freq)
    k = apply_rope(k, positions_BxT, inv_freq)
    q = constrain(q, ("batch", "length", "act_heads", None))
    B, T, H, E = q.shape
    K = cfg.num_kv_heads
    q_BxKxGxTxE = q.reshape(B, T, K, H // K, E).transpose(0, 2, 3, 1, 4)
    if cache_kv is None:
      k_BxKxExS = k.transpose(0, 2, 3, 1)
      v_BxKxSxE = v.transpose(0, 2, 1, 3)
      new_cache = None
    elif T == 1:
      # Decode: attend over this layer's cache as it was (slots before write_index) plus the new token
      # itself, then write the new key/value in place. Reading the layer after writing it instead lets
      # XLA fuse the write into the read, which then needs the pre-update buffer: copy insertion answered
      # with whole-cache copies every layer of every step.
      k_cache, v_cache, layer = cache_kv
      k_new_BxKxE, v_new_BxKxE = k[:, 0], v[:, 0]
      mask_BxS = mask_BxTxS[:, 0]
      slots_S = jnp.arange(mask_BxS.shape[-1])
      if jnp.ndim(write_index) == 0:
        before_BxS = slots_S[None, :] < write_index
        new_valid_B = jax.lax.dynamic_index_in_dim(mask_BxS, write_index, axis=1, keepdims=False)
      else:  # one slot per row (continuous batching: rows are at different token indices)
        before_BxS = slots_S[None, :] < write_index[:, None]
        new_valid_B = jnp.take_along_axis(mask_BxS, write_index[:, None], axis=1)[:, 0]
      out = _decode_attention(q_BxKxGxTxE[:, :, :, 0], _cache_layer(k_cache, layer), _cache_layer(v_cache, layer),
                              k_new_BxKxE, v_new_BxKxE, mask_BxS & before_BxS, new_valid_B, prefix_kv)
      out = out[:, :, :, None].astype(x_BxTxD.dtype)
      # A data dependency of the write on the attention output (x 0: free) orders the layer read before
      # the in-place write; without it copy insertion cannot prove the order and copies the whole cache.
      after = (out[0, 0, 0, 0, 0] * 0).astype(k_new_BxKxE.dtype)
      if jnp.ndim(write_index) == 0:
        new_cache = (_cache_write(k_cache, (k_new_BxKxE + after)[..., None], layer, (0, 0, 0, write_index)),
                     _cache_write(v_cache, (v_new_BxKxE + after)[:, :, None], layer, (0, 0, write_index, 0)))
      else:
        new_cache = (_cache_write_rows(k_cache, k_new_BxKxE + after, layer, write_index, slot_axis=3),
                     _cache_write_rows(v_cache, v_new_BxKxE + after, layer, write_index, slot_axis=2))
    else:
      if prefix_kv is not None:
        raise ValueError("forward_cached: a shared prefix is for decode steps (one new token per row); prefill "
                         "the prefix itself without one.")
      k_cache, v_cache, layer = cache_kv
      new_cache = (_cache_write(k_cache, k.transpose(0, 2, 3, 1), layer, (0, 0, 0, write_index)),
                   _cache_write(v_cache, v.transpose(0, 2, 1, 3), layer, (0, 0, write_index, 0)))
      k_BxKxExS, v_BxKxSxE = _cache_layer(new_cache[0], layer), _cache_layer(new_cache[1], layer)
    if cache_kv is None or T > 1:
      out = _chunked_attention(q_BxKxGxTxE, k_BxKxExS.astype(q.dtype), v_BxKxSxE, mask_BxTxS,
                               cfg.attention_chunk).astype(x_BxTxD.dtype)
    flat_out = out.transpose(0, 3, 1, 2, 4).reshape(B, T, H * E)  # B×T×(H·E)
    # One flat contraction over (heads, head_dim) (Proj's 2D matmul): given the two contracting dims
    # separately, XLA's CPU layout assignment transposed the H×E×D weight (a full copy of it every decode
    # step) to match an E-major activation.
    return self.o_proj(flat_out), new_cache


def _cache_layer(cache, layer):
  """This layer's B×K×… cache: `cache` is the stacked L×B×K×… array (layer = index) or the layer's own."""
  return cache if layer is None else jax.lax.dynamic_index_in_dim(cache, layer, keepdims=False)


def _cache_write(cache, new, layer, index):
  """Writes `new` (B×K×… block) at `index` of this layer's cache, in the stacked or per-layer layout."""
  if layer is None:
    return jax.lax.dynamic_update_slice(cache, new.astype(cache.dtype), index)
  return jax.lax.dynamic_update_slice(cache, new[None].astype(cache.dtype), (layer, *index))


def _cache_write_rows(cache, new_BxKxE, layer, slots_B, slot_axis: int):
  """Writes row b's new key or value at its own slot `slots_B[b]` (in place inside a loop).

  `slot_axis` is the slot dimension of this layer's B×K×… buffer: 3 for keys (B×K×E×S), 2 for values
  (B×K×S×E). A `dynamic_update_slice` mapped over rows: XLA's partitioner keeps it local to each row shard,
  where an indexed scatter (`.at[rows, ..., slots]`) gathered the updates and indices across the mesh.
  Slots are in range (the caller clips them)."""
  new_BxKxE = new_BxKxE.astype(cache.dtype)

  def write_row(row, new_KxE, slot):  # row: K×E×S or K×S×E, or L×… with the layer axis first
    update = jnp.expand_dims(new_KxE, slot_axis - 1)
    start = [0, 0, 0]
    start[slot_axis - 1] = slot
    if layer is None:
      return jax.lax.dynamic_update_slice(row, update, start)
    return jax.lax.dynamic_update_slice(row, update[None], [layer] + start)

  row_axis = 0 if layer is None else 1
  return jax.vmap(write_row, in_axes=(row_axis, 0, 0), out_axes=row_axis)(cache, new_BxKxE, slots_B)


def _attend(q_BxKxGxTxE, k_BxKxExS, v_BxKxSxE, mask_BxTxS):
  E = q_BxKxGxTxE.shape[-1]
  scores = jnp.einsum("bkgte,bkes->bkgts", q_BxKxGxTxE, k_BxKxExS, preferred_element_type=F32) * (E ** -0.5)
  scores = jnp.where(mask_BxTxS[:, None, None], scores, jnp.finfo(F32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v_BxKxSxE.dtype)
  return jnp.einsum("bkgts,bkse->bkgte", probs, v_BxKxSxE, preferred_element_type=F32)


def _chunked_attention(q_BxKxGxTxE, k_BxKxExS, v_BxKxSxE, mask_BxTxS, chunk: int):
  """Attention over blocks of `chunk` queries (a `lax.map`), so the fp32 scores held at once are
  B×H×chunk×S instead of B×H×T×S: at T = S = 8192 the unchunked scores of one row and layer of a 40-head
  model are 10 GiB. Queries are padded to a multiple of the chunk (padded rows are dropped)."""
  B, K, G, T, E = q_BxKxGxTxE.shape
  if chunk <= 0 or T <= chunk:
    return _attend(q_BxKxGxTxE, k_BxKxExS, v_BxKxSxE, mask_BxTxS)
  n = -(-T // chunk)
  pad = n * chunk - T
  q = jnp.pad(q_BxKxGxTxE, ((0, 0), (0, 0), (0, 0), (0, pad), (0, 0)))
  mask = jnp.pad(mask_BxTxS, ((0, 0), (0, pad), (0, 0)))
  q_JxBxKxGxCxE = q.reshape(B, K, G, n, chunk, E).transpose(3, 0, 1, 2, 4, 5)
  mask_JxBxCxS = mask.reshape(B, n, chunk, -1).transpose(1, 0, 2, 3)
  out = jax.lax.map(lambda qm: _attend(qm[0], k_BxKxExS, v_BxKxSxE, qm[1]), (q_JxBxKxGxCxE, mask_JxBxCxS))
  return out.transpose(1, 2, 3, 0, 4, 5).reshape(B, K, G, n * chunk, E)[:, :, :, :T]


def _decode_attention(q_NxKxGxE, k_NxKxExS, v_NxKxSxE, k_new_NxKxE, v_new_NxKxE, mask_NxS, new_valid_N,
                      prefix_kv=None):
  """One query token per row against the cache (slots where mask_NxS), its own new key/value and, if given, a
  shared read-only prefix, with one softmax over all of them, in fp32. The N rows are the decoder's batch; with
  a prefix they are B prompts × A samples, prompt-major.

  Own cache: batched dot products (einsum) over (row, kv head). An earlier multiply-reduce form
  (`sum(q[..., None] * k, axis=E)`) was meant to fuse with the cache read; measured on XLA:CPU it is never
  faster and collapses when a kv head has one query head (G = 1): 219 ms vs 3.2 ms per layer at 256 rows x
  257 slots, E = 32 (benchmarks/sampling.py --attention).

  `prefix_kv` = (k_pre_BxKxExP, v_pre_BxKxPxE, valid_BxP): P slots of each of B prompts, shared by its A = N / B
  consecutive rows (the samples of that prompt). Reading them once per group instead of once per row is the
  point: with 16 samples of a long prompt the prompt's keys and values are most of the bytes a decode step
  reads. Grouped, the scores are real matmuls (the group's samples × G query heads against the prompt's keys).
  """
  N, K, G, E = q_NxKxGxE.shape
  q = q_NxKxGxE.astype(F32) * (E ** -0.5)
  neg = jnp.finfo(F32).min
  scores_NxKxGxS = jnp.einsum("nkge,nkes->nkgs", q, k_NxKxExS.astype(F32))
  scores_NxKxGxS = jnp.where(mask_NxS[:, None, None], scores_NxKxGxS, neg)
  score_new_NxKxG = jnp.sum(q * k_new_NxKxE[:, :, None].astype(F32), axis=-1)
  score_new_NxKxG = jnp.where(new_valid_N[:, None, None], score_new_NxKxG, neg)
  top = jnp.maximum(jnp.max(scores_NxKxGxS, axis=-1), score_new_NxKxG)
  if prefix_kv is not None:
    k_pre_BxKxExP, v_pre_BxKxPxE, valid_BxP = prefix_kv
    B, P = valid_BxP.shape
    if N % B:
      raise ValueError(f"decode attention: {N} rows do not split into groups over the prefix's {B} rows; rows "
                       "must be prompt-major with the same number of samples per prompt.")
    q_BxAxKxGxE = q.reshape(B, N // B, K, G, E).astype(k_pre_BxKxExP.dtype)
    scores_BxAxKxGxP = jnp.einsum("bakge,bkep->bakgp", q_BxAxKxGxE, k_pre_BxKxExP, preferred_element_type=F32)
    scores_BxAxKxGxP = jnp.where(valid_BxP[:, None, None, None], scores_BxAxKxGxP, neg)
    top = jnp.maximum(top, jnp.max(scores_BxAxKxGxP, axis=-1).reshape(N, K, G))
  p_NxKxGxS = jnp.exp(scores_NxKxGxS - top[..., None])
  p_new_NxKxG = jnp.exp(score_new_NxKxG - top)
  denom = jnp.sum(p_NxKxGxS, axis=-1) + p_new_NxKxG
  out = jnp.einsum("nkgs,nkse->nkge", p_NxKxGxS, v_NxKxSxE.astype(F32))
  out = out + p_new_NxKxG[..., None] * v_new_NxKxE[:, :, None].astype(F32)
  if prefix_kv is not None:
    p_BxAxKxGxP = jnp.exp(scores_BxAxKxGxP - top.reshape(B, N // B, K, G)[..., None])
    denom = denom + jnp.sum(p_BxAxKxGxP, axis=-1).reshape(N, K, G)
    out = out + jnp.einsum("bakgp,bkpe->bakge", p_BxAxKxGxP.astype(v_pre_BxKxPxE.dtype), v_pre_BxKxPxE,
                           preferred_element_type=F32).reshape(N, K, G, E)
  return out / denom[..., None]


class MLP(nnx.Module):
  def __init__(self, cfg: ModelConfig, stack: int | None = None):
    d, f, dt = cfg.hidden_size, cfg.intermediate_size, jnp.dtype(cfg.dtype)
    self.gate_proj = Proj("btd,df->btf", (d, f), ("embed", "mlp"), None, None, dt, stack)
    self.up_proj = Proj("btd,df->btf", (d, f), ("embed", "mlp"), None, None, dt, stack)
    self.down_proj = Proj("btf,fd->btd", (f, d), ("mlp", "embed"), None, None, dt, stack)

  def __call__(self, x_BxTxD):
    h = jax.nn.silu(self.gate_proj(x_BxTxD).astype(F32)).astype(x_BxTxD.dtype) * self.up_proj(x_BxTxD)
    h = constrain(h, ("batch", "length", "act_mlp"))
    return self.down_proj(h)


class Block(nnx.Module):
  def __init__(self, cfg: ModelConfig, stack: int | None = None):
    dt = jnp.dtype(cfg.dtype)
    self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dt, stack)
    self.attn = Attention(cfg, stack)
    self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dt, stack)
    self.mlp = MLP(cfg, stack)

  def __call__(self, x_BxTxD, positions_BxT, mask_BxTxS, cache_kv=None, write_index=None, prefix_kv=None):
    attn_out, new_cache = self.attn(self.input_norm(x_BxTxD), positions_BxT, mask_BxTxS, cache_kv, write_index,
                                    prefix_kv)
    x = x_BxTxD + attn_out
    x = x + self.mlp(self.post_attn_norm(x))
    return constrain(x, ("batch", "length", "act_embed")), new_cache


class Decoder(nnx.Module):
  def __init__(self, cfg: ModelConfig):
    dt = jnp.dtype(cfg.dtype)
    self.embed = nnx.Param(jnp.zeros((cfg.vocab_size, cfg.hidden_size), dt), logical_axes=("vocab", "embed"))
    self.layers = Block(cfg, stack=cfg.num_layers)
    self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dt)
    if not cfg.tie_embeddings:
      self.lm_head = nnx.Param(jnp.zeros((cfg.hidden_size, cfg.vocab_size), dt), logical_axes=("embed", "vocab"))
    self.cfg = cfg


@functools.lru_cache(maxsize=None)
def _abstract(cfg: ModelConfig):
  model = nnx.eval_shape(lambda: Decoder(cfg))
  graphdef, state = nnx.split(model)
  block_graphdef, _ = nnx.split(nnx.eval_shape(lambda: Block(cfg)))
  return graphdef, state, block_graphdef


def abstract_params(cfg: ModelConfig) -> Params:
  """Params pytree of ShapeDtypeStructs (no memory)."""
  return nnx.to_pure_dict(_abstract(cfg)[1])


def param_logical_axes(cfg: ModelConfig) -> Params:
  """Same tree as the params, with a tuple of logical axis names per leaf."""
  state = _abstract(cfg)[1]
  leaves, _ = jax.tree_util.tree_flatten_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  out: Params = {}
  for path, variable in leaves:
    keys = [getattr(k, "key", getattr(k, "name", k)) for k in path]
    node = out
    for k in keys[:-1]:
      node = node.setdefault(k, {})
    node[keys[-1]] = tuple(variable.logical_axes)
  return out


def _merge(cfg: ModelConfig, params: Params) -> Decoder:
  graphdef, abstract_state, _ = _abstract(cfg)
  state = jax.tree.map(lambda x: x, abstract_state)  # a fresh copy: replace_by_pure_dict mutates
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(graphdef, state)


_REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def _apply_block(cfg, layer_params, x_BxTxD, positions_BxT, mask_BxTxS, cache_kv=None, write_index=None,
                 prefix_kv=None):
  state = jax.tree.map(lambda x: x, _abstract_block_state(cfg))
  nnx.replace_by_pure_dict(state, layer_params)
  block = nnx.merge(_abstract(cfg)[2], state)
  return block(x_BxTxD, positions_BxT, mask_BxTxS, cache_kv, write_index, prefix_kv)


def _run_layers(cfg, params, x_BxTxD, positions_BxT, mask_BxTxS, cache: KVCache | None, write_index,
                prefix: KVCache | None = None):
  block_state = params["layers"]

  def prefix_layer(i):
    """This layer's (keys, values, valid) of the shared prefix, or None."""
    if prefix is None:
      return None
    k, v = prefix.k_LxBxKxExS, prefix.v_LxBxKxSxE
    if isinstance(k, (list, tuple)):
      return k[i], v[i], prefix.valid_BxS
    return _cache_layer(k, i), _cache_layer(v, i), prefix.valid_BxS

  def body(carry, layer_params_and_index):
    x, k_all, v_all = carry
    layer_params, i = layer_params_and_index
    if k_all is None:
      x, _ = _apply_block(cfg, layer_params, x, positions_BxT, mask_BxTxS)
    else:
      x, (k_all, v_all) = _apply_block(cfg, layer_params, x, positions_BxT, mask_BxTxS, (k_all, v_all, i),
                                       write_index, prefix_layer(i))
    return (x, k_all, v_all), None

  if cfg.remat != "none":
    body = jax.checkpoint(body, policy=_REMAT[cfg.remat], prevent_cse=False)
  k_all = None if cache is None else cache.k_LxBxKxExS
  v_all = None if cache is None else cache.v_LxBxKxSxE
  unstacked_cache = isinstance(k_all, (list, tuple))
  if isinstance(block_state, (list, tuple)) or unstacked_cache or not cfg.scan_layers:
    # Per-layer params and/or cache (see `unstack_layers`, `unstack_cache`), or `scan_layers=False`: an
    # unrolled loop whose dots read each weight where it lies and whose cache writes hit each layer's own
    # buffer in place. A scan over stacked weights copies every layer's slice out before its dots (3x the
    # weight traffic), and its backward pass fills stacked per-layer residual buffers (for the world's
    # 4-layer model, zero-filling them was ~15 % of a training step on CPU).
    ks, vs = (list(k_all), list(v_all)) if unstacked_cache else ([], [])
    for i in range(cfg.num_layers):
      layer_params = (block_state[i] if isinstance(block_state, (list, tuple))
                      else jax.tree.map(lambda a, i=i: a[i], block_state))
      if k_all is None:
        (x_BxTxD, _, _), _ = body((x_BxTxD, None, None), (layer_params, i))
      elif unstacked_cache:
        x_BxTxD, (ks[i], vs[i]) = _apply_block(cfg, layer_params, x_BxTxD, positions_BxT, mask_BxTxS,
                                               (ks[i], vs[i], None), write_index, prefix_layer(i))
      else:
        (x_BxTxD, k_all, v_all), _ = body((x_BxTxD, k_all, v_all), (layer_params, i))
    if unstacked_cache:
      return x_BxTxD, tuple(ks), tuple(vs)
    return x_BxTxD, k_all, v_all
  if prefix is not None and isinstance(prefix.k_LxBxKxExS, (list, tuple)):
    raise ValueError("forward_cached: the prefix cache is per-layer (unstack_cache) but the params and the cache "
                     "are stacked; unstack the params or the cache as well, or pass a stacked prefix.")
  (x, k_all, v_all), _ = jax.lax.scan(body, (x_BxTxD, k_all, v_all),
                                      (block_state, jnp.arange(cfg.num_layers)))
  return x, k_all, v_all


def unstack_layers(params: Params) -> Params:
  """The same params with `layers` as a tuple of per-layer trees, for memory-bound decode loops.

  Every function here accepts either form. Stacked layers run under `lax.scan` (compile time independent
  of depth); unstacked ones run unrolled, which lets a decode step read each weight where it lies instead
  of copying its layer slice out first. Splitting costs one copy of the layer weights, made once.
  """
  stacked = params["layers"]
  if isinstance(stacked, (list, tuple)):
    return params
  num_layers = jax.tree.leaves(stacked)[0].shape[0]
  layers = tuple(jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(num_layers))
  return {**params, "layers": layers}


def unstack_cache(cache: KVCache) -> KVCache:
  """The same cache with per-layer key/value buffers (tuples of L arrays), for unrolled decode loops.

  `forward_cached` accepts either layout and returns the one it was given. Per-layer buffers are updated
  in place by each layer with no stacked array to slice, which keeps XLA from copying the whole cache.
  """
  if isinstance(cache.k_LxBxKxExS, (list, tuple)):
    return cache
  L = cache.k_LxBxKxExS.shape[0]
  return KVCache(tuple(cache.k_LxBxKxExS[i] for i in range(L)), tuple(cache.v_LxBxKxSxE[i] for i in range(L)),
                 cache.valid_BxS)


@functools.lru_cache(maxsize=None)
def _abstract_block_state(cfg: ModelConfig):
  return nnx.split(nnx.eval_shape(lambda: Block(cfg)))[1]


def _embed(cfg, params, tokens_BxT):
  x = jnp.take(params["embed"], tokens_BxT, axis=0)
  return constrain(x, ("batch", "length", "act_embed"))


def logits_from_hidden(cfg: ModelConfig, params: Params, hidden_BxTxD: jax.Array) -> jax.Array:
  """Output head in fp32 (tied to the embedding or separate)."""
  B, T, D = hidden_BxTxD.shape
  hidden_NxD = hidden_BxTxD.reshape(B * T, D)  # 2D matmuls: see Proj (the 3D form's backward pass is slower)
  if cfg.tie_embeddings:
    logits = jnp.einsum("nd,vd->nv", hidden_NxD, params["embed"], preferred_element_type=F32)
  else:
    logits = jnp.einsum("nd,dv->nv", hidden_NxD, params["lm_head"], preferred_element_type=F32)
  return constrain(logits.reshape(B, T, -1), ("batch", "length", "act_vocab"))


def default_positions(mask_BxT: jax.Array) -> jax.Array:
  """Positions that skip padding: left-padded rows get the same positions as unpadded ones."""
  return jnp.maximum(jnp.cumsum(mask_BxT.astype(jnp.int32), axis=-1) - 1, 0)


def hidden_states(cfg: ModelConfig, params: Params, tokens_BxT, *, positions=None, mask=None) -> jax.Array:
  """Final-norm hidden states B×T×D (what the loss and the head read)."""
  tokens_BxT = jnp.asarray(tokens_BxT)
  B, T = tokens_BxT.shape
  mask_BxT = jnp.ones((B, T), jnp.bool_) if mask is None else jnp.asarray(mask).astype(jnp.bool_)
  positions_BxT = default_positions(mask_BxT) if positions is None else jnp.asarray(positions)
  causal_TxT = jnp.tril(jnp.ones((T, T), jnp.bool_))
  mask_BxTxS = causal_TxT[None] & mask_BxT[:, None, :]
  x = _embed(cfg, params, tokens_BxT)
  x, _, _ = _run_layers(cfg, params, x, positions_BxT, mask_BxTxS, None, None)
  return rms_norm(x, params["final_norm"]["scale"], cfg.rms_norm_eps)


def forward(cfg: ModelConfig, params: Params, tokens_BxT, *, positions=None, mask=None) -> jax.Array:
  """Logits B×T×V (fp32). `mask` (B×T, 1 = real token) handles padding; positions default to skip pads."""
  return logits_from_hidden(cfg, params, hidden_states(cfg, params, tokens_BxT, positions=positions, mask=mask))


def forward_cached(cfg: ModelConfig, params: Params, tokens_BxT, positions_BxT, token_mask_BxT,
                   cache: KVCache, write_index, *, last_only: bool = False,
                   prefix: KVCache | None = None) -> tuple[jax.Array, KVCache]:
  """Runs T new tokens per row against the cache, writing them at slots [write_index, write_index+T).

  Used for prefill (T = prompt length, write_index = 0) and decode (T = 1). For decode, `write_index` may be
  a B-vector: row b writes at its own slot (continuous batching, where rows sit at different token indices);
  a scalar writes every row at the same slot. Returns fp32 logits of the
  new tokens and the updated cache; donate the cache for in-place updates. `last_only=True` returns only
  the last position's logits (B×1×V): a sampler's prefill needs nothing else, and the full B×T×V head
  would cost about a quarter of a small model's prefill.

  `prefix` (decode only, T = 1): a read-only cache shared by groups of rows, e.g. one prefilled prompt for
  its num_samples rows. Here the B rows are prompts × samples, prompt-major: with p prefix rows, row b reads
  prefix row b // (B / p). Every row attends over all of its valid slots before the row's own cache, and
  positions continue after it. It is stored and read once per group instead of once per row.
  """
  B, T = tokens_BxT.shape
  S = cache.max_length
  slots_S = jnp.arange(S)
  if jnp.ndim(write_index) == 0:
    valid_BxS = jax.lax.dynamic_update_slice(cache.valid_BxS, token_mask_BxT.astype(jnp.bool_), (0, write_index))
    query_slots_BxT = (write_index + jnp.arange(T))[None, :]
  else:
    if T != 1:
      raise ValueError(f"forward_cached: a write index per row (shape {jnp.shape(write_index)}) is for decode steps "
                       f"(one new token per row); got {T} tokens per row. Prefill with a scalar write_index.")
    write_index = jnp.asarray(write_index, jnp.int32)
    here_BxS = slots_S[None, :] == write_index[:, None]
    valid_BxS = jnp.where(here_BxS, token_mask_BxT.astype(jnp.bool_), cache.valid_BxS)
    query_slots_BxT = write_index[:, None]
  mask_BxTxS = valid_BxS[:, None, :] & (slots_S[None, None, :] <= query_slots_BxT[:, :, None])
  x = _embed(cfg, params, tokens_BxT)
  x, k_all, v_all = _run_layers(cfg, params, x, positions_BxT, mask_BxTxS, cache, write_index, prefix)
  if last_only:
    x = x[:, -1:]
  logits = logits_from_hidden(cfg, params, rms_norm(x, params["final_norm"]["scale"], cfg.rms_norm_eps))
  return logits, KVCache(k_all, v_all, valid_BxS)


def init_params(cfg: ModelConfig, seed: int = 0, std: float = 0.02) -> Params:
  """Random parameters (normal(0, std) weights and biases, unit norms); for tests and benchmarks."""
  abstract = abstract_params(cfg)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  out = []
  for (path, leaf), key in zip(leaves, keys):
    name = jax.tree_util.keystr(path)
    if "scale" in name:
      out.append(jnp.ones(leaf.shape, leaf.dtype))
    else:
      out.append((jax.random.normal(key, leaf.shape, F32) * std).astype(leaf.dtype))
  return jax.tree_util.tree_unflatten(treedef, out)
