"""The `eval_math` job: a policy on the six math benchmarks, greedy pass@1 and avg@k (docs/method.md, D11).

For every problem of every benchmark: one greedy answer (pass@1) and, when `num_samples` = k > 0, k sampled
answers (T = `temperature`, top_p = `top_p`), each graded against the gold answer by the one grader
(`spark_jax.evals.grading`, worker processes with a hard per-answer timeout). Scores per benchmark:

  pass@1   greedy answer correct, % of problems
  avg@k    mean over problems of the fraction of the k samples that are correct, %
  pass@k   at least one of the k samples correct, %

and their unweighted mean over the benchmarks (each benchmark counts once, as in published tables), with
the share of responses that hit the token budget and, for the policy prompt, the share that pass the RL
format gate (`spark_jax.rl.rewards.format_ok`: the answer a policy is rewarded for must also be well formed).

The prompt is the policy's own (`spark_jax.rl.policy`, `<think>/<step>/<answer>`), so a policy is evaluated
in the format it was trained in; `prompt_template="generator"` uses Stage I's generator prompt instead, for
models that never saw the policy format. Answers are extracted by the same rule everywhere (`extract_answer`).

Outputs in `config.workdir`: resumable prediction shards (`io.ShardedOutput`), `settings.json` (a rerun with
other decoding settings is refused instead of mixing shards), `scores.json`, `table.md` and `summary.json`.
Sampling seeds come from `config.seed` and each problem's global index, so a resumed run writes the records
an uninterrupted one would.
"""

from __future__ import annotations

import json
import os
from typing import Any, Protocol, Sequence

from spark_jax import io
from spark_jax.evals import grading
from spark_jax.evals import math_benchmarks

PROMPT_TEMPLATES = ("policy", "generator")
_THINKING = {"auto": None, "on": True, "off": False}  # the chat template's enable_thinking switch
_SETTINGS_FILE = "settings.json"


class Sampler(Protocol):
  """What the job needs from a model: `ChatModel.sample`'s signature."""

  def sample(self, user_messages: Sequence[str], *, num_samples: int = 1, temperature: float = 0.0,
             top_p: float = 1.0, max_new_tokens: int = 512, seed: int = 0,
             prompt_indices: Sequence[int] | None = None, **kwargs) -> list[list[Any]]:
    ...


def user_message(template: str, problem: str) -> str:
  if template == "policy":
    from spark_jax.rl.policy import policy_user_message
    return policy_user_message(problem)
  if template == "generator":
    from spark_jax.stage1.prompts import generator_prompt
    return generator_prompt(problem)
  raise ValueError(f"config.prompt_template={template!r}; use one of {PROMPT_TEMPLATES}.")


def load_items(config) -> list[dict]:
  """Every (benchmark, problem) pair in benchmark order, with its global index."""
  unknown = [b for b in config.benchmarks if b not in math_benchmarks.ALL_BENCHMARKS]
  if unknown or not config.benchmarks:
    raise ValueError(f"config.benchmarks={tuple(config.benchmarks)!r}: unknown {unknown}; choose from "
                     f"{math_benchmarks.ALL_BENCHMARKS}.")
  items = []
  for name in config.benchmarks:
    for row in math_benchmarks.load_benchmark(name, root=config.data, limit=config.limit or None):
      items.append({"benchmark": name, "_index": len(items), **row})
  return items


def _settings(config) -> dict:
  return {"model": config.model.name, "dtype": config.model.dtype, "prompt_template": config.prompt_template,
          "benchmarks": list(config.benchmarks), "limit": config.limit, "greedy": config.greedy,
          "num_samples": config.num_samples, "temperature": config.temperature, "top_p": config.top_p,
          "max_new_tokens": config.max_new_tokens, "thinking": config.thinking, "seed": config.seed}


def _check_settings(out_dir: str, settings: dict) -> None:
  path = os.path.join(out_dir, _SETTINGS_FILE)
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
    if diff:
      raise ValueError(f"{path}: this evaluation was started with other settings "
                       f"({', '.join(f'{k}: {a!r} -> {b!r}' for k, (a, b) in diff.items())}); resume with the same "
                       "settings or use a new workdir.")
  else:
    io.write_json_atomic(path, settings)


def _graded(completions, golds_per, pool, timeout_s, template: str) -> list[list[dict]]:
  """Completions (one list per problem) -> dicts with the extracted answer, its grade and (policy prompt) whether
  the response passes the RL format gate."""
  gate = None
  if template == "policy":
    from spark_jax.rl.rewards import format_ok as gate
  flat = [(i, c) for i, cs in enumerate(completions) for c in cs]
  preds = [grading.extract_answer(c.text) for _, c in flat]
  # pool=None grades in this process (grading_workers=0): for debugging and tiny runs, see grade_batch.
  verdicts = grading.grade_batch(preds, [golds_per[i] for i, _ in flat], timeout_s=timeout_s, pool=pool,
                                 num_workers=0 if pool is None else None) if flat else []
  out: list[list[dict]] = [[] for _ in completions]
  for (i, c), pred, ok in zip(flat, preds, verdicts):
    out[i].append({"text": c.text, "extracted": pred, "correct": bool(ok), "num_tokens": c.num_tokens,
                   "finish_reason": c.finish_reason, "format_ok": None if gate is None else bool(gate(c.text))})
  return out


def score(records: list[dict], benchmarks: Sequence[str], k: int) -> dict:
  """{benchmark: {n, pass@1, avg@k, pass@k, format_ok, truncated} (those that apply), "average": the unweighted
  mean over benchmarks}."""
  scores: dict[str, dict] = {}
  for name in benchmarks:
    rows = [r for r in records if r["benchmark"] == name]
    if not rows:
      continue
    entry: dict[str, Any] = {"n": len(rows)}
    responses = [s for r in rows for s in ([r["greedy"]] if r.get("greedy") else []) + r["samples"]]
    if rows[0].get("greedy"):
      entry["pass@1"] = 100.0 * sum(r["greedy"]["correct"] for r in rows) / len(rows)
    if k:
      entry[f"avg@{k}"] = 100.0 * sum(sum(s["correct"] for s in r["samples"]) / k for r in rows) / len(rows)
      entry[f"pass@{k}"] = 100.0 * sum(any(s["correct"] for s in r["samples"]) for r in rows) / len(rows)
    if responses and all(s.get("format_ok") is not None for s in responses):
      entry["format_ok"] = 100.0 * sum(s["format_ok"] for s in responses) / len(responses)
    entry["truncated"] = 100.0 * sum(s["finish_reason"] == "length" for s in responses) / max(len(responses), 1)
    scores[name] = entry
  metrics = [m for m in ("pass@1", f"avg@{k}", f"pass@{k}", "format_ok", "truncated")
             if all(m in e for e in scores.values())]
  if scores:
    scores["average"] = {"n": sum(e["n"] for e in scores.values()),
                         **{m: sum(e[m] for e in scores.values()) / len(scores) for m in metrics}}
  return scores


def markdown_table(scores: dict) -> str:
  metrics = [m for m in scores.get("average", {}) if m != "n"]
  lines = ["| benchmark | n | " + " | ".join(f"{m} (%)" for m in metrics) + " |", "|---|---|" + "---|" * len(metrics)]
  for name, entry in scores.items():
    label = "**average**" if name == "average" else name
    lines.append(f"| {label} | {entry['n']} | " + " | ".join(f"{entry[m]:.1f}" for m in metrics) + " |")
  return "\n".join(lines)


def _validate(config) -> None:
  if config.prompt_template not in PROMPT_TEMPLATES:
    raise ValueError(f"config.prompt_template={config.prompt_template!r}; use one of {PROMPT_TEMPLATES}.")
  if config.thinking not in _THINKING:
    raise ValueError(f"config.thinking={config.thinking!r}; use one of {tuple(_THINKING)}.")
  if config.num_samples < 0 or (not config.greedy and not config.num_samples):
    raise ValueError(f"config.greedy={config.greedy}, config.num_samples={config.num_samples}: ask for greedy "
                     "pass@1, k >= 1 samples for avg@k, or both.")
  if config.grading_workers < 0:
    raise ValueError(f"config.grading_workers={config.grading_workers}: use >= 1 worker processes, or 0 to grade "
                     "in this process (debugging; a hanging answer cannot be killed there).")
  if config.num_samples and config.temperature <= 0:
    raise ValueError(f"config.temperature={config.temperature}: avg@k needs sampling (T > 0; D11 uses 0.6).")


def run_eval_math(config, model: Sampler | None = None) -> dict:
  """The job. `model`: anything with `ChatModel.sample`'s signature (tests pass a scripted one); None loads
  `config.model` when there is work left."""
  _validate(config)
  out_dir = config.workdir
  os.makedirs(out_dir, exist_ok=True)
  _check_settings(out_dir, _settings(config))
  items = load_items(config)  # data and settings are checked before a checkpoint is loaded
  shards = io.ShardedOutput(out_dir, "predictions", items, config.shard_size)
  pending = shards.pending()
  if pending and model is None:
    from spark_jax.sampling.chat import ChatModel
    model = ChatModel.load(config.model, config.mesh, seed=config.seed, max_batch_rows=config.max_batch_rows,
                           batching=config.batching)
  pool = grading.GradingPool(num_workers=config.grading_workers, timeout_s=config.grading_timeout_s) \
      if pending and config.grading_workers else None
  thinking = _THINKING[config.thinking]

  def work(batch):
    messages = [user_message(config.prompt_template, it["problem"]) for it in batch]
    golds = [it["answer"] for it in batch]
    kwargs = dict(max_new_tokens=config.max_new_tokens, prompt_indices=[it["_index"] for it in batch],
                  seed=config.seed, enable_thinking=thinking)
    greedy = (_graded(model.sample(messages, num_samples=1, temperature=0.0, **kwargs), golds, pool,
                      config.grading_timeout_s, config.prompt_template) if config.greedy else [[] for _ in batch])
    samples = (_graded(model.sample(messages, num_samples=config.num_samples, temperature=config.temperature,
                                    top_p=config.top_p, **kwargs), golds, pool, config.grading_timeout_s,
                       config.prompt_template)
               if config.num_samples else [[] for _ in batch])
    return [{"id": it["id"], "benchmark": it["benchmark"], "answer": it["answer"],
             "greedy": g[0] if g else None, "samples": s,
             "num_tokens": sum(x["num_tokens"] for x in g + s)} for it, g, s in zip(batch, greedy, samples)]

  try:
    timing = shards.run(work, desc="eval_math", unit_counter=lambda rs: sum(r["num_tokens"] for r in rs))
  finally:
    if pool is not None:
      pool.close()
  records = shards.read_all()
  scores = score(records, config.benchmarks, config.num_samples)
  table = markdown_table(scores)
  io.write_json_atomic(os.path.join(out_dir, "scores.json"), scores)
  io.write_text_atomic(os.path.join(out_dir, "table.md"), table + "\n")
  print(table)
  summary = {"job": "eval_math", **_settings(config), "problems": len(records), "scores": scores,
             "average": scores.get("average", {}), **timing}
  io.write_summary(out_dir, summary)
  return summary
