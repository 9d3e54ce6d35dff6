"""Sampling on an accelerator: our engine vs Hugging Face `generate` (torch) at Qwen2.5 shapes, random weights.

    python benchmarks/sampling.py --gpu [--presets qwen2.5-1.5b,qwen2.5-7b] [--batches 1,64,256]
                                        [--hf-batches 64,256] [--json out.json]
    python benchmarks/sampling.py --gpu --smoke      # tiny presets on whatever JAX finds (CPU here): proves
                                                     # the script end to end; the test suite runs it

Per preset, in bf16 (`--dtype`), prompt 128 (`--prompt-len`), 128 new tokens (`--new-tokens`), greedy, stop
tokens ignored so every row decodes its whole budget:
  ours tok/s   batch x new tokens / seconds of a warm `SamplingEngine.generate` call (prefill included);
  HF tok/s     the same for `model.generate` on a model built from the same config (random init, sdpa
               attention, the GPU when torch sees one); ratio = ours / HF;
  roofline     batch 1 only: the decode step's bytes (all weights + the K/V cache slots it reads) / the
               measured copy bandwidth (a device-to-device `x + 1` over 1 GiB, bytes read + written), over
               the decode step's time = (call with N new tokens - call with 1) / (N - 1).
Each engine runs per preset in its own worker process: JAX preallocates most of the accelerator's memory and
torch's caching allocator keeps what it took, so in one process each would starve the other. The two models
have different random weights: the table compares speed, not outputs (greedy equality with HF on real
weights is a CPU test, tests/test_real_weights.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# 64 new tokens and the best of 3 calls: the batch-1 decode step is a difference of two call times, which
# needs enough steps to stand above timer noise on a loaded 2-core machine.
SMOKE = dict(presets=["tiny-qwen2"], batches=[1, 4], hf_batches=[4], prompt_len=16, new_tokens=64, repeats=3)


def _prompts(vocab: int, batch: int, prompt_len: int) -> list[list[int]]:
  rng = np.random.RandomState(batch)
  return [[int(t) for t in rng.randint(3, vocab, prompt_len)] for _ in range(batch)]


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
  """Bytes/s (read + written) of `x + 1` over `nbytes` of float32 on JAX's default device, best of 5."""
  import jax
  import jax.numpy as jnp
  from sampling import _time

  x = jnp.ones((nbytes // 4,), jnp.float32)
  f = jax.jit(lambda a: a + 1)
  f(x).block_until_ready()
  return 2 * x.nbytes / _time(lambda: f(x).block_until_ready(), 5)


def hf_model(cfg, dtype: str, device: str):
  """A transformers model of `cfg`'s architecture with random weights, on `device`."""
  import torch
  import transformers
  from spark_jax.models.hf_io import config_to_hf

  hf_cfg = dict(config_to_hf(cfg))
  model_type = hf_cfg.pop("model_type")
  for key in ("architectures", "torch_dtype", "dtype"):
    hf_cfg.pop(key, None)
  config = transformers.AutoConfig.for_model(model_type, **hf_cfg)
  torch.manual_seed(0)
  with torch.device(device):
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
  return model.eval()


def worker(args) -> dict:
  """One engine, one preset, every batch of the run: {"batches": {batch: {...}}, ...}."""
  from spark_jax import models, sampling

  cfg = models.get_preset(args.preset, dtype=args.dtype)
  rows = {}
  if args.worker == "hf":
    import torch
    from sampling import _hf

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = hf_model(cfg, args.dtype, device)
    for batch in args.batches:
      seconds, _ = _hf(model, _prompts(cfg.vocab_size, batch, args.prompt_len), args.new_tokens, args.repeats,
                       device=device)
      rows[batch] = {"seconds": seconds}
      print(f"  hf {args.preset} batch {batch}: {seconds:.2f} s", file=sys.stderr, flush=True)
    return {"engine": "hf", "device": device, "batches": rows}

  import jax
  from sampling import _ours

  params = models.init_params(cfg)
  weight_bytes = int(sum(x.nbytes for x in jax.tree.leaves(params)))
  for batch in args.batches:
    prompts = _prompts(cfg.vocab_size, batch, args.prompt_len)
    seconds, compile_s, _ = _ours(cfg, params, prompts, args.new_tokens, args.repeats)
    row = {"seconds": seconds, "compile_s": compile_s}
    if batch == 1:
      row["single_s"], _, _ = _ours(cfg, params, prompts, 1, args.repeats)
    rows[batch] = row
    print(f"  ours {args.preset} batch {batch}: {seconds:.2f} s (compile {compile_s:.1f} s)", file=sys.stderr,
          flush=True)
  slots = sampling.bucket_length(args.prompt_len) + args.new_tokens  # the cache slots a decode step reads
  kv_bytes = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * slots * np.dtype(args.dtype).itemsize
  return {"engine": "ours", "device": str(jax.devices()[0]), "batches": rows, "weight_bytes": weight_bytes,
          "kv_bytes": int(kv_bytes), "bandwidth": copy_bandwidth(args.bandwidth_bytes)}


def _spawn(engine: str, preset: str, batches: list[int], args) -> dict:
  with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
    out_path = f.name
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", engine, "--preset", preset, "--out", out_path,
         "--batches", ",".join(map(str, batches)), "--prompt-len", str(args.prompt_len), "--new-tokens",
         str(args.new_tokens), "--repeats", str(args.repeats), "--dtype", args.dtype, "--bandwidth-bytes",
         str(args.bandwidth_bytes)]
  proc = subprocess.run(cmd, env=dict(os.environ), stdout=subprocess.PIPE, text=True)  # stderr: progress
  if proc.returncode != 0:
    raise RuntimeError(f"GPU benchmark worker {engine} {preset} failed (exit {proc.returncode}); its stderr is "
                       "above.")
  with open(out_path) as f:
    result = json.load(f)
  os.unlink(out_path)
  return result


def table(results: dict, args) -> list[dict]:
  """Rows of the printed table from {preset: {"ours": ..., "hf": ...}} (also the JSON's rows)."""
  out = []
  for preset, by_engine in results.items():
    ours, hf = by_engine["ours"], by_engine.get("hf")
    for batch, r in sorted(ours["batches"].items(), key=lambda kv: int(kv[0])):
      batch = int(batch)
      row = {"preset": preset, "dtype": args.dtype, "batch": batch, "prompt": args.prompt_len,
             "new_tokens": args.new_tokens, "ours_tok_s": batch * args.new_tokens / r["seconds"],
             "compile_s": r["compile_s"], "device": ours["device"]}
      if hf is not None and str(batch) in {str(k) for k in hf["batches"]}:
        hf_s = {str(k): v for k, v in hf["batches"].items()}[str(batch)]["seconds"]
        row["hf_tok_s"] = batch * args.new_tokens / hf_s
        row["ratio"] = row["ours_tok_s"] / row["hf_tok_s"]
      step_s = (r["seconds"] - r["single_s"]) / (args.new_tokens - 1) if "single_s" in r else 0.0
      if step_s > 0:  # a difference of two timings: too few new tokens can leave it in the noise
        row["decode_step_ms"] = 1e3 * step_s
        row["roofline"] = (ours["weight_bytes"] + ours["kv_bytes"]) / ours["bandwidth"] / step_s
        row["bandwidth_gb_s"] = ours["bandwidth"] / 1e9
      out.append(row)
  return out


def main(args) -> None:
  if args.smoke:
    for k, v in SMOKE.items():
      setattr(args, k, v)
    args.bandwidth_bytes = 64 << 20
  results = {}
  for preset in args.presets:
    results[preset] = {"ours": _spawn("ours", preset, args.batches, args)}
    if args.hf_batches and not args.skip_hf:
      results[preset]["hf"] = _spawn("hf", preset, args.hf_batches, args)
  rows = table(results, args)
  print(f"sampling on {rows[0]['device']}: random weights, {args.dtype}, prompt {args.prompt_len}, "
        f"{args.new_tokens} new tokens, greedy, every row to its budget")
  print("| model | batch | ours tok/s | HF tok/s | ours / HF | decode step ms | roofline | compile s |")
  print("|---|---|---|---|---|---|---|---|")
  for r in rows:
    hf = f"{r['hf_tok_s']:.1f}" if "hf_tok_s" in r else "-"
    ratio = f"{r['ratio']:.2f}x" if "ratio" in r else "-"
    step = f"{r['decode_step_ms']:.2f}" if "decode_step_ms" in r else "-"
    roof = f"{100 * r['roofline']:.0f} % of {r['bandwidth_gb_s']:.0f} GB/s" if "roofline" in r else "-"
    print(f"| {r['preset']} {args.dtype} | {r['batch']} | {r['ours_tok_s']:.1f} | {hf} | {ratio} | {step} | "
          f"{roof} | {r['compile_s']:.1f} |", flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"rows": rows, "raw": results}, f, indent=1)


def _worker_main(argv) -> None:
  import argparse

  p = argparse.ArgumentParser()
  p.add_argument("--worker", choices=["ours", "hf"], required=True)
  p.add_argument("--preset", required=True)
  p.add_argument("--out", required=True)
  p.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], required=True)
  p.add_argument("--prompt-len", type=int, required=True)
  p.add_argument("--new-tokens", type=int, required=True)
  p.add_argument("--repeats", type=int, required=True)
  p.add_argument("--dtype", required=True)
  p.add_argument("--bandwidth-bytes", type=int, required=True)
  args = p.parse_args(argv)
  result = worker(args)
  with open(args.out, "w") as f:
    json.dump(result, f)


if __name__ == "__main__":
  _worker_main(sys.argv[1:])
