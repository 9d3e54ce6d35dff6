"""GRPO, selective and global-step advantages against hand-computed values and loop-based numpy references."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spark_jax.rl import advantages as adv


def test_grpo_hand_computed():
  # mean 0.25, unbiased std 0.5 -> (r - 0.25) / 0.5
  got = np.asarray(adv.grpo(jnp.array([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]), 4))
  np.testing.assert_allclose(got[:4], [1.5, -0.5, -0.5, -0.5], rtol=1e-5)
  np.testing.assert_allclose(got[4:], [0.0] * 4, atol=1e-6)  # all-equal group: zero advantage


def test_grpo_group_of_one_keeps_raw_reward():
  got = np.asarray(adv.grpo(jnp.array([2.0, -1.0, 0.5]), 1))
  np.testing.assert_allclose(got, np.array([2.0, -1.0, 0.5]) / (1 + 1e-6), rtol=1e-7)


def test_grpo_rejects_partial_groups():
  with pytest.raises(ValueError, match="group_size=3 does not divide the 4 rows"):
    adv.grpo(jnp.zeros(4), 3)


def test_batch_std_and_no_scaling():
  r = jnp.array([1.0, 0.0, 1.0, 1.0])
  centred = np.array([0.5, -0.5, 0.0, 0.0])
  np.testing.assert_allclose(adv.scaled(r, 2, "none"), centred, atol=1e-7)
  np.testing.assert_allclose(adv.scaled(r, 2, "batch"), centred / (np.std([1, 0, 1, 1], ddof=1) + 1e-6), rtol=1e-6)
  with pytest.raises(ValueError, match="'rank'"):
    adv.scaled(r, 2, "rank")


def test_step_token_ids():
  got = np.asarray(adv.step_token_ids(jnp.array([[4, 7, 9], [1, 5, 0]]), jnp.array([2, 2]), 10))
  np.testing.assert_array_equal(got[0], [-1, -1, -1, 0, 0, 1, 1, 1, -1, -1])
  # step 0 ends before token 3: its range [3, 1] is empty; step 1 spans [2, 5] (token 2 too: it follows end_0).
  np.testing.assert_array_equal(got[1], [-1, -1, 1, 1, 1, 1, -1, -1, -1, -1])


def _selective_case(**kw):
  rewards = jnp.array([1.0, 0.0])
  mask = jnp.arange(10)[None, :] < jnp.array([10, 9])[:, None]
  ends = jnp.array([[4, 7], [5, 8]])
  num_steps = jnp.array([2, 2])
  verdicts = jnp.array([[1, -1], [1, 1]])
  num_verdicts = jnp.array([2, 1])
  return np.asarray(adv.selective(rewards, 2, mask, ends, num_steps, verdicts, num_verdicts, **kw))


def test_selective_hand_computed():
  a = 1 / math.sqrt(2) / (1 + 1e-6 * math.sqrt(2))  # (1 - 0.5) / (std 0.7071 + 1e-6)
  got = _selective_case(min_steps=1)
  # Row 0 (A >= 0): step 1 (tokens 5..7) judged incorrect -> 0; the rest keeps A.
  np.testing.assert_allclose(got[0], [a, a, a, a, a, 0, 0, 0, a, a], rtol=1e-5)
  # Row 1 (A < 0): only min(2 steps, 1 verdict) = step 0 is compared; judged correct -> tokens 3..5 get 0.
  np.testing.assert_allclose(got[1], [-a, -a, -a, 0, 0, 0, -a, -a, -a, 0], rtol=1e-5)
  half = _selective_case(min_steps=1, half=True)
  np.testing.assert_allclose(half[0], [a, a, a, a, a, a / 2, a / 2, a / 2, a, a], rtol=1e-5)
  np.testing.assert_allclose(half[1], [-a, -a, -a, -a / 2, -a / 2, -a / 2, -a, -a, -a, 0], rtol=1e-5)


def test_selective_strict_penalty_zeroes_the_outcome():
  # Two policy steps < min_steps=4 with verdicts present: both rewards forced to 0 -> no advantage at all.
  np.testing.assert_array_equal(_selective_case(), np.zeros((2, 10)))


def test_selective_without_verdicts_is_outcome_grpo():
  mask = jnp.ones((2, 6), bool)
  got = adv.selective(jnp.array([1.0, 0.0]), 2, mask, jnp.array([[2, 4], [2, 4]]), jnp.array([2, 2]),
                      jnp.zeros((2, 2), jnp.int32), jnp.array([0, 0]))
  expected = np.asarray(adv.grpo(jnp.array([1.0, 0.0]), 2))[:, None] * np.ones((2, 6))
  np.testing.assert_allclose(got, expected, rtol=1e-6)


def _global_step_reference(rewards, G, lengths, ends, num_steps, verdicts, num_verdicts, R, penalty,
                           min_steps=3, max_steps=20):
  """Loop-by-loop numpy version of the rule (docs: pooled group step statistics, reverse cumsum, 0.8/0.2)."""
  N = len(rewards)
  r_out = np.array(rewards, float).reshape(-1, G)
  a_out = ((r_out - r_out.mean(1, keepdims=True)) / (r_out.std(1, ddof=1, keepdims=True) + 1e-6)).reshape(-1)
  step_r = []
  for i in range(N):
    n = num_steps[i]
    rs = [(1.0 if j < num_verdicts[i] and verdicts[i][j] > 0 else -1.0) / n for j in range(n)]
    if penalty and (n != num_verdicts[i] or n < min_steps or n > max_steps):
      rs = [0.0] * n
    step_r.append(rs)
  out = np.zeros((N, R))
  for g in range(N // G):
    pooled = [x for i in range(g * G, g * G + G) for x in step_r[i]]
    mu, sd = (np.mean(pooled), np.std(pooled, ddof=1)) if len(pooled) > 1 else (0.0, 1.0)
    for i in range(g * G, g * G + G):
      for t in range(lengths[i]):
        s = sum((x - mu) / (sd + 1e-6) for j, x in enumerate(step_r[i]) if ends[i][j] >= t)
        out[i, t] = 0.8 * a_out[i] + 0.2 * s
  return out


@pytest.mark.parametrize("penalty", [False, True])
def test_global_step_matches_reference(penalty):
  rewards, G, R = [1.0, 0.0, 1.0, 1.0], 2, 7
  lengths = [6, 7, 7, 3]
  ends = [[1, 3, 5, 0], [2, 4, 0, 0], [0, 2, 4, 6], [1, 2, 2, 0]]
  num_steps = [3, 2, 4, 3]
  verdicts = [[1, 1, -1, 0], [1, 0, 0, 0], [1, 1, 1, 1], [-1, -1, 1, 0]]
  num_verdicts = [3, 1, 4, 3]
  mask = jnp.arange(R)[None, :] < jnp.array(lengths)[:, None]
  got = adv.global_step(jnp.array(rewards), G, mask, jnp.array(ends), jnp.array(num_steps), jnp.array(verdicts),
                        jnp.array(num_verdicts), penalty=penalty)
  want = _global_step_reference(rewards, G, lengths, ends, num_steps, verdicts, num_verdicts, R, penalty)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


def test_global_step_hand_computed_single_row_groups():
  # G = 1, one row, steps +1/2 and -1/2 pooled: mean 0, unbiased std sqrt(0.5) -> r~ = +-0.5 / sqrt(0.5).
  got = np.asarray(adv.global_step(jnp.array([1.0]), 1, jnp.ones((1, 4), bool), jnp.array([[1, 3]]),
                                   jnp.array([2]), jnp.array([[1, -1]]), jnp.array([2]), penalty=False))
  s = 0.5 / (math.sqrt(0.5) + 1e-6)
  outcome = 0.8 * 1.0 / (1 + 1e-6)
  np.testing.assert_allclose(got[0], [outcome + 0.2 * (s - s), outcome, outcome - 0.2 * s, outcome - 0.2 * s],
                             rtol=1e-5, atol=1e-6)


def test_advantages_jit():
  f = jax.jit(adv.selective, static_argnums=(1,), static_argnames=("half", "min_steps", "max_steps"))
  out = f(jnp.array([1.0, 0.0]), 2, jnp.ones((2, 8), bool), jnp.array([[4, 6], [4, 6]]), jnp.array([2, 2]),
          jnp.array([[1, -1], [1, 1]]), jnp.array([2, 2]), half=True, min_steps=1)
  assert out.shape == (2, 8) and out.dtype == jnp.float32
