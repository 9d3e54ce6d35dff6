"""The GRPO step on tiny random models: the update (sharded vs one device, KL at the reference, the
sampler/trainer log-prob gap) and the structure of the rollout-and-reward program (the PRM is inside it)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spark_jax import models
from spark_jax import sharding as shd
from spark_jax.rl import step as rl_step
from spark_jax.sampling import core
from spark_jax.train import step as train_step

B, G, P, R = 4, 4, 12, 10


def _params(cfg, seed):
  rng = np.random.default_rng(seed)  # numpy init: random.normal per leaf compiles slowly on CPU
  params = jax.tree.map(lambda a: (rng.normal(size=a.shape) * 0.05).astype(np.float32), models.abstract_params(cfg))
  return jax.tree_util.tree_map_with_path(
      lambda p, x: np.ones_like(x) if "scale" in jax.tree_util.keystr(p) else x, params)


def _prompts(seed=0):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(4, P + 1, size=B).astype(np.int32)
  tokens = np.zeros((B, P), np.int32)
  for b, n in enumerate(lengths):
    tokens[b, P - n:] = rng.integers(5, 500, size=n)
  return tokens, lengths


@pytest.fixture(scope="module")
def tiny():
  cfg = models.get_preset("tiny-qwen2")
  return cfg, _params(cfg, 0)


@pytest.fixture(scope="module")
def rollouts(tiny):
  """Fixed T=1 rollouts of the tiny policy (no filters, fp32) with random advantages."""
  cfg, params = tiny
  pt, pl = _prompts()
  keys = jax.random.split(jax.random.PRNGKey(1), B * G)
  settings = core.SamplingParams(max_new_tokens=R, temperature=1.0, num_samples=G, stop_token_ids=(7,))
  out = jax.jit(core.generate_core, static_argnums=(0, 5))(cfg, params, jnp.asarray(pt), jnp.asarray(pl), keys,
                                                            settings)
  rng = np.random.default_rng(2)
  adv = rng.normal(size=(B * G,)).astype(np.float32)
  mask = np.arange(R)[None, :] < np.asarray(out.lengths_N)[:, None]
  return {"pt": pt, "pl": pl, "tokens": np.asarray(out.tokens_NxM), "lengths": np.asarray(out.lengths_N),
          "sampler_lp": np.asarray(out.logprobs_NxM), "adv": np.where(mask, adv[:, None], 0.0).astype(np.float32)}


def _update_curve(cfg, params, ro, mesh, settings, steps=3, micro_batch=0):
  tx, sched = train_step.make_optimizer(cfg, lr=1e-2, total_steps=steps, warmup_ratio=0.0, schedule="constant")
  with shd.use_mesh(mesh):
    state = train_step.init_state(cfg, params, tx, mesh)
    tokens, mask = rl_step.sequences(jnp.asarray(ro["pt"]), jnp.asarray(ro["pl"]), jnp.asarray(ro["tokens"]),
                                     jnp.asarray(ro["lengths"]), G)
    lp = rl_step.make_logprob_fn(cfg, mesh, chunk=8, micro_batch=micro_batch)(state["params"], tokens, mask, R)
    update = rl_step.make_update_step(cfg, tx, sched, mesh, settings)
    batch = {"tokens_NxT": tokens, "mask_NxT": mask, "old_logprobs_NxR": lp,
             "advantages_NxR": jnp.asarray(ro["adv"]), "ref_logprobs_NxR": lp}
    out = []
    for _ in range(steps):
      state, m, _ = update(state, batch)
      out.append((float(m["loss"]), float(m["grad_norm"]), float(m["kl"]), float(m["clip_frac"])))
  return np.asarray(out), np.asarray(lp)


def test_trainer_logprobs_match_the_sampler(tiny, rollouts):
  """At T=1, no filters, fp32: the trainer's recomputed log-probs are the sampler's up to rounding."""
  cfg, params = tiny
  mesh = shd.make_mesh({"data": 1}, devices=jax.devices()[:1])
  tokens, mask = rl_step.sequences(jnp.asarray(rollouts["pt"]), jnp.asarray(rollouts["pl"]),
                                   jnp.asarray(rollouts["tokens"]), jnp.asarray(rollouts["lengths"]), G)
  lp = np.asarray(rl_step.make_logprob_fn(cfg, mesh)(params, tokens, mask, R))
  resp = np.arange(R)[None, :] < rollouts["lengths"][:, None]
  assert resp.sum() > B * G  # real responses, not empty rows
  gap = np.abs(lp - rollouts["sampler_lp"])[resp]
  assert gap.max() <= 1e-3, gap.max()
  assert np.all(lp[~resp] == 0.0)


def test_sharded_update_matches_one_device(tiny, rollouts):
  """The same fixed rollouts on one device and on a (data 2, fsdp 2, tensor 2) mesh: same losses to 1e-4;
  KL (k3) is 0 while the policy is the reference."""
  assert jax.device_count() == 8, "tests/conftest.py should give 8 fake CPU devices"
  cfg, params = tiny
  settings = rl_step.UpdateSettings(beta=0.01, logits_chunk=8)
  one, _ = _update_curve(cfg, params, rollouts, shd.make_mesh({"data": 1}, devices=jax.devices()[:1]), settings)
  eight, _ = _update_curve(cfg, params, rollouts, shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}), settings)
  np.testing.assert_allclose(eight, one, atol=1e-4, rtol=1e-4)
  # First step: policy == reference (KL 0) and == pi_old (ratio 1, nothing clipped).
  assert one[0, 2] == pytest.approx(0.0, abs=1e-7)
  assert one[0, 3] == 0.0
  assert one[-1, 2] > 0  # the policy moved away from the reference
  assert one[-1, 0] != one[0, 0]


def test_on_policy_update_equals_recomputed_pi_old(tiny, rollouts):
  """old_logprobs_NxR=None (one mini-batch, one epoch): pi_old is the step's own forward pass. Same loss,
  gradient and parameters as the step given the separately recomputed pi_old, up to float rounding; the
  returned log-probs are that recomputation."""
  cfg, params = tiny
  mesh = shd.make_mesh({"data": 1}, devices=jax.devices()[:1])
  settings = rl_step.UpdateSettings(beta=0.0, logits_chunk=8)
  tx, sched = train_step.make_optimizer(cfg, lr=1e-2, total_steps=1, warmup_ratio=0.0, schedule="constant")
  update = rl_step.make_update_step(cfg, tx, sched, mesh, settings)
  with shd.use_mesh(mesh):
    tokens, mask = rl_step.sequences(jnp.asarray(rollouts["pt"]), jnp.asarray(rollouts["pl"]),
                                     jnp.asarray(rollouts["tokens"]), jnp.asarray(rollouts["lengths"]), G)
    outs = []
    for on_policy in (False, True):
      state = train_step.init_state(cfg, params, tx, mesh)
      lp = rl_step.make_logprob_fn(cfg, mesh)(state["params"], tokens, mask, R)
      batch = {"tokens_NxT": tokens, "mask_NxT": mask, "old_logprobs_NxR": None if on_policy else lp,
               "advantages_NxR": jnp.asarray(rollouts["adv"]), "ref_logprobs_NxR": jnp.zeros_like(lp)}
      state, m, step_lp = update(state, batch)
      outs.append((jax.device_get(state["params"]), m, np.asarray(step_lp), np.asarray(lp)))
  (p0, m0, _, lp0), (p1, m1, step_lp1, _) = outs
  np.testing.assert_allclose(step_lp1, lp0, atol=1e-5)
  assert np.abs(lp0).sum() > 0  # real log-probs, not an empty response mask
  for k in ("loss", "grad_norm", "pg_loss"):
    assert float(m1[k]) == pytest.approx(float(m0[k]), rel=1e-4, abs=1e-6), k
  assert float(m1["clip_frac"]) == 0.0
  for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(p1)):
    np.testing.assert_allclose(a, b, atol=1e-5)
  moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(params)))
  assert moved > 1e-4  # the step changed the parameters


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_micro_batched_update_matches_one_pass(tiny, rollouts, agg):
  """micro_batch = N/4: four accumulated micro-batches give the one-pass step's loss, metrics, log-probs and
  parameters (to float rounding) in every aggregation mode, with the KL term on; the log-prob pass too."""
  cfg, params = tiny
  mesh = shd.make_mesh({"data": 1}, devices=jax.devices()[:1])
  curves, finals = [], []
  for micro in (0, B * G // 4):
    settings = rl_step.UpdateSettings(beta=0.05, logits_chunk=8, loss_agg=agg, micro_batch=micro)
    curve, lp = _update_curve(cfg, params, rollouts, mesh, settings, micro_batch=micro)
    curves.append(curve)
    finals.append(lp)
  np.testing.assert_allclose(curves[1], curves[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(finals[1], finals[0], atol=1e-5)
  assert curves[0][-1, 3] > 0 and curves[0][-1, 2] > 0  # clipping and KL active by the last step: not all zeros
  assert np.abs(finals[0]).sum() > 0


def test_micro_batched_sharded_update_matches_one_device(tiny, rollouts):
  """micro_batch 4 on the (data 2, fsdp 2, tensor 2) mesh (one row per data x fsdp device per micro-batch)
  against one pass on one device; and the on-policy step (pi_old = the step's own forward pass) with
  micro-batches returns the one-pass log-probs."""
  cfg, params = tiny
  one, _ = _update_curve(cfg, params, rollouts, shd.make_mesh({"data": 1}, devices=jax.devices()[:1]),
                         rl_step.UpdateSettings(beta=0.01, logits_chunk=8))
  eight, _ = _update_curve(cfg, params, rollouts, shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}),
                           rl_step.UpdateSettings(beta=0.01, logits_chunk=8, micro_batch=4), micro_batch=4)
  np.testing.assert_allclose(eight, one, atol=1e-4, rtol=1e-4)
  mesh = shd.make_mesh({"data": 1}, devices=jax.devices()[:1])
  tx, sched = train_step.make_optimizer(cfg, lr=1e-2, total_steps=1, warmup_ratio=0.0, schedule="constant")
  with shd.use_mesh(mesh):
    tokens, mask = rl_step.sequences(jnp.asarray(rollouts["pt"]), jnp.asarray(rollouts["pl"]),
                                     jnp.asarray(rollouts["tokens"]), jnp.asarray(rollouts["lengths"]), G)
    out = []
    for micro in (0, 2):
      update = rl_step.make_update_step(cfg, tx, sched, mesh, rl_step.UpdateSettings(
          beta=0.0, logits_chunk=8, micro_batch=micro))
      state = train_step.init_state(cfg, params, tx, mesh)
      batch = {"tokens_NxT": tokens, "mask_NxT": mask, "old_logprobs_NxR": None,
               "advantages_NxR": jnp.asarray(rollouts["adv"]), "ref_logprobs_NxR": jnp.zeros((B * G, R))}
      state, m, step_lp = update(state, batch)
      out.append((float(m["loss"]), float(m["grad_norm"]), np.asarray(step_lp)))
  assert out[1][0] == pytest.approx(out[0][0], rel=1e-5, abs=1e-7)
  assert out[1][1] == pytest.approx(out[0][1], rel=1e-5)
  np.testing.assert_allclose(out[1][2], out[0][2], atol=1e-6)
  with pytest.raises(ValueError, match="micro_batch=3 does not divide the 16 rows"):
    rl_step.micro_batches(16, 3)


def test_reward_type_and_settings_errors():
  with pytest.raises(ValueError, match="reward.type='prm_magic'"):
    rl_step.RolloutSettings(group_size=2, max_response=4, stop_token_ids=(), reward_type="prm_magic")
  with pytest.raises(ValueError, match="adv_scale"):
    rl_step.RolloutSettings(group_size=2, max_response=4, stop_token_ids=(), adv_scale="rank")
  s = rl_step.RolloutSettings(group_size=2, max_response=4, stop_token_ids=(), reward_type="global_step",
                              orm_prompt_bug=True)
  assert s.prm_format == "orm"
  assert rl_step.RolloutSettings(group_size=2, max_response=4, stop_token_ids=(),
                                 reward_type="prm_cot_outcome", orm_prompt_bug=True).prm_format == "prm_cot"


def _tiny_tokenizer(tmp_path):
  import json
  from tokenizers import Tokenizer as HFTokenizer, decoders, models as tok_models, pre_tokenizers, trainers
  from spark_jax.tokenizer import Tokenizer
  tok = HFTokenizer(tok_models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(["<answer>\\boxed{7}</answer> **This step is correct.** Problem: user assistant"] * 5,
                          trainer)
  tok.save(str(tmp_path / "tokenizer.json"))
  chatml = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({
      "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
      "chat_template": chatml, "clean_up_tokenization_spaces": False}))
  return Tokenizer.from_pretrained(str(tmp_path))


def _dots_with_dim(jaxpr, dim: int) -> int:
  """dot_general equations (at any depth: while/scan/map bodies) with an operand axis of size `dim`."""
  count = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general" and any(dim in v.aval.shape for v in eqn.invars):
      count += 1
    for sub in jax.core.subjaxprs(eqn) if hasattr(jax.core, "subjaxprs") else ():
      count += _dots_with_dim(sub, dim)
    for p in eqn.params.values():
      for j in (p if isinstance(p, (list, tuple)) else [p]):
        inner = getattr(j, "jaxpr", None)
        if inner is not None and hasattr(inner, "eqns"):
          count += _dots_with_dim(inner, dim)
        elif hasattr(j, "eqns"):
          count += _dots_with_dim(j, dim)
  return count


def test_rollout_and_reward_is_one_program_that_contains_the_prm(tmp_path):
  """The traced rollout-and-reward program holds the PRM's forward: its MLP width (160, the policy's is 128)
  appears in dot_generals of the one jaxpr, inside the PRM's decode loop, and in the compiled HLO."""
  from spark_jax.rl import programs
  tok = _tiny_tokenizer(tmp_path)
  pcfg = models.get_preset("tiny-qwen2")
  rcfg = pcfg.replace(intermediate_size=160)
  settings = rl_step.RolloutSettings(group_size=2, max_response=6, stop_token_ids=tuple(tok.end_of_turn_ids),
                                     reward_type="prm_cot_outcome", prm_max_new_tokens=4, prm_chunk=2,
                                     prm_all_rows=True)
  tables = programs.make_reward_tables(tok, settings, tok, pcfg.vocab_size)
  pt, pl = _prompts()
  qt, ql = pt[:, :5], np.full((B,), 5, np.int32)
  fn = jax.jit(lambda pp, rp, t, a, b, c, d, k: rl_step.rollout_and_reward(pcfg, rcfg, settings, pp, rp, t, a, b, c,
                                                                            d, k))
  args = (_params(pcfg, 0), _params(rcfg, 1), tables, pt, pl, qt, ql, jax.random.PRNGKey(0))
  closed = jax.make_jaxpr(fn)(*args)
  prm_dots = _dots_with_dim(closed.jaxpr, 160)
  assert prm_dots >= 2 * rcfg.num_layers  # up/gate and down projections of every PRM layer (prefill + decode)
  assert _dots_with_dim(closed.jaxpr, pcfg.intermediate_size) >= 2 * pcfg.num_layers  # the policy's too
  assert "160" in fn.lower(*args).as_text()
  out = fn(*args)
  assert out.rewards_N.shape == (B * 2,) and out.advantages_NxR.shape == (B * 2, 6)
  assert float(out.stats["prm_output_length"]) == 4.0  # every row went to the PRM and ran its full budget


def _program_case(tmp_path, **settings_kw):
  from spark_jax.rl import programs
  tok = _tiny_tokenizer(tmp_path)
  pcfg = models.get_preset("tiny-qwen2")
  rcfg = pcfg.replace(intermediate_size=160)
  kw = dict(group_size=2, max_response=6, stop_token_ids=tuple(tok.end_of_turn_ids), reward_type="prm_cot_outcome",
            prm_max_new_tokens=4, prm_all_rows=True)
  settings = rl_step.RolloutSettings(**{**kw, **settings_kw})
  tables = programs.make_reward_tables(tok, settings, tok, pcfg.vocab_size)
  pt, pl = _prompts()
  qt, ql = pt[:, :5], np.full((B,), 5, np.int32)
  fn = jax.jit(lambda *a: rl_step.rollout_and_reward(pcfg, rcfg, settings, *a))
  return fn, (_params(pcfg, 0), _params(rcfg, 1), tables, pt, pl, qt, ql, jax.random.PRNGKey(0))


def test_chunked_rollouts_and_prm_calls_equal_one_block(tmp_path):
  """rollout_chunk (prompts per block) and prm_chunk (rows per block) change memory, not results: a row's
  sampling key folds in its prompt and sample, never its block."""
  fn, args = _program_case(tmp_path)
  whole = jax.device_get(fn(*args))
  fn, args = _program_case(tmp_path, rollout_chunk=1, prm_chunk=2)
  chunked = jax.device_get(fn(*args))
  assert np.asarray(whole.response_lengths_N).sum() > B * 2  # real responses
  for field in ("response_tokens_NxR", "response_lengths_N", "format_ok_N", "rewards_N", "advantages_NxR"):
    np.testing.assert_array_equal(np.asarray(getattr(chunked, field)), np.asarray(getattr(whole, field)), field)
  np.testing.assert_allclose(np.asarray(chunked.sampler_logprobs_NxR), np.asarray(whole.sampler_logprobs_NxR),
                             atol=1e-5)
  assert float(chunked.stats["prm_output_length"]) == float(whole.stats["prm_output_length"]) == 4.0
  # The decode layout of the weights (CPU: per-layer slices of the stacked kernels) is made once, outside
  # the block maps, not once per block.
  stacked = {tuple(a.shape) for a in jax.tree.leaves(args[0]["layers"]) + jax.tree.leaves(args[1]["layers"])}
  closed = jax.make_jaxpr(fn)(*args)
  if jax.default_backend() == "cpu":  # elsewhere the decode loop reads the stacked weights: nothing to make
    assert _weight_slices(closed.jaxpr, stacked, in_map=False) > 0
  assert _weight_slices(closed.jaxpr, stacked, in_map=True) == 0


def _weight_slices(jaxpr, shapes, in_map: bool, inside: bool = False) -> int:
  """Slicing eqns whose operand is a stacked layer weight, counted inside scan (lax.map) bodies or outside."""
  count = 0
  for eqn in jaxpr.eqns:
    if (eqn.primitive.name in ("slice", "squeeze", "dynamic_slice", "gather") and inside == in_map
        and any(tuple(v.aval.shape) in shapes for v in eqn.invars if hasattr(v, "aval"))):
      count += 1
    for p in eqn.params.values():
      for j in (p if isinstance(p, (list, tuple)) else [p]):
        inner = getattr(j, "jaxpr", j)
        if hasattr(inner, "eqns"):
          count += _weight_slices(inner, shapes, in_map, inside or eqn.primitive.name == "scan")
  return count


def test_a_reward_of_the_wrong_shape_is_an_error_at_trace_time(tmp_path, monkeypatch):
  fn, args = _program_case(tmp_path)
  real = rl_step._outcome_rewards
  monkeypatch.setattr(rl_step, "_outcome_rewards", lambda *a: real(*a)[:, None])
  with pytest.raises(ValueError, match=r"reward type 'prm_cot_outcome' gave rewards of shape \(8, 1\); .*\(8,\)"):
    jax.eval_shape(fn, *args)


def test_use_sampler_logprobs_takes_the_samplers_pi_old(tiny, rollouts):
  """`use_sampler_logprobs`: pi_old is the sampler's log-probs as given (here shifted by 0.1 nats on every
  response token), so the first update sees approx_kl = 0.1; by default pi_old is the trainer's recomputation
  and approx_kl is 0 (the gap is rounding). Two mini-batches x two epochs run the recomputed path too."""
  from spark_jax.rl import programs as programs_lib
  cfg, params = tiny
  mesh = shd.make_mesh({"data": 1}, devices=jax.devices()[:1])
  settings = rl_step.RolloutSettings(group_size=G, max_response=R, stop_token_ids=(7,), reward_type="rlvr")
  upd = rl_step.UpdateSettings(beta=0.0, logits_chunk=8)
  tx, sched = train_step.make_optimizer(cfg, lr=1e-3, total_steps=8, warmup_ratio=0.0, schedule="constant")
  progs = programs_lib.Programs(cfg, cfg, settings, upd, tx, sched, mesh)
  resp = np.arange(R)[None, :] < rollouts["lengths"][:, None]
  shifted = np.where(resp, rollouts["sampler_lp"] + 0.1, 0.0).astype(np.float32)
  roll = rl_step.RolloutOutput(rollouts["tokens"], rollouts["lengths"], shifted, np.ones(B * G, bool),
                               np.zeros(B * G, np.float32), rollouts["adv"], {})
  out = {}
  for use_sampler in (True, False):
    with shd.use_mesh(mesh):
      state = train_step.init_state(cfg, params, tx, mesh)
      _, out[use_sampler] = progs.update(state, None, rollouts["pt"], rollouts["pl"], roll, 1, 1, use_sampler)
  assert out[True]["approx_kl"] == pytest.approx(0.1, abs=1e-4)
  assert abs(out[False]["approx_kl"]) < 1e-5
  assert out[True]["logprob_gap_mean"] == pytest.approx(0.1, abs=1e-4)  # the gap is logged either way
  with shd.use_mesh(mesh):
    state = train_step.init_state(cfg, params, tx, mesh)
    state, m = progs.update(state, None, rollouts["pt"], rollouts["pl"], roll, 2, 2, False)
  assert int(state["step"]) == 4 and np.isfinite(m["loss"])
