"""Files in and out: datasets-compatible records, atomic writes, resumable sharded jobs, summaries.

Every job is `(config) -> files in config.workdir`. Work is cut into shards; a finished shard is written
atomically (temp file + rename), so a preempted VM loses at most the shard in flight and a restart
skips what is on disk. In multi-process runs shard i belongs to process i mod process_count.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import time
from typing import Any, Callable, Iterable, Sequence

import tqdm


class RecordError(ValueError):
  """A bad input row; the message names the file and the row."""


@dataclasses.dataclass
class ReadStats:
  rows: int = 0
  skipped: dict[str, int] = dataclasses.field(default_factory=dict)

  def skip(self, reason: str):
    self.skipped[reason] = self.skipped.get(reason, 0) + 1


def _files(path: str) -> list[str]:
  if os.path.isdir(path):
    files = sorted(f for ext in ("jsonl", "json", "parquet") for f in glob.glob(os.path.join(path, f"*.{ext}")))
    if not files:
      raise FileNotFoundError(f"{path}: directory has no .jsonl/.json/.parquet files.")
    return files
  return [path]


def read_records(path_or_id: str, *, split: str = "train", required: Sequence[str] = (),
                 on_error: str = "skip", stats: ReadStats | None = None) -> list[dict]:
  """Reads JSONL / JSON-list / parquet files (a file or a directory of them) or a hub dataset id.

  Rows that are not JSON objects or lack a `required` field raise `RecordError` naming file and row
  when `on_error="raise"`, and are counted in `stats.skipped` when `on_error="skip"`.
  """
  if on_error not in ("skip", "raise"):
    raise ValueError(f"on_error={on_error!r}: use 'skip' or 'raise'.")
  stats = stats if stats is not None else ReadStats()
  if not os.path.exists(path_or_id):
    if path_or_id.endswith((".jsonl", ".json", ".parquet")) or os.sep in path_or_id.strip("/").split("/", 1)[-1]:
      raise FileNotFoundError(f"{path_or_id}: no such file or directory.")
    try:
      import datasets
      rows = [dict(r) for r in datasets.load_dataset(path_or_id, split=split)]
    except Exception as e:
      raise OSError(f"{path_or_id!r} is not a local path and could not be loaded from the hub "
                    f"({type(e).__name__}: {e}); offline, pass a local JSONL/parquet path.") from e
    return _validate(rows, path_or_id, required, on_error, stats)
  out = []
  for file in _files(path_or_id):
    if file.endswith(".parquet"):
      import pyarrow.parquet as pq
      out.extend(_validate(pq.read_table(file).to_pylist(), file, required, on_error, stats))
    elif file.endswith(".json"):
      with open(file) as f:
        data = json.load(f)
      if not isinstance(data, list):
        raise RecordError(f"{file}: expected a JSON list of records, got {type(data).__name__}.")
      out.extend(_validate(data, file, required, on_error, stats))
    else:
      rows = []
      with open(file) as f:
        for i, line in enumerate(f, start=1):
          if not line.strip():
            continue
          try:
            rows.append((i, json.loads(line)))
          except json.JSONDecodeError as e:
            if on_error == "raise":
              raise RecordError(f"{file}: row {i} is not valid JSON ({e.msg} at column {e.colno}).") from None
            stats.skip("invalid_json")
      out.extend(_validate(rows, file, required, on_error, stats, numbered=True))
  return out


def _validate(rows, source, required, on_error, stats, numbered=False) -> list[dict]:
  out = []
  for j, row in enumerate(rows, start=1):
    i, row = row if numbered else (j, row)
    if not isinstance(row, dict):
      reason, msg = "not_an_object", f"is a {type(row).__name__}, not a JSON object"
    else:
      missing = [k for k in required if k not in row or row[k] is None]
      empty = [k for k in required if k in row and isinstance(row[k], str) and not row[k].strip()]
      if missing:
        reason, msg = f"missing_{missing[0]}", f"has no field {missing[0]!r} (fields: {sorted(row)[:10]})"
      elif empty:
        reason, msg = f"empty_{empty[0]}", f"has an empty {empty[0]!r}"
      else:
        stats.rows += 1
        out.append(row)
        continue
    if on_error == "raise":
      raise RecordError(f"{source}: row {i} {msg}; fix the row or set on_error='skip' to count and skip it.")
    stats.skip(reason)
  return out


def write_jsonl_atomic(path: str, records: Iterable[dict]) -> None:
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = f"{path}.tmp.{os.getpid()}"
  with open(tmp, "w") as f:
    for r in records:
      f.write(json.dumps(r, ensure_ascii=False, default=_json_default) + "\n")
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def write_json_atomic(path: str, obj: Any) -> str:
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = f"{path}.tmp.{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, ensure_ascii=False, default=_json_default)
  os.replace(tmp, path)
  return path


def _json_default(o):
  try:
    import numpy as np
    if isinstance(o, np.generic):
      return o.item()
    if isinstance(o, np.ndarray):
      return o.tolist()
  except ImportError:
    pass
  return str(o)


def write_summary(workdir: str, summary: dict) -> str:
  """Every job ends with `summary.json` in its workdir."""
  return write_json_atomic(os.path.join(workdir, "summary.json"), summary)


class ShardedOutput:
  """Items cut into fixed shards, each written once and atomically under `out_dir/<name>-NNNNN.jsonl`.

  `run(fn)` calls `fn(items_of_shard) -> records` for this process's unfinished shards; a restart
  with the same items and shard size skips the finished ones, so no record is written twice.
  """

  def __init__(self, out_dir: str, name: str, items: Sequence[Any], shard_size: int,
               process_index: int | None = None, process_count: int | None = None):
    if shard_size <= 0:
      raise ValueError(f"shard_size={shard_size} must be positive.")
    if process_index is None or process_count is None:
      import jax
      process_index, process_count = jax.process_index(), jax.process_count()
    self.out_dir, self.name, self.items, self.shard_size = out_dir, name, list(items), shard_size
    self.num_shards = -(-len(self.items) // shard_size)  # 0 for no items: nothing to run, nothing to read
    self.process_index, self.process_count = process_index, process_count
    os.makedirs(out_dir, exist_ok=True)
    manifest = os.path.join(out_dir, f"{name}.shards.json")
    spec = {"items": len(self.items), "shard_size": shard_size, "num_shards": self.num_shards}
    if os.path.exists(manifest):
      with open(manifest) as f:
        old = json.load(f)
      if old != spec:
        raise ValueError(f"{manifest}: this output was started with {old}, now {spec}; resume with the same "
                         "inputs and shard size, or use a new workdir.")
    elif process_index == 0:
      write_json_atomic(manifest, spec)

  def shard_path(self, i: int) -> str:
    return os.path.join(self.out_dir, f"{self.name}-{i:05d}-of-{self.num_shards:05d}.jsonl")

  def shard_items(self, i: int) -> list:
    return self.items[i * self.shard_size:(i + 1) * self.shard_size]

  def pending(self) -> list[int]:
    return [i for i in range(self.num_shards)
            if i % self.process_count == self.process_index and not os.path.exists(self.shard_path(i))]

  def run(self, fn: Callable[[list], list[dict]], desc: str | None = None,
          unit_counter: Callable[[list[dict]], int] | None = None, unit: str = "tok") -> dict:
    """Processes pending shards with a progress bar (items, `unit`/s, ETA). Returns timing stats."""
    pending = self.pending()
    total_items = sum(len(self.shard_items(i)) for i in pending)
    start, units = time.time(), 0
    with tqdm.tqdm(total=total_items, desc=desc or self.name, unit="item", dynamic_ncols=True) as bar:
      for i in pending:
        records = fn(self.shard_items(i))
        write_jsonl_atomic(self.shard_path(i), records)
        if unit_counter is not None:
          units += unit_counter(records)
          bar.set_postfix({f"{unit}/s": f"{units / max(time.time() - start, 1e-9):.1f}"})
        bar.update(len(self.shard_items(i)))
    return {"shards_run": len(pending), "shards_total": self.num_shards, "seconds": time.time() - start,
            unit: units}

  def done(self) -> bool:
    return all(os.path.exists(self.shard_path(i)) for i in range(self.num_shards))

  def read_all(self) -> list[dict]:
    missing = [self.shard_path(i) for i in range(self.num_shards) if not os.path.exists(self.shard_path(i))]
    if missing:
      raise FileNotFoundError(f"{len(missing)} shard(s) of {self.name} are not finished yet, e.g. {missing[0]}; "
                              "rerun the job (it resumes) or wait for the other processes.")
    out = []
    for i in range(self.num_shards):
      out.extend(read_records(self.shard_path(i), on_error="raise"))
    return out
