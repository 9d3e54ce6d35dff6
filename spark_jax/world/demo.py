"""The `demo` job: SPARK's pipeline on the embedded world, stage after stage, ending in workdir/report.md.

  bootstrap     world tokenizer + tiny generator and verifier (spark_jax/world/bootstrap.py)
  stage1        the unchanged Stage I jobs (configs/stage1.py + world overrides) on world problems
  labels        label accuracy of every data variant against the exact truth, for the first n of the N
                verifications (the aggregation functions of Stage I on prefixes; no new sampling)
  stage2        the SFT job (configs/sft_prm.py) per (variant, format), from the bootstrap verifier
  processbench  the unchanged processbench job on the world's held-out ProcessBench-style set, for every
                trained PRM and two untrained baselines (random weights; the verifier before Stage II)
  rl            the unchanged RL job (configs/rl.py, world settings) from the bootstrap generator, once per
                reward type (`rl.rewards`: the PRM-CoT of the step-consistency data, RLVR, random)

Every stage writes under workdir/<stage>/ and is skipped when its summary.json exists; the jobs inside are
resumable themselves, so a rerun after a kill continues. `STAGES` is the ordered list; a later stage (RL)
appends itself there and reads earlier results from `results[name]`. The report is rewritten after every
stage, with the numbers so far.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Callable

from ml_collections import ConfigDict

from spark_jax import io
from spark_jax.world import bootstrap as boot
from spark_jax.world import report as report_lib
from spark_jax.world import task as task_lib


def resolve(config) -> ConfigDict:
  """The config with `quick_settings` merged in when `quick` is set (an unknown key there is an error)."""
  config = ConfigDict(config.to_dict())
  if not config.quick:
    return config

  def merge(dst, src, prefix):
    for key, value in src.items():
      if key not in dst:
        raise KeyError(f"config.quick_settings.{prefix}{key} names no field of the demo config.")
      if isinstance(value, (dict, ConfigDict)) and isinstance(dst[key], ConfigDict):
        merge(dst[key], value, f"{prefix}{key}.")
      else:
        dst[key] = value

  merge(config, config.quick_settings, "")
  return config


def _names(value) -> tuple[str, ...]:
  """A tuple of names from a tuple or a comma-separated string (as `--config.stage2.variants=a,b` gives)."""
  items = (value,) if isinstance(value, str) else tuple(value)
  return tuple(n.strip() for v in items for n in str(v).split(",") if n.strip())


def _stage_dir(config, name: str) -> str:
  return os.path.join(os.path.abspath(config.workdir), name)


def _model(path: str) -> ConfigDict:
  from configs import common
  return common.model(path, init="pretrained", dtype="float32", scan_layers=False)


# ------------------------------------------------------------------------------------------------ stages


def stage_bootstrap(config, results: dict) -> dict:
  """The bootstrap (or its cache entry); its summary is also written to workdir/bootstrap/."""
  own = _stage_dir(config, "bootstrap")
  summary = boot.run_bootstrap(config, boot.bootstrap_dir(config, own))
  io.write_summary(own, summary)
  return summary


def stage1_config(config, results: dict) -> ConfigDict:
  """configs/stage1.py with the world's problems, models and sizes."""
  from configs.stage1 import stage1_config as base
  s, b = config.stage1, results["bootstrap"]
  c = base("stage1")
  c.workdir = _stage_dir(config, "stage1")
  c.data = os.path.join(c.workdir, "problems.jsonl")
  c.seed = config.seed
  c.mesh = config.mesh
  c.shard_size = s.shard_size
  c.max_batch_rows = config.max_batch_rows
  c.batching = config.batching
  c.generator = _model(b["generator_dir"])
  c.verifier = _model(b["verifier_dir"])
  c.generate.num_solutions = s.num_solutions
  c.generate.temperature = s.generator_temperature
  c.generate.max_new_tokens = s.max_new_tokens
  c.generate.curation = s.curation
  c.generate.grading_workers = 1
  c.verify.num_verifications = s.num_verifications
  c.verify.temperature = s.verifier_temperature
  c.verify.max_new_tokens = s.max_new_tokens
  c.verify.reference_num_verifications = s.reference_num_verifications
  c.critique.enabled = s.critique
  c.critique.max_new_tokens = s.max_new_tokens
  c.aggregate.variants = tuple(v for v in c.aggregate.variants if s.critique or not v.startswith("meta_critique"))
  return c


def stage_stage1(config, results: dict) -> dict:
  from spark_jax import jobs
  c = stage1_config(config, results)
  if not os.path.exists(c.data):
    problems = task_lib.make_problems(config.seed * 1000 + 3, config.stage1.problems, boot.task_config(config),
                                      prefix="stage1-")
    task_lib.write_problems(c.data, problems)
  return jobs.run(c)


def stage_labels(config, results: dict) -> dict:
  """Label accuracy per data variant and n (see spark_jax/world/report.py `label_accuracy`)."""
  s = config.stage1
  stage1_dir = _stage_dir(config, "stage1")
  n_grid = tuple(int(n) for n in _names(s.n_grid) if int(n) <= s.num_verifications)
  table = report_lib.label_accuracy(stage1_dir, n_grid=n_grid,
                                    reference=True)
  summary = {"job": "labels", "table": table}
  io.write_summary(_stage_dir(config, "labels"), summary)
  return summary


def _prm_runs(config) -> list[tuple[str, str]]:
  return [(v, f) for v in _names(config.stage2.variants) for f in _names(config.stage2.formats)]


def stage_stage2(config, results: dict) -> dict:
  datasets = results["stage1"]["datasets_dir"]
  base = results["bootstrap"]["verifier_dir"] if config.stage2.base == "verifier" else config.stage2.base
  runs = {}
  for variant, fmt in _prm_runs(config):
    data = os.path.join(datasets, variant, f"{fmt}.jsonl")
    with open(data) as f:
      rows = sum(1 for line in f if line.strip())
    if rows < 8:  # the variant kept (almost) no solution: nothing to train, reported as such
      runs[f"{variant}/{fmt}"] = {"export_dir": None, "train_examples": rows, "train_loss": None, "seconds": 0.0}
      continue
    c = boot.sft_config(os.path.join(_stage_dir(config, "stage2"), f"{variant}-{fmt}"), data, "", base,
                        config.stage2.sft, config.seed)
    c.model.init = "pretrained"
    # A tiny verifier can ramble into a long verification that Stage I still kept; such rows are dropped
    # (counted in the SFT summary) instead of stopping the demo.
    c.max_overlong_fraction = 0.25
    c.global_batch = min(c.global_batch, rows // 8 * 8)  # a small variant trains on smaller batches
    start = time.time()
    summary = boot.train(c)
    runs[f"{variant}/{fmt}"] = {"export_dir": summary["export_dir"], "train_examples": summary["train_examples"],
                                "train_loss": summary.get("train_loss_mean_last_10"),
                                "seconds": round(time.time() - start, 1)}
  summary = {"job": "stage2", "base": base, "runs": runs}
  io.write_summary(_stage_dir(config, "stage2"), summary)
  return summary


def _random_checkpoint(config, results: dict) -> str:
  """The verifier's architecture with random weights and the world tokenizer: the untrained baseline."""
  from spark_jax import models
  out = os.path.join(_stage_dir(config, "processbench"), "random_init")
  if not os.path.exists(os.path.join(out, "config.json")):
    cfg = models.get_preset(config.bootstrap.verifier_preset)
    models.save_pretrained(cfg, models.init_params(cfg, seed=config.seed), out,
                           tokenizer_dir=results["bootstrap"]["tokenizer_dir"])
  return out


def stage_processbench(config, results: dict) -> dict:
  from configs import processbench as pb_config
  from spark_jax import jobs
  root = _stage_dir(config, "processbench")
  data_dir = os.path.join(root, "data")
  if not os.path.exists(os.path.join(data_dir, f"{task_lib.PROCESSBENCH_SPLIT}.json")):
    problems = task_lib.make_problems(config.seed * 1000 + 4, config.processbench.cases, boot.task_config(config),
                                      prefix="pb-")
    task_lib.write_processbench(data_dir, task_lib.processbench_cases(problems, seed=config.seed))
  models = {f"{name}/{fmt}": (path, fmt) for name, path in (("random_init", _random_checkpoint(config, results)),
                                                           ("verifier_no_stage2", results["bootstrap"]["verifier_dir"]))
            for fmt in _names(config.stage2.formats)}
  models.update({name: (run["export_dir"], name.split("/")[1]) for name, run in results["stage2"]["runs"].items()
                 if run["export_dir"]})
  scores = {}
  for name, (path, fmt) in models.items():
    c = pb_config.get_config()
    c.workdir = os.path.join(root, name.replace("/", "-"))
    c.model = _model(path)
    c.format = fmt
    c.data = data_dir
    c.splits = (task_lib.PROCESSBENCH_SPLIT,)
    c.limit = 0
    c.max_new_tokens = config.processbench.max_new_tokens
    c.max_batch_rows = config.max_batch_rows
    c.batching = config.batching
    c.seed = config.seed
    c.mesh = config.mesh
    done = boot.finished_summary(c.workdir)
    s = done or jobs.run(c)
    scores[name] = s["scores"][task_lib.PROCESSBENCH_SPLIT]
  with open(os.path.join(data_dir, f"{task_lib.PROCESSBENCH_SPLIT}.json")) as f:
    scores["blind_guess"] = task_lib.blind_guess_scores(json.load(f))  # the chance level, for the report
  summary = {"job": "processbench", "scores": scores}
  io.write_summary(root, summary)
  return summary


def rl_config(config, results: dict, reward: str) -> ConfigDict:
  """configs/rl.py's `rl_config` with the world's settings (`world_settings`): the bootstrap generator as the
  policy, the Stage II PRM-CoT trained on step-consistency labels as the reward model, `config.rl` sizes."""
  from configs import rl as rl_configs
  r = config.rl
  prm = results["stage2"]["runs"].get("step_consistency/prm_cot", {}).get("export_dir")
  train, val = rl_configs.world_problems(config, os.path.join(_stage_dir(config, "rl"), "data"),
                                         val_problems=int(r.eval_prompts))
  c = rl_configs.rl_config()
  rl_configs.world_settings(c, policy_dir=results["bootstrap"]["generator_dir"], prm_dir=prm, train=train, val=val)
  c.workdir = os.path.join(_stage_dir(config, "rl"), reward)
  c.seed = config.seed
  c.mesh = config.mesh
  c.reward.type = reward
  for key in ("num_steps", "prompts_per_step", "group_size", "lr", "eval_every", "eval_prompts", "eval_samples"):
    c[key] = r[key]
  c.checkpoint_every = r.eval_every
  c.progress_bar = False
  return c


def _rl_curves(workdir: str) -> dict:
  """From an RL run's metrics.jsonl: the evaluation curve and the per-step reward and hacking monitors."""
  evals, train = {}, {}
  for row in io.read_records(os.path.join(workdir, "metrics.jsonl"), on_error="raise"):
    step = int(row["step"])
    if "loss" in row:
      train[step] = {k: row[k] for k in RL_MONITORS if k in row}
    elif "accuracy" in row:
      evals[step] = {k: row[k] for k in ("accuracy", "format_ok", "response_length")}
  return {"eval": dict(sorted(evals.items())), "train": dict(sorted(train.items()))}


RL_MONITORS = ("reward_mean", "format_violation", "text_after_answer", "steps_per_response",
               "reward_step_correlation", "response_length", "prm_verdict_yes", "kl")


def stage_rl(config, results: dict) -> dict:
  """GRPO from the bootstrap generator, once per reward type in `config.rl.rewards`; curves for the report."""
  from spark_jax import jobs
  from spark_jax.rl import step as rl_step
  runs = {}
  has_prm = bool(results["stage2"]["runs"].get("step_consistency/prm_cot", {}).get("export_dir"))
  for reward in _names(config.rl.rewards):
    if rl_step.REWARD_FORMATS[reward] is not None and not has_prm:
      runs[reward] = {"skipped": "Stage II trained no step_consistency/prm_cot PRM (see stage2/summary.json)"}
      continue
    c = rl_config(config, results, reward)
    done = None
    path = os.path.join(c.workdir, "summary.json")
    if os.path.exists(path):
      with open(path) as f:
        done = json.load(f)
      if done.get("final_step") != int(c.num_steps):
        done = None  # interrupted: jobs.run resumes it from its checkpoint
    start = time.time()
    summary = done or jobs.run(c)
    if summary.get("final_step") != int(c.num_steps):  # stopped by a signal: no stage summary, resume later
      raise RuntimeError(f"the {reward} RL run in {c.workdir} stopped at step {summary.get('final_step')} of "
                         f"{c.num_steps}; rerun the demo to resume it from its checkpoint.")
    runs[reward] = {"workdir": c.workdir, "seconds": round(summary.get("seconds", time.time() - start), 1),
                    "eval_rows": int(c.eval_prompts) * int(c.eval_samples), **_rl_curves(c.workdir)}
  summary = {"job": "rl_stage", "runs": runs}
  io.write_summary(_stage_dir(config, "rl"), summary)
  return summary


Stage = Callable[[Any, dict], dict]
STAGES: list[tuple[str, Stage]] = [
    ("bootstrap", stage_bootstrap),
    ("stage1", stage_stage1),
    ("labels", stage_labels),
    ("stage2", stage_stage2),
    ("processbench", stage_processbench),
    ("rl", stage_rl),
]


def run_demo(config) -> dict:
  """Runs `STAGES` in order (finished ones are read back), rewriting report.md after each; returns the summary."""
  start = time.time()
  config = resolve(config)
  workdir = os.path.abspath(config.workdir)
  os.makedirs(workdir, exist_ok=True)
  results, seconds = {}, {}
  for name, fn in STAGES:
    t = time.time()
    done = boot.finished_summary(_stage_dir(config, name))
    if done is None:
      logging.info("demo: stage %s", name)
      print(f"[demo] {name} ...", flush=True)
    results[name] = done or fn(config, results)
    seconds[name] = round(time.time() - t, 1)
    print(f"[demo] {name}: {'already done' if done else 'done'} in {seconds[name]:.1f} s", flush=True)
    report_lib.write_report(workdir, config, results, seconds)
  wall = round(time.time() - start, 1)
  path = report_lib.write_report(workdir, config, results, seconds, wall_s=wall)
  summary = {"job": "demo", "quick": bool(config.quick), "wall_s": wall, "seconds": seconds, "report": path}
  io.write_summary(workdir, summary)
  print(f"[demo] wall time {wall:.1f} s; report: {path}", flush=True)
  return summary


def world_prm(config, bootstrap_summary: dict, variant: str = "step_consistency", fmt: str = "prm_cot") -> str:
  """This world's Stage II PRM (one data variant and format) for Stage III outside the demo (configs/rl.py's
  `world_quick`, the test suite's `world_prm` fixture); returns its export directory.

  The demo's own Stage I and Stage II stages run in `<bootstrap dir>/stage2_<variant>-<fmt>`, finished stages
  read back from their summaries, so with `bootstrap.cache` it trains once per machine, next to the models it
  starts from.
  """
  config = resolve(config)
  config.stage2.variants = (variant,)
  config.stage2.formats = (fmt,)
  root = boot.bootstrap_dir(config, _stage_dir(config, "bootstrap"))
  config.workdir = os.path.join(root, f"stage2_{variant}-{fmt}")
  results = {"bootstrap": bootstrap_summary}
  stages = dict(STAGES)
  with io.file_lock(config.workdir + ".lock"):  # a shared cache entry: one process trains it, others wait
    for name in ("stage1", "stage2"):
      results[name] = boot.finished_summary(_stage_dir(config, name)) or stages[name](config, results)
  export_dir = results["stage2"]["runs"][f"{variant}/{fmt}"]["export_dir"]
  if not export_dir:
    raise RuntimeError(f"world_prm: Stage I kept too few {variant} rows to train a {fmt} PRM "
                       f"({results['stage2']['runs'][f'{variant}/{fmt}']['train_examples']}); see "
                       f"{_stage_dir(config, 'stage1')}.")
  return export_dir
