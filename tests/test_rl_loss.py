"""The GRPO loss: gradient sign, clipping, dual clip, KL estimators, aggregation modes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spark_jax.rl import loss as L


def test_gradient_sign_two_samples():
  # One token each, on-policy (ratio 1): positive advantage -> descent raises its log-prob, negative lowers it.
  old = jnp.array([[-1.0], [-2.0]])
  adv = jnp.array([[1.0], [-1.0]])
  mask = jnp.ones((2, 1), bool)
  grad = jax.grad(lambda lp: L.grpo_loss(lp, old, adv, mask)[0])(old)
  np.testing.assert_allclose(np.asarray(grad), [[-0.5], [0.5]], rtol=1e-6)


def test_clip_and_dual_clip_hand_computed():
  lp = jnp.log(jnp.array([[1.5, 0.5, 5.0, 5.0]]))
  old = jnp.zeros((1, 4))
  adv = jnp.array([[1.0, -1.0, -1.0, 1.0]])
  mask = jnp.ones((1, 4), bool)
  per_tok = []
  for i in range(4):
    loss, _ = L.grpo_loss(lp[:, i:i + 1], old[:, i:i + 1], adv[:, i:i + 1], mask[:, i:i + 1])
    per_tok.append(float(loss))
  # ratio 1.5, A=+1: max(-1.5, -1.2) = -1.2. ratio 0.5, A=-1: max(0.5, 0.8) = 0.8.
  # ratio 5, A=-1: max(5, 1.2) = 5, dual clip min(5, 3) = 3. ratio 5, A=+1: max(-5, -1.2) = -1.2.
  np.testing.assert_allclose(per_tok, [-1.2, 0.8, 3.0, -1.2], rtol=1e-5)
  loss, m = L.grpo_loss(lp, old, adv, mask)
  np.testing.assert_allclose(float(loss), np.mean([-1.2, 0.8, 3.0, -1.2]), rtol=1e-5)
  np.testing.assert_allclose(float(m["clip_frac"]), 0.75)  # at ratio 5, A < 0 the unclipped term is the max
  np.testing.assert_allclose(float(m["dual_clip_frac"]), 0.25)
  no_dual, _ = L.grpo_loss(lp[:, 2:3], old[:, 2:3], adv[:, 2:3], mask[:, 2:3], dual_clip=0.0)
  np.testing.assert_allclose(float(no_dual), 5.0, rtol=1e-5)
  asym, _ = L.grpo_loss(lp[:, :1], old[:, :1], adv[:, :1], mask[:, :1], clip_high=0.28)
  np.testing.assert_allclose(float(asym), -1.28, rtol=1e-5)


def test_clipped_token_has_no_gradient():
  grad = jax.grad(lambda lp: L.grpo_loss(lp, jnp.zeros((1, 1)), jnp.ones((1, 1)), jnp.ones((1, 1), bool))[0])(
      jnp.log(jnp.array([[1.5]])))
  assert float(grad[0, 0]) == 0.0


@pytest.mark.parametrize("kl_type", L.KL_TYPES)
def test_kl_is_zero_when_policy_equals_reference(kl_type):
  lp = jnp.array([[-0.3, -2.0, -5.0], [-1.0, -0.1, -7.0]])
  mask = jnp.array([[1, 1, 1], [1, 1, 0]], bool)
  loss, m = L.grpo_loss(lp, lp, jnp.zeros_like(lp), mask, ref_logprobs_NxR=lp, beta=0.5, kl_type=kl_type)
  assert float(m["kl"]) == 0.0 and float(loss) == 0.0
  grad = jax.grad(lambda x: L.grpo_loss(x, lp, jnp.zeros_like(lp), mask, ref_logprobs_NxR=lp, beta=0.5,
                                        kl_type=kl_type)[0])(lp)
  # k2 and k3 have zero gradient at the reference; k1's per-sample gradient is the constant beta / tokens
  # (zero only in expectation over samples).
  want = np.where(np.asarray(mask), 0.5 / 5, 0.0) if kl_type == "k1" else 0.0
  np.testing.assert_allclose(np.asarray(grad), want, atol=1e-7)


def test_kl_estimators_hand_computed():
  lp, ref = jnp.array([[0.0]]), jnp.array([[-1.0]])  # log ratio 1
  np.testing.assert_allclose(float(L.kl_penalty(lp, ref, "k1")[0, 0]), 1.0)
  np.testing.assert_allclose(float(L.kl_penalty(lp, ref, "k2")[0, 0]), 0.5)
  np.testing.assert_allclose(float(L.kl_penalty(lp, ref, "k3")[0, 0]), np.exp(-1.0) + 1.0 - 1.0, rtol=1e-6)
  with pytest.raises(ValueError, match="'k4'"):
    L.kl_penalty(lp, ref, "k4")


def test_aggregation_modes_hand_computed():
  x = jnp.array([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
  mask = jnp.array([[1, 1, 1], [1, 0, 0]], bool)
  np.testing.assert_allclose(float(L.aggregate(x, mask, "token-mean")), 10 / 4)
  np.testing.assert_allclose(float(L.aggregate(x, mask, "seq-mean-token-mean")), (2 + 4) / 2)
  np.testing.assert_allclose(float(L.aggregate(x, mask, "seq-mean-token-sum-norm")), (6 / 3 + 4 / 3) / 2, rtol=1e-6)
  np.testing.assert_allclose(float(L.aggregate(x, mask, "seq-mean-token-sum-norm", norm_length=4)), (6 + 4) / 8)
  # Micro-batching: global denominators make the halves sum to the whole.
  halves = [float(L.aggregate(x[i:i + 1], mask[i:i + 1], "token-mean", num_tokens=4)) for i in range(2)]
  np.testing.assert_allclose(sum(halves), 2.5)
  with pytest.raises(ValueError, match="'sum'"):
    L.aggregate(x, mask, "sum")


def test_loss_errors_name_the_input():
  lp = jnp.zeros((2, 3))
  with pytest.raises(ValueError, match="ref_logprobs_NxR"):
    L.grpo_loss(lp, lp, lp, jnp.ones((2, 3), bool), beta=0.1)
  with pytest.raises(ValueError, match="advantages_NxR has shape"):
    L.grpo_loss(lp, lp, jnp.zeros((2, 4)), jnp.ones((2, 3), bool))


def test_entropy_metric_and_bonus():
  lp = jnp.zeros((1, 2))
  ent = jnp.array([[1.0, 3.0]])
  loss, m = L.grpo_loss(lp, lp, jnp.zeros((1, 2)), jnp.ones((1, 2), bool), entropy_NxR=ent, entropy_coef=0.1)
  np.testing.assert_allclose(float(m["entropy"]), 2.0)
  np.testing.assert_allclose(float(loss), -0.2, rtol=1e-6)
