"""Continuous batching (`sampling.slots`, `sampling.continuous`): the same samples as the static engine whatever
the slot count and refill order, per-request budgets, stops, occupancy, and the per-row cache write."""

import jax.numpy as jnp
import numpy as np
import pytest

from spark_jax import models, sampling
from spark_jax.sampling import core
from spark_jax.sharding import make_mesh
from tests.test_sampling import TINY, _prompts, _random_params, _token_bytes


@pytest.fixture(scope="module")
def params():
  return _random_params(5)


def _run(params, prompts, settings, batching, rows, **kw):
  engine_kw = {k: kw.pop(k) for k in ("refill_every", "refill_fraction", "unstack_layers") if k in kw}
  engine = sampling.SamplingEngine(TINY, params, max_batch_rows=rows, progress=False, batching=batching, **engine_kw)
  return engine.generate(prompts, settings, **kw), engine.stats


def _same(a, b):
  assert [[s.tokens for s in o] for o in a] == [[s.tokens for s in o] for o in b]
  assert [[s.finish_reason for s in o] for o in a] == [[s.finish_reason for s in o] for o in b]
  assert [[s.stop for s in o] for o in a] == [[s.stop for s in o] for o in b]
  for oa, ob in zip(a, b):
    for sa, sb in zip(oa, ob):
      np.testing.assert_allclose(sa.logprobs, sb.logprobs, rtol=1e-4, atol=1e-4)


def test_continuous_matches_static_with_budgets_stops_and_refills(params):
  """13 prompts x 3 samples with budgets 1..20, stop strings and a stop token, through 2, 4 or 8 slot groups
  (refilled many times) and refill rules from every step to whole-chunk: the same tokens, log-probs, finish
  reasons and stops as static batches, which see the same row keys."""
  prompts = _prompts(np.random.RandomState(2).randint(1, 40, 13), seed=4)
  budgets = [int(b) for b in np.random.RandomState(3).randint(1, 21, 13)]
  table = _token_bytes(TINY.vocab_size)
  kw = dict(seed=9, max_new_tokens=budgets, token_bytes=table)
  free, _ = _run(params, prompts, core.SamplingParams(max_new_tokens=20, temperature=1.0, num_samples=3), "static",
                 12, **kw)
  longest = int(np.argmax(budgets))
  stop_token = free[longest][1].tokens[2]  # a token some row draws early without stops
  settings = core.SamplingParams(max_new_tokens=20, temperature=1.0, num_samples=3, stop_token_ids=(stop_token,),
                                 stop_strings=(b"1>", b"<33"))
  ref, ref_stats = _run(params, prompts, settings, "static", 12, **kw)
  reasons = {s.finish_reason for o in ref for s in o}
  assert reasons == {"length", "stop_string", "stop_token"}, reasons
  for o, budget in zip(ref, budgets):
    assert all(1 <= len(s.tokens) <= budget for s in o)
    assert all(len(s.tokens) == budget for s in o if s.finish_reason == "length")
  for rows, rule in [(6, {}), (12, dict(refill_every=1)), (24, dict(refill_fraction=1.0, refill_every=1000)),
                     (12, dict(unstack_layers=False))]:  # the last: stacked layers under a scan (GPU/TPU layout)
    out, stats = _run(params, prompts, settings, "continuous", rows, **kw, **rule)
    _same(out, ref)
    assert stats.tokens == ref_stats.tokens == sum(len(s.tokens) for o in ref for s in o)
    groups = rows // 3
    assert stats.rows == rows and stats.batches > 13 // groups, stats  # refills happened (admission calls)


@pytest.mark.parametrize("unstack", [True, False])
def test_greedy_continuous_equals_static_with_one_sample(params, unstack):
  """Per-layer buffers (the CPU layout) and stacked ones under a layer scan (the GPU/TPU layout)."""
  prompts = _prompts([3, 17, 9, 30, 5, 12, 1], seed=8)
  settings = core.SamplingParams(max_new_tokens=12)
  budgets = [12, 3, 7, 1, 12, 5, 9]
  ref, _ = _run(params, prompts, settings, "static", 4, max_new_tokens=budgets)
  out, _ = _run(params, prompts, settings, "continuous", 2, max_new_tokens=budgets, unstack_layers=unstack)
  _same(out, ref)
  assert [len(o[0].tokens) for o in out] == budgets


def test_continuous_keeps_the_slots_busy_on_long_tailed_budgets(params):
  """64 prompts, budgets mostly short with a long tail: static batches decode until their longest row, so
  most of their row-steps produce nothing; the slots stay mostly full. Counts, not times: deterministic."""
  rng = np.random.RandomState(0)
  budgets = np.minimum(np.maximum(1, np.round(rng.lognormal(np.log(8), 1.0, 64))), 64).astype(int)
  budgets[rng.permutation(64)[:6]] = 64
  prompts = _prompts(rng.randint(2, 30, 64), seed=1)
  settings = core.SamplingParams(max_new_tokens=64, temperature=1.0)
  _, static = _run(params, prompts, settings, "static", 16, max_new_tokens=[int(b) for b in budgets])
  _, cont = _run(params, prompts, settings, "continuous", 16, max_new_tokens=[int(b) for b in budgets])
  assert static.tokens == cont.tokens == int(budgets.sum())
  assert static.occupancy < 0.4, static
  assert cont.occupancy > 0.6, cont
  assert cont.row_steps < 0.6 * static.row_steps, (cont, static)


def test_sharded_continuous_matches_one_device(params):
  """5 prompts x 2 samples in 4 groups over 4 row shards (2 on a tensor axis): the samples of one device."""
  mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  prompts = _prompts([4, 9, 2, 13, 6], seed=3)
  settings = core.SamplingParams(max_new_tokens=8, temperature=1.0, num_samples=2)
  budgets = [8, 2, 5, 8, 1]
  engine = sampling.SamplingEngine(TINY, params, mesh=mesh, max_batch_rows=8, progress=False)
  sharded = engine.generate(prompts, settings, seed=1, max_new_tokens=budgets)
  single, _ = _run(params, prompts, settings, "continuous", 8, seed=1, max_new_tokens=budgets)
  _same(sharded, single)


def test_budget_errors_name_the_prompt(params):
  settings = core.SamplingParams(max_new_tokens=4)
  with pytest.raises(ValueError, match=r"max_new_tokens\[1\] = 5: each prompt's budget must be in 1..4"):
    _run(params, [[1], [2]], settings, "continuous", 4, max_new_tokens=[4, 5])
  with pytest.raises(ValueError, match=r"one integer token budget per prompt \(2\)"):
    _run(params, [[1], [2]], settings, "static", 4, max_new_tokens=[4])
  with pytest.raises(ValueError, match="batching='dynamic'"):
    sampling.SamplingEngine(TINY, params, batching="dynamic")


def test_per_row_write_index_matches_a_shared_one(params):
  """A decode step with a write slot per row equals the scalar-slot step when the slots agree, and writes
  each row's key and value at its own slot when they differ."""
  cfg = TINY
  B, S = 3, 8
  cache = models.decoder.init_cache(cfg, B, S)
  prompt = jnp.asarray(_prompts([5, 5, 5], seed=2))
  mask = jnp.ones((B, 5), bool)
  _, cache = models.forward_cached(cfg, params, prompt, models.decoder.default_positions(mask), mask, cache, 0)
  tok = jnp.asarray([[3], [4], [5]])
  pos = jnp.full((B, 1), 5)
  one = jnp.ones((B, 1), bool)
  scalar_logits, scalar_cache = models.forward_cached(cfg, params, tok, pos, one, cache, 5)
  row_logits, row_cache = models.forward_cached(cfg, params, tok, pos, one, cache, jnp.full((B,), 5))
  np.testing.assert_allclose(row_logits, scalar_logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(row_cache.k_LxBxKxExS, scalar_cache.k_LxBxKxExS, atol=1e-6)
  np.testing.assert_array_equal(row_cache.valid_BxS, scalar_cache.valid_BxS)
  _, mixed = models.forward_cached(cfg, params, tok, pos, one, cache, jnp.asarray([5, 6, 7]))
  for b, slot in enumerate([5, 6, 7]):
    np.testing.assert_array_equal(np.flatnonzero(mixed.valid_BxS[b]), list(range(5)) + [slot])
    np.testing.assert_allclose(mixed.v_LxBxKxSxE[:, b, :, slot], scalar_cache.v_LxBxKxSxE[:, b, :, 5], atol=1e-6)
  with pytest.raises(ValueError, match="write index per row"):
    models.forward_cached(cfg, params, prompt, models.decoder.default_positions(mask), mask, cache,
                          jnp.zeros((B,), jnp.int32))
