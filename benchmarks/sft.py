"""Throughput of the SFT train step: tokens/s and MFU for a preset, sequence length and batch.

    python benchmarks/sft.py                                   # CPU: tiny-qwen2, proves the script
    python benchmarks/sft.py --preset=qwen2.5-0.5b --seq=4096 --batch=8 --dtype=bfloat16 --remat=full
    python benchmarks/sft.py --gpu                             # qwen2.5-0.5b and 1.5b at seq 4096, bf16
    python benchmarks/sft.py --preset=world-small --seq=256 --batch=32 --layers=both  # scan vs unrolled

Random weights (a cheap deterministic init: values do not change the FLOPs), full-length rows (no padding),
loss on the second half of every row. The timed loop dispatches every step before fetching any metric, as
the trainer does; compile time is reported separately. The step is exactly the trainer's
(`spark_jax.train.step.make_train_step` with `sft_loss`): fp32 master weights + AdamW, compute in --dtype.
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from spark_jax import models
from spark_jax import sharding as shd
from spark_jax.models import load
from spark_jax.train import perf
from spark_jax.train import step as step_lib

GPU_CASES = (("qwen2.5-0.5b", 4096, 8), ("qwen2.5-1.5b", 4096, 4))


def _cheap_params(cfg, mesh):
  """Deterministic pseudo-random weights (sin of a hashed index): fast to compile on any backend."""
  shardings = load.param_shardings(cfg, mesh)

  def init():
    flat, tree = jax.tree_util.tree_flatten_with_path(models.abstract_params(cfg))
    leaves = []
    for i, (path, a) in enumerate(flat):
      if "scale" in jax.tree_util.keystr(path):
        leaves.append(jnp.ones(a.shape, jnp.float32))
      else:
        idx = jax.lax.broadcasted_iota(jnp.float32, a.shape, 0)
        for d in range(1, len(a.shape)):
          idx = idx * 1.618 + jax.lax.broadcasted_iota(jnp.float32, a.shape, d)
        leaves.append(0.02 * jnp.sin(idx * 12.9898 + i * 78.233))
    return jax.tree_util.tree_unflatten(tree, leaves)

  return jax.jit(init, out_shardings=shardings)()


def bench(preset: str, seq: int, batch: int, accum: int, dtype: str, remat: str, steps: int, mesh_axes: dict,
          logits_chunk: int, peak_per_device: float, scan_layers: bool = True) -> dict:
  cfg = models.get_preset(preset).replace(dtype=dtype, remat=remat, scan_layers=scan_layers)
  mesh = shd.make_mesh(mesh_axes)
  tx, sched = step_lib.make_optimizer(cfg, lr=1e-5, total_steps=1000, warmup_ratio=0.03)
  loss_fn = functools.partial(step_lib.sft_loss, cfg, logits_chunk=logits_chunk)
  with shd.use_mesh(mesh):
    state = step_lib.init_state(cfg, _cheap_params(cfg, mesh), tx, mesh)
    train_step = step_lib.make_train_step(cfg, tx, sched, loss_fn, mesh, compute_dtype=dtype)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (accum, batch, seq), dtype=np.int32)
    weights = np.zeros((accum, batch, seq), np.float32)
    weights[..., seq // 2:-1] = 1.0
    host = {"tokens": tokens, "targets": np.roll(tokens, -1, -1), "weights": weights,
            "mask": np.ones((accum, batch, seq), np.int32)}
    data = jax.device_put(host, step_lib.batch_sharding(mesh))
    t0 = time.perf_counter()
    state, m = train_step(state, data)
    loss0 = float(m["loss"])
    compile_s = time.perf_counter() - t0
    state, m = train_step(state, data)  # one warm step
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for _ in range(steps):
      state, m = train_step(state, data)
    jax.block_until_ready(m)
    step_s = (time.perf_counter() - t0) / steps
  tokens_per_step = accum * batch * seq
  peak, how = perf.total_peak_flops(mesh.devices.flat, dtype, peak_per_device)
  return {
      "preset": preset, "seq": seq, "batch": batch, "accum": accum, "dtype": dtype, "remat": remat,
      "devices": f"{mesh.devices.size} x {mesh.devices.flat[0].device_kind}", "mesh": dict(mesh.shape),
      "params_M": cfg.num_params / 1e6, "first_loss": loss0, "compile_s": compile_s, "step_s": step_s,
      "tokens_per_s": tokens_per_step / step_s,
      "mfu": perf.mfu(tokens_per_step, seq, step_s, cfg, remat, peak), "peak_flops": peak, "peak_source": how,
  }


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", default="tiny-qwen2")
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--batch", type=int, default=8, help="rows per micro batch (all devices)")
  p.add_argument("--accum", type=int, default=1, help="micro batches per step (scan inside the step)")
  p.add_argument("--dtype", default="float32")
  p.add_argument("--remat", default="none", choices=("none", "full", "save_dots"))
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--logits_chunk", type=int, default=1024)
  p.add_argument("--mesh", default="data=-1", help="e.g. data=1,fsdp=-1,tensor=1")
  p.add_argument("--peak_flops_per_device", type=float, default=0.0, help="0 = table (CPU: measured)")
  p.add_argument("--layers", default="scan", choices=("scan", "unrolled", "both"),
                 help="model.scan_layers: one lax.scan, unrolled, or both side by side")
  p.add_argument("--gpu", action="store_true", help=f"run {GPU_CASES} (preset, seq, batch) in bf16, full remat")
  args = p.parse_args()
  mesh_axes = {k: int(v) for k, v in (kv.split("=") for kv in args.mesh.split(","))}
  cases = ([(n, s, b, args.accum, "bfloat16", "full") for n, s, b in GPU_CASES] if args.gpu else
           [(args.preset, args.seq, args.batch, args.accum, args.dtype, args.remat)])
  layouts = {"scan": (True,), "unrolled": (False,), "both": (True, False)}[args.layers]
  print(f"{'preset':14s} {'layers':8s} {'seq':>5s} {'batch':>5s} {'dtype':9s} {'remat':9s} {'compile s':>9s} "
        f"{'step s':>8s} {'tokens/s':>10s} {'MFU':>6s}  devices / peak")
  for (preset, seq, batch, accum, dtype, remat), scan in ((c, s) for c in cases for s in layouts):
    r = bench(preset, seq, batch, accum, dtype, remat, args.steps, mesh_axes, args.logits_chunk,
              args.peak_flops_per_device, scan_layers=scan)
    print(f"{preset:14s} {'scan' if scan else 'unrolled':8s} {seq:5d} {batch * accum:5d} {dtype:9s} {remat:9s} "
          f"{r['compile_s']:9.1f} "
          f"{r['step_s']:8.3f} {r['tokens_per_s']:10.0f} {r['mfu']:6.3f}  {r['devices']}, "
          f"{r['peak_flops']:.3g} FLOP/s ({r['peak_source']})", flush=True)


if __name__ == "__main__":
  main()
