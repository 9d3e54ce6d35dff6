"""Math benchmark copies: integrity, loader row counts and gold answers."""

from __future__ import annotations

import hashlib
import json

import pytest

from spark_jax.io import DATA_DIR
from spark_jax.evals import math_benchmarks as mb


@pytest.mark.parametrize("name", mb.ALL_BENCHMARKS)
def test_checksums(name):
  folder = DATA_DIR / name
  listed = {}
  for line in (folder / "SHA256SUMS").read_text().splitlines():
    digest, fname = line.split(maxsplit=1)
    listed[fname.lstrip("*")] = digest
  assert {p.name for p in folder.iterdir()} - {"README.md", "SHA256SUMS"} == set(listed)
  for fname, digest in listed.items():
    assert hashlib.sha256((folder / fname).read_bytes()).hexdigest() == digest, folder / fname
  assert (folder / "README.md").is_file()


@pytest.mark.parametrize("name", mb.ALL_BENCHMARKS)
def test_rows(name):
  rows = mb.load_benchmark(name)
  assert len(rows) == mb.BENCHMARK_SIZES[name]
  assert len({r["id"] for r in rows}) == len(rows)
  for r in rows:
    assert set(r) == {"id", "problem", "answer"}
    assert r["id"].startswith(f"{name}-")
    assert isinstance(r["problem"], str) and r["problem"].strip(), r["id"]
    assert isinstance(r["answer"], str) and r["answer"].strip(), r["id"]
    assert "$" not in r["answer"].replace("\\$", ""), r["id"]


def test_known_golds():
  first = {name: mb.load_benchmark(name, limit=1)[0]["answer"] for name in mb.ALL_BENCHMARKS}
  assert first == {
      "math500": "\\left( 3, \\frac{\\pi}{2} \\right)",
      "aime24": "204",
      "aime25": "70",
      "amc23": "27",  # stored as 27.0
      "olympiadbench": "2",
      "minerva_math": "1.6",  # last \boxed{} of the solution
      "gsm8k": "18",  # after '####'
  }
  assert mb.load_benchmark("aime25")[19]["answer"] == "336^\\circ"
  gsm = {r["id"]: r["answer"] for r in mb.load_benchmark("gsm8k")}
  assert all("," not in a for a in gsm.values())
  olymp = [r["answer"] for r in mb.load_benchmark("olympiadbench")]
  assert "69,84" in olymp  # "$69$,$84$" upstream


def test_limit_and_benchmark_tuple():
  assert mb.BENCHMARKS == ("math500", "aime24", "aime25", "amc23", "olympiadbench", "minerva_math")
  assert len(mb.load_benchmark("math500", limit=5)) == 5
  assert set(mb.load_benchmarks(("aime24", "amc23"))) == {"aime24", "amc23"}


def test_errors(tmp_path):
  with pytest.raises(ValueError, match="unknown benchmark 'aime26'"):
    mb.load_benchmark("aime26")
  with pytest.raises(FileNotFoundError, match="math500"):
    mb.load_benchmark("math500", root=tmp_path)
  (tmp_path / "aime24").mkdir()
  (tmp_path / "aime24" / "test.jsonl").write_text(
      json.dumps({"id": 1, "problem": "p", "answer": "3"}) + "\n" + json.dumps({"id": 2, "problem": "q"}) + "\n")
  with pytest.raises(ValueError, match=r"test\.jsonl: line 2 \(aime24\): missing key 'answer'"):
    mb.load_benchmark("aime24", root=tmp_path)
  (tmp_path / "minerva_math").mkdir()
  (tmp_path / "minerva_math" / "test.jsonl").write_text(json.dumps({"idx": 0, "problem": "p",
                                                                    "solution": "no box"}) + "\n")
  with pytest.raises(ValueError, match=r"line 1 \(minerva_math\).*\\boxed"):
    mb.load_benchmark("minerva_math", root=tmp_path)
