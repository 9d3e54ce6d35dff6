"""The RL job `rl`: GRPO with the PRM inside the jitted rollout-and-reward program (docs/method.md, Stage III).

    python -m spark_jax.main --config=configs/rl.py
    python -m spark_jax.main --config=configs/rl.py:world     # the embedded world, CPU, minutes

One step: B prompts from the shuffled prompt set -> `rl.step.rollout_and_reward` (one jitted program; for
`rlvr` the host grades between two programs) -> dynamic sampling (optional: drop groups whose rewards all
agree and refill from new prompts, a bounded number of rounds) -> pi_old (and reference) log-probs ->
`ppo_epochs` x mini-batches of AdamW steps -> metrics. With one mini-batch and one epoch pi_old is the update's
own forward pass under stop_gradient (no separate pass). Every `eval_every` steps the policy answers the
validation prompts greedily and is graded with math_verify.

Checkpoints (train/checkpoint.py): {"step", "params", "opt_state"} + the prompt iterator's state; step t
draws with fold_in(seed key, t) (train/loop.py), so a restart resumes with identical metrics without storing
a key. SIGTERM (a preemption notice) checkpoints after the running step and exits cleanly.
The final policy is exported as a Hugging Face checkpoint (`export_dir`).
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import jax
import numpy as np
from ml_collections import ConfigDict

from spark_jax import sharding as shd
from spark_jax.rl import policy as policy_lib
from spark_jax.rl import programs as programs_lib
from spark_jax.rl import step as rl_step
from spark_jax.text import rm_ids


# ------------------------------------------------------------------------------------------ prompt data


class PromptIterator:
  """Seeded epoch shuffles of the prompt indices; its state (epoch, position) is checkpointed."""

  def __init__(self, num: int, seed: int):
    self.num, self.seed, self.epoch, self.position = num, seed, 0, 0

  def _order(self) -> np.ndarray:
    return np.random.default_rng([self.seed, self.epoch]).permutation(self.num)

  def take(self, n: int) -> list[int]:
    out: list[int] = []
    while len(out) < n:
      order = self._order()
      k = min(n - len(out), self.num - self.position)
      out.extend(int(i) for i in order[self.position:self.position + k])
      self.position += k
      if self.position == self.num:
        self.epoch, self.position = self.epoch + 1, 0
    return out

  def state(self) -> dict:
    return {"epoch": self.epoch, "position": self.position}

  def restore(self, state: dict) -> None:
    self.epoch, self.position = int(state["epoch"]), int(state["position"])


def left_pad(rows: list[list[int]], length: int, pad: int = 0) -> tuple[np.ndarray, np.ndarray]:
  out = np.full((len(rows), length), pad, np.int32)
  for i, r in enumerate(rows):
    out[i, length - len(r):] = r
  return out, np.asarray([len(r) for r in rows], np.int32)


def right_pad(rows: list[list[int]], length: int, pad: int = 0) -> tuple[np.ndarray, np.ndarray]:
  out = np.full((len(rows), length), pad, np.int32)
  for i, r in enumerate(rows):
    out[i, :len(r)] = r[:length]
  return out, np.asarray([min(len(r), length) for r in rows], np.int32)


def check_config(config) -> None:
  """The bad-input errors that need no model: reward type, group size vs batch, budgets."""
  rl_step.check_reward_type(config.reward.type)
  B, G = int(config.prompts_per_step), int(config.group_size)
  if B < 1 or G < 1:
    raise ValueError(f"config.prompts_per_step={B}, config.group_size={G}: both must be >= 1.")
  if (B * G) % int(config.mini_batches):
    raise ValueError(f"config.mini_batches={config.mini_batches} does not divide the {B} x {G} = {B * G} rollouts "
                     "of a step; pick a divisor.")
  if int(config.mini_batches) > 1 and (B * G // int(config.mini_batches)) % G:
    raise ValueError(f"config.group_size={G} does not divide the mini-batch of {B * G // int(config.mini_batches)} "
                     "rollouts; a group must not straddle mini-batches.")
  mini = B * G // int(config.mini_batches)
  micro = int(config.micro_batch)
  if micro < 0 or (0 < micro < mini and mini % micro):
    raise ValueError(f"config.micro_batch={micro} does not divide the mini-batch of {mini} rollouts "
                     f"({B} x {G} / mini_batches {config.mini_batches}); pick a divisor, or 0 for one pass.")
  for key, chunk, total, what in (("reward.rollout_chunk", int(config.reward.rollout_chunk), B, "prompts"),
                                  ("reward.prm_chunk", int(config.reward.prm_chunk), B * G, "rollouts")):
    if chunk < 0 or (0 < chunk < total and total % chunk):
      raise ValueError(f"config.{key}={chunk} does not divide the {total} {what} of a step (prompts_per_step {B} "
                       f"x group_size {G}); pick a divisor, or 0 for one block.")
  if int(config.grading_workers) < 1:
    raise ValueError(f"config.grading_workers={config.grading_workers}: RL grades rlvr rewards and validation in a "
                     "pool of worker processes (a hung math_verify call must not stall the step); set it >= 1.")
  if float(config.grading_timeout_s) <= 0:
    raise ValueError(f"config.grading_timeout_s={config.grading_timeout_s}: the per-answer grading limit must be "
                     "> 0 seconds.")


def check_budget(cfg, max_prompt: int, max_new: int, which: str) -> None:
  limit = cfg.max_position_embeddings
  if max_prompt + max_new > limit:
    raise ValueError(f"{which}: prompt budget {max_prompt} + output budget {max_new} = {max_prompt + max_new} "
                     f"tokens exceeds the model's cache / position limit {limit}; lower config.max_response "
                     "(or reward.prm_max_new_tokens) or config.max_prompt_tokens.")


def check_same_tokenizer(policy_tok, prm_tok, policy_name: str, prm_name: str) -> None:
  """The in-graph reward feeds policy ids to the PRM: both token->bytes tables must be identical."""
  from spark_jax.tokenizer import vocabulary_difference
  difference = vocabulary_difference(policy_tok, prm_tok)
  if difference:
    raise ValueError(
        f"policy {policy_name!r} and PRM {prm_name!r} have different tokenizers ({difference}); the in-graph "
        "reward needs one shared tokenizer. Use a PRM trained from the policy's tokenizer, or set "
        "config.reward.in_graph=False to score on the host.")


# ------------------------------------------------------------------------------------------------- run


class _Stop:
  """SIGTERM (a preemption notice) asks the loop to checkpoint after the running step and exit cleanly."""

  def __init__(self):
    self.requested = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def close(self):
    signal.signal(signal.SIGTERM, self._previous)


def _load(spec, mesh, seed: int, which: str):
  from spark_jax.models.load import load_model
  with shd.use_mesh(mesh):
    try:
      return load_model(spec.name, init=spec.init, dtype=spec.dtype, mesh=mesh, seed=seed, remat=spec.remat,
                        scan_layers=bool(spec.get("scan_layers", True)))
    except (KeyError, ValueError, OSError) as e:
      raise type(e)(f"config.{which}: {e}") from e


def _tokenizer(directory: str, ckpt_dir: str | None, which: str):
  from spark_jax.tokenizer import Tokenizer
  source = directory or ckpt_dir
  if not source:
    raise ValueError(f"config.{which} is empty and the model has no checkpoint directory to take a tokenizer "
                     "from; set it to a tokenizer directory.")
  return Tokenizer.from_pretrained(source)


class Evaluator:
  """The policy's answers to the validation prompts, graded with math_verify: accuracy, format-valid share and
  response length. Greedy pass@1 by default; with `eval_temperature > 0`, `eval_samples` draws per prompt at
  that temperature and the mean accuracy over them (avg@k, D11): the quantity GRPO itself raises, which a
  policy already right under greedy decoding still has room to improve.

  Uses the sampling engine with the current params per call (same shapes: no recompilation); the draws use a
  fixed seed, so successive evaluations differ only by the parameters."""

  def __init__(self, config, pcfg, params, tokenizer, mesh, grade):
    from spark_jax.sampling import core
    from spark_jax.sampling.engine import SamplingEngine
    self.sets = validation_sets(config.data.val)
    prompts, self.set_of_prompt = [], []
    for name, source in self.sets.items():
      rows = policy_lib.load_rl_prompts(source, problem_key=config.data.problem_key,
                                        answer_key=config.data.answer_key, split=config.data.split,
                                        limit=int(config.eval_prompts), require_answer=True)
      prompts += rows
      self.set_of_prompt += [name] * len(rows)
    self.ids, _ = policy_lib.encode_prompts(tokenizer, prompts, template=config.data.template,
                                            max_prompt_tokens=int(config.max_prompt_tokens))
    self.golds = [p.ground_truth for p in prompts]
    self.tokenizer = tokenizer
    self.grade = grade
    temperature, k = float(config.eval_temperature), int(config.eval_samples)
    if k < 1 or (temperature == 0.0 and k != 1):
      raise ValueError(f"eval_samples={k} with eval_temperature={temperature}: greedy evaluation takes one sample "
                       "per prompt; sampled evaluation (temperature > 0) takes eval_samples >= 1.")
    self.seed = int(config.seed) + 7919
    self.settings = core.SamplingParams(max_new_tokens=int(config.eval_max_response or config.max_response),
                                        temperature=temperature, num_samples=k,
                                        stop_token_ids=tuple(tokenizer.end_of_turn_ids))
    self.engine = SamplingEngine(pcfg, params, mesh=mesh, progress=False)

  def __call__(self, params) -> dict[str, float]:
    from spark_jax.rl import rewards as rewards_lib
    samples = self.engine.generate(self.ids, self.settings, params=params, seed=self.seed)
    texts = [self.tokenizer.decode(s.tokens, skip_special_tokens=True) for group in samples for s in group]
    golds = [g for g, group in zip(self.golds, samples) for _ in group]
    names = np.asarray([n for n, group in zip(self.set_of_prompt, samples) for _ in group])
    correct = np.asarray(self.grade(texts, golds), np.float64)
    out = {"format_ok": float(np.mean([rewards_lib.format_ok(t) for t in texts])),
           "response_length": float(np.mean([len(s.tokens) for group in samples for s in group]))}
    if len(self.sets) == 1:
      return {"accuracy": float(correct.mean()), **out}
    per_set = {f"accuracy/{name}": float(correct[names == name].mean()) for name in self.sets}
    # The benchmarks' average, each set weighing the same (AIME's 30 problems as much as MATH500's 100).
    return {"accuracy": float(np.mean(list(per_set.values()))), **per_set, **out}


def validation_sets(spec: str) -> dict[str, str]:
  """`config.data.val` -> {name: source}: one source, or several separated by commas, each named by its
  folder (`data/aime24/test.jsonl` -> aime24) or, for a folder or hub id, its last component."""
  sources = [x.strip() for x in str(spec).split(",") if x.strip()]
  out: dict[str, str] = {}
  for source in sources:
    parts = [x for x in source.replace("\\", "/").split("/") if x]
    name = parts[-2] if len(parts) > 1 and os.path.splitext(parts[-1])[1] else parts[-1]
    if name in out:
      raise ValueError(f"config.data.val={spec!r}: two validation sets are named {name!r} ({out[name]!r} and "
                       f"{source!r}); put them in folders of different names.")
    out[name] = source
  return out


# Fields that leave the numbers alone: a checkpoint written under other values still resumes.
NOT_RESULT = ("job", "workdir", "mesh", "checkpoint_every", "keep_checkpoints", "eval_every", "eval_prompts",
              "eval_temperature", "eval_samples",
              "export_dir", "progress_bar", "log_every", "num_steps", "resume", "debug_stop_after", "grading_workers",
              "policy.remat", "policy.scan_layers", "prm.remat", "prm.scan_layers", "micro_batch",
              "logits_chunk", "reward.rollout_chunk", "reward.prm_chunk", "data.val")


def run_rl(config) -> dict:
  """Runs GRPO per `config` (every knob: configs/rl.py `rl_config`); returns the summary."""
  from spark_jax.io import write_summary
  from spark_jax.train import checkpoint as ckpt_lib
  from spark_jax.train import loop as loop_lib
  from spark_jax.train import metrics as metrics_lib
  from spark_jax.train import step as train_step

  t_start = time.time()
  check_config(config)
  workdir = os.path.abspath(config.workdir)
  os.makedirs(workdir, exist_ok=True)
  mesh = shd.make_mesh(config.mesh.to_dict())
  B, G = int(config.prompts_per_step), int(config.group_size)
  ways = mesh.shape["data"] * mesh.shape["fsdp"]
  # A row count the data axes do not divide would be replicated on every device instead of split (memory).
  for key, value, rows, total in (
      ("micro_batch", config.micro_batch, int(config.micro_batch), B * G // int(config.mini_batches)),
      ("reward.rollout_chunk", config.reward.rollout_chunk, int(config.reward.rollout_chunk) * G, B * G),
      ("reward.prm_chunk", config.reward.prm_chunk, int(config.reward.prm_chunk), B * G)):
    if 0 < rows < total and rows % ways:
      raise ValueError(f"config.{key}={value} gives blocks of {rows} rows, not a multiple of the mesh's data x fsdp = {ways} "
                       f"(mesh {dict(mesh.shape)}): each device takes an equal share of every block. Pick a "
                       "multiple, or 0 for one block.")
  reward_type = config.reward.type
  needs_prm = rl_step.REWARD_FORMATS[reward_type] is not None

  # ---- models and tokenizers
  pcfg, policy_params, policy_dir = _load(config.policy, mesh, config.seed, "policy")
  tokenizer = _tokenizer(config.tokenizer, policy_dir, "tokenizer")
  check_budget(pcfg, int(config.max_prompt_tokens), int(config.max_response), "policy")
  prm_cfg = prm_params = prm_tok = None
  if needs_prm:
    prm_cfg, prm_params, prm_dir = _load(config.prm, mesh, config.seed + 1, "prm")
    prm_tok = _tokenizer(config.prm_tokenizer, prm_dir, "prm_tokenizer")
    if config.reward.in_graph:
      check_same_tokenizer(tokenizer, prm_tok, config.policy.name, config.prm.name)
  ref_params = None
  if config.beta > 0:
    ref_params = (policy_params if not config.reference
                  else _load(ConfigDict({**config.policy.to_dict(), "name": config.reference}), mesh,
                             config.seed, "reference")[1])

  # ---- data
  prompts = policy_lib.load_rl_prompts(config.data.train, problem_key=config.data.problem_key,
                                       answer_key=config.data.answer_key, split=config.data.split,
                                       limit=int(config.data.limit), require_answer=(reward_type == "rlvr"))
  policy_ids, problem_ids = policy_lib.encode_prompts(tokenizer, prompts, template=config.data.template,
                                                      max_prompt_tokens=int(config.max_prompt_tokens))
  P = max(len(r) for r in policy_ids)
  Q = max(len(r) for r in problem_ids)
  it = PromptIterator(len(prompts), int(config.seed))

  # ---- programs
  settings = rl_step.RolloutSettings(
      group_size=G, max_response=int(config.max_response), stop_token_ids=tuple(tokenizer.end_of_turn_ids),
      reward_type=reward_type, temperature=float(config.temperature), top_p=float(config.top_p),
      top_k=int(config.top_k), prm_max_new_tokens=int(config.reward.prm_max_new_tokens),
      prm_stop_token_ids=tuple(prm_tok.end_of_turn_ids) if prm_tok else (),
      rollout_chunk=int(config.reward.rollout_chunk), prm_chunk=int(config.reward.prm_chunk),
      rlvr_gate=bool(config.reward.rlvr_gate), orm_prompt_bug=bool(config.reward.orm_prompt_bug),
      prm_all_rows=bool(config.reward.prm_all_rows), adv_scale=config.adv_scale)
  tables = programs_lib.make_reward_tables(tokenizer, settings, prm_tok, pcfg.vocab_size)
  if needs_prm:  # the PRM's prompt: template pieces + the longest problem + the whole response budget
    t = tables.prm_template
    prm_prompt_len = t.head.shape[0] + Q + t.mid.shape[0] + int(config.max_response) + t.tail.shape[0]
    check_budget(prm_cfg, prm_prompt_len, int(config.reward.prm_max_new_tokens), "prm")
  update_settings = rl_step.UpdateSettings(
      clip_low=float(config.clip_low), clip_high=float(config.clip_high), dual_clip=float(config.dual_clip),
      beta=float(config.beta), kl_type=config.kl_type, loss_agg=config.loss_agg,
      logits_chunk=int(config.logits_chunk), compute_dtype=config.policy.dtype,
      micro_batch=int(config.micro_batch))
  updates_per_step = int(config.mini_batches) * int(config.ppo_epochs)
  tx, schedule = train_step.make_optimizer(pcfg, lr=float(config.lr),
                                           total_steps=max(int(config.num_steps) * updates_per_step, 1),
                                           warmup_ratio=float(config.warmup_ratio),
                                           weight_decay=float(config.weight_decay),
                                           grad_clip=float(config.grad_clip), schedule=config.schedule)
  programs = programs_lib.Programs(pcfg, prm_cfg, settings, update_settings, tx, schedule, mesh)

  # ---- state: restore or initialise
  ckpt_root = os.path.join(workdir, "checkpoints")
  fingerprint = ckpt_lib.config_fingerprint(config, NOT_RESULT, num_prompts=len(prompts))
  ckpt = ckpt_lib.Checkpointer(ckpt_root, fingerprint=fingerprint, keep=int(config.keep_checkpoints),
                               resume=config.resume)
  restored = ckpt.restore_latest(train_step.abstract_state(pcfg, tx, mesh))
  if restored is not None:
    state, extra = restored
    it.restore(extra["data"])
    start = int(extra["step"])
  else:
    with shd.use_mesh(mesh):
      state = train_step.init_state(pcfg, policy_params, tx, mesh)
    start = 0
  if ref_params is None:
    del policy_params
  num_steps = int(config.num_steps)
  stop_at = num_steps
  if config.debug_stop_after and start < int(config.debug_stop_after) < num_steps:
    stop_at = int(config.debug_stop_after)
  writer = metrics_lib.MetricsWriter(
      workdir, total=num_steps, initial=start, desc="rl", log_every=int(config.log_every),
      progress_bar=bool(config.progress_bar),
      console_keys=("reward_mean", "accuracy", "format_violation", "kl", "response_length",
                    "tokens_per_s_per_device", "time_rollout_and_reward", "time_update"))
  writer.console(f"rl: {len(prompts)} prompts, {B} x {G} rollouts per step, reward {reward_type} "
                 f"({'in graph' if config.reward.in_graph else 'host reference'}), mesh {dict(mesh.shape)}, "
                 f"steps {start}->{num_steps}")
  # One grading pool for the run (rlvr rewards and validation): a worker costs about a second to start
  # (math_verify and sympy imports), which a pool per call paid every step.
  # Created inside the run's try (below), so its finally closes whatever exists; the closures here read them
  # only once the run has started.
  pool = grade = evaluator = None
  stop = _Stop()

  def batch_arrays(idx):
    pt, pl = left_pad([policy_ids[i] for i in idx], P)
    qt, ql = right_pad([problem_ids[i] for i in idx], Q)
    return pt, pl, qt, ql

  def sample(params, idx, key):
    pt, pl, qt, ql = batch_arrays(idx)
    roll, timing = programs.rollout_and_reward(
        params, prm_params, tables, pt, pl, qt, ql, key, golds=[prompts[i].ground_truth for i in idx],
        problems=[prompts[i].problem for i in idx], tokenizer=tokenizer, prm_tokenizer=prm_tok,
        in_graph=bool(config.reward.in_graph), grade=grade)
    return roll, pt, pl, timing

  def rl_step_fn(st, idx, key):
    t0 = time.time()
    roll, pt, pl, timing = sample(st["params"], idx, key)
    m = {}
    if config.dynamic_sampling:
      roll, pt, pl, m = programs_lib.dynamic_sampling(
          roll, pt, pl, G, lambda k: sample(st["params"], it.take(B), k), key, int(config.max_sampling_rounds))
    t_update = time.time()
    st, upd = programs.update(st, ref_params, pt, pl, roll, int(config.mini_batches), int(config.ppo_epochs),
                              bool(config.use_sampler_logprobs))
    dt = time.time() - t0
    m.update({k: float(v) for k, v in roll.stats.items()})
    m.update(upd)
    m.update(timing)
    m["time_update"] = time.time() - t_update
    lengths_N = np.asarray(roll.response_lengths_N)
    tokens = float(np.sum(pl)) * G + float(np.sum(lengths_N))
    # Sampled ids that are not the canonical tokenisation of their own text: fed to the PRM as they are
    # (text/rm_ids.py), so their share says how far the PRM's inputs drift from what it saw in training.
    response_tokens = np.asarray(roll.response_tokens_NxR)
    m["non_canonical_responses"] = rm_ids.count_non_canonical(
        tokenizer, [response_tokens[i, :lengths_N[i]] for i in range(len(lengths_N))]) / max(len(lengths_N), 1)
    m["tokens_per_s_per_device"] = tokens / dt / jax.device_count()
    return st, m

  def batches():
    while True:
      yield it.take(B), {}

  def on_metrics(step_no, m):
    metrics_lib.check_finite(step_no, m, ("loss", "grad_norm"))
    writer.write(step_no, m)

  def save(step_no, st):
    ckpt.save(step_no, st, {"data": it.state()})

  def evaluate(step_no, st):
    if evaluator is not None:
      t = time.time()
      m = evaluator(st["params"])
      writer.write(step_no, {**m, "time_eval": time.time() - t}, prefix="eval")

  summary: dict[str, Any] = {"job": "rl", "workdir": workdir, "reward": reward_type}
  try:
    if reward_type == "rlvr" or config.data.val:
      from spark_jax.evals.grading import GradingPool
      pool = GradingPool(num_workers=int(config.grading_workers), timeout_s=float(config.grading_timeout_s))
    grade = programs_lib.grader(pool)
    evaluator = Evaluator(config, pcfg, state["params"], tokenizer, mesh, grade) if config.data.val else None
    if start == 0 and int(config.eval_every) > 0:
      evaluate(0, state)  # the starting accuracy: the learning curve's first point
    state, steps_run = loop_lib.run(
        rl_step_fn, state, batches(), start=start, stop=stop_at, on_metrics=on_metrics,
        rng=jax.random.PRNGKey(int(config.seed)), checkpoint_every=int(config.checkpoint_every), save=save,
        eval_every=int(config.eval_every), evaluate=evaluate, last_step=num_steps,
        should_stop=lambda: stop.requested, mesh=mesh)
    final = start + steps_run
    if ckpt.latest_step() != final:
      save(final, state)
    summary.update(final_step=final, num_steps=num_steps, interrupted=stop.requested)
    if final == num_steps:
      evaluate(final, state)
      if config.export_dir != "none":
        from spark_jax.models import hf_io
        export_dir = os.path.abspath(config.export_dir or os.path.join(workdir, "export"))
        hf_io.save_pretrained(pcfg.replace(remat="none"), state["params"], export_dir,
                              tokenizer_dir=tokenizer.source if os.path.isdir(tokenizer.source) else None)
        writer.console(f"exported step {final} to {export_dir}")
        summary["export_dir"] = export_dir
  finally:
    stop.close()
    if pool is not None:
      pool.close()
    writer.close()
    ckpt.close()
  summary["seconds"] = time.time() - t_start
  write_summary(workdir, summary)
  return summary
