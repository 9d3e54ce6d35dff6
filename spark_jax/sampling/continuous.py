"""Continuous batching, the host half: keep the decode slots full while prompts wait.

The loop alternates the two programs of `sampling.slots`: admit waiting prompts into free groups of slots
(prefilled a power-of-two number at a time, or all groups' worth, at the bucketed length of the longest of them), then decode until
`refill_every` steps have run, every slot is done, or enough groups are free to be worth a refill
(`refill_fraction` of the groups, or all that are waiting). Finished groups are read back and freed after each
decode call. Programs have fixed shapes (slot groups, prefix slots, M, admission size, prompt bucket), so a job
compiles one decode program and a few admission programs whatever its length.
"""

from __future__ import annotations

import collections
import math
import time
from typing import Sequence

import jax
import numpy as np

from spark_jax import sharding as shd
from spark_jax.models import decoder
from spark_jax.sampling import core, slots


def slot_groups(num_prompts: int, num_samples: int, max_batch_rows: int, row_multiple: int) -> int:
  """Groups of slots (one prompt's samples each) for a job: as many as fit `max_batch_rows` decode rows, a
  multiple of the prompts it takes for the rows to split evenly over `row_multiple` shards, and no more than
  the job needs (rounded up to that multiple times a power of two, so small jobs share programs)."""
  granule = row_multiple // math.gcd(row_multiple, num_samples)
  full = max(granule, (max_batch_rows // num_samples) // granule * granule)
  return min(full, granule * (1 << max(0, (-(-num_prompts // granule) - 1).bit_length())))


def run(engine, params, prompts: Sequence[np.ndarray], settings: core.SamplingParams, *, seed: int,
        prompt_indices: Sequence[int], budgets: np.ndarray, table, on_done) -> None:
  """Samples every prompt through the slots; calls `on_done(prompt, tokens, logprobs, lengths, finish)` with its
  rows' arrays as each prompt's group finishes. `engine` is the `SamplingEngine` (programs, placement, stats)."""
  from spark_jax.sampling.engine import _row_keys, bucket_length

  ns, M = settings.num_samples, settings.max_new_tokens
  groups = slot_groups(len(prompts), ns, engine.max_batch_rows, engine._row_multiple)
  N = groups * ns
  prompt_slots = bucket_length(max(len(p) for p in prompts), engine.prompt_buckets)
  unstack = engine.unstack_layers
  window = None if table is None else core._window_width(settings, table)
  decode_params = engine._unstacked(params) if unstack else params
  state = engine._slot_program("init", settings, (groups, prompt_slots, window, unstack), (), lambda: lambda: (
      slots.init_slots(engine.cfg, groups, settings, prompt_slots, window, unstack=unstack)))()
  waiting = collections.deque(sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i)))
  free = list(range(groups))
  occupant: dict[int, int] = {}
  refill_min = max(1, math.ceil(engine.refill_fraction * groups))
  stats = engine.stats
  while waiting or occupant:
    while free and waiting:
      take = min(len(free), len(waiting))
      batch = min(1 << (take - 1).bit_length(), groups)  # prompts per admission: a power of two, or all groups
      chosen = [waiting.popleft() for _ in range(take)]
      targets = [free.pop(0) for _ in range(take)]
      length = min(bucket_length(max(len(prompts[i]) for i in chosen), engine.prompt_buckets), prompt_slots)
      tokens = np.zeros((batch, length), np.int32)
      lengths = np.ones((batch,), np.int32)
      budgets_B = np.ones((batch,), np.int32)
      group_ids = np.full((batch,), groups, np.int32)  # past the last group: a padding admission, written nowhere
      indices = np.zeros((batch,), np.int64)
      for j, (i, g) in enumerate(zip(chosen, targets)):
        tokens[j, length - len(prompts[i]):] = prompts[i]
        lengths[j], budgets_B[j], group_ids[j], indices[j] = len(prompts[i]), budgets[i], g, prompt_indices[i]
        occupant[g] = i
      args = (params, state, tokens, lengths, budgets_B, _row_keys(seed, indices, ns), group_ids, table)
      args = engine._place_replicated_args(args)
      state = engine._slot_program("admit", settings, (groups, prompt_slots, window, unstack, batch, length), args,
                                   lambda: _admit_fn(engine.cfg, settings))(*args)
      stats.batches += 1
    refill_at = min(refill_min, len(waiting)) if waiting else groups + 1
    args = (decode_params, state, np.int32(engine.refill_every), np.int32(refill_at), table)
    args = engine._place_replicated_args(args)
    state = engine._slot_program("decode", settings, (groups, prompt_slots, window, unstack), args,
                                 lambda: _decode_fn(engine.cfg, settings))(*args)
    done_N = np.asarray(jax.device_get(state.done_N))
    finished = [g for g in list(occupant) if done_N[g * ns:(g + 1) * ns].all()]
    for g in sorted(finished):  # read back only the finished groups' rows
      start = np.int32(g * ns)
      tokens, logprobs, lengths, finish = jax.device_get(
          [_group_rows(x, start, ns) for x in (state.tokens_NxM, state.logprobs_NxM, state.lengths_N, state.finish_N)])
      on_done(occupant.pop(g), tokens, logprobs, lengths, finish)
      free.append(g)
    free.sort()
  steps, row_steps = jax.device_get((state.steps, state.row_steps))
  stats.rows += N
  stats.steps += int(steps)
  stats.row_steps += int(row_steps)


def _admit_fn(cfg, settings):
  def fn(params, state, tokens, lengths, budgets, keys, groups, table):
    return slots.admit(cfg, params, state, tokens, lengths, budgets, keys, groups, settings, table)
  return fn


def _decode_fn(cfg, settings):
  def fn(params, state, max_steps, refill_at, table):
    return slots.decode(cfg, params, state, max_steps, refill_at, settings, table)
  return fn


def compile_program(fn, args, mesh, donate_state: bool):
  """jit + lower + compile with the slot state (argument 1) donated, under the engine's mesh."""
  with shd.use_mesh(mesh):
    if not args:
      return jax.jit(fn).lower().compile()
    return jax.jit(fn, donate_argnums=(1,) if donate_state else ()).lower(*args).compile()


unstack_layers = jax.jit(decoder.unstack_layers)
_group_rows = jax.jit(lambda x, start, size: jax.lax.dynamic_slice_in_dim(x, start, size), static_argnums=2)
