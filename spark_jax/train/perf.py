"""Throughput accounting: peak FLOP/s per device kind and model-FLOPs utilisation (MFU).

MFU = (tokens x ModelConfig.flops_per_token(T) x k) / seconds / peak, with k = 3 (forward + backward) or 4
under full rematerialisation (the forward runs twice; strictly that makes it a hardware-FLOPs utilisation).
Tokens are the non-padding tokens of the step, so padding waste shows up as lost MFU; the attention term uses
the step's padded length T, a slight over-count for sequences shorter than their bucket.

Peak numbers are dense (no 2:4 sparsity) vendor figures per chip. An fp32 model on a GPU runs its matmuls in
TF32 under JAX's default precision, and on a TPU in single-pass bf16, so fp32 uses those rates. A CPU has no
table entry: its peak is measured once with a large matmul (`measure_matmul_flops`) unless configured, and the
fake host devices of a CPU test share that one peak (they share the cores).
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp

# device_kind substring (lower case, most specific first) -> (bf16/fp16 peak, fp32 peak) FLOP/s per chip.
PEAK_FLOPS: tuple[tuple[str, tuple[float, float]], ...] = (
    ("h200", (989e12, 495e12)),
    ("h100 pcie", (756e12, 378e12)),
    ("h100", (989e12, 495e12)),
    ("gh200", (989e12, 495e12)),
    ("b200", (2250e12, 1100e12)),
    ("a100", (312e12, 156e12)),
    ("l4", (121e12, 60e12)),
    ("a10g", (125e12, 62.5e12)),
    ("v100", (125e12, 15.7e12)),
    ("tpu v6 lite", (918e12, 918e12)),
    ("tpu v6e", (918e12, 918e12)),
    ("tpu v5 lite", (197e12, 197e12)),
    ("tpu v5e", (197e12, 197e12)),
    ("tpu v5p", (459e12, 459e12)),
    ("tpu v5", (459e12, 459e12)),
    ("tpu v4", (275e12, 275e12)),
    ("tpu v3", (123e12, 123e12)),
)


def table_peak_flops(device_kind: str, dtype: str) -> float | None:
  """Peak FLOP/s of one chip from the table, or None when the device kind is not listed."""
  kind = device_kind.lower()
  for key, (half, full) in PEAK_FLOPS:
    if key in kind:
      return full if dtype == "float32" else half
  return None


@functools.lru_cache(maxsize=None)
def measure_matmul_flops(dtype: str = "float32", n: int = 1024, repeats: int = 8) -> float:
  """Achieved FLOP/s of an n×n matmul chain on the default device: the practical peak of a CPU."""
  a = jnp.ones((n, n), dtype)

  @jax.jit
  def chain(x):
    for _ in range(repeats):
      x = (x @ a) * (1.0 / n)
    return x

  chain(a).block_until_ready()
  best = float("inf")
  for _ in range(3):
    start = time.perf_counter()
    chain(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2.0 * n ** 3 * repeats / best


def total_peak_flops(devices, dtype: str, configured_per_device: float = 0.0) -> tuple[float, str]:
  """(peak FLOP/s of all `devices` together, how it was obtained).

  configured_per_device > 0 wins; otherwise the table; CPU devices are measured (and not multiplied by the
  fake device count, which splits one host's cores).
  """
  devices = list(devices)
  kind = devices[0].device_kind
  if configured_per_device > 0:
    return configured_per_device * len(devices), "configured"
  if devices[0].platform == "cpu":
    return measure_matmul_flops(dtype if dtype != "bfloat16" else "float32"), "measured (cpu matmul)"
  per = table_peak_flops(kind, dtype)
  if per is None:
    return 0.0, f"unknown device kind {kind!r} (set config.peak_flops_per_device for MFU)"
  return per * len(devices), f"table ({kind})"


def mfu(tokens: float, seq_len: int, seconds: float, model_cfg, remat: str, peak_flops: float) -> float:
  """Fraction of `peak_flops` that `tokens` of training at padded length `seq_len` used in `seconds`."""
  if seconds <= 0 or peak_flops <= 0:
    return 0.0
  mult = 4.0 if remat == "full" else 3.0
  return tokens * model_cfg.flops_per_token(seq_len) * mult / seconds / peak_flops
