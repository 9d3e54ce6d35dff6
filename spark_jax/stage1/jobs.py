"""Stage I jobs: generate -> verify (+ reference-guided) -> critique -> aggregate, and `stage1` for all.

Each job is a thin shell: it reads the previous job's files under `config.workdir`, asks a model through
`ChatModel.sample`, and writes resumable shards (`spark_jax.io.ShardedOutput`) plus `summary.json` in its
own subdirectory:

  workdir/generate/   shards of {problem_id, problem, answer, solutions: [...]}; solutions.jsonl (curated,
                      one row per solution); summary.json
  workdir/verify/     shards of {problem_id, solution_id, verifications: [text, ...], ...}
  workdir/verify_reference/   the same with the expected answer in the prompt (D7)
  workdir/critique/   shards of {problem_id, solution_id, meta_critique: {...}, meta_critique_outcome: {...}}
  workdir/aggregate/  records.jsonl, datasets/<variant>/<format>.jsonl + manifest.json, data_quality.{json,md}

Randomness: every sampled row draws from a key derived from `config.seed`, a per-job salt, and the global
index of its item alone (the problem's row for generate, the solution's row in solutions.jsonl for the
verifiers; `ChatModel.sample(prompt_indices=...)` folds it in). The records therefore do not depend on
`shard_size`, on the number of processes, or on where a resumed job restarted.

Upstream checks: a job reads what the previous jobs wrote only after checking that each one finished (its
`summary.json` exists and its counts match what this job expects) and through the sharded-output reader;
anything missing or inconsistent is an error that names the job to rerun, never a silent drop.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import time

from spark_jax import io
from spark_jax.evals import grading
from spark_jax.stage1 import aggregate, curation, formats, prompts, quality
from spark_jax.text import verdicts as parsing
from spark_jax.text.answers import extract_answer
from spark_jax.text.rm import RM_FORMATS

_THINKING = {"auto": None, "on": True, "off": False}


def _dir(config, job: str) -> str:
  return os.path.join(config.workdir, job)


# Per-job salts of the sampling seed, so that jobs sampling the same item indices draw different streams.
_SALT = {"generate": 1, "verify": 2, "verify_reference": 3, "critique": 4}


def _seed(config, job: str) -> int:
  return (config.seed * 1_000_003 + _SALT[job] * 7_919) % (2**31 - 1)


def _rerun(job: str) -> str:
  return f"rerun the {job} job (`python -m spark_jax.main --config=configs/stage1.py --config.job={job}`, same workdir)"


def _upstream_summary(config, job: str, expect: dict) -> dict:
  """The summary of a finished upstream job; raises, naming the job to rerun, when it is missing or its
  counts differ from `expect` (key -> value this job needs)."""
  path = os.path.join(_dir(config, job), "summary.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} is missing: the {job} job has not finished in this workdir; {_rerun(job)}.")
  with open(path) as f:
    summary = json.load(f)
  wrong = {k: (summary.get(k), v) for k, v in expect.items() if summary.get(k) != v}
  if wrong:
    raise ValueError(f"{path}: " + ", ".join(f"{k} = {got!r}, expected {want!r}" for k, (got, want) in wrong.items())
                     + f"; the {job} outputs are stale or from other settings: {_rerun(job)} in a clean "
                     f"{_dir(config, job)}.")
  return summary


def _upstream_records(config, job: str, name: str, items: list[dict]) -> dict[str, dict]:
  """The finished sharded output `name` of upstream `job`, one record per item of `items` (by solution_id)."""
  out_dir = _dir(config, job)
  spec_path = os.path.join(out_dir, f"{name}.shards.json")
  if not os.path.exists(spec_path):
    raise FileNotFoundError(f"{spec_path} is missing: the {job} job has not run in this workdir; {_rerun(job)}.")
  with open(spec_path) as f:
    spec = json.load(f)
  if spec.get("items") != len(items):
    raise ValueError(f"{spec_path}: the {job} job ran on {spec.get('items')} solutions, but "
                     f"{_dir(config, 'generate')}/solutions.jsonl has {len(items)}; {_rerun(job)} in a clean "
                     f"{out_dir}.")
  records = io.ShardedOutput(out_dir, name, items, spec["shard_size"], process_index=0, process_count=1).read_all()
  for item, record in zip(items, records):
    if record.get("solution_id") != item["solution_id"]:
      raise ValueError(f"{out_dir}: record for solution {record.get('solution_id')!r} stands where solution "
                       f"{item['solution_id']!r} of solutions.jsonl is expected; {_rerun(job)} in a clean {out_dir}.")
  return {r["solution_id"]: r for r in records}


def _chat_model(config, which: str):
  from spark_jax.sampling.chat import ChatModel
  return ChatModel.load(config[which], config.mesh, seed=config.seed, max_batch_rows=config.max_batch_rows,
                        batching=config.batching)


# ------------------------------------------------------------------------------------------------ generate


def load_problems(config) -> tuple[list[dict], io.ReadStats]:
  stats = io.ReadStats()
  rows = io.read_records(config.data, required=[config.problem_field], on_error=config.on_error, stats=stats)
  if config.limit:
    rows = rows[:config.limit]
  problems = []
  for i, row in enumerate(rows):
    problems.append({
        "problem_id": str(row.get(config.id_field, i)) if config.id_field else str(i),
        "problem": row[config.problem_field],
        "answer": row.get(config.answer_field) if config.answer_field else None,
        "_index": i,
    })
  return problems, stats


def run_generate(config) -> dict:
  """M solutions per problem, answers extracted and graded (when a ground truth exists), then curation."""
  g = config.generate
  if g.curation not in curation.CURATIONS:
    raise ValueError(f"config.generate.curation={g.curation!r}; use one of {curation.CURATIONS}.")
  out_dir = _dir(config, "generate")
  problems, read_stats = load_problems(config)
  if not problems:
    raise ValueError(f"{config.data}: no usable problems (skipped: {read_stats.skipped}).")
  shards = io.ShardedOutput(out_dir, "solutions", problems, config.shard_size)
  model = _chat_model(config, "generator") if shards.pending() else None
  pool = grading.GradingPool(num_workers=g.grading_workers, timeout_s=g.grading_timeout_s) \
      if shards.pending() and any(p["answer"] is not None for p in problems) else None

  def work(items):
    completions = model.sample([prompts.generator_prompt(p["problem"]) for p in items],
                               num_samples=g.num_solutions, temperature=g.temperature, top_p=g.top_p,
                               max_new_tokens=g.max_new_tokens, seed=_seed(config, "generate"),
                               prompt_indices=[p["_index"] for p in items])
    records = []
    for p, samples in zip(items, completions):
      solutions = []
      for j, c in enumerate(samples):
        solutions.append({"solution_id": f"{p['problem_id']}-s{j}", "solution": parsing.strip_thinking(c.text),
                          "finish_reason": c.finish_reason, "num_tokens": c.num_tokens,
                          "extracted_answer": extract_answer(c.text), "is_correct": None})
      records.append({"problem_id": p["problem_id"], "problem": p["problem"], "answer": p["answer"],
                      "solutions": solutions})
    graded = [(s, r["answer"]) for r in records if r["answer"] is not None for s in r["solutions"]]
    if graded:
      verdicts = pool.grade([s["extracted_answer"] for s, _ in graded], [a for _, a in graded])
      for (s, _), ok in zip(graded, verdicts):
        s["is_correct"] = bool(ok)
    return records

  try:
    timing = shards.run(work, unit_counter=lambda rs: sum(
        s["num_tokens"] for r in rs for s in r["solutions"]))
  finally:
    if pool is not None:
      pool.close()
  records = shards.read_all()
  has_truth = all(r["answer"] is not None for r in records)
  if g.curation == "reference" and not has_truth:
    raise ValueError(f"config.generate.curation='reference' needs a ground truth for every problem "
                     f"(field {config.answer_field!r} of {config.data}); use 'verifier_majority' or 'none'.")
  if g.curation == "reference":
    kept, curation_counts = curation.balance(records, lambda s: s["is_correct"], cap=g.curation_cap,
                                             seed=g.curation_seed)
  else:  # verifier_majority balances in `aggregate`, after verification
    kept, curation_counts = [s for r in records for s in r["solutions"]], {"solutions_kept": None}
  by_solution = {s["solution_id"]: r for r in records for s in r["solutions"]}
  rows = [{"problem_id": by_solution[s["solution_id"]]["problem_id"],
           "problem": by_solution[s["solution_id"]]["problem"],
           "answer": by_solution[s["solution_id"]]["answer"], **s} for s in kept]
  io.write_jsonl_atomic(os.path.join(out_dir, "solutions.jsonl"), rows)
  all_solutions = [s for r in records for s in r["solutions"]]
  summary = {
      "job": "generate", "problems": len(records), "read": {"rows": read_stats.rows, "skipped": read_stats.skipped},
      "solutions_generated": len(all_solutions), "solutions_kept": len(rows), "curation": g.curation,
      "curation_counts": curation_counts,
      "finish_reasons": dict(collections.Counter(s["finish_reason"] for s in all_solutions)),
      "no_extracted_answer": sum(s["extracted_answer"] is None for s in all_solutions),
      # A trace that never closed leaves no visible solution (the one think rule, text/verdicts decision 1).
      "empty_solutions": sum(not s["solution"] for s in all_solutions),
      "correct_fraction": (sum(bool(s["is_correct"]) for s in all_solutions) / len(all_solutions))
                          if has_truth else None,
      **timing,
  }
  io.write_summary(out_dir, summary)
  return summary


# -------------------------------------------------------------------------------------------------- verify


def _solutions(config) -> list[dict]:
  """The curated solutions of the finished generate job, each with `_index` (its row: the sampling index)."""
  path = os.path.join(_dir(config, "generate"), "solutions.jsonl")
  summary = _upstream_summary(config, "generate", {})
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} is missing although the generate job wrote its summary; {_rerun('generate')}.")
  rows = io.read_records(path, on_error="raise")
  if summary.get("solutions_kept") != len(rows):
    raise ValueError(f"{path} has {len(rows)} rows but {_dir(config, 'generate')}/summary.json says solutions_kept="
                     f"{summary.get('solutions_kept')}; the file is stale or truncated: {_rerun('generate')}.")
  for i, r in enumerate(rows):
    r["_index"] = i
  return rows


def run_verify(config, *, reference: bool = False) -> dict:
  """N verifications per solution without the reference answer (or, `reference=True`, with it: D7)."""
  v = config.verify
  name = "verify_reference" if reference else "verify"
  n = v.reference_num_verifications if reference else v.num_verifications
  solutions = _solutions(config)
  if reference and any(s["answer"] is None for s in solutions):
    raise ValueError("the reference-guided verifier needs every problem's answer; set "
                     "config.verify.reference=False for data without ground truth.")
  shards = io.ShardedOutput(_dir(config, name), "verifications", solutions, config.shard_size)
  model = _chat_model(config, "verifier") if shards.pending() else None

  def work(items):
    messages = [prompts.verifier_prompt(s["problem"], s["solution"],
                                        expected_answer=grading.normalize_gold(s["answer"])[0] if reference else None)
                for s in items]
    completions = model.sample(messages, num_samples=n, temperature=v.temperature, top_p=v.top_p,
                               max_new_tokens=v.max_new_tokens, seed=_seed(config, name),
                               enable_thinking=_THINKING[v.thinking], prompt_indices=[s["_index"] for s in items])
    return [{"problem_id": s["problem_id"], "solution_id": s["solution_id"],
             "verifications": [c.text for c in cs], "finish_reasons": [c.finish_reason for c in cs],
             "num_tokens": [c.num_tokens for c in cs]} for s, cs in zip(items, completions)]

  timing = shards.run(work, unit_counter=lambda rs: sum(sum(r["num_tokens"]) for r in rs))
  records = shards.read_all()
  parsed = [parsing.parse_verification(t) for r in records for t in r["verifications"]]
  summary = {"job": name, "solutions": len(records), "verifications": len(parsed),
             "verifications_per_solution": n,
             "parse": {"with_final": sum(p["final"] is not None for p in parsed),
                       "with_steps": sum(bool(p["steps"]) for p in parsed), "total": len(parsed)},
             "finish_reasons": dict(collections.Counter(f for r in records for f in r["finish_reasons"])),
             **timing}
  io.write_summary(_dir(config, name), summary)
  return summary


# ------------------------------------------------------------------------------------------------ critique


def _verifications(config, solutions: list[dict], *, reference: bool = False) -> dict[str, dict]:
  """Finished verify (or verify_reference) outputs by solution_id, after the upstream checks."""
  job = "verify_reference" if reference else "verify"
  n = config.verify.reference_num_verifications if reference else config.verify.num_verifications
  _upstream_summary(config, job, {"solutions": len(solutions), "verifications_per_solution": n,
                                  "verifications": len(solutions) * n})
  return _upstream_records(config, job, "verifications", solutions)


def run_critique(config) -> dict:
  """Critic then merger (both greedy) on verification 0 and on the outcome-consistency selection (D6).

  For each solution and each meta-critique variant with a selection (`aggregate.select_for_meta_critique`),
  the critic sees that verification; the merger sees the same verification and the critic's output.
  """
  c = config.critique
  solutions = _solutions(config)
  verifications = _verifications(config, solutions)
  agg = _aggregation_config(config)
  shards = io.ShardedOutput(_dir(config, "critique"), "critiques", solutions, config.shard_size)
  model = _chat_model(config, "verifier") if shards.pending() else None

  def work(items):
    jobs = []  # (solution index in items, variant, verification index)
    for i, s in enumerate(items):
      texts = verifications[s["solution_id"]]["verifications"]
      for variant, index in aggregate.select_for_meta_critique(texts, agg).items():
        if index is not None:
          jobs.append((i, variant, index))
    # Greedy, so the keys do not matter; they still follow the item index, as in every job.
    settings = dict(num_samples=1, temperature=0.0, max_new_tokens=c.max_new_tokens, seed=_seed(config, "critique"),
                    enable_thinking=_THINKING[config.verify.thinking],
                    prompt_indices=[items[i]["_index"] * len(_META_VARIANTS) + _META_VARIANTS.index(variant)
                                    for i, variant, _ in jobs])
    critic_inputs = [(items[i], verifications[items[i]["solution_id"]]["verifications"][k]) for i, _, k in jobs]
    critiques = model.sample([prompts.critic_prompt(s["problem"], s["solution"], v) for s, v in critic_inputs],
                             **settings)
    merged = model.sample([prompts.merger_prompt(s["problem"], s["solution"], v, cr[0].text)
                           for (s, v), cr in zip(critic_inputs, critiques)], **settings)
    records = [{"problem_id": s["problem_id"], "solution_id": s["solution_id"], "num_tokens": 0} for s in items]
    for (i, variant, k), cr, mg in zip(jobs, critiques, merged):
      records[i][variant] = {"verification_index": k, "critique": cr[0].text, "merged": mg[0].text,
                             "finish_reasons": [cr[0].finish_reason, mg[0].finish_reason]}
      records[i]["num_tokens"] += cr[0].num_tokens + mg[0].num_tokens
    return records

  timing = shards.run(work, unit_counter=lambda rs: sum(r["num_tokens"] for r in rs))
  records = shards.read_all()
  summary = {"job": "critique", "solutions": len(records),
             "critiqued": {v: sum(v in r for r in records) for v in _META_VARIANTS},
             **timing}
  io.write_summary(_dir(config, "critique"), summary)
  return summary


_META_VARIANTS = ("meta_critique", "meta_critique_outcome")


def _merged_texts(critique: dict, selection: dict[str, int | None], solution_id: str) -> dict[str, str]:
  """The merged text per meta-critique variant of one solution, checked against the aggregation's selection.

  A variant without a selection gets "" (the record is then dropped with the outcome_consistency reason);
  a selected variant that the critique record lacks, or that critiqued another verification (the
  aggregation settings changed since the critique job ran), is an error.
  """
  merged = {}
  for variant in _META_VARIANTS:
    index = selection[variant]
    if index is None:
      merged[variant] = ""
      continue
    entry = critique.get(variant)
    if entry is None:
      raise ValueError(f"solution {solution_id}: the critique record has no {variant} entry although verification "
                       f"{index} is selected for it; {_rerun('critique')} in a clean critique directory.")
    if entry.get("verification_index") != index:
      raise ValueError(f"solution {solution_id}: the {variant} critique is of verification "
                       f"{entry.get('verification_index')}, but the current aggregation settings select {index}; "
                       f"{_rerun('critique')} in a clean critique directory with the same config.aggregate.")
    merged[variant] = entry["merged"]
  return merged


# ----------------------------------------------------------------------------------------------- aggregate


def _aggregation_config(config) -> aggregate.AggregationConfig:
  a = config.aggregate
  return aggregate.AggregationConfig(step_tie=a.step_tie, outcome_tie=a.outcome_tie, step_quorum=a.step_quorum,
                                     step_match_final=a.step_match_final, contradictions=a.contradictions)


def _config_names(value, allowed: tuple[str, ...], key: str) -> tuple[str, ...]:
  """Names from a tuple or a comma-separated string (`--config.aggregate.variants=a,b` gives ("a,b",)),
  each checked against `allowed`: an unknown name would otherwise silently select nothing."""
  items = (value,) if isinstance(value, str) else tuple(value)
  names = tuple(n.strip() for v in items for n in str(v).split(",") if n.strip())
  unknown = [n for n in names if n not in allowed]
  if unknown or not names:
    raise ValueError(f"config.{key}={value!r}: unknown {unknown or 'empty'}; use names from {allowed}.")
  return names


def run_aggregate(config) -> dict:
  """Parsing, majorities, target selection; the SFT datasets per variant x format; the quality table."""
  a = config.aggregate
  variants = _config_names(a.variants, aggregate.VARIANTS, "aggregate.variants")
  fmts = _config_names(a.formats, RM_FORMATS, "aggregate.formats")
  out_dir = _dir(config, "aggregate")
  agg = _aggregation_config(config)
  solutions = _solutions(config)
  verifications = _verifications(config, solutions)
  reference = _verifications(config, solutions, reference=True) if config.verify.reference else None
  critiques = None
  if config.critique.enabled:
    _upstream_summary(config, "critique", {"solutions": len(solutions)})
    critiques = _upstream_records(config, "critique", "critiques", solutions)

  if config.generate.curation == "verifier_majority":
    problems = collections.defaultdict(list)
    for s in solutions:
      problems[s["problem_id"]].append(s)

    def majority(s):
      finals = [parsing.parse_verification(t)["final"] for t in verifications[s["solution_id"]]["verifications"]]
      return aggregate.outcome_majority(finals, tie=agg.outcome_tie)

    solutions, curation_counts = curation.balance(
        [{"problem_id": k, "solutions": v} for k, v in problems.items()], majority,
        cap=config.generate.curation_cap, seed=config.generate.curation_seed)
  else:
    curation_counts = None

  records, rows = [], collections.defaultdict(list)
  for s in solutions:
    sid = s["solution_id"]
    texts = verifications[sid]["verifications"]
    merged = {}
    if critiques is not None:
      merged = _merged_texts(critiques[sid], aggregate.select_for_meta_critique(texts, agg), sid)
    built = aggregate.build_variant_records(
        texts, problem_id=s["problem_id"], solution_id=sid, is_correct=s.get("is_correct"),
        solution_steps=parsing.count_solution_steps(s["solution"]),
        merged=merged.get("meta_critique"), merged_outcome=merged.get("meta_critique_outcome"),
        reference_verifications=reference[sid]["verifications"] if reference is not None else None, config=agg)
    for record in built:
      if record.variant not in variants:
        continue
      records.append(record)
      for row in formats.sft_examples_from_record(record, s["problem"], s["solution"], formats=fmts):
        rows[(record.variant, row["format"])].append(row)

  io.write_jsonl_atomic(os.path.join(out_dir, "records.jsonl"), [r.to_dict() for r in records])
  manifests = {}
  for variant in variants:
    vrecords = [r for r in records if r.variant == variant]
    if not vrecords:
      continue
    for fmt in fmts:
      io.write_jsonl_atomic(os.path.join(out_dir, "datasets", variant, f"{fmt}.jsonl"), rows[(variant, fmt)])
    kept = [r for r in vrecords if r.kept]
    manifests[variant] = {
        "problems": len({r.problem_id for r in vrecords}),
        "solutions": len(vrecords),
        "kept_solutions": len(kept),
        "dropped": dict(collections.Counter(r.drop_reason for r in vrecords if not r.kept)),
        "parse_failures": sum(r.drop_reason == aggregate.DROP_PARSE_FAILURE for r in vrecords),
        # Targets that contradict themselves, per format (kept records, plus those dropped for it).
        "contradictions": {fmt: sum(fmt in r.contradictory_formats for r in vrecords)
                           for fmt in aggregate.CONTRADICTION_FORMATS},
        # Verifications whose number of step verdicts differs from the solution's own step count.
        "step_count": {
            "solutions_without_step_headers": sum(not r.solution_steps for r in vrecords),
            "verifications_checked": sum(r.step_count_checked for r in vrecords),
            "verifications_differing": sum(r.step_count_differing for r in vrecords),
            "kept_labels_differing": sum(bool(r.solution_steps) and len(r.steps) != r.solution_steps for r in kept),
        },
        "rows": {fmt: len(rows[(variant, fmt)]) for fmt in fmts},
        "missing_targets": dict(collections.Counter(reason for r in kept for reason in r.missing_targets.values())),
        "labels": {"final_yes": sum(bool(r.final) for r in kept), "final_no": sum(r.final is False for r in kept),
                   "steps_correct": sum(sum(r.steps) for r in kept),
                   "steps_incorrect": sum(len(r.steps) - sum(r.steps) for r in kept)},
    }
    io.write_json_atomic(os.path.join(out_dir, "datasets", variant, "manifest.json"), manifests[variant])
  summary = {"job": "aggregate", "solutions": len(solutions), "variants": manifests,
             "curation_counts": curation_counts, "datasets_dir": os.path.join(out_dir, "datasets")}
  if all(s.get("is_correct") is not None for s in solutions) and solutions:
    table = quality.data_quality_table(records)
    io.write_json_atomic(os.path.join(out_dir, "data_quality.json"), table)
    markdown = quality.render_quality_markdown(table)
    with open(os.path.join(out_dir, "data_quality.md"), "w") as f:
      f.write(markdown + "\n")
    print(markdown)
    summary["data_quality"] = table
  io.write_summary(out_dir, summary)
  return summary


# -------------------------------------------------------------------------------------------------- stage1


def run_stage1(config) -> dict:
  """The whole Stage I in one command; each step resumes where a previous run stopped."""
  # A typo in the aggregate's names must fail now, not after hours of generation.
  _config_names(config.aggregate.variants, aggregate.VARIANTS, "aggregate.variants")
  _config_names(config.aggregate.formats, RM_FORMATS, "aggregate.formats")
  timings, summaries = {}, {}
  steps = [("generate", run_generate), ("verify", run_verify)]
  if config.verify.reference:
    steps.append(("verify_reference", lambda c: run_verify(c, reference=True)))
  if config.critique.enabled:
    steps.append(("critique", run_critique))
  steps.append(("aggregate", run_aggregate))
  for name, fn in steps:
    start = time.time()
    logging.info("stage1: %s", name)
    summaries[name] = fn(config)
    timings[name] = round(time.time() - start, 2)
  summary = {"job": "stage1", "seconds": timings, "datasets_dir": summaries["aggregate"]["datasets_dir"]}
  io.write_summary(config.workdir, summary)
  return summary


def run_verify_reference(config) -> dict:
  return run_verify(config, reference=True)
