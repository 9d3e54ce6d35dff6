"""A non-editable install carries every data set: install a copy of the package outside the repository and
load ProcessBench, the math benchmarks and the Skywork pool from a directory where no source tree is in reach.

Why a copy and a foreign working directory: run from the checkout, `data/...` or the editable install would
find the repository's files and hide a wheel that ships none. Dependencies come from the test environment
(the install is `--no-deps` into its own folder, first on PYTHONPATH), so the check takes seconds; the child
asserts that `spark_jax` is imported from that folder, not from the repository.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from spark_jax.evals import math_benchmarks as mb
from spark_jax.io import DATA_DIR

REPO = pathlib.Path(__file__).resolve().parents[1]

CHILD = r"""
import hashlib, json, pathlib, sys
import spark_jax
from spark_jax import io
from spark_jax.evals import math_benchmarks as mb, processbench as pb

site = pathlib.Path(sys.argv[1]).resolve()
assert pathlib.Path(spark_jax.__file__).resolve().is_relative_to(site), spark_jax.__file__
counts = {"processbench": len(pb.load_processbench())}
counts.update({name: len(mb.load_benchmark(name)) for name in mb.ALL_BENCHMARKS})
for name in ("problems_8k", "problems_256"):
  counts[name] = len(io.read_records(f"data/skywork_math_8k/{name}.jsonl", required=["problem", "answer"],
                                     on_error="raise"))
bad = []
for sums in sorted(io.DATA_DIR.glob("*/SHA256SUMS")):
  for line in sums.read_text().splitlines():
    digest, name = line.split(maxsplit=1)
    if hashlib.sha256((sums.parent / name.lstrip("*")).read_bytes()).hexdigest() != digest:
      bad.append(str(sums.parent / name))
print(json.dumps({"file": spark_jax.__file__, "data_dir": str(io.DATA_DIR), "counts": counts, "bad": bad}))
"""


@pytest.mark.slow
def test_installed_package_loads_every_data_set(tmp_path):
  src = tmp_path / "src"
  src.mkdir()
  shutil.copy(REPO / "pyproject.toml", src)
  shutil.copy(REPO / "README.md", src)
  shutil.copytree(REPO / "spark_jax", src / "spark_jax",
                  ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
  site = tmp_path / "site"
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                  "--no-compile", "--target", str(site), str(src)], check=True, cwd=tmp_path)
  outside = tmp_path / "elsewhere"
  outside.mkdir()
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
  env["PYTHONPATH"] = str(site)
  done = subprocess.run([sys.executable, "-c", CHILD, str(site)], cwd=outside, env=env, capture_output=True,
                        text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-4000:]
  result = json.loads(done.stdout.strip().splitlines()[-1])
  assert pathlib.Path(result["data_dir"]).is_relative_to(site)
  expected = {"processbench": 3400, **mb.BENCHMARK_SIZES, "problems_8k": 8000, "problems_256": 256}
  assert result["counts"] == expected
  assert result["bad"] == []
  shipped = sorted(str(p.relative_to(site / "spark_jax" / "data")) for p in (site / "spark_jax" / "data").rglob("*")
                   if p.is_file())
  in_repo = sorted(str(p.relative_to(DATA_DIR)) for p in DATA_DIR.rglob("*")
                   if p.is_file() and "__pycache__" not in p.parts)
  assert shipped == in_repo


def test_skywork_slice_is_the_head_of_the_full_pool():
  """problems_256.jsonl is byte for byte the first 256 lines of problems_8k.jsonl (one script makes both)."""
  folder = DATA_DIR / "skywork_math_8k"
  full = (folder / "problems_8k.jsonl").read_bytes().splitlines(keepends=True)
  assert len(full) == 8000
  assert b"".join(full[:256]) == (folder / "problems_256.jsonl").read_bytes()
  ids = [json.loads(line)["id"] for line in full]
  assert len(set(ids)) == 8000
  listed = dict(reversed(line.split()) for line in (folder / "SHA256SUMS").read_text().splitlines())
  assert listed == {name: hashlib.sha256((folder / name).read_bytes()).hexdigest()
                    for name in ("problems_256.jsonl", "problems_8k.jsonl")}
