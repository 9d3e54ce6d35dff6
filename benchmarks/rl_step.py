"""One GRPO step, timed: rollout / reward / update split and tokens/s/device (verl's perf/throughput).

    python benchmarks/rl_step.py                              # CPU: tiny policy + tiny PRM, proves the script
    python benchmarks/rl_step.py --gpu                        # Qwen2.5-0.5B shapes (policy and PRM), 64 x 16,
                                                              # response 1024, PRM-CoT output 512, bf16,
                                                              # update in micro-batches of 64 with remat
    python benchmarks/rl_step.py --micro_batch 4 --json out.json   # the CPU case in micro-batches, rows to JSON

Random weights; `--prm_all_rows` (on by default here) sends every rollout to the PRM whatever the format gate
says, so the reward time is the real cost of verifying the whole batch (random weights never pass the gate).
Rollouts and PRM outputs run to their full budgets (no stop token: random weights would stop at random).

Phases are timed as separate programs (each compiled and run once before the timed runs):
  rollout   the rollout + gate program alone;
  reward    the full rollout-and-reward program minus the rollout program (the PRM prompt packing, the PRM's
            generation and the verdict parsing inside the same jit);
  update    one AdamW step of the GRPO loss on the batch (on-policy: pi_old is the step's own forward pass).
tokens/s/device = (prompt + response tokens of the batch) / (rollout-and-reward + update time) / devices.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from spark_jax import models
from spark_jax import sharding as shd
from spark_jax.rl import programs as programs_lib
from spark_jax.rl import step as rl_step
from spark_jax.train import step as train_step

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_tokenizer(vocab: int):
  """A byte-level BPE of `vocab` ids trained on a few policy/PRM texts (tiny presets have no real tokenizer)."""
  from tokenizers import Tokenizer as HFTokenizer, decoders, models as tok_models, pre_tokenizers, trainers
  from spark_jax.tokenizer import Tokenizer
  out = tempfile.mkdtemp(prefix="rl_bench_tok")
  tok = HFTokenizer(tok_models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  corpus = ["<think><step>3 + 4 = 7</step></think><answer>\\boxed{7}</answer>",
            "## Step 1: add\n**This step is correct.**\n**Verification: Is the answer correct (Yes/No)? Yes**",
            "Problem: Student Solution: Let's verify step by step. user assistant"] * 8
  tok.train_from_iterator(corpus, trainer)
  tok.save(os.path.join(out, "tokenizer.json"))
  with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>",
               "pad_token": "<|endoftext|>", "chat_template": CHATML, "clean_up_tokenization_spaces": False}, f)
  return Tokenizer.from_pretrained(out)


def _params(cfg, mesh, seed):
  rng = np.random.default_rng(seed)  # numpy init: cheap and deterministic; values do not change the cost
  abstract = models.abstract_params(cfg)
  params = jax.tree_util.tree_map_with_path(
      lambda p, a: (np.ones(a.shape) if "scale" in jax.tree_util.keystr(p)
                    else rng.normal(size=a.shape) * 0.02).astype(a.dtype), abstract)
  from spark_jax.models.load import shard_params
  return shard_params(cfg, params, mesh)


def _time(fn, repeats: int):
  jax.block_until_ready(fn())  # compile + warm
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def run(args) -> dict:
  mesh = shd.make_mesh({"data": -1})
  pcfg = models.get_preset(args.policy).replace(dtype=args.dtype, remat=args.remat)
  rcfg = models.get_preset(args.prm).replace(dtype=args.dtype)
  if args.tokenizer:
    from spark_jax.tokenizer import Tokenizer
    tok = Tokenizer.from_pretrained(args.tokenizer)
  elif pcfg.vocab_size > 100_000:
    from spark_jax.tokenizer_qwen import load_qwen2_tokenizer
    tok = load_qwen2_tokenizer()
  else:
    tok = tiny_tokenizer(pcfg.vocab_size)
  B, G, R = args.prompts, args.group, args.response
  settings = rl_step.RolloutSettings(
      group_size=G, max_response=R, stop_token_ids=(), reward_type=args.reward, prm_max_new_tokens=args.prm_out,
      prm_stop_token_ids=(), prm_all_rows=args.prm_all_rows, rollout_chunk=args.rollout_chunk,
      prm_chunk=args.prm_chunk)
  tables = programs_lib.make_reward_tables(tok, settings, tok, pcfg.vocab_size)
  with shd.use_mesh(mesh):
    policy, prm = _params(pcfg, mesh, 0), _params(rcfg, mesh, 1)
  rng = np.random.default_rng(0)
  pt = rng.integers(3, min(pcfg.vocab_size, 300), (B, args.prompt_len)).astype(np.int32)
  pl = np.full((B,), args.prompt_len, np.int32)
  qt = rng.integers(3, min(pcfg.vocab_size, 300), (B, args.problem_len)).astype(np.int32)
  ql = np.full((B,), args.problem_len, np.int32)
  key = jax.random.PRNGKey(0)
  tx, sched = train_step.make_optimizer(pcfg, lr=1e-6, total_steps=10, warmup_ratio=0.0, schedule="constant",
                                        grad_clip=1.0)
  progs = programs_lib.Programs(pcfg, rcfg, settings, rl_step.UpdateSettings(
      beta=0.0, compute_dtype=args.dtype, micro_batch=args.micro_batch, logits_chunk=args.logits_chunk), tx,
      sched, mesh)
  with shd.use_mesh(mesh):
    t_rollout = _time(lambda: progs._rollout_and_gate(policy, tables, pt, pl, key), args.repeats)
    t_full = _time(lambda: progs._rollout_and_reward(policy, prm, tables, pt, pl, qt, ql, key), args.repeats)
    roll = progs._rollout_and_reward(policy, prm, tables, pt, pl, qt, ql, key)
    state = train_step.init_state(pcfg, policy, tx, mesh)

    def upd():
      nonlocal state
      state, m = progs.update(state, None, pt, pl, roll, 1, 1, False)
      return m
    upd()
    times = []
    for _ in range(args.repeats):
      t0 = time.perf_counter()
      upd()
      times.append(time.perf_counter() - t0)
    t_update = float(np.median(times))
  tokens = B * G * (args.prompt_len + R)
  step = t_full + t_update
  row = {"policy": args.policy, "prm": args.prm, "dtype": args.dtype, "prompts": B, "group": G, "response": R,
         "prm_out": args.prm_out, "micro_batch": args.micro_batch, "rollout_s": t_rollout, "reward_s": max(t_full - t_rollout, 0.0),
         "update_s": t_update, "step_s": step, "tokens": tokens,
         "tokens_per_s_per_device": tokens / step / jax.device_count(), "devices": jax.device_count(),
         "backend": jax.default_backend(), "prm_prompt_len": float(roll.stats.get("prm_prompt_length", 0.0))}
  return row


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--policy", default="tiny-qwen2")
  ap.add_argument("--prm", default="tiny-qwen2")
  ap.add_argument("--tokenizer", default="", help="tokenizer dir; default: Qwen2.5 (offline) or a tiny BPE")
  ap.add_argument("--reward", default="prm_cot_outcome")
  ap.add_argument("--prompts", type=int, default=4)
  ap.add_argument("--group", type=int, default=4)
  ap.add_argument("--prompt_len", type=int, default=32)
  ap.add_argument("--problem_len", type=int, default=16)
  ap.add_argument("--response", type=int, default=32)
  ap.add_argument("--prm_out", type=int, default=32)
  ap.add_argument("--rollout_chunk", type=int, default=0)
  ap.add_argument("--prm_chunk", type=int, default=0)
  ap.add_argument("--prm_all_rows", type=int, default=1)
  ap.add_argument("--dtype", default="float32")
  ap.add_argument("--logits_chunk", type=int, default=1024, help="positions per vocabulary-projection chunk")
  ap.add_argument("--micro_batch", type=int, default=0, help="rollouts per forward/backward of the update (0 = all)")
  ap.add_argument("--remat", default="none", help="the policy's rematerialisation in the update: none | full")
  ap.add_argument("--repeats", type=int, default=2)
  ap.add_argument("--json", default="", help="also write the row here")
  ap.add_argument("--gpu", action="store_true", help="the issue's GPU case (Qwen2.5-0.5B shapes, bf16)")
  args = ap.parse_args()
  if args.gpu:
    args.policy = args.prm = "qwen2.5-0.5b"
    args.prompts, args.group, args.response, args.prm_out = 64, 16, 1024, 512
    args.prompt_len, args.problem_len, args.dtype, args.repeats = 256, 128, "bfloat16", 1
    args.prm_chunk = 256
    # 1,024 rows x 1,280 tokens do not fit one backward pass; 64 rows x 128 positions x 151,936 fp32 logits
    # are 5 GB per head chunk.
    args.micro_batch, args.remat, args.logits_chunk = 64, "full", 128
  row = run(args)
  cols = ("policy", "dtype", "prompts", "group", "response", "prm_out", "micro_batch", "rollout_s", "reward_s",
          "update_s",
          "step_s", "tokens_per_s_per_device", "devices", "backend")
  print("| " + " | ".join(cols) + " |")
  print("|" + "---|" * len(cols))
  print("| " + " | ".join(f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c]) for c in cols) + " |")
  print(json.dumps(row))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(row, f, indent=1)


if __name__ == "__main__":
  main()
