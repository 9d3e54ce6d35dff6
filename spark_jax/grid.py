"""The `grid` job: one base config, a list of cells (dotted-key overrides), one job run per cell, one table.

  python -m spark_jax.main --config=configs/grid.py:<name>                       # all cells, then the table
  python -m spark_jax.main --config=configs/grid.py:<name> --config.worker=1 --config.num_workers=4
  python -m spark_jax.main --config=configs/grid.py:<name> --config.mode=collect  # only the table

A grid config names a base config (`configs/<job>.py[:variant]`, the syntax of `--config`), the cells, and the
metrics to collect. A cell is `{"labels": {axis: value}, "overrides": {"dotted.key": value}}`; a plain dict of
overrides is a cell whose labels are its overrides. `product` builds the cells of an N x M x ... grid.

Each cell runs through `spark_jax.jobs.run` in its own directory `<workdir>/cells/<name>` (the name is made
from its labels, so it is stable across runs and machines):

  cells/<name>/grid_cell.json   labels, overrides and the cell's full config, written before the job starts; a
                                rerun with another config for the same cell is an error, not a silent mix
  cells/<name>/summary.json     the job's returned summary, written last: a cell is finished iff it exists

Finished cells are skipped, so a killed grid continues where it stopped (an unfinished cell's own job resumes
its shards). With `num_workers=k`, cell j belongs to worker j mod k: k machines share one workdir without locks
or atomic renames across machines. Whoever finds every cell finished writes the table (`table.csv`,
`table.md`, `results.json`), the plot (`grid.png`) and the grid's `summary.json`; `mode=collect` does only
that.

Metrics are `((column, "file:dotted.path"), ...)` read from each cell directory: `summary.json` when no file is given;
a `.jsonl` file (e.g. a training metrics log) gives the last row that holds the path. `{axis}` in a spec is
replaced by the cell's label for that axis, e.g. `aggregate/summary.json:data_quality.{variant}.final.all.accuracy`.
A metric absent in some cells is left blank there (and listed in results.json); absent in every cell, it is an
error (a wrong spec).
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import itertools
import json
import logging
import math
import os
import re
import time
from typing import Any, Mapping, Sequence

from spark_jax import io

CELL_FILE = "grid_cell.json"
SUMMARY_FILE = "summary.json"
_MAX_NAME = 96
_PLACEHOLDER_RE = re.compile(r"\{([^{}]+)\}")
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------------ cells


def product(axes: Mapping[str, Any]) -> list[dict]:
  """The cells of a full product grid, in row-major order of `axes` (the last axis varies fastest).

  Each axis is either a dotted config key with a sequence of values (`{"verify.num_verifications": (1, 4)}`,
  label = the value) or a name with `{label: overrides}` (`{"variant": {"step": {"a.b": 1}, ...}}`).
  """
  if not axes:
    raise ValueError("product: no axes; pass {axis: values} with at least one axis.")
  options = []
  for axis, values in axes.items():
    if isinstance(values, Mapping):
      choices = []
      for label, overrides in values.items():
        if not isinstance(overrides, Mapping):
          raise TypeError(f"product: axis {axis!r} value {label!r} maps to {overrides!r}; a labelled axis maps "
                          "each label to a dict of dotted-key overrides.")
        choices.append((label, dict(overrides)))
    elif isinstance(values, (list, tuple)):
      choices = [(v, {axis: v}) for v in values]
    else:
      raise TypeError(f"product: axis {axis!r} = {values!r}; give a list of values or {{label: overrides}}.")
    if not choices:
      raise ValueError(f"product: axis {axis!r} has no values.")
    options.append([(axis, label, overrides) for label, overrides in choices])
  cells = []
  for combo in itertools.product(*options):
    labels, overrides = {}, {}
    for axis, label, over in combo:
      clash = sorted(set(overrides) & set(over))
      if clash:
        raise ValueError(f"product: axis {axis!r} overrides {clash} that another axis also sets; each key may "
                         "come from one axis only.")
      labels[axis] = label
      overrides.update(over)
    cells.append({"labels": labels, "overrides": overrides})
  return cells


def with_overrides(cells: Sequence[Mapping[str, Any]], overrides: Mapping[str, Any]) -> list[dict]:
  """The cells with `overrides` added to each (settings shared by the whole grid); labels are unchanged."""
  out = []
  for j, cell in enumerate(cells):
    cell = normalize_cell(cell, j)
    clash = sorted(set(cell["overrides"]) & set(overrides))
    if clash:
      raise ValueError(f"with_overrides: cell {j} ({cell['labels']}) already sets {clash}; a shared override "
                       "may not also vary per cell.")
    out.append({"labels": cell["labels"], "overrides": {**overrides, **cell["overrides"]}})
  return out


def normalize_cell(cell: Mapping[str, Any], index: int) -> dict:
  """`{"labels", "overrides"}` as is; a plain dict of overrides becomes a cell labelled by its overrides."""
  if not isinstance(cell, Mapping):
    raise TypeError(f"grid cell {index} is {cell!r}; a cell is a dict of dotted-key overrides or "
                    "{'labels': ..., 'overrides': ...}.")
  if set(cell) and set(cell) <= {"labels", "overrides"} and "overrides" in cell:
    labels, overrides = dict(cell.get("labels") or {}), dict(cell["overrides"])
    if not labels:
      labels = dict(overrides)
  else:
    labels, overrides = dict(cell), dict(cell)
  return {"labels": labels, "overrides": overrides}


def _label_text(value: Any) -> str:
  if isinstance(value, (list, tuple)):
    return "+".join(_label_text(v) for v in value)
  return str(value)


def cell_name(labels: Mapping[str, Any]) -> str:
  """A directory name from the labels: `N=4__aggregation=step`; long names keep a prefix and a hash."""
  parts = [f"{k.rsplit('.', 1)[-1]}={_label_text(v)}" for k, v in labels.items()]
  name = re.sub(r"[^A-Za-z0-9._=+-]", "_", "__".join(parts)) or "base"
  if len(name) > _MAX_NAME:
    digest = hashlib.sha1(json.dumps(labels, sort_keys=True, default=str).encode()).hexdigest()[:10]
    name = f"{name[:_MAX_NAME - 11]}-{digest}"
  return name


# ------------------------------------------------------------------------------------------------ configs


def load_config_module(spec: str):
  """`configs/<job>.py[:variant]` (relative to the working directory or the repository) -> its config."""
  path, _, variant = spec.partition(":")
  candidates = [path] if os.path.isabs(path) else [path, os.path.join(_REPO_ROOT, path)]
  found = next((p for p in candidates if os.path.isfile(p)), None)
  if found is None:
    raise FileNotFoundError(f"grid base config {spec!r}: no file {path!r} (looked in {candidates}); use "
                            "'configs/<job>.py' or 'configs/<job>.py:<variant>', as for --config.")
  module_name = "grid_base_" + re.sub(r"\W", "_", os.path.abspath(found))
  loader = importlib.machinery.SourceFileLoader(module_name, found)
  module = importlib.util.module_from_spec(importlib.util.spec_from_loader(module_name, loader))
  loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise AttributeError(f"grid base config {found} has no get_config().")
  return module.get_config(variant) if variant else module.get_config()


def apply_overrides(config, overrides: Mapping[str, Any], *, where: str = ""):
  """Sets each dotted key on the (locked) config; an unknown key or a value of the wrong type is an error."""
  for key, value in overrides.items():
    node, parts = config, key.split(".")
    for depth, part in enumerate(parts):
      keys = sorted(node.keys()) if hasattr(node, "keys") else []
      if part not in keys:
        prefix = ".".join(parts[:depth]) or "<top level>"
        raise KeyError(f"{where}override {key!r}: {prefix} has no field {part!r} (fields: {keys}); fix the key "
                       "in the grid config.")
      if depth < len(parts) - 1:
        node = node[part]
    old = node[parts[-1]]
    if isinstance(old, tuple) and isinstance(value, list):
      value = tuple(value)
    try:
      node[parts[-1]] = value
    except (TypeError, ValueError) as e:
      raise TypeError(f"{where}override {key!r} = {value!r}: {e}") from None
  return config


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(d, Mapping):
    out = {}
    for k, v in d.items():
      out.update(_flatten(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: d}


def _metric_pairs(metrics) -> dict[str, str]:
  """Metrics as `((column, spec), ...)` (columns keep this order) or a dict (a ConfigDict sorts its keys)."""
  pairs = list(metrics.items()) if hasattr(metrics, "items") else list(metrics)
  for pair in pairs:
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
      raise TypeError(f"config.metrics entry {pair!r}: give (column, 'file:dotted.path') pairs.")
  out = dict(pairs)
  if len(out) != len(pairs):
    raise ValueError(f"config.metrics names a column twice: {[c for c, _ in pairs]}.")
  return out


class Grid:
  """The cells of one grid config, each with its name, directory and full job config."""

  def __init__(self, config):
    if config.num_workers < 1 or not 0 <= config.worker < config.num_workers:
      raise ValueError(f"config.worker={config.worker}, config.num_workers={config.num_workers}: need "
                       "num_workers >= 1 and 0 <= worker < num_workers.")
    if not config.cells:
      raise ValueError(f"grid {config.name!r} has no cells; define config.cells (see spark_jax.grid.product).")
    self.config = config
    self.workdir = config.workdir
    self.cells = []
    names = {}
    for j, raw in enumerate(config.cells):
      cell = normalize_cell(raw, j)
      cell["name"] = cell_name(cell["labels"])
      if cell["name"] in names:
        raise ValueError(f"grid cells {names[cell['name']]} and {j} have the same labels {cell['labels']}; "
                         "give every cell distinct labels.")
      names[cell["name"]] = j
      cell["index"] = j
      cell["dir"] = os.path.join(self.workdir, "cells", cell["name"])
      job_config = load_config_module(config.base)
      apply_overrides(job_config, cell["overrides"], where=f"grid {config.name!r} cell {j} ({cell['name']}): ")
      job_config.workdir = cell["dir"]
      cell["config"] = job_config
      self.cells.append(cell)
    self.axes = list(dict.fromkeys(k for c in self.cells for k in c["labels"]))
    self.metrics = _metric_pairs(config.metrics)
    clash = [m for m in self.metrics if m in self.axes or m == "cell"]
    if clash:
      raise ValueError(f"config.metrics columns {clash} clash with the table's 'cell' or axis columns {self.axes}; "
                       "rename them.")
    if config.plot.x and config.plot.x not in self.axes:
      raise KeyError(f"config.plot.x={config.plot.x!r} is not an axis of grid {config.name!r} (axes: {self.axes}).")
    unknown = [m for m in config.plot.metrics if m not in self.metrics]
    if unknown:
      raise KeyError(f"config.plot.metrics names {unknown}, which are not metrics of the grid ({list(self.metrics)}).")
    for column, spec in self.metrics.items():  # before any cell runs: a typo must not surface hours later
      for cell in self.cells:
        missing = [p for p in _PLACEHOLDER_RE.findall(spec) if p not in cell["labels"]]
        if missing:
          raise KeyError(f"metric {column!r} = {spec!r}: placeholder {{{missing[0]}}} is not an axis of cell "
                         f"{cell['name']} (axes: {sorted(cell['labels'])}).")

  def mine(self) -> list[dict]:
    k, i = self.config.num_workers, self.config.worker
    return [c for c in self.cells if c["index"] % k == i]

  @staticmethod
  def finished(cell: dict) -> bool:
    return os.path.exists(os.path.join(cell["dir"], SUMMARY_FILE))

  @staticmethod
  def _comparable(cell: dict) -> dict:
    flat = _flatten(json.loads(cell["config"].to_json(sort_keys=True)))
    flat.pop("workdir", None)  # the grid may be moved or mounted elsewhere
    return flat

  def check_cell_file(self, cell: dict) -> None:
    """A cell directory started under another config must not be resumed or collected as this cell."""
    path = os.path.join(cell["dir"], CELL_FILE)
    if not os.path.exists(path):
      return
    with open(path) as f:
      old = _flatten(json.load(f)["config"])
    old.pop("workdir", None)
    new = self._comparable(cell)
    diff = sorted(k for k in set(old) | set(new) if old.get(k, "<absent>") != new.get(k, "<absent>"))
    if diff:
      shown = ", ".join(f"{k}: {old.get(k, '<absent>')!r} -> {new.get(k, '<absent>')!r}" for k in diff[:5])
      raise ValueError(f"{path}: cell {cell['name']!r} was started with another config ({len(diff)} field(s) "
                       f"differ: {shown}); use a new grid workdir, or delete {cell['dir']} to rerun the cell.")

  def write_cell_file(self, cell: dict) -> None:
    io.write_json_atomic(os.path.join(cell["dir"], CELL_FILE), {
        "grid": self.config.name, "index": cell["index"], "name": cell["name"], "labels": cell["labels"],
        "overrides": cell["overrides"], "config": json.loads(cell["config"].to_json(sort_keys=True))})


# ------------------------------------------------------------------------------------------------ metrics


def _resolve(obj: Any, dotted: str) -> tuple[bool, Any]:
  for part in dotted.split("."):
    if isinstance(obj, Mapping) and part in obj:
      obj = obj[part]
    elif isinstance(obj, list) and re.fullmatch(r"-?\d+", part) and -len(obj) <= int(part) < len(obj):
      obj = obj[int(part)]
    else:
      return False, obj
  return True, obj


class MetricMissing(LookupError):
  """A metric's file or path is absent in a cell (the message names the spec, file and where the path stops)."""


def read_metric(cell_dir: str, spec: str, labels: Mapping[str, Any]) -> Any:
  """One metric of one cell (see the module docstring for `spec`)."""

  def fill(m):
    if m.group(1) not in labels:
      raise KeyError(f"metric {spec!r}: placeholder {{{m.group(1)}}} is not an axis of the cell (axes: "
                     f"{sorted(labels)}).")
    return _label_text(labels[m.group(1)])

  resolved = _PLACEHOLDER_RE.sub(fill, spec)
  file, sep, dotted = resolved.rpartition(":")
  if not sep:
    file, dotted = SUMMARY_FILE, resolved
  path = os.path.join(cell_dir, file)
  if not os.path.exists(path):
    raise MetricMissing(f"metric {spec!r}: {path} does not exist; check the file part of the metric.")
  if file.endswith(".jsonl"):
    rows = io.read_records(path, on_error="raise")
    for row in reversed(rows):
      ok, value = _resolve(row, dotted)
      if ok:
        return value
    raise MetricMissing(f"metric {spec!r}: no row of {path} has {dotted!r}.")
  with open(path) as f:
    data = json.load(f)
  ok, value = _resolve(data, dotted)
  if not ok:
    keys = sorted(value) if isinstance(value, Mapping) else type(value).__name__
    raise MetricMissing(f"metric {spec!r}: {path} has no {dotted!r} (the path stops at a level with keys {keys}).")
  return value


def collect(grid: Grid) -> tuple[list[dict], dict[str, list[str]]]:
  """One row per cell (its name, labels and metrics) and, per column, the cells that lack the metric.

  A metric absent in some cells is a result (e.g. a data variant that kept no solution trained no PRM): the
  cell is left blank and named in the second return value. Absent in every cell, it is a wrong spec: an error.
  """
  pending = [c["name"] for c in grid.cells if not grid.finished(c)]
  if pending:
    raise RuntimeError(f"grid {grid.config.name!r}: {len(pending)} cell(s) not finished (e.g. {pending[0]}); run "
                       "the grid (or every worker) first.")
  rows, missing, first_error = [], {}, {}
  for cell in grid.cells:
    grid.check_cell_file(cell)
    row = {"cell": cell["name"], **{a: cell["labels"].get(a) for a in grid.axes}}
    for column, spec in grid.metrics.items():
      try:
        row[column] = read_metric(cell["dir"], spec, cell["labels"])
      except MetricMissing as e:
        row[column] = None
        missing.setdefault(column, []).append(cell["name"])
        first_error.setdefault(column, e)
    rows.append(row)
  for column, cells in missing.items():
    if len(cells) == len(grid.cells):
      raise first_error[column]
    logging.warning("grid %s: metric %r is absent in %d of %d cells (left blank): %s", grid.config.name, column,
                    len(cells), len(grid.cells), first_error[column])
  return rows, missing


def _format(value: Any) -> str:
  if value is None:
    return ""
  if isinstance(value, float):
    return "nan" if math.isnan(value) else f"{value:.4g}"
  if isinstance(value, (list, tuple, dict)):
    return json.dumps(value)
  return str(value)


def write_table(grid: Grid, rows: list[dict], missing: Mapping[str, list[str]]) -> dict[str, str]:
  import csv
  columns = list(rows[0]) if rows else ["cell"]
  paths = {"csv": os.path.join(grid.workdir, "table.csv"), "markdown": os.path.join(grid.workdir, "table.md"),
           "json": os.path.join(grid.workdir, "results.json")}
  with io.atomic_path(paths["csv"]) as tmp, open(tmp, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(columns)
    for row in rows:
      writer.writerow([_format(row[c]) for c in columns])
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(_format(row[c]) for c in columns) + " |" for row in rows]
  markdown = "\n".join(lines)
  io.write_text_atomic(paths["markdown"], f"# grid {grid.config.name}\n\nbase: `{grid.config.base}`\n\n{markdown}\n")
  io.write_json_atomic(paths["json"], {"grid": grid.config.name, "base": grid.config.base, "axes": grid.axes,
                                       "metrics": grid.metrics, "rows": rows, "missing": dict(missing)})
  print(markdown)
  return paths


def plot_grid(grid: Grid, rows: list[dict]) -> str | None:
  """One panel per numeric metric: the metric against the x axis, one line per value of the other axes."""
  from spark_jax import plots
  p = grid.config.plot
  x = p.x or (grid.axes[0] if grid.axes else "")
  if not x:
    return None
  metrics = list(p.metrics) or [m for m in grid.metrics
                                if all(plots.is_number(r[m]) or r[m] is None for r in rows)]
  if not metrics:
    return None
  others = [a for a in grid.axes if a != x]
  panels = {}
  for m in metrics:
    series: dict[str, tuple[list, list]] = {}
    for r in rows:
      key = ", ".join(f"{a}={_label_text(r[a])}" for a in others) or m
      xs, ys = series.setdefault(key, ([], []))
      xs.append(r[x])
      ys.append(float("nan") if r[m] is None else float(r[m]))
    panels[m] = series
  return plots.line_panels(os.path.join(grid.workdir, "grid.png"), panels, xlabel=x,
                           title=f"grid {grid.config.name}")


# ------------------------------------------------------------------------------------------------ the job


def run_grid(config) -> dict:
  """Runs this worker's unfinished cells, then writes the table if every cell is finished."""
  from spark_jax import jobs
  if config.mode not in ("run", "collect"):
    raise ValueError(f"config.mode={config.mode!r}; use 'run' or 'collect'.")
  grid = Grid(config)
  os.makedirs(grid.workdir, exist_ok=True)
  for cell in grid.cells:
    grid.check_cell_file(cell)  # before any work: a stale cell should stop the grid, not a later worker
  mine = grid.mine()
  ran = []
  if config.mode == "run":
    todo = [c for c in mine if not grid.finished(c)]
    logging.info("grid %s: %d cells, worker %d/%d owns %d, %d to run", config.name, len(grid.cells),
                 config.worker, config.num_workers, len(mine), len(todo))
    for n, cell in enumerate(todo, start=1):
      print(f"grid {config.name}: cell {n}/{len(todo)} {cell['name']} ({cell['config'].job})", flush=True)
      grid.write_cell_file(cell)
      start = time.time()
      summary = jobs.run(cell["config"])
      io.write_summary(cell["dir"], summary if isinstance(summary, dict) else {"result": summary})
      logging.info("grid %s: cell %s finished in %.1f s", config.name, cell["name"], time.time() - start)
      ran.append(cell["name"])
  pending = [c for c in grid.cells if not grid.finished(c)]
  summary = {"job": "grid", "grid": config.name, "cells": len(grid.cells), "ran": ran,
             "pending": [c["name"] for c in pending]}
  if pending:
    owners = sorted({c["index"] % config.num_workers for c in pending})
    print(f"grid {config.name}: {len(pending)} cell(s) still to run by worker(s) {owners}; the last worker to "
          f"finish writes the table (or run with --config.mode=collect).")
    if config.mode == "collect":
      collect(grid)  # raises, naming the unfinished cells
    return summary
  rows, missing = collect(grid)
  paths = write_table(grid, rows, missing)
  plot = plot_grid(grid, rows)
  if plot:
    paths["plot"] = plot
  for kind, path in paths.items():
    print(f"grid {config.name}: {kind} -> {path}")
  summary.update(paths=paths, rows=rows, missing=missing)
  io.write_summary(grid.workdir, summary)
  return summary
