"""Decoder family: logit parity with transformers, checkpoint I/O, sharding, bad inputs."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from spark_jax import models, sharding
from spark_jax.models import decoder, hf_io
from spark_jax.models.load import load_model, shard_params

VOCAB = 300


def _hf_model(kind: str, tied: bool, directory: str):
  common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
                max_position_embeddings=256)
  if kind == "qwen2":
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(rope_theta=1e4, **common))
  elif kind == "qwen3":
    model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(head_dim=32, rope_theta=1e6, **common))
  else:
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(rope_theta=1e5, **common))
  torch.manual_seed(0)
  with torch.no_grad():
    for p in model.parameters():  # HF init leaves biases/norms trivial; randomise everything
      p.normal_(0, 0.2)
  model.save_pretrained(directory)
  return model.eval()


CASES = [("qwen2", False), ("qwen2", True), ("qwen3", False), ("llama", True)]


@pytest.fixture(scope="module", params=CASES, ids=[f"{k}-{'tied' if t else 'untied'}" for k, t in CASES])
def hf_case(request, tmp_path_factory):
  kind, tied = request.param
  directory = str(tmp_path_factory.mktemp(f"{kind}_{tied}"))
  return kind, tied, directory, _hf_model(kind, tied, directory)


def _tokens(batch=2, length=10, seed=0):
  return np.random.RandomState(seed).randint(0, VOCAB, (batch, length))


def test_logit_parity_with_and_without_left_padding(hf_case):
  kind, tied, directory, hf = hf_case
  cfg, params = models.from_pretrained(directory)
  assert cfg.family == kind and cfg.tie_embeddings == tied
  tokens = _tokens()
  ref = hf(torch.tensor(tokens)).logits.detach().numpy()
  ours = np.asarray(models.forward(cfg, params, tokens))
  assert np.abs(ours - ref).max() <= 1e-4
  pad = 3
  padded = np.concatenate([np.zeros((2, pad), int), tokens], 1)
  mask = np.concatenate([np.zeros((2, pad)), np.ones(tokens.shape)], 1)
  ours_padded = np.asarray(models.forward(cfg, params, padded, mask=mask))[:, pad:]
  assert np.abs(ours_padded - ref).max() <= 1e-4


def test_save_pretrained_reloads_in_transformers_and_round_trips(hf_case, tmp_path):
  _, _, directory, hf = hf_case
  cfg, params = models.from_pretrained(directory)
  out = models.save_pretrained(cfg, params, str(tmp_path / "export"))
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  tokens = _tokens(seed=1)
  a = reloaded(torch.tensor(tokens)).logits.detach().numpy()
  b = hf(torch.tensor(tokens)).logits.detach().numpy()
  assert np.array_equal(a, b)
  cfg2, params2 = models.from_pretrained(out)
  assert cfg2 == cfg
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), params, params2)


def test_sharded_checkpoint_with_index_and_rope_parameters(tmp_path):
  cfg = models.get_preset("tiny-qwen3")
  params = models.init_params(cfg, seed=3)
  out = models.save_pretrained(cfg, params, str(tmp_path / "sharded"), max_shard_bytes=200_000)
  assert os.path.exists(os.path.join(out, "model.safetensors.index.json"))
  assert len([f for f in os.listdir(out) if f.endswith(".safetensors")]) > 1
  # transformers 5 writes rope_theta only inside rope_parameters; real Qwen2.5 configs only at the top.
  with open(os.path.join(out, "config.json")) as f:
    hf = json.load(f)
  top_only = dict(hf)
  top_only.pop("rope_parameters")
  nested_only = dict(hf)
  nested_only.pop("rope_theta")
  assert hf_io.config_from_hf(top_only).rope_theta == cfg.rope_theta
  assert hf_io.config_from_hf(nested_only).rope_theta == cfg.rope_theta
  cfg2, params2 = models.from_pretrained(out)
  assert cfg2 == cfg
  tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 8))
  np.testing.assert_array_equal(np.asarray(models.forward(cfg, params, tokens)),
                                np.asarray(models.forward(cfg2, params2, tokens)))


def test_forward_sharded_on_2x2x2_mesh_equals_single_device(tmp_path):
  assert jax.device_count() == 8, "tests/conftest.py must give 8 fake CPU devices"
  cfg = models.get_preset("tiny-qwen2")
  params = models.init_params(cfg, seed=1)
  tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (4, 16))
  single = np.asarray(jax.jit(models.forward, static_argnums=0)(cfg, params, tokens))
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  sharded_params = shard_params(cfg, params, mesh)
  assert sharded_params["layers"]["attn"]["q_proj"]["kernel"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
  with sharding.use_mesh(mesh):
    out = jax.jit(models.forward, static_argnums=0)(cfg, sharded_params, tokens)
  np.testing.assert_allclose(np.asarray(out), single, atol=1e-5, rtol=0)
  # Loading straight into the mesh gives the same sharded params.
  directory = models.save_pretrained(cfg, params, str(tmp_path / "ckpt"))
  _, loaded = models.from_pretrained(directory, mesh=mesh)
  leaf = loaded["layers"]["mlp"]["down_proj"]["kernel"]
  assert leaf.sharding.spec == jax.sharding.PartitionSpec(None, "tensor", "fsdp")
  np.testing.assert_array_equal(np.asarray(leaf), np.asarray(params["layers"]["mlp"]["down_proj"]["kernel"]))


def test_kv_cache_prefill_and_decode_match_full_forward():
  cfg = models.get_preset("tiny-llama")
  params = models.init_params(cfg, seed=2)
  tokens = np.random.RandomState(0).randint(1, cfg.vocab_size, (2, 12))
  mask = np.ones((2, 12), bool)
  mask[0, :4] = False
  full = np.asarray(models.forward(cfg, params, tokens, mask=mask))
  positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
  cache = models.init_cache(cfg, 2, 16)
  logits, cache = models.forward_cached(cfg, params, tokens[:, :8], positions[:, :8], mask[:, :8], cache, 0)
  np.testing.assert_allclose(np.asarray(logits)[mask[:, :8]], full[:, :8][mask[:, :8]], atol=1e-5)
  for t in range(8, 12):
    logits, cache = models.forward_cached(cfg, params, tokens[:, t:t + 1], positions[:, t:t + 1],
                                          mask[:, t:t + 1], cache, t)
    np.testing.assert_allclose(np.asarray(logits)[:, 0], full[:, t], atol=1e-5)


@pytest.mark.parametrize("unstacked", [False, True])
def test_decode_over_a_shared_prefix_matches_a_repeated_cache(unstacked):
  """Two prompts (one left-padded) x 3 samples: decoding against the prompts' cache as a shared prefix gives
  the logits of decoding against a full cache per row (prompt repeated), step after step."""
  cfg = models.get_preset("tiny-qwen2")
  params = models.init_params(cfg, seed=5)
  rng = np.random.RandomState(1)
  P, ns, steps = 8, 3, 4
  prompts = rng.randint(1, cfg.vocab_size, (2, P))
  mask = np.ones((2, P), bool)
  mask[1, :3] = False
  positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
  prefix = models.init_cache(cfg, 2, P)
  _, prefix = models.forward_cached(cfg, params, prompts, positions, mask, prefix, 0)
  full = models.init_cache(cfg, 2 * ns, P + steps)
  rep = lambda a: np.repeat(a, ns, axis=0)
  _, full = models.forward_cached(cfg, params, rep(prompts), rep(positions), rep(mask), full, 0)
  own = models.init_cache(cfg, 2 * ns, steps)
  decode_params = params
  if unstacked:
    decode_params = decoder.unstack_layers(params)
    prefix, own, full = decoder.unstack_cache(prefix), decoder.unstack_cache(own), decoder.unstack_cache(full)
  next_pos = rep(positions[:, -1:] + 1)
  tokens = rng.randint(1, cfg.vocab_size, (2 * ns, steps))
  for t in range(steps):
    ones = np.ones((2 * ns, 1), bool)
    want, full = models.forward_cached(cfg, decode_params, tokens[:, t:t + 1], next_pos + t, ones, full, P + t)
    got, own = models.forward_cached(cfg, decode_params, tokens[:, t:t + 1], next_pos + t, ones, own, t,
                                     prefix=prefix)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
  with pytest.raises(ValueError, match="shared prefix is for decode"):
    models.forward_cached(cfg, decode_params, tokens[:, :2], next_pos + np.arange(2), np.ones((6, 2), bool),
                          own, 0, prefix=prefix)


def test_bf16_forward_tracks_fp32():
  cfg = models.get_preset("tiny-qwen2")
  params = models.init_params(cfg, seed=4)
  tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 16))
  ref = np.asarray(models.forward(cfg, params, tokens))
  cfg16 = cfg.replace(dtype="bfloat16")
  params16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  out = models.forward(cfg16, params16, tokens)
  assert out.dtype == jnp.float32  # logits always fp32
  assert np.abs(np.asarray(out) - ref).max() < 0.05


def test_remat_gives_same_gradients():
  cfg = models.get_preset("tiny-qwen3")
  params = models.init_params(cfg, seed=5)
  tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 8))

  def loss(p, c):
    return jnp.mean(models.forward(c, p, tokens) ** 2)

  g1 = jax.grad(loss)(params, cfg)
  g2 = jax.grad(loss)(params, cfg.replace(remat="full"))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6), g1, g2)


@pytest.mark.parametrize("remat", ["none", "full"])
def test_unrolled_layers_give_the_scanned_logits_gradients_and_cache(remat):
  """scan_layers=False (the layers unrolled over the same stacked weights): same logits, gradients and KV
  cache writes as the lax.scan."""
  cfg = models.get_preset("tiny-qwen3").replace(remat=remat)
  params = models.init_params(cfg, seed=6)
  tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 8))

  def loss(p, c):
    return jnp.mean(models.forward(c, p, tokens) ** 2)

  unrolled = cfg.replace(scan_layers=False)
  np.testing.assert_allclose(np.asarray(models.forward(unrolled, params, tokens)),
                             np.asarray(models.forward(cfg, params, tokens)), atol=1e-5)
  g1 = jax.grad(loss)(params, cfg)
  g2 = jax.grad(loss)(params, unrolled)
  assert max(float(jnp.abs(a).max()) for a in jax.tree.leaves(g1)) > 0
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6), g1, g2)
  mask, positions = np.ones((2, 8), bool), np.broadcast_to(np.arange(8), (2, 8))
  outs = [models.forward_cached(c, params, tokens, positions, mask, models.init_cache(c, 2, 10), 0)
          for c in (cfg, unrolled)]
  for a, b in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_presets_have_real_sizes():
  assert abs(models.get_preset("smollm2-135m").num_params / 1e6 - 134.5) < 1.0
  assert abs(models.get_preset("qwen2.5-0.5b").num_params / 1e9 - 0.494) < 0.01
  assert abs(models.get_preset("qwen2.5-7b").num_params / 1e9 - 7.62) < 0.05
  assert abs(models.get_preset("qwen3-32b").num_params / 1e9 - 32.8) < 0.2
  with pytest.raises(KeyError, match="Unknown model preset 'qwen9'"):
    models.get_preset("qwen9")


# ------------------------------------------------------------------------------------------- bad inputs


@pytest.fixture
def tiny_checkpoint(tmp_path):
  cfg = models.get_preset("tiny-qwen2")
  return cfg, models.save_pretrained(cfg, models.init_params(cfg), str(tmp_path / "ckpt"))


def test_unknown_architecture_is_named(tiny_checkpoint):
  _, directory = tiny_checkpoint
  path = os.path.join(directory, "config.json")
  with open(path) as f:
    hf = json.load(f)
  hf["architectures"], hf["model_type"] = ["MistralForCausalLM"], "mistral"
  with open(path, "w") as f:
    json.dump(hf, f)
  with pytest.raises(ValueError, match="MistralForCausalLM"):
    models.from_pretrained(directory)


def test_missing_and_misshaped_tensors_are_named(tiny_checkpoint, tmp_path):
  cfg, directory = tiny_checkpoint
  reader = hf_io._SafetensorsFile(os.path.join(directory, "model.safetensors"))
  tensors = {n: np.array(reader.get(n)) for n in reader.meta}
  missing = dict(tensors)
  del missing["model.layers.1.mlp.up_proj.weight"]
  bad_dir = str(tmp_path / "missing")
  shutil.copytree(directory, bad_dir)
  hf_io.write_safetensors(os.path.join(bad_dir, "model.safetensors"), missing)
  with pytest.raises(KeyError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
    models.from_pretrained(bad_dir)
  misshaped = dict(tensors)
  misshaped["model.layers.0.self_attn.k_proj.weight"] = np.zeros((40, 64), np.float32)
  hf_io.write_safetensors(os.path.join(bad_dir, "model.safetensors"), misshaped)
  with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight.*\(40, 64\)"):
    models.from_pretrained(bad_dir)


def test_mesh_that_does_not_divide_is_named(tiny_checkpoint):
  _, directory = tiny_checkpoint
  mesh = sharding.make_mesh({"data": 2, "fsdp": 1, "tensor": 4})  # 4 heads split, 2 kv heads cannot
  with pytest.raises(ValueError, match=r"k_proj/kernel.*'kv_heads'.*not divisible by mesh axis 'tensor' of size 4"):
    models.from_pretrained(directory, mesh=mesh)
  with pytest.raises(ValueError, match="needs 12 devices"):
    sharding.make_mesh({"data": 3, "fsdp": 2, "tensor": 2})


def test_offline_repo_id_error_says_so():
  with pytest.raises(OSError, match="unreachable when offline"):
    models.from_pretrained("Qwen/Qwen2.5-0.5B-Instruct-does-not-exist")


def test_load_model_random_preset_on_mesh():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  cfg, params, ckpt = load_model("tiny-qwen3", init="random", mesh=mesh)
  assert ckpt is None and params["embed"].sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
  with pytest.raises(ValueError, match="is a preset"):
    load_model("tiny-qwen3", init="pretrained")


def test_query_chunked_attention_matches_one_block():
  cfg = models.get_preset("tiny-qwen3")
  params = models.init_params(cfg, seed=6)
  tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 50))
  mask = np.ones((2, 50), bool)
  mask[0, :7] = False
  whole = jax.jit(models.forward, static_argnums=0)(cfg.replace(attention_chunk=0), params, tokens, mask=mask)
  chunked = jax.jit(models.forward, static_argnums=0)(cfg.replace(attention_chunk=16), params, tokens, mask=mask)
  np.testing.assert_allclose(np.asarray(chunked), np.asarray(whole), atol=1e-5)
