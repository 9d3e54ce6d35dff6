"""Data-quality diagnostics of the Stage I variants (docs/method.md §2.6): label accuracy against ground truth.

For each data variant: the accuracy of the final label and of the step-derived verdict against the
ground-truth correctness of the solutions, the drop reasons, and the contradictory targets per format.
Ground truth is used here for diagnostics only, never for labels.
"""

from __future__ import annotations

import collections
from typing import Any, Iterable, Mapping

from spark_jax.stage1.aggregate import CONTRADICTION_FORMATS, VARIANTS, VariantRecord
from spark_jax.text import verdicts as parsing

QUALITY_SPLITS = ("all", "correct_solutions", "incorrect_solutions")


def _accuracy_cell(hits: int, n: int) -> dict[str, Any]:
  return {"n": n, "hits": hits, "accuracy": hits / n if n else None}


def data_quality_table(records: Iterable[VariantRecord | Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
  """Label accuracy of every data variant against the ground-truth correctness of the solutions.

  For the kept records of each variant: accuracy of the final label (final == is_correct) and of the
  step-derived verdict (all step labels correct <=> Yes), over all solutions and split into truly correct
  and truly incorrect ones. Dropped records are counted per reason, not scored. Contradictory targets are
  counted per format over the records that list them (kept ones, and those dropped for it).

  Returns:
    {variant: {"kept": int, "dropped": int, "drop_reasons": {code: count},
               "contradictions": {format: count} for CONTRADICTION_FORMATS,
               "final": {split: {"n", "hits", "accuracy"}}, "step_derived": {split: {...}}}}
    with splits QUALITY_SPLITS; accuracy is None for an empty split. Variants appear in VARIANTS order.
  """
  counts: dict[str, dict[str, Any]] = {}
  for position, record in enumerate(records):
    if isinstance(record, Mapping):
      record = VariantRecord.from_dict(record)
    entry = counts.setdefault(record.variant, {
        "kept": 0, "dropped": 0, "drop_reasons": collections.Counter(),
        "contradictions": dict.fromkeys(CONTRADICTION_FORMATS, 0),
        "final": {split: [0, 0] for split in QUALITY_SPLITS},
        "step_derived": {split: [0, 0] for split in QUALITY_SPLITS},
    })
    for fmt in record.contradictory_formats:
      entry["contradictions"][fmt] += 1
    if not record.kept:
      entry["dropped"] += 1
      entry["drop_reasons"][record.drop_reason] += 1
      continue
    if record.is_correct is None:
      raise ValueError(f"record {position} (variant {record.variant}, solution {record.solution_id}) has no "
                       "is_correct; the quality table needs the ground-truth correctness of every kept solution.")
    entry["kept"] += 1
    split = "correct_solutions" if record.is_correct else "incorrect_solutions"
    for key, predicted in (("final", record.final), ("step_derived", parsing.step_derived_verdict(record.steps))):
      hit = int(predicted == record.is_correct)
      for s in ("all", split):
        entry[key][s][0] += hit
        entry[key][s][1] += 1
  order = [v for v in VARIANTS if v in counts] + sorted(v for v in counts if v not in VARIANTS)
  return {
      variant: {
          "kept": counts[variant]["kept"],
          "dropped": counts[variant]["dropped"],
          "drop_reasons": dict(sorted(counts[variant]["drop_reasons"].items())),
          "contradictions": counts[variant]["contradictions"],
          **{key: {s: _accuracy_cell(*counts[variant][key][s]) for s in QUALITY_SPLITS}
             for key in ("final", "step_derived")},
      } for variant in order
  }


def render_quality_markdown(table: Mapping[str, Mapping[str, Any]]) -> str:
  """Markdown rendering of `data_quality_table`: one row per variant, cells "accuracy (hits/n)", and the
  contradictory targets per format as "prm/prm_cot/think_prm" counts."""

  def cell(c: Mapping[str, Any]) -> str:
    return "–" if not c["n"] else f"{c['accuracy']:.3f} ({c['hits']}/{c['n']})"

  header = ("| variant | kept | dropped | final: all | final: correct sol. | final: incorrect sol. "
            "| step-derived: all | step-derived: correct sol. | step-derived: incorrect sol. "
            f"| contradictory ({'/'.join(CONTRADICTION_FORMATS)}) |")
  lines = [header, "|" + "---|" * 10]
  for variant, row in table.items():
    cells = [variant, str(row["kept"]), str(row["dropped"])]
    cells += [cell(row["final"][s]) for s in QUALITY_SPLITS]
    cells += [cell(row["step_derived"][s]) for s in QUALITY_SPLITS]
    cells.append("/".join(str(row["contradictions"][fmt]) for fmt in CONTRADICTION_FORMATS))
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"
