"""Meshes and logical-axis sharding.

Parameters and activations are annotated with *logical* axis names ("embed", "heads", "batch", …); a small
rule table maps them to the mesh axes (data, fsdp, tensor). The same model code therefore runs on one
device, on 8 fake CPU devices, on a GPU box and on a TPU pod — only the mesh changes.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated).
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    # activations
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("cache_length", None),
)


def make_mesh(axis_sizes: Mapping[str, int] | Sequence[tuple[str, int]], devices=None) -> Mesh:
  """Builds a (data, fsdp, tensor) mesh; one size may be -1 (= the remaining devices)."""
  sizes = dict(axis_sizes)
  unknown = set(sizes) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"mesh axes {sorted(unknown)} are unknown; the mesh axes are {MESH_AXES}.")
  devices = np.asarray(jax.devices() if devices is None else devices)
  n = devices.size
  shape = [sizes.get(a, 1) for a in MESH_AXES]
  if shape.count(-1) > 1:
    raise ValueError(f"mesh {sizes}: at most one axis may be -1.")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if n % known:
      raise ValueError(f"mesh {sizes}: {n} devices are not divisible by the fixed axes' product {known}.")
    shape[shape.index(-1)] = n // known
  if math.prod(shape) != n:
    raise ValueError(f"mesh {sizes} -> shape {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices, "
                     f"but {n} are available; use -1 for one axis to take the rest.")
  try:
    device_grid = jax.experimental.mesh_utils.create_device_mesh(shape, devices=devices.reshape(-1))
  except Exception:  # fake CPU devices and odd shapes have no physical topology to respect
    device_grid = devices.reshape(shape)
  return Mesh(device_grid, MESH_AXES)


def initialize_distributed() -> None:
  """`jax.distributed.initialize()` when launched as one of several processes (TPU pod, multi-node GPU)."""
  import os
  multi = any(k in os.environ for k in ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "SLURM_NTASKS",
                                        "OMPI_COMM_WORLD_SIZE"))
  if multi and not jax.distributed.is_initialized():
    jax.distributed.initialize()


def logical_to_spec(logical_axes: Sequence[str | None], rules=DEFAULT_RULES) -> P:
  table = dict(rules)
  out = []
  for name in logical_axes:
    if name is None:
      out.append(None)
      continue
    if name not in table:
      raise KeyError(f"logical axis {name!r} has no sharding rule; known: {sorted(table)}.")
    out.append(table[name])
  return P(*out)


def _mesh_size(mesh: Mesh, entry) -> int:
  if entry is None:
    return 1
  names = entry if isinstance(entry, tuple) else (entry,)
  return math.prod(mesh.shape[n] for n in names)


def named_sharding(mesh: Mesh, logical_axes: Sequence[str | None], shape: Sequence[int] | None = None,
                   name: str = "array", rules=DEFAULT_RULES) -> NamedSharding:
  """NamedSharding for a logically-annotated array; checks that every sharded dim divides evenly."""
  spec = logical_to_spec(logical_axes, rules)
  if shape is not None:
    for dim, (size, entry, logical) in enumerate(zip(shape, spec, logical_axes)):
      m = _mesh_size(mesh, entry)
      if size % m:
        raise ValueError(
            f"{name}: dimension {dim} ({logical!r}, size {size}) is not divisible by mesh axis {entry!r} of size "
            f"{m}; choose a mesh whose {entry!r} size divides {size} (mesh is {dict(mesh.shape)}).")
  return NamedSharding(mesh, spec)


# The active mesh for activation constraints. Model code calls `constrain`, which is a no-op without a mesh.
_ACTIVE: contextvars.ContextVar[tuple[Mesh, tuple] | None] = contextvars.ContextVar("spark_jax_mesh", default=None)


@contextlib.contextmanager
def use_mesh(mesh: Mesh | None, rules=DEFAULT_RULES):
  token = _ACTIVE.set((mesh, rules) if mesh is not None else None)
  try:
    yield mesh
  finally:
    _ACTIVE.reset(token)


def active_mesh() -> Mesh | None:
  state = _ACTIVE.get()
  return None if state is None else state[0]


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """with_sharding_constraint by logical names, skipping dims the mesh does not divide."""
  state = _ACTIVE.get()
  if state is None:
    return x
  mesh, rules = state
  spec = list(logical_to_spec(logical_axes, rules))
  spec = [e if x.shape[i] % _mesh_size(mesh, e) == 0 else None for i, e in enumerate(spec)]
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(*spec)))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
