"""Record reading (bad rows named or counted), data path resolution, atomic writes, sharded outputs and resume."""

import json
import os
import pathlib

import pytest

from spark_jax import io


def _write(path, lines):
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")


def test_bad_rows_are_named_or_counted(tmp_path):
  path = str(tmp_path / "problems.jsonl")
  _write(path, ['{"problem": "1+1?", "answer": "2"}', "{not json", '{"answer": "3"}', '{"problem": "  "}',
                '[1, 2]', '{"problem": "2+2?"}'])
  stats = io.ReadStats()
  rows = io.read_records(path, required=["problem"], stats=stats)
  assert [r["problem"] for r in rows] == ["1+1?", "2+2?"]
  assert stats.rows == 2
  assert stats.skipped == {"invalid_json": 1, "missing_problem": 1, "empty_problem": 1, "not_an_object": 1}
  with pytest.raises(io.RecordError, match=r"problems\.jsonl:2: not valid JSON"):
    io.read_records(path, required=["problem"], on_error="raise")
  _write(path, ['{"problem": "1+1?"}', '{"question": "x"}'])
  with pytest.raises(io.RecordError, match=r"problems\.jsonl:2: the row has no field 'problem'"):
    io.read_records(path, required=["problem"], on_error="raise")


def test_parquet_json_and_directory_inputs(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  pq.write_table(pa.Table.from_pylist([{"problem": "a"}, {"problem": "b"}]), str(tmp_path / "a.parquet"))
  _write(tmp_path / "b.jsonl", ['{"problem": "c"}'])
  # A directory's .json files are what jobs write beside rows (manifests, summaries): never read as rows.
  with open(tmp_path / "manifest.json", "w") as f:
    json.dump({"rows": 3}, f)
  rows = io.read_records(str(tmp_path), required=["problem"], on_error="raise")
  assert [r["problem"] for r in rows] == ["a", "b", "c"]
  # A .json file named directly (or by a glob) is a JSON list of rows, or JSON lines.
  with open(tmp_path / "list.json", "w") as f:
    json.dump([{"problem": "d"}, {"problem": "e"}], f)
  _write(tmp_path / "lines.json", ['{"problem": "f"}'])
  where = [w for w, _ in io.iter_records(str(tmp_path / "*.json"))]
  assert where == [f"{tmp_path / 'lines.json'}:1", f"{tmp_path / 'list.json'}[0]", f"{tmp_path / 'list.json'}[1]",
                   f"{tmp_path / 'manifest.json'}:1"]
  assert [w for w, _ in io.iter_records(str(tmp_path / "a.parquet"))][1] == f"{tmp_path / 'a.parquet'}[1]"
  with pytest.raises(FileNotFoundError, match="nope.jsonl"):
    io.read_records(str(tmp_path / "nope.jsonl"))
  only_json = tmp_path / "only_json"
  only_json.mkdir()
  (only_json / "x.json").write_text("[]")
  with pytest.raises(FileNotFoundError, match=r"holds no \.jsonl/\.parquet files .*dir/\*\.json"):
    io.read_records(str(only_json))


def test_data_paths_resolve_to_the_packaged_copy_from_any_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert io.resolve_data_path("data/processbench") == io.DATA_DIR / "processbench"
  rows = io.read_records("data/skywork_math_8k/problems_256.jsonl", on_error="raise")
  assert len(rows) == 256 and rows[0]["id"] == "skywork8k-8756"
  with pytest.raises(FileNotFoundError, match=r"data/nope.*looked at .*nope.*packaged data sets are \[.*'processbench'"):
    io.resolve_data_path("data/nope")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    io.resolve_data_path(str(tmp_path / "absent.jsonl"))
  # A relative path that exists from the working directory wins over the packaged copy.
  (tmp_path / "data" / "processbench").mkdir(parents=True)
  assert io.resolve_data_path("data/processbench") == pathlib.Path("data/processbench")


def test_atomic_path_replaces_in_one_rename_and_cleans_up(tmp_path):
  target = tmp_path / "out" / "x.json"
  io.write_json_atomic(str(target), {"a": 1})
  assert json.loads(target.read_text()) == {"a": 1}
  assert oct(target.stat().st_mode & 0o777) == oct(0o666 & ~_umask())
  with pytest.raises(RuntimeError):
    with io.atomic_path(target) as tmp:
      with open(tmp, "w") as f:
        f.write("half")
      raise RuntimeError("killed")
  assert json.loads(target.read_text()) == {"a": 1} and os.listdir(target.parent) == ["x.json"]
  folder = tmp_path / "ckpt"
  for version in ("old", "new"):
    with io.atomic_path(folder, directory=True) as tmp:
      (pathlib.Path(tmp) / f"{version}.txt").write_text(version)
  assert os.listdir(folder) == ["new.txt"] and sorted(os.listdir(tmp_path)) == ["ckpt", "out"]


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
  monkeypatch.setenv(io.CACHE_ENV, str(tmp_path))
  assert io.cache_dir("tokenizers", "qwen2.5") == str(tmp_path / "tokenizers" / "qwen2.5")
  monkeypatch.delenv(io.CACHE_ENV)
  assert io.cache_dir() == os.path.join(os.path.expanduser("~"), ".cache", "spark_jax")


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def test_compilation_cache_defaults_to_the_cache_dir_and_yields_to_the_environment(tmp_path, monkeypatch):
  import jax
  old = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
  try:
    monkeypatch.setenv(io.CACHE_ENV, str(tmp_path))
    monkeypatch.delenv(io.COMPILATION_CACHE_ENV, raising=False)
    assert io.enable_compilation_cache() == str(tmp_path / "jax_cache")
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "jax_cache")
    jax.config.update("jax_compilation_cache_dir", old[0])
    monkeypatch.setenv(io.COMPILATION_CACHE_ENV, str(tmp_path / "mine"))  # the user's choice wins, untouched
    assert io.enable_compilation_cache() == str(tmp_path / "mine")
    assert jax.config.jax_compilation_cache_dir == old[0]
    monkeypatch.setenv(io.COMPILATION_CACHE_ENV, "")  # empty: off
    assert io.enable_compilation_cache() is None and jax.config.jax_compilation_cache_dir == old[0]
  finally:
    jax.config.update("jax_compilation_cache_dir", old[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", old[1])


def test_sharded_output_resumes_without_duplicates(tmp_path):
  items = list(range(10))
  calls = []

  def work(chunk):
    calls.append(list(chunk))
    if len(calls) == 3:
      raise RuntimeError("preempted")
    return [{"x": x, "y": x * x} for x in chunk]

  out = io.ShardedOutput(str(tmp_path), "squares", items, shard_size=3, process_index=0, process_count=1)
  with pytest.raises(RuntimeError):
    out.run(work)
  assert out.pending() == [2, 3] and not out.done()
  with pytest.raises(FileNotFoundError, match="not finished"):
    out.read_all()
  calls.clear()
  again = io.ShardedOutput(str(tmp_path), "squares", items, shard_size=3, process_index=0, process_count=1)
  again.run(lambda chunk: [{"x": x, "y": x * x} for x in chunk])
  assert again.done()
  assert [r["x"] for r in again.read_all()] == items
  assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]
  with pytest.raises(ValueError, match="resume with the same inputs"):
    io.ShardedOutput(str(tmp_path), "squares", items, shard_size=4, process_index=0, process_count=1)


def test_processes_take_disjoint_shards(tmp_path):
  items = list(range(7))
  a = io.ShardedOutput(str(tmp_path), "p", items, 2, process_index=0, process_count=2)
  b = io.ShardedOutput(str(tmp_path), "p", items, 2, process_index=1, process_count=2)
  assert a.pending() == [0, 2] and b.pending() == [1, 3]


def test_no_items_means_no_shards(tmp_path):
  out = io.ShardedOutput(str(tmp_path), "empty", [], 4, process_index=0, process_count=1)
  assert out.num_shards == 0 and out.pending() == [] and out.done() and out.read_all() == []
  assert out.run(lambda chunk: 1 / 0)["shards_run"] == 0
