"""The RL job `rl`: GRPO with the PRM inside the jitted rollout-and-reward program (docs/method.md, Stage III).

    python -m spark_jax.main --config=configs/rl.py
    python -m spark_jax.main --config=configs/rl.py:world     # the embedded world, CPU, minutes

One step: B prompts from the shuffled prompt set -> `rl.step.rollout_and_reward` (one jitted program; for
`rlvr` the host grades between two programs) -> dynamic sampling (optional: drop groups whose rewards all
agree and refill from new prompts, a bounded number of rounds) -> pi_old (and reference) log-probs ->
`ppo_epochs` x mini-batches of AdamW steps -> metrics. Every `eval_every` steps the policy answers the
validation prompts greedily and is graded with math_verify.

Checkpoints (train/checkpoint.py): {"step", "params", "opt_state"} + the prompt iterator's state + the RNG
key; a restart resumes bit-identically, and SIGTERM checkpoints at the end of the running step and exits.
The final policy is exported as a Hugging Face checkpoint (`export_dir`).
"""

from __future__ import annotations

import math
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from spark_jax import sharding as shd
from spark_jax.rl import policy as policy_lib
from spark_jax.rl import step as rl_step


def default_config() -> ConfigDict:
  """Every RL knob with its D10 default. Required: `data.train` and the models.

  policy / prm / reference      model specs (common.model); reference "" = the policy's initial weights.
  tokenizer / prm_tokenizer     tokenizer directories ("" = the model's checkpoint directory).
  data.train / data.val         RL prompt sets (JSONL / parquet / directory / hub id); val "" = no evaluation.
  data.problem_key / answer_key fields (dotted paths allowed) of the raw problem and the ground truth.
  data.template                 "chat" | "plain" (policy prompt rendering, rl/policy.py).
  prompts_per_step / group_size B prompts x G rollouts (D10: 256 x 16).
  max_prompt_tokens / max_response  prompt and response budgets (D10: 2048 / 2048).
  temperature / top_p / top_k   rollout sampling (D10: 1, 1, 0).
  reward.type                   one of rl.step.REWARD_TYPES; reward.in_graph False = host reference path.
  reward.prm_max_new_tokens     PRM output budget; reward.prm_chunk / rollout_chunk rows/prompts per block.
  reward.rlvr_gate / orm_prompt_bug / prm_all_rows   D12 / D10 knobs, benchmark knob.
  adv_scale                     "group" | "batch" | "none".
  lr, schedule, warmup_ratio, weight_decay, grad_clip   AdamW (D10: 1e-6 constant, 0, 0.01, 1.0).
  clip_low / clip_high / dual_clip, beta, kl_type, loss_agg   the GRPO loss (D10: 0.2 / 0.2 / 3, 0.001, k3,
                                token-mean).
  mini_batches / ppo_epochs     optimizer steps per rollout batch = mini_batches x ppo_epochs (D10: 1 x 1).
  use_sampler_logprobs          pi_old = the sampler's log-probs instead of the trainer's recomputation.
  dynamic_sampling / max_sampling_rounds   DAPO's filter of zero-variance groups, refill rounds.
  num_steps, eval_every, eval_prompts, checkpoint_every, export_dir, progress_bar.
  """
  from configs import common
  c = common.base("rl", "runs/rl")
  c.policy = common.model("qwen2.5-0.5b", init="random")
  c.prm = common.model("qwen2.5-0.5b", init="random")
  c.reference = ""
  c.tokenizer = ""
  c.prm_tokenizer = ""
  c.data = ConfigDict({"train": "", "val": "", "split": "train", "problem_key": "problem",
                       "answer_key": "answer", "template": "chat", "limit": 0})
  c.prompts_per_step = 256
  c.group_size = 16
  c.max_prompt_tokens = 2048
  c.max_response = 2048
  c.temperature = 1.0
  c.top_p = 1.0
  c.top_k = 0
  c.reward = ConfigDict({"type": "prm_cot_outcome", "in_graph": True, "prm_max_new_tokens": 4096,
                         "prm_chunk": 0, "rollout_chunk": 0, "rlvr_gate": False, "orm_prompt_bug": False,
                         "prm_all_rows": False})
  c.adv_scale = "group"
  c.lr = 1e-6
  c.schedule = "constant"
  c.warmup_ratio = 0.0
  c.weight_decay = 0.01
  c.grad_clip = 1.0
  c.clip_low = 0.2
  c.clip_high = 0.2
  c.dual_clip = 3.0
  c.beta = 0.001
  c.kl_type = "k3"
  c.loss_agg = "token-mean"
  c.logits_chunk = 1024
  c.mini_batches = 1
  c.ppo_epochs = 1
  c.use_sampler_logprobs = False
  c.dynamic_sampling = False
  c.max_sampling_rounds = 3
  c.num_steps = 100
  c.eval_every = 10
  c.eval_prompts = 0
  c.eval_max_response = 0
  c.checkpoint_every = 50
  c.export_dir = ""
  c.progress_bar = True
  return c


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


def check_budget(cfg, max_prompt: int, max_new: int, which: str) -> None:
  limit = cfg.max_position_embeddings
  if max_prompt + max_new > limit:
    raise ValueError(f"{which}: prompt budget {max_prompt} + output budget {max_new} = {max_prompt + max_new} "
                     f"tokens exceeds the model's cache / position limit {limit}; lower config.max_response "
                     "(or reward.prm_max_new_tokens) or config.max_prompt_tokens.")


def check_same_tokenizer(policy_tok, prm_tok, policy_name: str, prm_name: str) -> None:
  """The in-graph reward feeds policy ids to the PRM: both token->bytes tables must be identical."""
  a, b = policy_tok.token_bytes_table(), prm_tok.token_bytes_table()
  if a != b:
    first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    raise ValueError(
        f"policy {policy_name!r} and PRM {prm_name!r} have different tokenizers ({len(a)} vs {len(b)} ids; first "
        f"difference at id {first}); the in-graph reward needs one shared tokenizer. Use a PRM trained from the "
        "policy's tokenizer, or set config.reward.in_graph=False to score on the host.")


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
      return load_model(spec.name, init=spec.init, dtype=spec.dtype, mesh=mesh, seed=seed, remat=spec.remat)
    except (KeyError, ValueError, OSError) as e:
      raise type(e)(f"config.{which}: {e}") from e


def _tokenizer(directory: str, ckpt_dir: str | None, which: str):
  from spark_jax.tokenizer import Tokenizer
  source = directory or ckpt_dir
  if not source:
    raise ValueError(f"config.{which} is empty and the model has no checkpoint directory to take a tokenizer "
                     "from; set it to a tokenizer directory.")
  return Tokenizer.from_pretrained(source)


def _grade(responses: list[str], golds: list[Any]) -> np.ndarray:
  from spark_jax.evals.grading import grade_responses
  return np.asarray(grade_responses(responses, golds), np.float32)


class Evaluator:
  """Greedy answers to the validation prompts, graded with math_verify: accuracy and format-valid share.

  Uses the sampling engine with the current params per call (same shapes: no recompilation)."""

  def __init__(self, config, pcfg, params, tokenizer, mesh):
    from spark_jax.sampling import core
    from spark_jax.sampling.engine import SamplingEngine
    prompts = policy_lib.load_rl_prompts(config.data.val, problem_key=config.data.problem_key,
                                         answer_key=config.data.answer_key, split=config.data.split,
                                         limit=int(config.eval_prompts), require_answer=True)
    self.ids, _ = policy_lib.encode_prompts(tokenizer, prompts, template=config.data.template,
                                            max_prompt_tokens=int(config.max_prompt_tokens))
    self.golds = [p.ground_truth for p in prompts]
    self.tokenizer = tokenizer
    self.settings = core.SamplingParams(max_new_tokens=int(config.eval_max_response or config.max_response),
                                        temperature=0.0, stop_token_ids=tuple(tokenizer.end_of_turn_ids))
    self.engine = SamplingEngine(pcfg, params, mesh=mesh, progress=False)

  def __call__(self, params) -> dict[str, float]:
    from spark_jax.rl import rewards as rewards_lib
    samples = self.engine.generate(self.ids, self.settings, params=params)
    texts = [self.tokenizer.decode(s[0].tokens, skip_special_tokens=True) for s in samples]
    return {"accuracy": float(np.mean(_grade(texts, self.golds))),
            "format_ok": float(np.mean([rewards_lib.format_ok(t) for t in texts])),
            "response_length": float(np.mean([len(s[0].tokens) for s in samples]))}


def run_rl(config) -> dict:
  """Runs GRPO per `config` (see `default_config`); returns the summary."""
  from spark_jax.io import write_summary
  from spark_jax.rl import automata, prm_prompt
  from spark_jax.train import checkpoint as ckpt_lib
  from spark_jax.train import metrics as metrics_lib
  from spark_jax.train import step as train_step

  t_start = time.time()
  check_config(config)
  workdir = os.path.abspath(config.workdir)
  os.makedirs(workdir, exist_ok=True)
  mesh = shd.make_mesh(config.mesh.to_dict())
  B, G = int(config.prompts_per_step), int(config.group_size)
  N = B * G
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
  it = PromptIterator(len(prompts), config.seed)

  # ---- programs
  eot = tuple(tokenizer.end_of_turn_ids)
  settings = rl_step.RolloutSettings(
      group_size=G, max_response=int(config.max_response), stop_token_ids=eot, reward_type=reward_type,
      temperature=float(config.temperature), top_p=float(config.top_p), top_k=int(config.top_k),
      prm_max_new_tokens=int(config.reward.prm_max_new_tokens),
      prm_stop_token_ids=tuple(prm_tok.end_of_turn_ids) if prm_tok else (),
      rollout_chunk=int(config.reward.rollout_chunk), prm_chunk=int(config.reward.prm_chunk),
      rlvr_gate=bool(config.reward.rlvr_gate), orm_prompt_bug=bool(config.reward.orm_prompt_bug),
      prm_all_rows=bool(config.reward.prm_all_rows), adv_scale=config.adv_scale)
  tables = rl_step.make_reward_tables(tokenizer, settings, prm_tok, pcfg.vocab_size)
  update_settings = rl_step.UpdateSettings(
      clip_low=float(config.clip_low), clip_high=float(config.clip_high), dual_clip=float(config.dual_clip),
      beta=float(config.beta), kl_type=config.kl_type, loss_agg=config.loss_agg,
      logits_chunk=int(config.logits_chunk), compute_dtype=config.policy.dtype)
  total_updates = int(config.num_steps) * int(config.mini_batches) * int(config.ppo_epochs)
  tx, schedule = train_step.make_optimizer(pcfg, lr=float(config.lr), total_steps=max(total_updates, 1),
                                           warmup_ratio=float(config.warmup_ratio),
                                           weight_decay=float(config.weight_decay),
                                           grad_clip=float(config.grad_clip), schedule=config.schedule)
  programs = rl_step.Programs(pcfg, prm_cfg, settings, update_settings, tx, schedule, mesh)

  # ---- state, resume
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                               fingerprint={"data": config.data.train, "B": B, "G": G, "reward": reward_type})
  with shd.use_mesh(mesh):
    state = train_step.init_state(pcfg, policy_params, tx, mesh)
  key = jax.random.PRNGKey(config.seed)
  restored = ckpt.restore_latest(state)
  if restored is not None:
    state, extra = restored
    it.restore(extra["data"])
    key = jnp.asarray(np.asarray(extra["rng"], np.uint32))
  start = int(state["step"]) // max(int(config.mini_batches) * int(config.ppo_epochs), 1)
  writer = metrics_lib.MetricsWriter(workdir, total=int(config.num_steps), initial=start, desc="rl",
                                     progress_bar=bool(config.progress_bar))
  evaluate = Evaluator(config, pcfg, state["params"], tokenizer, mesh) if config.data.val else None
  stop = _Stop()

  def save(step_no: int):
    ckpt.save(step_no, state, {"data": it.state(), "rng": np.asarray(key).tolist()})

  def batch_arrays(idx):
    pt, pl = left_pad([policy_ids[i] for i in idx], P)
    qt, ql = right_pad([problem_ids[i] for i in idx], Q)
    return pt, pl, qt, ql

  step_no = start
  try:
    with shd.use_mesh(mesh):
      while step_no < int(config.num_steps) and not stop.requested:
        t0 = time.time()
        key, round_key = jax.random.split(key)
        idx = it.take(B)
        pt, pl, qt, ql = batch_arrays(idx)
        roll, timing = programs.rollout_and_reward(state["params"], prm_params, tables, pt, pl, qt, ql, round_key,
                                                   golds=[prompts[i].ground_truth for i in idx],
                                                   tokenizer=tokenizer, prm_tokenizer=prm_tok,
                                                   in_graph=bool(config.reward.in_graph))
        if config.dynamic_sampling:
          roll, pt, pl, rounds = programs.refill(roll, pt, pl, lambda n: batch_arrays(it.take(n)), key,
                                                 int(config.max_sampling_rounds), timing)
        t_update = time.time()
        state, update_metrics = programs.update(state, ref_params, pt, pl, roll, int(config.mini_batches),
                                                int(config.ppo_epochs), bool(config.use_sampler_logprobs))
        step_no += 1
        dt = time.time() - t0
        tokens = float(np.sum(pl)) * G + float(np.sum(np.asarray(roll.response_lengths_N)))
        m = {k: float(v) for k, v in roll.stats.items()}
        m.update(update_metrics)
        m.update(timing)
        m["time_update"] = time.time() - t_update
        m["time_step"] = dt
        m["tokens_per_s_per_device"] = tokens / dt / jax.device_count()
        metrics_lib.check_finite(step_no, m, ("loss", "grad_norm"))
        writer.write(step_no, m, prefix="train")
        if evaluate is not None and config.eval_every and step_no % int(config.eval_every) == 0:
          writer.write(step_no, evaluate(state["params"]), prefix="eval")
        if config.checkpoint_every and step_no % int(config.checkpoint_every) == 0:
          save(step_no)
      save(step_no)
  finally:
    stop.close()
    writer.close()
  summary = {"steps": step_no, "interrupted": stop.requested, "seconds": time.time() - t_start}
  if not stop.requested and config.export_dir:
    from spark_jax.models import hf_io
    hf_io.save_pretrained(pcfg, jax.device_get(state["params"]), config.export_dir)
    tokenizer.hf.save_pretrained(config.export_dir)
    summary["export_dir"] = config.export_dir
  write_summary(workdir, summary)
  return summary
