"""Continuous batching, the pure half: a fixed set of decode slots that prompts enter and leave mid-run.

The static core (`core.generate_core`) decodes one batch until its longest row is done; with mixed output
lengths the finished rows idle. Here the decode state lives across calls of two fixed-shape programs that
the host alternates (`sampling.continuous`):

  `admit`   prefills a batch of waiting prompts (one bucketed length) and puts them into free groups of slots,
            sampling each row's first token from the prefill;
  `decode`  runs decode steps over all N slots until `max_steps` steps have run, every row is done, or at
            least `refill_at` groups are free (checked in the loop's condition: no host round trip per step).

Layout. The N slots form N / num_samples groups of num_samples rows, one prompt per group: a prompt's samples
enter and leave together, so its prompt is prefilled once and read once per decode step as the group's shared
prefix (`decoder.forward_cached(prefix=...)`), exactly as in the static core. The prefix holds P slots per group
(the job's longest prompt bucket; shorter prompts sit right-aligned behind invalid slots); each row owns M slots
for what it generates. Rows sit at different token indices, so a decode step writes each row's key and value at
its own slot (`write_index` per row) and draws its token with fold_in(row key, its own token index): a row's
output depends on its prompt index, sample index and token index only, never on the slot, the loop step or
the refill order, and equals what the static core draws for it up to float rounding between program shapes.

A slot row is free when it is done (`done_N`); a group is free when all its rows are done. Empty slots start
done. Each row may carry its own budget (`budget_N`, at most M new tokens).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from spark_jax.models import decoder
from spark_jax.models.config import ModelConfig
from spark_jax.sampling import core
from spark_jax.sharding import constrain


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SlotState:
  """Everything the slots carry between calls (a pytree; donate it to `admit` / `decode`).

  The row fields (`last_N` … `window_NxW`) mean what they mean in the static core's state, with `lengths_N`
  doubling as each row's next token index. `steps` counts decode-loop trips and `row_steps` the slot rows they
  ran (active or not, admissions' prefill rows included), so tokens / row_steps is the slot occupancy.
  """

  cache: decoder.KVCache
  prefix: decoder.KVCache
  prompt_len_N: jax.Array
  budget_N: jax.Array
  keys_N: jax.Array
  last_N: jax.Array
  tokens_NxM: jax.Array
  logprobs_NxM: jax.Array
  done_N: jax.Array
  finish_N: jax.Array
  lengths_N: jax.Array
  window_NxW: jax.Array | None
  steps: jax.Array
  row_steps: jax.Array


def _constrain_rows(x):
  return constrain(x, ("batch",) + (None,) * (x.ndim - 1))


def _constrain_cache(cache: decoder.KVCache) -> decoder.KVCache:
  """Rows over the batch shards, kv heads over the tensor shards; per-layer buffers one by one."""
  if not isinstance(cache.k_LxBxKxExS, (list, tuple)):
    return core._constrain_cache(cache)
  k_spec, v_spec = ("batch", "act_kv_heads", None, "cache_length"), ("batch", "act_kv_heads", "cache_length", None)
  return decoder.KVCache(tuple(constrain(k, k_spec) for k in cache.k_LxBxKxExS),
                         tuple(constrain(v, v_spec) for v in cache.v_LxBxKxSxE),
                         constrain(cache.valid_BxS, ("batch", "cache_length")))


def _constrain(state: SlotState) -> SlotState:
  rows = {f.name: _constrain_rows(getattr(state, f.name)) for f in dataclasses.fields(state)
          if f.name.endswith(("_N", "_NxM", "_NxW")) and getattr(state, f.name) is not None}
  return dataclasses.replace(state, cache=_constrain_cache(state.cache), prefix=_constrain_cache(state.prefix),
                             **rows)


def init_slots(cfg: ModelConfig, groups: int, settings: core.SamplingParams, prompt_slots: int,
               window_width: int | None, *, unstack: bool) -> SlotState:
  """Empty slots: `groups` x settings.num_samples rows, every one done; `prompt_slots` prefix slots per group,
  settings.max_new_tokens own slots per row; a stop-string window of `window_width` bytes (None: no stop
  strings). `unstack`: per-layer cache buffers (the CPU decode layout, see `decoder.unstack_cache`)."""
  N, M = groups * settings.num_samples, settings.max_new_tokens
  cache = decoder.init_cache(cfg, N, M)
  prefix = decoder.init_cache(cfg, groups, prompt_slots)
  if unstack:
    cache, prefix = decoder.unstack_cache(cache), decoder.unstack_cache(prefix)
  zeros_N = jnp.zeros((N,), jnp.int32)
  window = None if window_width is None else jnp.full((N, window_width), -1, jnp.int16)
  state = SlotState(
      cache=cache, prefix=prefix, prompt_len_N=zeros_N, budget_N=zeros_N,
      keys_N=jnp.zeros((N, jax.random.key_data(jax.random.PRNGKey(0)).shape[-1]), jnp.uint32), last_N=zeros_N, tokens_NxM=jnp.zeros((N, M), jnp.int32),
      logprobs_NxM=jnp.zeros((N, M), jnp.float32), done_N=jnp.ones((N,), jnp.bool_),
      finish_N=jnp.full((N,), core.FINISH_INACTIVE, jnp.int32), lengths_N=zeros_N, window_NxW=window,
      steps=jnp.int32(0), row_steps=jnp.int32(0))
  return _constrain(state)


def _place_prefix(prefix_layer, block, groups_B, slot_axis: int):
  """Writes each admitted prompt's prefilled block (B×K×…×Pb, left-padded) right-aligned into its group's P
  prefix slots; padding admissions (a group id past the last group) are dropped."""
  P, Pb = prefix_layer.shape[slot_axis], block.shape[slot_axis]
  pad = [(0, 0)] * block.ndim
  pad[slot_axis] = (P - Pb, 0)
  return prefix_layer.at[groups_B].set(jnp.pad(block, pad).astype(prefix_layer.dtype), mode="drop")


def admit(cfg: ModelConfig, params: decoder.Params, state: SlotState, tokens_BxP: jax.Array,
          lengths_B: jax.Array, budgets_B: jax.Array, keys_BA: jax.Array, groups_B: jax.Array,
          settings: core.SamplingParams, table: core.StopTable | None) -> SlotState:
  """Prefills B left-padded prompts and starts their samples in groups `groups_B` (an id past the last group: a
  padding admission, written nowhere). `keys_BA` holds the B x num_samples row keys, prompt-major; `budgets_B`
  each prompt's new-token budget (1..M). Each row's first token is sampled from the prefill with fold_in(key, 0)."""
  groups = state.prefix.valid_BxS.shape[0]
  N, M = state.tokens_NxM.shape
  ns = N // groups
  B, Pb = tokens_BxP.shape
  lengths_B = lengths_B.astype(jnp.int32)
  mask_BxP = jnp.arange(Pb)[None, :] >= (Pb - lengths_B)[:, None]
  tokens_BxP = jnp.where(mask_BxP, tokens_BxP.astype(jnp.int32), 0)
  block = decoder.init_cache(cfg, B, Pb)
  logits_Bx1xV, block = decoder.forward_cached(cfg, params, tokens_BxP, decoder.default_positions(mask_BxP),
                                               mask_BxP, block, 0, last_only=True)
  groups_B = groups_B.astype(jnp.int32)
  k_pre, v_pre = state.prefix.k_LxBxKxExS, state.prefix.v_LxBxKxSxE
  if isinstance(k_pre, (list, tuple)):
    k_pre = tuple(_place_prefix(k_pre[i], block.k_LxBxKxExS[i], groups_B, 3) for i in range(cfg.num_layers))
    v_pre = tuple(_place_prefix(v_pre[i], block.v_LxBxKxSxE[i], groups_B, 2) for i in range(cfg.num_layers))
  else:
    k_pre = jax.vmap(_place_prefix, in_axes=(0, 0, None, None))(k_pre, block.k_LxBxKxExS, groups_B, 3)
    v_pre = jax.vmap(_place_prefix, in_axes=(0, 0, None, None))(v_pre, block.v_LxBxKxSxE, groups_B, 2)
  valid_pre = _place_prefix(state.prefix.valid_BxS, block.valid_BxS, groups_B, 1)
  prefix = decoder.KVCache(k_pre, v_pre, valid_pre)

  rows_BA = (groups_B[:, None] * ns + jnp.arange(ns)[None, :]).reshape(-1)  # rows >= N: padding, dropped
  admitted_N = jnp.zeros((N,), jnp.bool_).at[rows_BA].set(True, mode="drop")

  def put(x_N, values_BA):
    return x_N.at[rows_BA].set(values_BA.astype(x_N.dtype), mode="drop")

  fresh = dataclasses.replace(
      state, prefix=prefix,
      cache=dataclasses.replace(state.cache, valid_BxS=jnp.where(admitted_N[:, None], False, state.cache.valid_BxS)),
      prompt_len_N=put(state.prompt_len_N, jnp.repeat(lengths_B, ns)),
      budget_N=put(state.budget_N, jnp.clip(jnp.repeat(budgets_B, ns), 1, M)),
      keys_N=state.keys_N.at[rows_BA].set(keys_BA.astype(state.keys_N.dtype), mode="drop"),
      tokens_NxM=jnp.where(admitted_N[:, None], 0, state.tokens_NxM),
      logprobs_NxM=jnp.where(admitted_N[:, None], 0.0, state.logprobs_NxM),
      finish_N=jnp.where(admitted_N, core.FINISH_LENGTH, state.finish_N),
      lengths_N=jnp.where(admitted_N, 0, state.lengths_N),
      window_NxW=None if state.window_NxW is None else jnp.where(admitted_N[:, None], -1, state.window_NxW),
      done_N=~admitted_N)  # for `_record`: only the admitted rows take the prefill's token
  tok_BA, lp_BA = core.sample_tokens(jnp.repeat(logits_Bx1xV[:, 0], ns, axis=0),
                                   jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys_BA, 0), settings)
  tok_N, lp_N = put(jnp.zeros((N,), jnp.int32), tok_BA), put(jnp.zeros((N,), jnp.float32), lp_BA)
  recorded = core._record(fresh, jnp.where(admitted_N, 0, M), tok_N, lp_N, settings, table, fresh.budget_N)
  out = dataclasses.replace(
      recorded, last_N=jnp.where(admitted_N, recorded.last_N, state.last_N),
      done_N=jnp.where(admitted_N, recorded.done_N, state.done_N),
      row_steps=state.row_steps + B * ns)
  return _constrain(out)


def free_groups(state: SlotState) -> jax.Array:
  """One bool per group (the prefix's rows): every row of the group is done (finished, or never admitted)."""
  return jnp.all(state.done_N.reshape(state.prefix.valid_BxS.shape[0], -1), axis=1)


def decode(cfg: ModelConfig, params: decoder.Params, state: SlotState, max_steps: jax.Array,
           refill_at: jax.Array, settings: core.SamplingParams, table: core.StopTable | None) -> SlotState:
  """Decode steps over all slots while fewer than `max_steps` steps have run in this call, some row is active
  and fewer than `refill_at` groups are free (pass more than the group count when nothing waits)."""
  N, M = state.tokens_NxM.shape
  ones_Nx1 = jnp.ones((N, 1), jnp.bool_)

  def cond(carry):
    i, s = carry
    return (i < max_steps) & ~jnp.all(s.done_N) & (jnp.sum(free_groups(s)) < refill_at)

  def body(carry):
    i, s = carry
    active_N = ~s.done_N
    t_N = s.lengths_N  # the index of the token each row samples now; it feeds token t - 1
    logits_Nx1xV, cache = decoder.forward_cached(
        cfg, params, s.last_N[:, None], (s.prompt_len_N + t_N - 1)[:, None], ones_Nx1, s.cache,
        jnp.clip(t_N - 1, 0, M - 1), prefix=s.prefix)
    keys_N = jax.vmap(jax.random.fold_in)(s.keys_N, t_N)
    tok_N, lp_N = core.sample_tokens(logits_Nx1xV[:, 0], keys_N, settings)
    s = core._record(dataclasses.replace(s, cache=cache), jnp.where(active_N, t_N, M), tok_N, lp_N, settings,
                     table, s.budget_N)
    return i + 1, dataclasses.replace(s, steps=s.steps + 1, row_steps=s.row_steps + N)

  _, state = jax.lax.while_loop(cond, body, (jnp.int32(0), state))
  return _constrain(state)
