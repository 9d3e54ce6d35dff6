"""Hugging Face checkpoint I/O: config.json <-> ModelConfig, safetensors <-> params.

Loading is lazy and tensor by tensor: each parameter is built with `jax.make_array_from_callback`, whose
callback reads (memory-mapped) only the HF tensors that a device shard needs, so a 14B model is never held
whole on the host. The safetensors format is read and written here directly (a JSON header + raw
little-endian buffers) because the numpy backend of `safetensors` cannot hold bfloat16.
"""

from __future__ import annotations

import json
import os
import re
import struct
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.sharding import SingleDeviceSharding

from spark_jax import sharding as shd
from spark_jax.io import atomic_path
from spark_jax.models.config import ARCHITECTURES, HF_ARCHITECTURE, ModelConfig
from spark_jax.models.decoder import Params, abstract_params, param_logical_axes

_ST_DTYPES = {
    "F32": np.dtype(np.float32), "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16),
    "F64": np.dtype(np.float64), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
# Buffers HF sometimes stores that carry no learned information.
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|\.masked_bias|\.attn\.bias)$")


# ----------------------------------------------------------------------------------------------- config


def config_from_hf(hf: dict, *, dtype: str = "float32") -> ModelConfig:
  """ModelConfig from a config.json dict (transformers 4 and 5 layouts)."""
  arch = (hf.get("architectures") or [None])[0]
  family = ARCHITECTURES.get(arch) or ARCHITECTURES.get(hf.get("model_type"))
  if family is None:
    raise ValueError(f"config.json: architecture {arch!r} / model_type {hf.get('model_type')!r} is not supported; "
                     f"spark_jax supports {sorted(HF_ARCHITECTURE.values())}.")
  for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
    if key not in hf:
      raise KeyError(f"config.json: required key {key!r} is missing.")
  rope = hf.get("rope_parameters") or {}
  rope_theta = hf.get("rope_theta", rope.get("rope_theta", 10_000.0))
  scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
  if scaling is not None:
    scaling = dict(scaling)
    scaling.setdefault("rope_type", scaling.get("type", "default"))
    scaling.pop("rope_theta", None)
    scaling.pop("type", None)
    scaling = None if scaling["rope_type"] == "default" else tuple(sorted(scaling.items()))
  heads = hf["num_attention_heads"]
  qkv_bias = True if family == "qwen2" else bool(hf.get("attention_bias", False))
  if hf.get("mlp_bias"):
    raise ValueError("config.json: mlp_bias=True is not supported by the spark_jax decoder.")
  eos = hf.get("eos_token_id")
  return ModelConfig(
      family=family,
      vocab_size=hf["vocab_size"],
      hidden_size=hf["hidden_size"],
      intermediate_size=hf["intermediate_size"],
      num_layers=hf["num_hidden_layers"],
      num_heads=heads,
      num_kv_heads=hf.get("num_key_value_heads") or heads,
      head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
      rope_theta=float(rope_theta),
      rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      qkv_bias=qkv_bias,
      qk_norm=family == "qwen3",
      rope_scaling=scaling,
      dtype=dtype,
      bos_token_id=hf.get("bos_token_id"),
      eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
  )


def config_to_hf(cfg: ModelConfig) -> dict:
  """config.json that transformers 4.4x and 5.x both read (rope_theta at the top and in rope_parameters)."""
  rope_parameters = {"rope_type": "default", "rope_theta": cfg.rope_theta}
  if cfg.rope_scaling is not None:
    rope_parameters.update(dict(cfg.rope_scaling))
  hf = {
      "architectures": [HF_ARCHITECTURE[cfg.family]],
      "model_type": cfg.family,
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.hidden_size,
      "intermediate_size": cfg.intermediate_size,
      "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim,
      "hidden_act": "silu",
      "max_position_embeddings": cfg.max_position_embeddings,
      "rms_norm_eps": cfg.rms_norm_eps,
      "rope_theta": cfg.rope_theta,
      "rope_parameters": rope_parameters,
      "tie_word_embeddings": cfg.tie_embeddings,
      "attention_bias": cfg.qkv_bias,
      "attention_dropout": 0.0,
      "use_cache": True,
      "torch_dtype": cfg.dtype,
      "dtype": cfg.dtype,
  }
  if cfg.rope_scaling is not None:
    hf["rope_scaling"] = dict(cfg.rope_scaling)
  if cfg.family == "llama":
    hf["mlp_bias"] = False
  if cfg.family == "qwen2":
    hf["use_sliding_window"] = False
  if cfg.bos_token_id is not None:
    hf["bos_token_id"] = cfg.bos_token_id
  if cfg.eos_token_id is not None:
    hf["eos_token_id"] = list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id
  return hf


# ------------------------------------------------------------------------------------------ name mapping

# (our path under params, HF name template, to_ours(hf_array, cfg) -> array, to_hf(our_array, cfg) -> array)
_LAYER_MAP: list[tuple[tuple[str, ...], str, Callable, Callable]] = [
    (("attn", "q_proj", "kernel"), "self_attn.q_proj.weight",
     lambda w, c: w.T.reshape(c.hidden_size, c.num_heads, c.head_dim),
     lambda w, c: w.reshape(c.hidden_size, -1).T),
    (("attn", "q_proj", "bias"), "self_attn.q_proj.bias",
     lambda w, c: w.reshape(c.num_heads, c.head_dim), lambda w, c: w.reshape(-1)),
    (("attn", "k_proj", "kernel"), "self_attn.k_proj.weight",
     lambda w, c: w.T.reshape(c.hidden_size, c.num_kv_heads, c.head_dim),
     lambda w, c: w.reshape(c.hidden_size, -1).T),
    (("attn", "k_proj", "bias"), "self_attn.k_proj.bias",
     lambda w, c: w.reshape(c.num_kv_heads, c.head_dim), lambda w, c: w.reshape(-1)),
    (("attn", "v_proj", "kernel"), "self_attn.v_proj.weight",
     lambda w, c: w.T.reshape(c.hidden_size, c.num_kv_heads, c.head_dim),
     lambda w, c: w.reshape(c.hidden_size, -1).T),
    (("attn", "v_proj", "bias"), "self_attn.v_proj.bias",
     lambda w, c: w.reshape(c.num_kv_heads, c.head_dim), lambda w, c: w.reshape(-1)),
    (("attn", "o_proj", "kernel"), "self_attn.o_proj.weight",
     lambda w, c: w.T.reshape(c.num_heads, c.head_dim, c.hidden_size),
     lambda w, c: w.reshape(-1, c.hidden_size).T),
    (("attn", "q_norm", "scale"), "self_attn.q_norm.weight", lambda w, c: w, lambda w, c: w),
    (("attn", "k_norm", "scale"), "self_attn.k_norm.weight", lambda w, c: w, lambda w, c: w),
    (("mlp", "gate_proj", "kernel"), "mlp.gate_proj.weight", lambda w, c: w.T, lambda w, c: w.T),
    (("mlp", "up_proj", "kernel"), "mlp.up_proj.weight", lambda w, c: w.T, lambda w, c: w.T),
    (("mlp", "down_proj", "kernel"), "mlp.down_proj.weight", lambda w, c: w.T, lambda w, c: w.T),
    (("input_norm", "scale"), "input_layernorm.weight", lambda w, c: w, lambda w, c: w),
    (("post_attn_norm", "scale"), "post_attention_layernorm.weight", lambda w, c: w, lambda w, c: w),
]
_TOP_MAP: list[tuple[tuple[str, ...], str, Callable, Callable]] = [
    (("embed",), "model.embed_tokens.weight", lambda w, c: w, lambda w, c: w),
    (("final_norm", "scale"), "model.norm.weight", lambda w, c: w, lambda w, c: w),
    (("lm_head",), "lm_head.weight", lambda w, c: w.T, lambda w, c: w.T),
]


def _get(tree, path):
  for p in path:
    tree = tree[p]
  return tree


def _set(tree, path, value):
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def _present(cfg: ModelConfig, path: tuple[str, ...]) -> bool:
  try:
    _get(abstract_params(cfg), path)
    return True
  except KeyError:
    return False


def _hf_tensor_names(cfg: ModelConfig) -> dict[tuple, Any]:
  """Our param path -> HF name (top level) or list of per-layer HF names (stacked layers)."""
  out = {}
  for path, name, _, _ in _TOP_MAP:
    if _present(cfg, path):
      out[path] = name
  for path, name, _, _ in _LAYER_MAP:
    full = ("layers", *path)
    if _present(cfg, full):
      out[full] = [f"model.layers.{i}.{name}" for i in range(cfg.num_layers)]
  return out


# -------------------------------------------------------------------------------------------- safetensors


class _SafetensorsFile:
  """A memory-mapped safetensors file; `get(name)` returns a zero-copy numpy view."""

  def __init__(self, path: str):
    self.path = path
    with open(path, "rb") as f:
      (n,) = struct.unpack("<Q", f.read(8))
      header = json.loads(f.read(n))
    self.meta = {k: v for k, v in header.items() if k != "__metadata__"}
    self._offset = 8 + n
    self._mmap = np.memmap(path, dtype=np.uint8, mode="r")

  def shape(self, name):
    return tuple(self.meta[name]["shape"])

  def get(self, name) -> np.ndarray:
    info = self.meta[name]
    if info["dtype"] not in _ST_DTYPES:
      raise ValueError(f"{self.path}: tensor {name!r} has dtype {info['dtype']} which spark_jax cannot read.")
    start, end = info["data_offsets"]
    buf = self._mmap[self._offset + start:self._offset + end]
    return buf.view(_ST_DTYPES[info["dtype"]]).reshape(info["shape"])


def write_safetensors(path: str, tensors: dict[str, np.ndarray], metadata: dict | None = None) -> None:
  header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
  offset = 0
  arrays = {}
  for name, arr in tensors.items():
    arr = np.ascontiguousarray(arr)
    if arr.dtype not in _ST_NAMES:
      raise ValueError(f"{path}: cannot write tensor {name!r} of dtype {arr.dtype}.")
    header[name] = {"dtype": _ST_NAMES[arr.dtype], "shape": list(arr.shape),
                    "data_offsets": [offset, offset + arr.nbytes]}
    offset += arr.nbytes
    arrays[name] = arr
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  with atomic_path(path) as tmp, open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for arr in arrays.values():
      f.write(arr.tobytes())


class _CheckpointReader:
  """Maps tensor names to the (possibly sharded) safetensors files that hold them."""

  def __init__(self, directory: str):
    self.directory = directory
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
      files = sorted(set(weight_map.values()))
    else:
      files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
      weight_map = None
    if not files:
      raise FileNotFoundError(f"{directory}: no *.safetensors files (and no model.safetensors.index.json) found; "
                              "spark_jax reads safetensors checkpoints only.")
    self.files = {f: _SafetensorsFile(os.path.join(directory, f)) for f in files}
    self.where = {}
    for fname, st in self.files.items():
      for name in st.meta:
        self.where[name] = fname
    if weight_map is not None:
      missing = [n for n, f in weight_map.items() if n not in self.files[f].meta]
      if missing:
        raise KeyError(f"{index}: tensors {missing[:5]} are listed in the index but absent from their files.")

  def names(self):
    return self.where.keys()

  def shape(self, name):
    return self.files[self.where[name]].shape(name)

  def get(self, name) -> np.ndarray:
    return self.files[self.where[name]].get(name)


# --------------------------------------------------------------------------------------------- loading


def resolve_dir(path_or_repo_id: str) -> str:
  """A local checkpoint directory for a path or a hub repo id (downloaded when online)."""
  if os.path.isdir(path_or_repo_id):
    return path_or_repo_id
  if os.path.exists(path_or_repo_id):
    raise NotADirectoryError(f"{path_or_repo_id}: from_pretrained expects a checkpoint directory "
                             "(config.json + *.safetensors) or a hub repo id.")
  try:
    from huggingface_hub import snapshot_download
    return snapshot_download(path_or_repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"])
  except Exception as e:  # offline, unknown repo, no auth
    raise OSError(
        f"{path_or_repo_id!r} is not a local directory and could not be fetched from the Hugging Face hub "
        f"({type(e).__name__}: {e}). The hub is unreachable when offline (HF_HUB_OFFLINE=1 or no network): "
        "download the checkpoint elsewhere and pass its local directory.") from e


def from_pretrained(path_or_repo_id: str, *, dtype: str = "float32", mesh=None,
                    rules=shd.DEFAULT_RULES) -> tuple[ModelConfig, Params]:
  """Loads a HF checkpoint (config.json + single or sharded safetensors) into (cfg, params).

  Each tensor is placed straight into its target sharding on `mesh` (or on the default device).
  """
  directory = resolve_dir(path_or_repo_id)
  config_path = os.path.join(directory, "config.json")
  if not os.path.exists(config_path):
    raise FileNotFoundError(f"{directory}: config.json is missing.")
  with open(config_path) as f:
    cfg = config_from_hf(json.load(f), dtype=dtype)
  reader = _CheckpointReader(directory)
  names = _hf_tensor_names(cfg)
  converters = {p: (f, s) for p, _, f, s in _TOP_MAP}
  converters.update({("layers", *p): (f, s) for p, _, f, s in _LAYER_MAP})
  abstract = abstract_params(cfg)
  axes = param_logical_axes(cfg)
  target_dtype = np.dtype(jnp.dtype(dtype))

  expected = set()
  for path, hf in names.items():
    for n in ([hf] if isinstance(hf, str) else hf):
      expected.add(n)
  present = set(reader.names())
  missing = sorted(expected - present)
  if missing:
    raise KeyError(f"{directory}: checkpoint is missing tensor(s) {missing[:8]}"
                   f"{' …' if len(missing) > 8 else ''} required by a {cfg.family} model with this config.json.")
  unexpected = sorted(n for n in present - expected
                      if not _IGNORED.search(n) and not (n == "lm_head.weight" and cfg.tie_embeddings))
  if unexpected:
    raise KeyError(f"{directory}: checkpoint has tensor(s) {unexpected[:8]} that a {cfg.family} model with this "
                   "config.json does not use; is config.json's architecture right?")

  params: Params = {}
  for path, hf in names.items():
    to_ours = converters[path][0]
    target = _get(abstract, path)
    per_layer = [hf] if isinstance(hf, str) else hf
    layer_shape = target.shape if isinstance(hf, str) else target.shape[1:]
    for n in per_layer:
      got = to_ours(np.empty(reader.shape(n), np.bool_), cfg).shape if _shape_ok(reader.shape(n), to_ours, cfg) else None
      if got != tuple(layer_shape):
        raise ValueError(f"{directory}: tensor {n!r} has shape {reader.shape(n)}, which does not give the "
                         f"expected {tuple(layer_shape)} for {'/'.join(path)} (check config.json's sizes).")
    if mesh is None:
      sharding = SingleDeviceSharding(jax.devices()[0])
    else:
      sharding = shd.named_sharding(mesh, _get(axes, path), target.shape, name="/".join(path), rules=rules)
    params_leaf = _load_leaf(reader, hf, to_ours, cfg, target.shape, target_dtype, sharding)
    _set(params, path, params_leaf)
  return cfg, params


def _shape_ok(shape, to_ours, cfg) -> bool:
  try:
    to_ours(np.empty(shape, np.bool_), cfg)
    return True
  except ValueError:
    return False


def _load_leaf(reader, hf, to_ours, cfg, shape, dtype, sharding) -> jax.Array:
  cache: dict[str, np.ndarray] = {}

  def layer(name):
    if name not in cache:
      cache.clear()  # keep one converted layer tensor at a time on the host
      cache[name] = np.asarray(to_ours(reader.get(name), cfg)).astype(dtype)
    return cache[name]

  def callback(index):
    if isinstance(hf, str):
      return layer(hf)[index]
    layer_index, rest = index[0], index[1:]
    ids = range(len(hf))[layer_index]
    return np.stack([layer(hf[i])[rest] for i in ids], axis=0)

  return jax.make_array_from_callback(tuple(shape), sharding, callback)


# --------------------------------------------------------------------------------------------- saving


def _host(x) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x))


def _iter_hf_tensors(cfg: ModelConfig, params: Params) -> Iterator[tuple[str, np.ndarray]]:
  for path, name, _, to_hf in _TOP_MAP:
    if _present(cfg, path):
      yield name, np.ascontiguousarray(to_hf(_host(_get(params, path)), cfg))
  for path, name, _, to_hf in _LAYER_MAP:
    full = ("layers", *path)
    if not _present(cfg, full):
      continue
    stacked = _host(_get(params, full))
    for i in range(cfg.num_layers):
      yield f"model.layers.{i}.{name}", np.ascontiguousarray(to_hf(stacked[i], cfg))


def save_pretrained(cfg: ModelConfig, params: Params, out_dir: str, *, max_shard_bytes: int = 4 << 30,
                    tokenizer_dir: str | None = None) -> str:
  """Writes config.json + safetensors (sharded with an index above `max_shard_bytes`).

  The result loads with `transformers.AutoModelForCausalLM.from_pretrained(out_dir)`. Tokenizer files from
  `tokenizer_dir` are copied alongside when given. In multi-process runs only process 0 writes.
  """
  os.makedirs(out_dir, exist_ok=True)
  shards: list[dict[str, np.ndarray]] = [{}]
  sizes = [0]
  for name, arr in _iter_hf_tensors(cfg, params):
    if sizes[-1] and sizes[-1] + arr.nbytes > max_shard_bytes:
      shards.append({})
      sizes.append(0)
    shards[-1][name] = arr
    sizes[-1] += arr.nbytes
  if jax.process_index() == 0:
    if len(shards) == 1:
      write_safetensors(os.path.join(out_dir, "model.safetensors"), shards[0])
    else:
      weight_map = {}
      for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(os.path.join(out_dir, fname), shard)
        weight_map.update({n: fname for n in shard})
      with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": int(sum(sizes))}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
      json.dump(config_to_hf(cfg), f, indent=2)
    if tokenizer_dir is not None:
      import shutil
      for fname in os.listdir(tokenizer_dir):
        if fname.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template", "generation_config")):
          shutil.copy(os.path.join(tokenizer_dir, fname), os.path.join(out_dir, fname))
  return out_dir
