"""ProcessBench: loading, step rendering, the critic protocol, and the F1 metric (docs/method.md §4).

ProcessBench (Zheng et al., 2024; 3,400 cases in four splits) gives a problem, a solution split into
steps (paragraphs) and `label`: the 0-based index of the earliest wrong step, or -1 when every step is
correct. A method predicts that index; per split, accuracy is measured separately on the erroneous cases
(`acc_error`) and on the all-correct cases (`acc_correct`), and F1 is their harmonic mean. The headline
number is the mean of the four split F1s.

Two ways to get a prediction:
  * A generative PRM (our models, D8): show the steps as `Step k: <text>` (`render_steps`), parse its
    per-step verdicts (elsewhere), and turn them into an index with `prediction_from_verdicts`.
  * Any instruct model as a critic (ProcessBench's own protocol): `critic_prompt` tags the paragraphs
    `<paragraph_i>` and asks for the earliest wrong index in `\\boxed{}`; `parse_critic_output` reads it
    back and `vote` takes a majority over several samples.

All scores are percentages (0-100), as ProcessBench and SPARK report them.
"""

from __future__ import annotations

import collections
import json
import os
import pathlib
import re
from typing import Any, Mapping, Sequence

from spark_jax.evals import resolve_data_path
from spark_jax.text.answers import last_boxed
from spark_jax.text.verdicts import strip_thinking

SPLITS = ("gsm8k", "math", "olympiadbench", "omnimath")
SPLIT_SIZES = {"gsm8k": 400, "math": 1000, "olympiadbench": 1000, "omnimath": 1000}
DEFAULT_ROOT = "data/processbench"

# How markdown_table names the splits (the ProcessBench paper's column names).
SPLIT_TITLES = {"gsm8k": "GSM8K", "math": "MATH", "olympiadbench": "OlympiadBench", "omnimath": "Omni-MATH"}

_RESTORE_HINT = ("The repository ships these files in data/processbench/ (see its README and SHA256SUMS); "
                 "restore them with `git checkout -- data/processbench` or pass root= to a folder with the "
                 "official ProcessBench json files.")


# ---------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------


def _validate_row(row: Any, path: pathlib.Path, i: int) -> dict[str, Any]:
  """Checks one json object and returns our row; every error names the file, the row and the key."""
  where = f"{path}: row {i}"
  if not isinstance(row, dict):
    raise ValueError(f"{where} is a {type(row).__name__}, expected a JSON object. {_RESTORE_HINT}")
  if isinstance(row.get("id"), str):
    where += f" (id {row['id']!r})"
  for key in ("id", "problem", "steps", "label"):
    if key not in row:
      raise ValueError(f"{where}: missing key {key!r}. {_RESTORE_HINT}")
  if not isinstance(row["id"], str) or not row["id"]:
    raise ValueError(f"{where}: key 'id' = {row['id']!r}, expected a non-empty string. {_RESTORE_HINT}")
  if not isinstance(row["problem"], str) or not row["problem"].strip():
    raise ValueError(f"{where}: key 'problem' is empty or not a string. {_RESTORE_HINT}")
  steps = row["steps"]
  if not isinstance(steps, list) or not steps or not all(isinstance(s, str) for s in steps):
    raise ValueError(f"{where}: key 'steps' must be a non-empty list of strings, got "
                     f"{type(steps).__name__} {str(steps)[:80]!r}. {_RESTORE_HINT}")
  label = row["label"]
  if isinstance(label, bool) or not isinstance(label, int):
    raise ValueError(f"{where}: key 'label' = {label!r} is not an integer. {_RESTORE_HINT}")
  if not -1 <= label < len(steps):
    raise ValueError(f"{where}: key 'label' = {label} is out of range for {len(steps)} steps; expected -1 "
                     f"or 0..{len(steps) - 1}. {_RESTORE_HINT}")
  return row


def load_processbench(root: str | os.PathLike[str] = DEFAULT_ROOT, splits: Sequence[str] | None = None,
                      limit: int | None = None) -> list[dict[str, Any]]:
  """Loads ProcessBench cases from `<root>/<split>.json`, validating every row.

  Args:
    root: folder with the four official json files. The default `data/processbench` (and any relative
      path that does not exist from the working directory) resolves against the repository root, so
      the loader works from any working directory.
    splits: subset of `SPLITS` (default: all four, in the paper's order).
    limit: keep only the first `limit` cases of each split (smoke runs); None = all.

  Returns:
    Rows {id, split, problem, steps (list[str]), label (int; -1 = all steps correct),
    final_answer_correct (bool or None), generator (str or None)}, split by split in file order.

  Raises:
    ValueError: unknown split, or a malformed row (the message names file, row and key).
    FileNotFoundError: a split's file is missing (the message says how to restore it).
  """
  splits = SPLITS if splits is None else tuple(splits)
  folder = resolve_data_path(root)
  # Other splits in ProcessBench's format (e.g. spark_jax.world's held-out set) load when their file exists.
  unknown = [s for s in splits if s not in SPLITS and not (folder / f"{s}.json").is_file()]
  if unknown:
    raise ValueError(f"unknown ProcessBench split(s) {unknown}; the splits are {SPLITS} (or any <split>.json "
                     f"in {folder}).")
  if limit is not None and limit < 0:
    raise ValueError(f"limit={limit}: use None (all rows) or a non-negative count per split.")
  rows: list[dict[str, Any]] = []
  for split in splits:
    path = folder / f"{split}.json"
    if not path.is_file():
      raise FileNotFoundError(f"ProcessBench split {split!r}: {path} does not exist. {_RESTORE_HINT}")
    try:
      data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not valid JSON ({e}). {_RESTORE_HINT}") from e
    if not isinstance(data, list):
      raise ValueError(f"{path}: expected a JSON array of cases, got {type(data).__name__}. {_RESTORE_HINT}")
    if limit is not None:
      data = data[:limit]
    for i, raw in enumerate(data):
      row = _validate_row(raw, path, i)
      rows.append({
          "id": row["id"],
          "split": split,
          "problem": row["problem"],
          "steps": list(row["steps"]),
          "label": int(row["label"]),
          "final_answer_correct": row.get("final_answer_correct"),
          "generator": row.get("generator"),
      })
  return rows


# ---------------------------------------------------------------------------------------------------------
# Generative PRM protocol (D8)
# ---------------------------------------------------------------------------------------------------------


def render_steps(steps: Sequence[str]) -> str:
  """D8: the solution as `Step k: <text>` (k from 1), steps joined by a blank line.

  1-based numbering matches how the PRM was trained to name steps ("Step 1: Correct"), so its verdict
  for "Step k" belongs to `steps[k-1]`. Each step's surrounding whitespace is stripped so that the blank
  line stays the only separator.
  """
  if not steps:
    raise ValueError("render_steps: got no steps; a ProcessBench case always has at least one.")
  return "\n\n".join(f"Step {k}: {str(text).strip()}" for k, text in enumerate(steps, start=1))


def prediction_from_verdicts(step_verdicts: Sequence[bool | None] | None, num_steps: int) -> int | None:
  """Turns per-step verdicts (True = correct) into a ProcessBench prediction.

  Returns the 0-based index of the first step judged incorrect, -1 when all `num_steps` steps are
  judged correct, or None (scored as a wrong prediction and counted as a parse failure) when the
  verdicts do not determine the earliest error.

  The rule: a prediction `i >= 0` needs steps 0..i-1 judged correct and step i judged incorrect; -1 needs
  every step judged correct. Hence:
    * None or an empty list -> None (nothing parsed).
    * Shorter list: a False within it still gives its index (every earlier step was judged correct,
      so the earliest error is determined); if all given verdicts are True, the unjudged tail might hold
      the error, so -> None rather than -1. Claiming "all correct" on a partial read would reward PRMs
      that stop early on the (frequent) all-correct cases.
    * Longer list: verdicts past `num_steps` refer to steps that do not exist (the PRM split a step
      or invented one) and are ignored; a label can never point there.
    * A None entry (a step whose verdict could not be parsed) acts like the end of the list: a False
      before it still counts, otherwise -> None.
  """
  if num_steps < 1:
    raise ValueError(f"prediction_from_verdicts: num_steps={num_steps}; a case has at least one step.")
  if not step_verdicts:
    return None
  for i in range(num_steps):
    if i >= len(step_verdicts) or step_verdicts[i] is None:
      return None
    if not step_verdicts[i]:
      return i
  return -1


# ---------------------------------------------------------------------------------------------------------
# Critic protocol for instruct models (ProcessBench's, in our wording)
# ---------------------------------------------------------------------------------------------------------

_CRITIC_TEMPLATE = """\
Below is a math problem followed by a proposed solution. The solution is divided into paragraphs; each \
paragraph sits between tags that carry its index, counting from 0.

[Problem]

{problem}

[Proposed solution]

{tagged_steps}

Check the solution one paragraph at a time. If a paragraph contains an error, report the index of the \
earliest paragraph with an error. If no paragraph contains an error, report -1.

Give your final answer, the index alone, inside \\boxed{{}}."""


def critic_prompt(problem: str, steps: Sequence[str]) -> str:
  """The user message of ProcessBench's critic protocol, for any instruct model (apply its chat template).

  Follows the official structure — paragraphs wrapped as `<paragraph_i>...</paragraph_i>` with 0-based
  indices, a request for the earliest erroneous index or -1, answer in the final `\\boxed{}` — in our
  own wording.
  """
  if not steps:
    raise ValueError("critic_prompt: got no steps; a ProcessBench case always has at least one.")
  tagged = "\n\n".join(f"<paragraph_{i}>\n{str(s).strip()}\n</paragraph_{i}>" for i, s in enumerate(steps))
  return _CRITIC_TEMPLATE.format(problem=problem.strip(), tagged_steps=tagged)


_INDEX_RE = re.compile(r"^(?:paragraph[_\s]*)?(-?\d+)\.?$", re.IGNORECASE)


def parse_critic_output(text: str | None, num_steps: int | None = None) -> int | None:
  """Reads the predicted index from the last `\\boxed{}` of a critic's output; None if unusable.

  The reasoning trace is dropped first (`spark_jax.text.verdicts.split_thinking`, the one think rule). The
  box may hold `3`, `-1`, `$3$`, `\\text{3}` or `paragraph_3`. With `num_steps`, an index outside
  -1..num_steps-1 is also None (the official script would score it as an ordinary miss; either way it is
  wrong, and None makes it visible in the parse-failure rate).
  """
  if not text:
    return None
  boxed = last_boxed(strip_thinking(text))
  if boxed is None:
    return None
  s = boxed.replace("$", "").replace(" ", "")
  m = re.fullmatch(r"\\(?:text|mathrm|textbf)\{(.*)\}", s)
  if m:
    s = m.group(1)
  m = _INDEX_RE.match(s)
  if not m:
    return None
  index = int(m.group(1))
  if num_steps is not None and not -1 <= index < num_steps:
    return None
  return index


def vote(predictions: Sequence[int | None]) -> int | None:
  """Majority vote over k sampled predictions for one case.

  None (unparseable) samples do not vote; if no sample parsed, the result is None. Ties go to the tied
  value that appears first in sampling order — what `collections.Counter.most_common` does, as in the
  official ProcessBench script — so results are deterministic given the samples. (The official script
  also lets None win a vote; we do not, so one readable sample beats several unreadable ones.)
  """
  counts = collections.Counter(p for p in predictions if p is not None)
  if not counts:
    return None
  return counts.most_common(1)[0][0]


# ---------------------------------------------------------------------------------------------------------
# Metric
# ---------------------------------------------------------------------------------------------------------


def _pct(hits: int, total: int) -> float | None:
  return 100.0 * hits / total if total else None


def _f1(a: float | None, b: float | None) -> float | None:
  if a is None or b is None:
    return None
  return 0.0 if a + b == 0 else 2 * a * b / (a + b)


def _mean(values: Sequence[float | None]) -> float | None:
  vals = [v for v in values if v is not None]
  return sum(vals) / len(vals) if vals else None


def f1_scores(examples: Sequence[Mapping[str, Any]],
              predictions: Sequence[int | None] | Mapping[str, int | None]) -> dict[str, dict[str, Any]]:
  """ProcessBench metrics per split plus their average, in percent (0-100).

  Args:
    examples: rows with `split` and `label` (as from `load_processbench`); `id` too if `predictions` is a
      mapping.
    predictions: one prediction per example (aligned list), or a mapping id -> prediction. A prediction
      is an int (-1 = "no error") or None (parse failure: always wrong).

  Returns:
    {split: {acc_error, acc_correct, f1, n, n_error, n_correct, n_parse_failures, parse_failure_rate},
     ..., "average": {...}}. acc_error is exact-match accuracy on the cases with label != -1, acc_correct
    on label == -1, f1 = 2·acc_error·acc_correct / (acc_error + acc_correct), 0 when both are 0.
    parse_failure_rate = percent of the split's predictions that are None. Splits follow `SPLITS` order
    (others after, in order of appearance). "average" holds the unweighted mean over splits of each
    rate (its f1 is ProcessBench's "Avg"), and summed counts.

    A split with no cases of one kind has that accuracy undefined: it is None, its f1 is None, and the
    average is taken over the splits where the value is defined (`average["n_splits_f1"]` says how many).
    The official script would give NaN; None keeps the result JSON-serialisable and the gap visible.

  Raises:
    ValueError: lengths differ, an example lacks split/label, or a mapping lacks some ids (named).
  """
  if isinstance(predictions, Mapping):
    missing = [ex.get("id") for ex in examples if ex.get("id") not in predictions]
    if missing:
      raise ValueError(f"f1_scores: predictions has no entry for {len(missing)} example id(s), e.g. "
                       f"{missing[:5]}; give every example a prediction (None for a parse failure).")
    preds = [predictions[ex["id"]] for ex in examples]
  else:
    preds = list(predictions)
    if len(preds) != len(examples):
      raise ValueError(f"f1_scores: {len(examples)} examples but {len(preds)} predictions; pass one "
                       "prediction per example, in the same order.")

  tallies: dict[str, collections.Counter] = {}
  for i, (ex, pred) in enumerate(zip(examples, preds)):
    if "split" not in ex or "label" not in ex:
      raise ValueError(f"f1_scores: examples[{i}] (id {ex.get('id')!r}) lacks 'split' or 'label'; use rows "
                       "from load_processbench.")
    if pred is not None and (isinstance(pred, bool) or not isinstance(pred, int)):
      raise ValueError(f"f1_scores: predictions[{i}] = {pred!r} (id {ex.get('id')!r}) is not an int or "
                       "None; convert model outputs with prediction_from_verdicts / parse_critic_output.")
    t = tallies.setdefault(ex["split"], collections.Counter())
    kind = "correct" if ex["label"] == -1 else "error"
    t[f"n_{kind}"] += 1
    t[f"hit_{kind}"] += int(pred is not None and pred == ex["label"])
    t["n_parse_failures"] += int(pred is None)

  order = [s for s in SPLITS if s in tallies] + [s for s in tallies if s not in SPLITS]
  scores: dict[str, dict[str, Any]] = {}
  for split in order:
    t = tallies[split]
    n = t["n_error"] + t["n_correct"]
    acc_error = _pct(t["hit_error"], t["n_error"])
    acc_correct = _pct(t["hit_correct"], t["n_correct"])
    scores[split] = {
        "acc_error": acc_error,
        "acc_correct": acc_correct,
        "f1": _f1(acc_error, acc_correct),
        "n": n,
        "n_error": t["n_error"],
        "n_correct": t["n_correct"],
        "n_parse_failures": t["n_parse_failures"],
        "parse_failure_rate": _pct(t["n_parse_failures"], n),
    }
  per_split = [scores[s] for s in order]
  scores["average"] = {
      "acc_error": _mean([s["acc_error"] for s in per_split]),
      "acc_correct": _mean([s["acc_correct"] for s in per_split]),
      "f1": _mean([s["f1"] for s in per_split]),
      "n": sum(s["n"] for s in per_split),
      "n_error": sum(s["n_error"] for s in per_split),
      "n_correct": sum(s["n_correct"] for s in per_split),
      "n_parse_failures": sum(s["n_parse_failures"] for s in per_split),
      "parse_failure_rate": _mean([s["parse_failure_rate"] for s in per_split]),
      "n_splits_f1": sum(s["f1"] is not None for s in per_split),
  }
  return scores


def _fmt(x: float | None) -> str:
  return "n/a" if x is None else f"{x:.1f}"


def markdown_table(scores: Mapping[str, Mapping[str, Any]]) -> str:
  """Renders `f1_scores` output as a markdown table: one row per split, then the average (all in %)."""
  lines = [
      "| split | error acc | correct acc | F1 | n (error / correct) | parse failures |",
      "|---|---|---|---|---|---|",
  ]
  for split, s in scores.items():
    name = "**Average**" if split == "average" else SPLIT_TITLES.get(split, split)
    f1 = _fmt(s["f1"])
    if split == "average":
      f1 = f"**{f1}**"
    lines.append(f"| {name} | {_fmt(s['acc_error'])} | {_fmt(s['acc_correct'])} | {f1} | "
                 f"{s['n']} ({s['n_error']} / {s['n_correct']}) | {_fmt(s['parse_failure_rate'])}% |")
  return "\n".join(lines) + "\n"
