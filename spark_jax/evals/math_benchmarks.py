"""Math evaluation sets (docs/method.md §5.11) reduced to rows {id, problem, answer}.

Each benchmark ships as `data/<name>/test.jsonl` in its upstream layout (see each folder's README); this
module knows where each keeps its problem and gold answer, so callers see one shape:

| name          | rows | problem field | gold answer                                                    |
|---------------|------|---------------|----------------------------------------------------------------|
| math500       | 500  | problem       | answer                                                         |
| aime24        | 30   | problem       | answer                                                         |
| aime25        | 30   | problem       | answer (one is `336^\\circ`)                                    |
| amc23         | 40   | problem       | answer, stored as a float (27.0 -> "27")                       |
| olympiadbench | 675  | question      | final_answer[0] with `$` removed ("$69$,$84$" -> "69,84")      |
| minerva_math  | 272  | problem       | last `\\boxed{}` of solution, `$` removed (no answer field)     |
| gsm8k         | 1319 | question      | text after `####`, commas removed ("2,125" -> "2125")          |

Golds are strings ready for `grading.is_equivalent`. Ids are prefixed with the benchmark name
("aime24-60") so that results from several benchmarks can be merged.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

from spark_jax.evals import resolve_data_path
from spark_jax.text.answers import last_boxed

BENCHMARKS = ("math500", "aime24", "aime25", "amc23", "olympiadbench", "minerva_math")
EXTRA_BENCHMARKS = ("gsm8k",)
ALL_BENCHMARKS = BENCHMARKS + EXTRA_BENCHMARKS
BENCHMARK_SIZES = {"math500": 500, "aime24": 30, "aime25": 30, "amc23": 40, "olympiadbench": 675,
                   "minerva_math": 272, "gsm8k": 1319}
DEFAULT_ROOT = "data"


class _RowError(ValueError):
  """A row-level problem; load_benchmark adds the file and line."""


def _field(row: dict[str, Any], key: str) -> Any:
  if key not in row:
    raise _RowError(f"missing key {key!r} (row keys: {sorted(row)})")
  return row[key]


def _text(row: dict[str, Any], key: str) -> str:
  value = _field(row, key)
  if not isinstance(value, str) or not value.strip():
    raise _RowError(f"key {key!r} = {str(value)[:60]!r} is not a non-empty string")
  return value


def _number_or_text(value: Any, key: str) -> str:
  """Gold as text; integral floats lose their ".0" (AMC23 stores 27.0) so that string equality works."""
  if isinstance(value, bool):
    raise _RowError(f"key {key!r} = {value!r} is a bool, expected an answer")
  if isinstance(value, float):
    return str(int(value)) if value.is_integer() else repr(value)
  if isinstance(value, int):
    return str(value)
  if isinstance(value, str) and value.strip():
    return value.strip()
  raise _RowError(f"key {key!r} = {value!r} is not a usable answer")


def _drop_dollars(s: str) -> str:
  """Removes math-mode `$` (keeping escaped `\\$`): golds are graded as `$…$` and must not nest them."""
  return s.replace("\\$", "\x00").replace("$", "").replace("\x00", "\\$").strip()


def _plain(row: dict[str, Any]) -> tuple[str, str]:
  return _text(row, "problem"), _number_or_text(_field(row, "answer"), "answer")


def _olympiadbench(row: dict[str, Any]) -> tuple[str, str]:
  answers = _field(row, "final_answer")
  if not isinstance(answers, list) or not answers or not isinstance(answers[0], str):
    raise _RowError(f"key 'final_answer' = {answers!r}, expected a non-empty list of strings")
  # Answers are LaTeX wrapped in `$`; several-part answers come as "$69$,$84$".
  answer = _drop_dollars(answers[0])
  if not answer:
    raise _RowError(f"key 'final_answer' = {answers!r} is empty after removing `$`")
  problem = _text(row, "question")
  context = row.get("context")
  if isinstance(context, str) and context.strip() and context.strip() != "None":
    problem = f"{context.strip()}\n\n{problem}"
  return problem, answer


def _minerva(row: dict[str, Any]) -> tuple[str, str]:
  answer = last_boxed(_text(row, "solution"))
  if answer:
    answer = _drop_dollars(answer)  # One upstream box holds a stray "$ $" (row idx 72).
  if not answer:
    raise _RowError("key 'solution' has no non-empty \\boxed{} to take the gold answer from")
  return _text(row, "problem"), answer


def _gsm8k(row: dict[str, Any]) -> tuple[str, str]:
  solution = _text(row, "answer")
  if "####" not in solution:
    raise _RowError("key 'answer' has no '####' marker before the final number")
  answer = solution.rsplit("####", 1)[1].strip().replace(",", "")
  if not answer:
    raise _RowError("key 'answer' has nothing after '####'")
  return _text(row, "question"), answer


# name -> (row -> (problem, answer), id key or None for the line number).
_SPECS: dict[str, tuple[Callable[[dict[str, Any]], tuple[str, str]], str | None]] = {
    "math500": (_plain, "unique_id"),
    "aime24": (_plain, "id"),
    "aime25": (_plain, "id"),
    "amc23": (_plain, "id"),
    "olympiadbench": (_olympiadbench, "id"),
    "minerva_math": (_minerva, "idx"),
    "gsm8k": (_gsm8k, None),
}


def load_benchmark(name: str, root: str | os.PathLike[str] = DEFAULT_ROOT,
                   limit: int | None = None) -> list[dict[str, str]]:
  """Loads `<root>/<name>/test.jsonl` as rows {id, problem, answer} (see the module table).

  Args:
    name: one of `ALL_BENCHMARKS` (`BENCHMARKS` are SPARK's RL evaluation sets; gsm8k is extra).
    root: folder holding the benchmark folders. The default `data` (and any relative path that does not
      exist from the working directory) resolves against the repository root.
    limit: keep only the first `limit` rows (smoke runs); None = all.

  Raises:
    ValueError: unknown name, or a row without the fields this benchmark needs (names file, line, key).
    FileNotFoundError: the file is missing (says how to restore it).
  """
  if name not in _SPECS:
    raise ValueError(f"unknown benchmark {name!r}; choose one of {ALL_BENCHMARKS}.")
  if limit is not None and limit < 0:
    raise ValueError(f"limit={limit}: use None (all rows) or a non-negative count.")
  convert, id_key = _SPECS[name]
  path = resolve_data_path(root) / name / "test.jsonl"
  if not path.is_file():
    raise FileNotFoundError(f"benchmark {name!r}: {path} does not exist. The repository ships it in "
                            f"data/{name}/ (see its README and SHA256SUMS); restore it with "
                            f"`git checkout -- data/{name}` or pass root= to a folder holding {name}/.")
  rows: list[dict[str, str]] = []
  with path.open(encoding="utf-8") as f:
    for line_no, line in enumerate(f, start=1):
      if limit is not None and len(rows) >= limit:
        break
      if not line.strip():
        continue
      where = f"{path}: line {line_no}"
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e}); restore the file from git.") from e
      if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}; restore the file.")
      try:
        problem, answer = convert(row)
        raw_id = _field(row, id_key) if id_key else line_no - 1
      except _RowError as e:
        raise ValueError(f"{where} ({name}): {e}. This loader expects the upstream layout described in "
                         f"data/{name}/README.md; fix or restore the file.") from None
      rows.append({"id": f"{name}-{raw_id}", "problem": problem, "answer": answer})
  return rows


def load_benchmarks(names: tuple[str, ...] = BENCHMARKS, root: str | os.PathLike[str] = DEFAULT_ROOT,
                    limit: int | None = None) -> dict[str, list[dict[str, str]]]:
  """`load_benchmark` for several names: {name: rows}."""
  return {name: load_benchmark(name, root=root, limit=limit) for name in names}
