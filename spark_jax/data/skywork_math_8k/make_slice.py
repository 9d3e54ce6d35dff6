"""Writes problems_<rows>.jsonl: the first N rows of the Skywork-OR1 8K problem pool, flattened (8000 = all).

Why flattened copies in the package: Stage I needs real math problems with ground truth, and the 8K parquet
lives outside the repository. The output is deterministic (the first N rows in file order, no shuffling), so
re-running this script reproduces problems_8k.jsonl and problems_256.jsonl byte for byte.

Usage:
  python spark_jax/data/skywork_math_8k/make_slice.py \
      [--source /work/shared/data/skywork_math_8k/train_8k.parquet] [--rows 256] [--out <dir>/problems_256.jsonl]

Row fields:
  id              "skywork8k-<extra_info.index>" (stable across slices: the upstream index, not the row)
  row             0-based row number in train_8k.parquet
  problem         content of the user message of `prompt` (the verl system message is dropped)
  answer          the single ground-truth answer as a plain string (element 0 of the JSON list)
  ground_truth    reward_model.ground_truth verbatim: a JSON-list string such as '["1156"]'
  data_source     e.g. "train-math-deepscaler"
  model_difficulty extra_info.model_difficulty (pass counts of DeepSeek-R1-Distill models, upstream metadata)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pathlib

import pyarrow.parquet as pq

DEFAULT_SOURCE = "/work/shared/data/skywork_math_8k/train_8k.parquet"


def _user_message(prompt: list[dict], row: int, source: str) -> str:
  users = [m["content"] for m in prompt if m["role"] == "user"]
  if len(users) != 1:
    raise ValueError(f"{source} row {row}: expected exactly one user message in `prompt`, found {len(users)}; "
                     "the problem text cannot be identified.")
  return users[0]


def _single_answer(ground_truth: str, row: int, source: str) -> str:
  answers = json.loads(ground_truth)
  if not isinstance(answers, list) or len(answers) != 1 or not isinstance(answers[0], str):
    raise ValueError(f"{source} row {row}: reward_model.ground_truth {ground_truth!r} is not a one-element "
                     "JSON list of strings; decide how to map several answers before slicing.")
  return answers[0]


def make_rows(source: str, n_rows: int) -> list[dict]:
  table = pq.read_table(source).slice(0, n_rows).to_pylist()
  if len(table) < n_rows:
    raise ValueError(f"{source} has only {len(table)} rows; asked for the first {n_rows}.")
  rows = []
  for row, record in enumerate(table):
    ground_truth = record["reward_model"]["ground_truth"]
    rows.append({
        "id": f"skywork8k-{record['extra_info']['index']}",
        "row": row,
        "problem": _user_message(record["prompt"], row, source),
        "answer": _single_answer(ground_truth, row, source),
        "ground_truth": ground_truth,
        "data_source": record["data_source"],
        "model_difficulty": record["extra_info"]["model_difficulty"],
    })
  ids = [r["id"] for r in rows]
  if len(set(ids)) != len(ids):
    raise ValueError(f"{source}: extra_info.index is not unique in the first {n_rows} rows; ids would collide.")
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--source", default=DEFAULT_SOURCE)
  parser.add_argument("--rows", type=int, default=256)
  parser.add_argument("--out", default=None, help="default: problems_<rows>.jsonl next to this script")
  args = parser.parse_args()
  out = pathlib.Path(args.out or pathlib.Path(__file__).parent / f"problems_{args.rows}.jsonl")
  text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in make_rows(args.source, args.rows))
  out.write_text(text, encoding="utf-8")
  print(f"wrote {out} ({args.rows} rows) sha256 {hashlib.sha256(text.encode('utf-8')).hexdigest()}")


if __name__ == "__main__":
  main()
