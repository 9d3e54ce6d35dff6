"""Bootstrap of the world's models: a tiny generator/policy and a tiny verifier trained from random weights
with the project's own SFT job (`spark_jax.jobs.run` on a configs/sft_prm.py config), then measured.

  generator  user: `stage1.prompts.generator_prompt(problem)`; assistant: a policy-format solution
             (spark_jax/world/task.py) in which an error is injected at a uniform step with probability
             `generator_error_rate`, so the trained model samples partly wrong solutions (room for RL).
  verifier   user: `stage1.prompts.verifier_prompt(problem, solution)` (a `reference_fraction` of the rows
             with the expected answer, the reference-guided prompt) for a solution whose steps are each wrong
             with probability `verifier_step_error_rate`; assistant: a verification by a grader that redoes
             each step and miscalculates with probability 1 - `verifier_step_accuracy`
             (task.noisy_verification). A model fit to these samples noisy, partly independent verdicts:
             what self-consistency is meant to fix.

Solutions shown to the verifier are the decoded form Stage I stores (special tokens skipped). Every output
is a checkpoint directory with the world tokenizer (`ChatModel.load` / `load_model` read it like a real
model). Measured on held-out problems: parse rate, generator answer and process accuracy, verifier per-step
verdict accuracy against the exact truth. Each model's training resumes (the SFT job checkpoints) and a
finished one is skipped by its summary.json.

What it takes to learn (docs/method.md §1.1 and §7.2 have the measurements): the generator learns the
table at lr 1e-3 within ~700 steps at every seed tried (0, 1, 2); at lr 3e-3 it sat on a loss plateau and
then learnt or not depending on the seed and on float rounding. The verifier, fine-tuned from the generator,
learns its verdict only when the verification writes the difference `c - r = d` out: with `a op b = r;
written c` it recomputed r and copied c but never compared them.

Cache: training is deterministic given the settings, so with `bootstrap.cache=True` the models live in
`$SPARK_JAX_CACHE/world/<fingerprint>` (`bootstrap_dir`), the fingerprint hashing every setting that shapes
them (world, bootstrap, seed, measuring temperatures, the tokenizer, this module's version). The test
suite's fixture and a later quick demo then train them once per machine instead of once per run.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from typing import Sequence

from ml_collections import ConfigDict

from spark_jax import io
from spark_jax.stage1 import prompts
from spark_jax.text import verdicts
from spark_jax.text.answers import extract_answer
from spark_jax.world import task as task_lib
from spark_jax.world import tokenizer as world_tokenizer


_VERSION = 7  # 4: world-small models; 5: verifications check "c - r = d"; 6: trained by the 2D-projection
# decoder (other float rounding: a cache entry trained before it holds other models, so it is not reused);
# 7: padded lengths every 32 tokens (sft_config)


def fingerprint(config) -> str:
  """Hash of everything the bootstrap models depend on (see the module docstring)."""
  payload = {"version": _VERSION, "world": config.world.to_dict(), "seed": config.seed,
             "bootstrap": {k: v for k, v in config.bootstrap.to_dict().items() if k != "cache"},
             "temperatures": [config.stage1.generator_temperature, config.stage1.verifier_temperature],
             "tokenizer": hashlib.sha256(world_tokenizer.build_tokenizer_json().encode()).hexdigest()}
  return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def bootstrap_dir(config, default: str) -> str:
  """Where the bootstrap writes: the shared cache entry when `bootstrap.cache`, else `default`."""
  return io.cache_dir("world", fingerprint(config)) if config.bootstrap.cache else default


def task_config(config) -> task_lib.TaskConfig:
  w = config.world
  return task_lib.TaskConfig(modulus=w.modulus, min_ops=w.min_ops, max_ops=w.max_ops, max_operand=w.max_operand)


# ------------------------------------------------------------------------------------------------ data


def generator_rows(problems: Sequence[task_lib.Problem], seed: int, error_rate: float) -> list[dict]:
  rng = random.Random(f"generator-rows:{seed}")
  rows = []
  for p in problems:
    solution, fe = task_lib.sample_solution(p, rng, error_rate)
    rows.append({"messages": [{"role": "user", "content": prompts.generator_prompt(p.text)},
                              {"role": "assistant", "content": solution}],
                 "problem_id": p.problem_id, "first_error": fe})
  return rows


def verifier_rows(problems: Sequence[task_lib.Problem], seed: int, step_error_rate: float, step_accuracy: float,
                  reference_fraction: float) -> list[dict]:
  rng = random.Random(f"verifier-rows:{seed}")
  rows = []
  for p in problems:
    solution, fe = task_lib.sample_step_error_solution(p, rng, step_error_rate)
    shown = task_lib.visible(solution)
    expected = p.answer if rng.random() < reference_fraction else None
    verification = task_lib.noisy_verification(p, solution, rng, step_accuracy)
    rows.append({"messages": [{"role": "user", "content": prompts.verifier_prompt(p.text, shown, expected)},
                              {"role": "assistant", "content": verification}],
                 "problem_id": p.problem_id, "first_error": fe})
  return rows


# ------------------------------------------------------------------------------------------------ training


def sft_config(workdir: str, data: str, tokenizer_dir: str, preset: str, settings, seed: int) -> ConfigDict:
  """The SFT job's config (configs/sft_prm.py) for a random-init world preset on chat rows `data`."""
  from configs import sft_prm
  c = sft_prm.get_config()
  c.workdir = workdir
  c.data = data
  c.format = ""
  c.formats = ()
  c.tokenizer = tokenizer_dir
  c.model.name = preset
  c.model.init = "random"
  c.model.dtype = "float32"
  c.model.remat = "none"
  c.model.scan_layers = False  # 4 layers: unrolled steps are faster and compile fast (docs/method.md §1.1)
  c.seed = seed
  c.num_steps = settings.num_steps
  c.global_batch = settings.global_batch
  c.lr = settings.lr
  c.warmup_ratio = 0.05
  c.end_lr_ratio = 0.1
  c.weight_decay = 0.0
  c.max_length = settings.max_length
  # Padded lengths every 32 tokens: world rows are 50-90 (generator) and 130-210 (verifications, PRM-CoT)
  # tokens, which powers of two pad to 128 and 256 (47 % and 28 % padding); each used length compiles once.
  c.bucket_boundaries = tuple(range(64, int(settings.max_length), 32))
  c.eval_fraction = 0.0
  c.checkpoint_every = settings.num_steps
  c.eval_every = 0
  c.log_every = max(1, settings.num_steps // 5)
  c.export_dtype = "float32"
  c.progress_bar = False
  return c


def finished_summary(workdir: str) -> dict | None:
  """A job's summary.json when the job finished (for the SFT job: all steps done and exported)."""
  path = os.path.join(workdir, "summary.json")
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    summary = json.load(f)
  if summary.get("job") == "sft" and (summary.get("stopped_early") or not summary.get("export_dir")):
    return None
  return summary


def train(config: ConfigDict) -> dict:
  """Runs the SFT job unless its workdir already holds a finished run; returns its summary."""
  from spark_jax import jobs
  return finished_summary(config.workdir) or jobs.run(config)


# ------------------------------------------------------------------------------------------------ measuring


def _chat_model(model_dir: str, mesh, seed: int, max_batch_rows: int, batching: str):
  from configs import common
  from spark_jax.sampling.chat import ChatModel
  return ChatModel.load(common.model(model_dir, init="pretrained", dtype="float32"), mesh, seed=seed,
                        max_batch_rows=max_batch_rows, batching=batching)


def measure_generator(model, problems: Sequence[task_lib.Problem], *, temperature: float, max_new_tokens: int,
                      seed: int) -> dict:
  """Parse rate (a boxed answer and >= 1 step), answer accuracy, process-complete rate, per-step accuracy."""
  outs = model.sample([prompts.generator_prompt(p.text) for p in problems], num_samples=1,
                      temperature=temperature, top_p=1.0, max_new_tokens=max_new_tokens, seed=seed)
  parsed = correct = complete = step_hits = steps = 0
  for p, (c,) in zip(problems, outs):
    truth = task_lib.step_truth(p, c.text)
    parsed += extract_answer(c.text) is not None and bool(truth)
    correct += task_lib.solution_is_correct(p, c.text)
    complete += task_lib.process_complete(p, c.text)
    step_hits += sum(truth)
    steps += len(p.ops)
  n = len(problems)
  return {"temperature": temperature, "n": n, "parse_rate": parsed / n, "answer_accuracy": correct / n,
          "process_complete": complete / n, "step_accuracy": step_hits / steps, "example": outs[0][0].text}


def measure_verifier(model, problems: Sequence[task_lib.Problem], *, error_rate: float, temperature: float,
                     max_new_tokens: int, seed: int) -> dict:
  """On task-generated solutions: well-formed rate, per-step verdict accuracy, final-verdict accuracy."""
  rng = random.Random(f"measure-verifier:{seed}")
  items = []
  for p in problems:
    solution, _ = task_lib.sample_solution(p, rng, error_rate)
    items.append((p, task_lib.visible(solution)))
  outs = model.sample([prompts.verifier_prompt(p.text, s) for p, s in items], num_samples=1,
                      temperature=temperature, top_p=1.0, max_new_tokens=max_new_tokens, seed=seed)
  well_formed = final_hits = step_hits = steps = 0
  for (p, s), (c,) in zip(items, outs):
    parsed = verdicts.parse_verification(c.text)
    truth = task_lib.step_truth(p, s)
    well_formed += bool(parsed["steps"]) and parsed["final"] is not None
    final_hits += parsed["final"] == task_lib.solution_is_correct(p, s)
    step_hits += sum(a == b for a, b in zip(parsed["steps"], truth))
    steps += len(truth)
  n = len(items)
  return {"temperature": temperature, "n": n, "well_formed": well_formed / n, "step_accuracy": step_hits / steps,
          "final_accuracy": final_hits / n, "example": outs[0][0].text}


# ------------------------------------------------------------------------------------------------ the stage


def run_bootstrap(config, workdir: str) -> dict:
  """Tokenizer, training data, both models and their measurements under `workdir`; returns the summary.

  `config` is the demo config (sections `world` and `bootstrap`, `seed`, `mesh`, `max_batch_rows`,
  `batching`).
  """
  with io.file_lock(workdir.rstrip("/") + ".lock"):  # one trainer per cache entry; others wait, then read it
    return finished_summary(workdir) or _run_bootstrap(config, workdir)


def _run_bootstrap(config, workdir: str) -> dict:
  start = time.time()
  b, tc = config.bootstrap, task_config(config)
  tok_dir = world_tokenizer.build_tokenizer(os.path.join(workdir, "tokenizer"))
  train_problems = task_lib.make_problems(config.seed * 1000 + 1, b.train_problems, tc, prefix="boot")
  data_dir = os.path.join(workdir, "data")
  gen_data, ver_data = os.path.join(data_dir, "generator.jsonl"), os.path.join(data_dir, "verifier.jsonl")
  if not os.path.exists(gen_data):
    io.write_jsonl_atomic(gen_data, generator_rows(train_problems, config.seed, b.generator_error_rate))
  if not os.path.exists(ver_data):
    io.write_jsonl_atomic(ver_data, verifier_rows(train_problems, config.seed, b.verifier_step_error_rate,
                                                  b.verifier_step_accuracy, b.reference_fraction))
  timings = {}
  t = time.time()
  gen_sft = train(sft_config(os.path.join(workdir, "generator"), gen_data, tok_dir, b.generator_preset,
                             b.generator_sft, config.seed))
  timings["generator_sft"] = round(time.time() - t, 1)
  t = time.time()
  ver_config = sft_config(os.path.join(workdir, "verifier"), ver_data, tok_dir, b.verifier_preset, b.verifier_sft,
                          config.seed)
  if b.verifier_init == "generator":  # as a real verifier starts from an LLM that can already do the math
    ver_config.model.name = gen_sft["export_dir"]
    ver_config.model.init = "pretrained"
  elif b.verifier_init != "random":
    raise ValueError(f"bootstrap.verifier_init={b.verifier_init!r}; use 'generator' or 'random'.")
  ver_sft = train(ver_config)
  timings["verifier_sft"] = round(time.time() - t, 1)

  t = time.time()
  held_out = task_lib.make_problems(config.seed * 1000 + 2, b.eval_problems, tc, prefix="heldout")
  generator = _chat_model(gen_sft["export_dir"], config.mesh, config.seed, config.max_batch_rows, config.batching)
  gen_metrics = {name: measure_generator(generator, held_out, temperature=temp, max_new_tokens=b.max_new_tokens,
                                         seed=config.seed)
                 for name, temp in (("greedy", 0.0), ("sampled", config.stage1.generator_temperature))}
  verifier = _chat_model(ver_sft["export_dir"], config.mesh, config.seed, config.max_batch_rows, config.batching)
  ver_metrics = {name: measure_verifier(verifier, held_out, error_rate=b.generator_error_rate, temperature=temp,
                                        max_new_tokens=b.max_new_tokens, seed=config.seed)
                 for name, temp in (("greedy", 0.0), ("sampled", config.stage1.verifier_temperature))}
  timings["measure"] = round(time.time() - t, 1)
  summary = {"job": "bootstrap", "tokenizer_dir": tok_dir, "generator_dir": gen_sft["export_dir"],
             "verifier_dir": ver_sft["export_dir"], "generator": gen_metrics, "verifier": ver_metrics,
             "generator_train_loss": gen_sft.get("train_loss_mean_last_10"),
             "verifier_train_loss": ver_sft.get("train_loss_mean_last_10"),
             "seconds": timings, "elapsed_s": round(time.time() - start, 1)}
  io.write_summary(workdir, summary)
  return summary
