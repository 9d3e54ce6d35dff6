"""The demo's numbers: label accuracy of every Stage I data variant against the world's exact truth (as a
function of the number n of verifications aggregated), and the report (markdown + a PNG plot).

Label accuracy is measured with Stage I's own aggregation (`stage1.aggregate.build_variant_records`) on
the first n of the N verifications the verify job sampled, so one Stage I run gives the whole curve. Per
variant and n, over the solutions the variant keeps (dropped ones are counted, not scored):
  step_accuracy         share of written steps whose label equals the exact verdict (a label missing for a
                        step counts as wrong);
  first_error_accuracy  share of solutions whose labels locate the first error exactly (ProcessBench's
                        criterion: `processbench.prediction_from_verdicts` == the true first error, -1 = none);
  outcome_accuracy      share whose final label equals the truth of the answer.
"""

from __future__ import annotations

import glob
import os
from typing import Any, Sequence

from spark_jax import io
from spark_jax.evals import processbench as pb
from spark_jax.stage1 import aggregate
from spark_jax.world import task as task_lib

LABEL_VARIANTS = ("single", "outcome_consistency", "step_consistency", "reference_guided")


def _verifications(directory: str, name: str = "verifications") -> dict[str, list[str]]:
  files = sorted(glob.glob(os.path.join(directory, f"{name}-*.jsonl")))
  if not files:
    raise FileNotFoundError(f"{directory} has no {name}-*.jsonl shards; run Stage I (the verify job) first.")
  return {r["solution_id"]: r["verifications"] for f in files for r in io.read_records(f, on_error="raise")}


def label_accuracy(stage1_dir: str, n_grid: Sequence[int], reference: bool = True,
                   config: aggregate.AggregationConfig = aggregate.AggregationConfig()) -> dict[str, Any]:
  """{variant: {n: {kept, dropped, step_accuracy, first_error_accuracy, outcome_accuracy, steps, solutions}}}
  plus "solutions" (total) and "unlabelable" (solutions without any parseable step: no step truth)."""
  problems = task_lib.read_problems(os.path.join(stage1_dir, "problems.jsonl"))
  solutions = io.read_records(os.path.join(stage1_dir, "generate", "solutions.jsonl"), on_error="raise")
  verifications = _verifications(os.path.join(stage1_dir, "verify"))
  references = _verifications(os.path.join(stage1_dir, "verify_reference")) if reference else {}
  table: dict[str, Any] = {v: {} for v in LABEL_VARIANTS if reference or v != "reference_guided"}
  unlabelable = 0
  tallies = {(v, n): [0, 0, 0, 0, 0, 0] for v in table for n in n_grid}  # kept, dropped, step hits, steps, fe, out
  for s in solutions:
    problem = problems[s["problem_id"]]
    truth = task_lib.step_truth(problem, s["solution"])
    if not truth:
      unlabelable += 1
      continue
    outcome = task_lib.solution_is_correct(problem, s["solution"])
    fe = task_lib.first_error(truth)
    for n in n_grid:
      refs = references.get(s["solution_id"])
      records = aggregate.build_variant_records(
          verifications[s["solution_id"]][:n], problem_id=s["problem_id"], solution_id=s["solution_id"],
          reference_verifications=refs[:n] if refs is not None else None, config=config)
      for r in records:
        if r.variant not in table:
          continue
        t = tallies[(r.variant, n)]
        if not r.kept:
          t[1] += 1
          continue
        t[0] += 1
        t[2] += sum(i < len(r.steps) and r.steps[i] == truth[i] for i in range(len(truth)))
        t[3] += len(truth)
        t[4] += pb.prediction_from_verdicts(r.steps, len(truth)) == fe
        t[5] += r.final == outcome
  for (variant, n), (kept, dropped, hits, steps, fe_hits, out_hits) in tallies.items():
    table[variant][n] = {"kept": kept, "dropped": dropped, "steps": steps,
                         "step_accuracy": hits / steps if steps else None,
                         "first_error_accuracy": fe_hits / kept if kept else None,
                         "outcome_accuracy": out_hits / kept if kept else None}
  return {"variants": table, "solutions": len(solutions), "unlabelable": unlabelable, "n_grid": list(n_grid)}


# ------------------------------------------------------------------------------------------------ report


def _pct(x) -> str:
  return "–" if x is None else f"{100 * x:.1f}"


def _f(x) -> str:
  return "–" if x is None else f"{x:.1f}"


def _plot(path: str, labels: dict) -> str | None:
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return None
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
  for variant, row in labels["variants"].items():
    ns = sorted(int(n) for n in row)
    for ax, key in zip(axes, ("step_accuracy", "outcome_accuracy")):
      ax.plot(ns, [row[n if n in row else str(n)][key] for n in ns], marker="o", label=variant)
  for ax, title in zip(axes, ("step labels vs truth", "outcome labels vs truth")):
    ax.set_xscale("log", base=2)
    ax.set_xlabel("verifications aggregated (n)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("accuracy")
  axes[1].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def rl_gain(run: dict) -> dict | None:
  """First and last validation accuracy of an RL run, their difference, and its standard error (two
  independent binomial proportions over `eval_rows` graded answers each: an upper bound for the paired
  difference on one validation set, so a gain above 2 SE cannot be sampling noise of the evaluation)."""
  curve = run.get("eval") or {}
  if len(curve) < 2:
    return None
  steps = sorted(curve, key=int)
  first, last = curve[steps[0]]["accuracy"], curve[steps[-1]]["accuracy"]
  n = max(int(run.get("eval_rows", 1)), 1)
  se = ((first * (1 - first) + last * (1 - last)) / n) ** 0.5
  return {"first": first, "last": last, "gain": last - first, "se": se, "steps": int(steps[-1])}


def _plot_rl(path: str, runs: dict) -> str | None:
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return None
  fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
  for reward, run in runs.items():
    if "eval" not in run:
      continue
    ev = sorted((int(k), v) for k, v in run["eval"].items())
    axes[0].plot([k for k, _ in ev], [v["accuracy"] for _, v in ev], marker="o", label=reward)
    tr = sorted((int(k), v) for k, v in run["train"].items())
    axes[1].plot([k for k, _ in tr], [v.get("reward_mean") for _, v in tr], label=reward)
    axes[2].plot([k for k, _ in tr], [v.get("format_violation") for _, v in tr], label=f"{reward} format violation")
    axes[2].plot([k for k, _ in tr], [v.get("text_after_answer") for _, v in tr], ls="--",
                 label=f"{reward} text after answer")
  for ax, title in zip(axes, ("validation accuracy (avg@k, T=1)", "training reward (mean)", "hacking monitors")):
    ax.set_xlabel("RL step")
    ax.set_title(title)
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=7)
  axes[2].legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def claims(results: dict) -> list[tuple[str, str, str]]:
  """(the paper's claim, what this world measured, held?) for the claims the stages so far can test."""
  out = []
  labels = results.get("labels")
  if labels:
    v = labels["table"]["variants"]
    n = str(max(int(k) for k in v["single"]))
    get = lambda variant, key: (v[variant].get(n) or v[variant].get(int(n)))[key]
    step, outcome, single = (get(x, "step_accuracy") for x in ("step_consistency", "outcome_consistency", "single"))
    holds = None not in (step, outcome, single) and step >= outcome >= single
    out.append((f"step-level SC >= outcome-level SC >= single verification (step-label accuracy, N={n})",
                f"{_pct(step)} / {_pct(outcome)} / {_pct(single)}", "yes" if holds else "no"))
  pbr = results.get("processbench")
  if pbr:
    scores = pbr["scores"]
    trained = {k: s["f1"] for k, s in scores.items() if k.startswith("step_consistency/")}
    chance = scores.get("blind_guess", {}).get("f1")
    for key, f1 in trained.items():
      fmt = key.split("/")[1]
      if chance is not None:
        out.append((f"the PRM ({fmt}) trained on step-SC data judges better than a blind guess (F1; the guess "
                    "never reads the solution)", f"{_f(f1)} vs {_f(chance)}",
                    "yes" if f1 is not None and f1 > chance else "no"))
      single = scores.get(f"single/{fmt}", {}).get("f1")
      if single is not None:
        out.append((f"a PRM ({fmt}) trained on step-SC data beats one trained on single verifications (F1)",
                    f"{_f(f1)} vs {_f(single)}", "yes" if f1 is not None and f1 > single else "no"))
  rl = results.get("rl")
  if rl:
    gains = {k: rl_gain(v) for k, v in rl["runs"].items()}
    g = lambda k: gains.get(k)
    if g("rlvr"):
      r = g("rlvr")
      out.append(("GRPO with the verifiable reward (RLVR) raises accuracy",
                  f"{_pct(r['first'])} -> {_pct(r['last'])} (gain {_pct(r['gain'])} ± {_pct(r['se'])} SE)",
                  "yes" if r["gain"] > 2 * r["se"] else "no"))
    if g("prm_cot_outcome") and g("rlvr"):
      p, r = g("prm_cot_outcome"), g("rlvr")
      out.append(("the PRM-CoT reward (reference-free) >= RLVR (final validation accuracy)",
                  f"{_pct(p['last'])} vs {_pct(r['last'])}", "yes" if p["last"] >= r["last"] else "no"))
    if g("random"):
      r = g("random")
      out.append(("a random reward gives no gain", f"gain {_pct(r['gain'])} ± {_pct(r['se'])} SE",
                  "yes" if r["gain"] <= 2 * r["se"] else "no"))
  return out


def write_report(workdir: str, config, results: dict, seconds: dict, wall_s: float | None = None) -> str:
  """Writes workdir/report.md (and report_labels.png) from the results so far; returns the report's path."""
  lines = ["# SPARK on the embedded world", ""]
  w = config.world
  lines += [f"World: start value and {w.min_ops}-{w.max_ops} operations mod {w.modulus}; seed {config.seed}; "
            f"quick={bool(config.quick)}.", ""]
  lines += ["| stage | seconds |", "|---|---|"] + [f"| {k} | {v:.1f} |" for k, v in seconds.items()]
  if wall_s is not None:
    lines += [f"| **wall time** | **{wall_s:.1f}** |"]
  lines.append("")
  b = results.get("bootstrap")
  if b:
    lines += ["## Bootstrap models (held-out problems)", "",
              "| model | decoding | parse rate | answer acc. | process-complete | step acc. | final acc. |",
              "|---|---|---|---|---|---|---|"]
    for mode, m in b["generator"].items():
      lines.append(f"| generator | {mode} (T={m['temperature']}) | {_pct(m['parse_rate'])} | "
                   f"{_pct(m['answer_accuracy'])} | {_pct(m['process_complete'])} | {_pct(m['step_accuracy'])} | – |")
    for mode, m in b["verifier"].items():
      lines.append(f"| verifier | {mode} (T={m['temperature']}) | {_pct(m['well_formed'])} | – | – | "
                   f"{_pct(m['step_accuracy'])} | {_pct(m['final_accuracy'])} |")
    lines += ["", "Percent. Verifier step acc. = per-step verdict accuracy against the exact truth on task-generated "
              f"solutions ({100 * config.bootstrap.generator_error_rate:.0f} % with an injected error); its teacher "
              f"graders recomputed each step right with probability {config.bootstrap.verifier_step_accuracy}.", ""]
  s1 = results.get("stage1")
  if s1:
    lines += ["## Stage I", "", f"Stage I seconds per job: {s1.get('seconds')}.", ""]
  labels = results.get("labels")
  if labels:
    t = labels["table"]
    lines += ["## Label accuracy against the exact truth", "",
              f"{t['solutions']} solutions ({t['unlabelable']} without a parseable step are not scored). "
              "Accuracy in percent over the solutions each variant keeps.", "",
              "| variant | n | kept | step acc. | first-error acc. | outcome acc. |", "|---|---|---|---|---|---|"]
    for variant, row in t["variants"].items():
      for n, c in sorted(row.items(), key=lambda kv: int(kv[0])):
        lines.append(f"| {variant} | {n} | {c['kept']}/{c['kept'] + c['dropped']} | {_pct(c['step_accuracy'])} | "
                     f"{_pct(c['first_error_accuracy'])} | {_pct(c['outcome_accuracy'])} |")
    plot = _plot(os.path.join(workdir, "report_labels.png"), t)
    if plot:
      lines += ["", f"![label accuracy vs n]({os.path.basename(plot)})"]
    lines.append("")
  pbr = results.get("processbench")
  if pbr:
    lines += ["## Held-out ProcessBench-style F1", "",
              "| model | F1 | error acc. | correct acc. | n (error / correct) | parse failures |",
              "|---|---|---|---|---|---|"]
    for name, s in pbr["scores"].items():
      lines.append(f"| {name} | {_f(s['f1'])} | {_f(s['acc_error'])} | {_f(s['acc_correct'])} | "
                   f"{s['n']} ({s['n_error']} / {s['n_correct']}) | {_f(s['parse_failure_rate'])}% |")
    lines.append("")
  rl = results.get("rl")
  if rl:
    lines += ["## Stage III: GRPO per reward type", "",
              "Validation accuracy is avg@k at temperature 1 on held-out problems (percent); monitors are the "
              "last step's.", "",
              "| reward | first | last | gain ± SE | format violation | text after answer | reward~steps corr. | "
              "PRM says Yes | seconds |", "|---|---|---|---|---|---|---|---|---|"]
    for reward, run in rl["runs"].items():
      if "skipped" in run:
        lines.append(f"| {reward} | skipped: {run['skipped']} | | | | | | | |")
        continue
      gain = rl_gain(run) or {}
      last = run["train"][max(run["train"], key=int)] if run["train"] else {}
      lines.append(f"| {reward} | {_pct(gain.get('first'))} | {_pct(gain.get('last'))} | "
                   f"{_pct(gain.get('gain'))} ± {_pct(gain.get('se'))} | {_pct(last.get('format_violation'))} | "
                   f"{_pct(last.get('text_after_answer'))} | {_f(last.get('reward_step_correlation'))} | "
                   f"{_pct(last.get('prm_verdict_yes'))} | {_f(run.get('seconds'))} |")
    plot = _plot_rl(os.path.join(workdir, "report_rl.png"), rl["runs"])
    if plot:
      lines += ["", f"![RL curves]({os.path.basename(plot)})"]
    lines.append("")
  rows = claims(results)
  if rows:
    lines += ["## The paper's claims vs this world", "", "| claim | measured | held here |", "|---|---|---|"]
    lines += [f"| {c} | {m} | {h} |" for c, m, h in rows]
    lines.append("")
  path = os.path.join(workdir, "report.md")
  io.write_text_atomic(path, "\n".join(lines))
  return path
