"""Record reading (bad rows named or counted), atomic sharded outputs and resume."""

import json
import os

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
  with pytest.raises(io.RecordError, match=r"problems\.jsonl: row 2 is not valid JSON"):
    io.read_records(path, required=["problem"], on_error="raise")
  _write(path, ['{"problem": "1+1?"}', '{"question": "x"}'])
  with pytest.raises(io.RecordError, match=r"problems\.jsonl: row 2 has no field 'problem'"):
    io.read_records(path, required=["problem"], on_error="raise")


def test_parquet_json_and_directory_inputs(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  pq.write_table(pa.Table.from_pylist([{"problem": "a"}, {"problem": "b"}]), str(tmp_path / "a.parquet"))
  with open(tmp_path / "b.json", "w") as f:
    json.dump([{"problem": "c"}], f)
  rows = io.read_records(str(tmp_path), required=["problem"])
  assert sorted(r["problem"] for r in rows) == ["a", "b", "c"]
  with pytest.raises(FileNotFoundError, match="nope.jsonl"):
    io.read_records(str(tmp_path / "nope.jsonl"))


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
