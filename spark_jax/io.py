"""Files in and out: packaged data, records, atomic writes, the cache directory, resumable sharded jobs.

The one place for each of these:
- `resolve_data_path`: where a data path points (the packaged data sets under spark_jax/data included).
- `iter_records` / `read_records`: every JSONL / JSON / parquet / hub reader of rows in the project.
- `atomic_path` (and the `write_*_atomic` wrappers on it): every file or folder written in one rename.
- `cache_dir`: where derived artefacts (converted checkpoints, built tokenizers) are kept between runs;
  `enable_compilation_cache` puts JAX's persistent compilation cache there.

Every job is `(config) -> files in config.workdir`. Work is cut into shards; a finished shard is written
atomically (temp file + rename), so a preempted VM loses at most the shard in flight and a restart
skips what is on disk. In multi-process runs shard i belongs to process i mod process_count.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import os
import pathlib
import shutil
import tempfile
import time
from typing import Any, Callable, Iterable, Iterator, Sequence

import tqdm

# The data sets that ship inside the package, one folder each with its README.md (provenance) and SHA256SUMS:
# processbench, the six math benchmarks (+ gsm8k), skywork_math_8k (the Stage I pool and its 256 slice).
DATA_DIR = pathlib.Path(__file__).resolve().parent / "data"
DATA_EXTENSIONS = (".jsonl", ".json", ".parquet")
CACHE_ENV = "SPARK_JAX_CACHE"


def resolve_data_path(path: str | os.PathLike[str]) -> pathlib.Path:
  """The one rule for where a data path points; raises FileNotFoundError naming every place it looked.

  1. An absolute path (after `~` expansion) is used as is.
  2. A relative path that exists from the working directory is used as is.
  3. Otherwise a path `data/<rest>` names the packaged copy `DATA_DIR/<rest>` (spark_jax/data/<rest>), so the
     configs' `data/processbench` or `data/skywork_math_8k/problems_8k.jsonl` work from any directory, in a
     checkout and in an installed wheel alike.
  """
  p = pathlib.Path(path).expanduser()
  if p.is_absolute() or p.exists():
    if not p.exists():
      raise FileNotFoundError(f"data path {str(path)!r} does not exist.")
    return p
  tried = [str(p.resolve())]
  if p.parts and p.parts[0] == "data":
    packaged = DATA_DIR.joinpath(*p.parts[1:])
    if packaged.exists():
      return packaged
    tried.append(str(packaged))
  hint = (f"the packaged data sets are {sorted(d.name for d in DATA_DIR.iterdir() if d.is_dir())} under "
          f"{DATA_DIR} (name them data/<set>/...)" if DATA_DIR.is_dir() else
          f"the packaged data folder {DATA_DIR} is missing: reinstall spark_jax")
  raise FileNotFoundError(f"data path {str(path)!r} does not exist (looked at {', '.join(tried)}); {hint}.")


def cache_dir(*parts: str) -> str:
  """`$SPARK_JAX_CACHE/<parts>` (default ~/.cache/spark_jax): converted checkpoints, built tokenizers."""
  root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "spark_jax")
  return os.path.join(root, *parts)


COMPILATION_CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"
COMPILATION_CACHE_MIN_COMPILE_S = 0.5  # programs that compile faster are not worth a cache file


def enable_compilation_cache() -> str | None:
  """Turns on JAX's persistent compilation cache at `$SPARK_JAX_CACHE/jax_cache` unless the environment already
  says where it goes (`JAX_COMPILATION_CACHE_DIR`; set it empty to turn the cache off); returns the directory.

  A rerun, a resumed job and every cell of a grid compile the same programs; from the cache they load in
  milliseconds instead of compiling again (on the world's quick demo compilation is a large share of the time).
  """
  import jax
  if COMPILATION_CACHE_ENV in os.environ:  # JAX reads it itself; an empty value leaves the cache off
    return os.environ[COMPILATION_CACHE_ENV] or None
  path = cache_dir("jax_cache")
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", COMPILATION_CACHE_MIN_COMPILE_S)
  return path


@contextlib.contextmanager
def file_lock(path: str | os.PathLike[str]) -> Iterator[None]:
  """An exclusive advisory lock on `path` (created if missing) for the duration of the block.

  For work shared through a machine-local cache (the world's bootstrap models): two processes (pytest-xdist
  workers, grid workers on one machine) that need the same entry take turns instead of training it twice
  into one folder. `flock` is released by the kernel when a holder dies, so a killed run leaves no stale lock.
  """
  import fcntl
  path = os.fspath(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "a") as f:
    fcntl.flock(f.fileno(), fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f.fileno(), fcntl.LOCK_UN)


# ------------------------------------------------------------------------------------------------ records


class RecordError(ValueError):
  """A bad input row; the message names the file and the row."""


@dataclasses.dataclass
class ReadStats:
  rows: int = 0
  skipped: dict[str, int] = dataclasses.field(default_factory=dict)

  def skip(self, reason: str):
    self.skipped[reason] = self.skipped.get(reason, 0) + 1


def is_hub_id(source: str) -> bool:
  """"org/name" or "name": not a path, a glob or a data file name."""
  return (not any(c in source for c in "*?[") and source.count("/") <= 1 and not source.startswith((".", "/", "~"))
          and not source.endswith(DATA_EXTENSIONS) and not source.startswith("data/"))


def record_files(source: str) -> list[str]:
  """The data files of a local `source`: a file, a directory or a glob (relative paths: `resolve_data_path`).

  A directory contributes its *.jsonl and *.parquet files, sorted, but not *.json: the JSON files that jobs
  write beside their rows (manifest.json, summary.json, <name>.shards.json) are not rows. Name JSON row files
  directly or with a glob (dir/*.json).
  """
  if any(c in source for c in "*?["):
    files = sorted(f for f in glob.glob(os.path.expanduser(source)) if f.endswith(DATA_EXTENSIONS))
    if not files:
      raise FileNotFoundError(f"data glob {source!r} matches no {'/'.join(DATA_EXTENSIONS)} files; check the path.")
    return files
  path = resolve_data_path(source)
  if path.is_dir():
    files = sorted(str(f) for f in path.iterdir() if f.suffix in (".jsonl", ".parquet"))
    if not files:
      raise FileNotFoundError(f"data directory {str(path)!r} holds no .jsonl/.parquet files (a directory's *.json "
                              "files are not read as rows: name them directly or with a glob, dir/*.json).")
    return files
  return [str(path)]


def iter_records(source: str, *, split: str = "train", on_error: str = "raise",
                 stats: ReadStats | None = None) -> Iterator[tuple[str, Any]]:
  """Yields `(where, row)` from a JSONL / JSON / parquet file, a directory or glob of them, or a hub dataset id.

  `where` names the row for error messages: "file:N" for line N (1-based) of a JSONL file, "file[i]" for the
  i-th (0-based) row of a parquet file or JSON list, "id[split][i]" for a hub row. A .json file holds a JSON
  list of rows or JSON lines. A line that is not JSON raises `RecordError` (on_error="raise") or is counted
  in `stats.skipped["invalid_json"]` (on_error="skip"). Rows are not checked here (see `read_records`).
  """
  if on_error not in ("skip", "raise"):
    raise ValueError(f"on_error={on_error!r}: use 'skip' or 'raise'.")
  stats = stats if stats is not None else ReadStats()
  if is_hub_id(source) and not os.path.exists(source):
    try:
      import datasets
      ds = datasets.load_dataset(source, split=split)
    except Exception as e:  # offline, unknown id, missing split
      raise OSError(f"data source {source!r} is not a local path and `datasets.load_dataset({source!r}, "
                    f"split={split!r})` failed ({type(e).__name__}: {e}); offline, pass a local JSONL/parquet file "
                    "or directory instead.") from e
    for i, row in enumerate(ds):
      yield f"{source}[{split}][{i}]", dict(row)
    return
  for file in record_files(source):
    if file.endswith(".parquet"):
      import pyarrow.parquet as pq
      for i, row in enumerate(pq.read_table(file).to_pylist()):
        yield f"{file}[{i}]", row
      continue
    with open(file, encoding="utf-8") as f:
      text = f.read()
    if file.endswith(".json") and text.lstrip().startswith("["):
      try:
        rows = json.loads(text)
      except json.JSONDecodeError as e:
        raise RecordError(f"{file}: not valid JSON ({e.msg} at line {e.lineno}); fix or restore the file.") from None
      for i, row in enumerate(rows):
        yield f"{file}[{i}]", row
      continue
    for line_no, line in enumerate(text.splitlines(), start=1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        if on_error == "raise":
          raise RecordError(f"{file}:{line_no}: not valid JSON ({e.msg} at column {e.colno}); every line of a "
                            "JSONL file must be one JSON object: fix or remove that line.") from None
        stats.skip("invalid_json")
        continue
      yield f"{file}:{line_no}", row


def read_records(path_or_id: str, *, split: str = "train", required: Sequence[str] = (),
                 on_error: str = "skip", stats: ReadStats | None = None) -> list[dict]:
  """`iter_records` as a list of dict rows, each holding every `required` field (non-empty strings).

  A row that is not a JSON object, lacks a `required` field or has it empty raises `RecordError` naming file
  and row when `on_error="raise"`, and is counted in `stats.skipped` when `on_error="skip"`.
  """
  stats = stats if stats is not None else ReadStats()
  out = []
  for where, row in iter_records(path_or_id, split=split, on_error=on_error, stats=stats):
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
      raise RecordError(f"{where}: the row {msg}; fix the row or set on_error='skip' to count and skip it.")
    stats.skip(reason)
  return out


# ------------------------------------------------------------------------------------------------ writing


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, directory: bool = False) -> Iterator[str]:
  """Yields a temporary sibling of `path` to write (a file, or a folder with directory=True); on a clean exit
  it replaces `path` in one rename, on an error it is removed.

  Readers never see a half-written `path`, and a killed writer leaves only a hidden `.<name>.tmp-*` sibling.
  A folder that already exists is moved aside first (a rename cannot replace a non-empty folder), so `path`
  is never a mix of old and new files. Temporary files and folders get the permissions a plain open() or
  makedirs() would give, not mkstemp's 0600.
  """
  path = os.path.abspath(os.fspath(path))
  parent, name = os.path.split(path)
  os.makedirs(parent, exist_ok=True)
  umask = os.umask(0)
  os.umask(umask)
  if directory:
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    os.chmod(tmp, 0o777 & ~umask)
  else:
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.tmp-", dir=parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~umask)
  try:
    yield tmp
    if directory:
      if os.path.lexists(path):
        old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
        os.rename(path, os.path.join(old, name))
        shutil.rmtree(old, ignore_errors=True)
    else:
      with open(tmp, "rb+") as f:  # durable before the rename: a crash cannot leave an empty `path`
        os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if directory:
      shutil.rmtree(tmp, ignore_errors=True)
    elif os.path.exists(tmp):
      os.unlink(tmp)
    raise


def write_text_atomic(path: str | os.PathLike[str], text: str) -> str:
  with atomic_path(path) as tmp:
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)
  return os.fspath(path)


def write_jsonl_atomic(path: str, records: Iterable[dict]) -> None:
  with atomic_path(path) as tmp:
    with open(tmp, "w", encoding="utf-8") as f:
      for r in records:
        f.write(json.dumps(r, ensure_ascii=False, default=_json_default) + "\n")


def write_json_atomic(path: str, obj: Any) -> str:
  return write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False, default=_json_default))


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
