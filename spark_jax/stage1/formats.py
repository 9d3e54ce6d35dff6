"""Stage II SFT examples: (problem, solution, target) -> one chat row per reward-model format.

Row format (one JSON object per line in the SFT files; this is what the Stage II trainer reads):

    {
      "messages": [
        {"role": "user", "content": rm_prompt(format, problem, solution)},
        {"role": "assistant", "content": target},
      ],
      "rm_prompt": {"format": format, "problem": problem, "solution": solution},
      "format": "orm" | "prm" | "prm_cot" | "think_prm",
      "variant": one of aggregate.VARIANTS (the Stage I data variant the labels come from),
      "problem_id": str, "solution_id": str,
      "labels": {"steps": [bool, ...], "final": bool},   # the aggregated labels behind the target
    }

The trainer applies the chat template of the base model and puts the loss on the assistant message only
(D9). The user message is exactly the reward-model prompt used at RL time (docs/method.md §3.2), kept as text so
the rows read like any other SFT data. `rm_prompt` marks the user turn as that prompt and holds its parts: the
trainer tokenizes it piecewise with `text.rm_ids.rm_prompt_ids`, as ProcessBench and the RL reward do, so
training and querying see the identical ids, not only the identical text (a whole-string tokenization merges
tokens across the piece boundaries). The trainer checks that the user message equals
`rm_prompt(format, problem, solution)`. Targets per format:

  orm        "Yes" | "No"
  prm        "Step 1: Correct\\nStep 2: Incorrect\\n...\\n**Verification: Is the answer correct (Yes/No)? No**"
  prm_cot    the selected (or merged) teacher verification, reasoning trace removed
  think_prm  "<think>\\n<trace>\\n</think>\\n\\n<the same verification>"

Every target is parsed back before a row is written, so a row whose target would not parse (and would thus
teach an unparseable format) is an error, not silent noise.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

from spark_jax.text import verdicts as parsing
from spark_jax.stage1.aggregate import VariantRecord
from spark_jax.text.rm import RM_FORMATS, rm_prompt


def _check_target(fmt: str, target: str, where: str) -> None:
  if fmt == "orm":
    ok = parsing.parse_orm_output(target) is not None
  elif fmt == "prm":
    parsed = parsing.parse_prm_output(target)
    ok = bool(parsed["steps"]) and parsed["final"] is not None
  else:  # prm_cot, think_prm: the teacher-verification format.
    parsed = parsing.parse_verification(target)
    ok = bool(parsed["steps"]) and parsed["final"] is not None
    if fmt == "think_prm":
      ok = ok and parsing.split_thinking(target)[0] is not None
  if not ok:
    raise ValueError(f"{where}: the {fmt} target does not parse in its own format; target starts "
                     f"{target[:120]!r}. Rebuild it with the aggregate.*_target functions.")


def sft_example(fmt: str, problem: str, solution: str, target: str, *, variant: str, problem_id: str | None,
                solution_id: str | None, labels: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """One SFT row (module docstring) for reward-model format `fmt`; raises if `target` does not parse."""
  if fmt not in RM_FORMATS:
    raise ValueError(f"unknown reward-model format {fmt!r} for problem {problem_id}, solution {solution_id}; "
                     f"use one of {RM_FORMATS}.")
  _check_target(fmt, target, f"problem {problem_id}, solution {solution_id}, variant {variant}")
  row: dict[str, Any] = {
      "messages": [
          {"role": "user", "content": rm_prompt(fmt, problem, solution)},
          {"role": "assistant", "content": target},
      ],
      "rm_prompt": {"format": fmt, "problem": problem, "solution": solution},
      "format": fmt,
      "variant": variant,
      "problem_id": problem_id,
      "solution_id": solution_id,
  }
  if labels is not None:
    row["labels"] = {"steps": list(labels["steps"]), "final": labels["final"]}
  return row


def sft_examples_from_record(record: VariantRecord | Mapping[str, Any], problem: str, solution: str,
                             formats: Sequence[str] = RM_FORMATS) -> list[dict[str, Any]]:
  """SFT rows of one kept variant record, one per requested format that has a target.

  Dropped records give no rows; formats without a target (e.g. think_prm without a trace) are skipped; the
  caller counts both from the record itself.
  """
  unknown = [fmt for fmt in formats if fmt not in RM_FORMATS]
  if unknown:
    raise ValueError(f"unknown reward-model formats {unknown}; use a subset of {RM_FORMATS}.")
  if isinstance(record, Mapping):
    record = VariantRecord.from_dict(record)
  if not record.kept:
    return []
  labels = {"steps": record.steps, "final": record.final}
  return [
      sft_example(fmt, problem, solution, record.targets[fmt], variant=record.variant,
                  problem_id=record.problem_id, solution_id=record.solution_id, labels=labels)
      for fmt in formats if record.targets.get(fmt) is not None
  ]


def count_rows(rows: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str], int]:
  """Number of SFT rows per (variant, format), for logging the size of every training set."""
  counts: dict[tuple[str, str], int] = {}
  for row in rows:
    key = (row["variant"], row["format"])
    counts[key] = counts.get(key, 0) + 1
  return counts
