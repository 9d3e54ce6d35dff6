"""PNG plots for grids and reports: metric vs a swept knob, bars per variant, training curves per run.

Every function takes plain Python data (lists, dicts), writes one PNG atomically and returns its path, so the
report and grid code stay free of matplotlib. The Agg backend is forced: jobs run headless (CI, TPU VMs).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Mapping, Sequence

Series = Mapping[str, tuple[Sequence[Any], Sequence[float]]]


def is_number(value: Any) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _pyplot():
  import matplotlib
  matplotlib.use("Agg", force=True)
  import matplotlib.pyplot as plt
  return plt


def _save(fig, path: str) -> str:
  from spark_jax import io
  try:
    with io.atomic_path(path) as tmp:
      fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
  finally:
    _pyplot().close(fig)
  return path


def _check_series(name: str, xs: Sequence[Any], ys: Sequence[float]) -> None:
  if len(xs) != len(ys):
    raise ValueError(f"series {name!r}: {len(xs)} x values but {len(ys)} y values.")
  bad = [y for y in ys if not (is_number(y) or y is None)]
  if bad:
    raise TypeError(f"series {name!r}: y values must be numbers (or None for a gap), got {bad[:3]}.")


def _draw_lines(ax, series: Series, *, logx: bool | None) -> None:
  """Numeric x on a numeric axis (log when all > 0 and spanning 10x, unless `logx` says); else categories."""
  all_x = [x for xs, _ in series.values() for x in xs]
  numeric = all(is_number(x) for x in all_x)
  categories = list(dict.fromkeys(all_x)) if not numeric else []
  for name, (xs, ys) in series.items():
    pairs = sorted(zip(xs, ys), key=lambda p: p[0]) if numeric else [(categories.index(x), y) for x, y in zip(xs, ys)]
    ax.plot([p[0] for p in pairs], [math.nan if p[1] is None else p[1] for p in pairs], marker="o", label=name)
  if numeric and all_x:
    positive = all(x > 0 for x in all_x)
    if logx or (logx is None and positive and max(all_x) >= 10 * min(all_x)):
      ax.set_xscale("log", base=2 if all(float(x).is_integer() for x in all_x) else 10)
    ticks = sorted(set(all_x))
    if len(ticks) <= 12:
      ax.set_xticks(ticks)
      ax.set_xticklabels([f"{t:g}" for t in ticks])
      ax.minorticks_off()
  elif categories:
    ax.set_xticks(range(len(categories)))
    ax.set_xticklabels([str(c) for c in categories])
  ax.grid(True, alpha=0.3)
  if len(series) > 1:
    ax.legend(fontsize=8)


def line_plot(path: str, series: Series, *, xlabel: str = "", ylabel: str = "", title: str = "",
              logx: bool | None = None) -> str:
  """One line per series `{name: (xs, ys)}`: e.g. label accuracy vs N, one line per aggregation."""
  if not series:
    raise ValueError(f"line_plot {path}: no series to draw.")
  for name, (xs, ys) in series.items():  # before a figure exists: a bad input leaves no file and no open figure
    _check_series(name, xs, ys)
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6, 4))
  _draw_lines(ax, series, logx=logx)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  return _save(fig, path)


def line_panels(path: str, panels: Mapping[str, Series], *, xlabel: str = "", title: str = "",
                logx: bool | None = None) -> str:
  """Several `line_plot`s side by side, one per metric (the panel's name is its y label)."""
  if not panels:
    raise ValueError(f"line_panels {path}: no panels to draw.")
  for panel, series in panels.items():
    if not series:
      raise ValueError(f"line_panels {path}: panel {panel!r} has no series.")
    for name, (xs, ys) in series.items():
      _check_series(name, xs, ys)
  plt = _pyplot()
  cols = min(3, len(panels))
  rows = -(-len(panels) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
  for ax, (name, series) in zip(axes.flat, panels.items()):
    _draw_lines(ax, series, logx=logx)
    ax.set_xlabel(xlabel)
    ax.set_title(name, fontsize=10)
  for ax in list(axes.flat)[len(panels):]:
    ax.set_visible(False)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  return _save(fig, path)


def bar_chart(path: str, values: Mapping[str, Any], *, ylabel: str = "", title: str = "",
              ylim: tuple[float, float] | None = None) -> str:
  """Bars per variant: `{variant: value}`, or grouped `{group: {variant: value}}` (e.g. F1 per split per PRM).

  Values are printed above their bars; None leaves a gap (a variant that produced no model).
  """
  if not values:
    raise ValueError(f"bar_chart {path}: no values to draw.")
  grouped = all(isinstance(v, Mapping) for v in values.values())
  if not grouped and any(isinstance(v, Mapping) for v in values.values()):
    raise TypeError(f"bar_chart {path}: mix of plain and grouped values; use {{name: value}} or "
                    "{group: {name: value}}.")
  groups = dict(values) if grouped else {"": dict(values)}
  bars = list(dict.fromkeys(b for g in groups.values() for b in g))
  for g, row in groups.items():
    bad = {b: v for b, v in row.items() if not (is_number(v) or v is None)}
    if bad:
      raise TypeError(f"bar_chart {path}: group {g!r} has non-numeric values {bad}.")
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(max(5.0, 0.6 * len(bars) * len(groups) + 2), 4))
  # Grouped: one cluster per group, one colour per bar name. Plain: one bar per name, spaced like clusters.
  width = 0.8 / len(bars) if grouped else 0.7
  for j, bar in enumerate(bars):
    xs = [i + (j - (len(bars) - 1) / 2) * width for i in range(len(groups))] if grouped else [j]
    ys = [groups[g].get(bar) for g in groups]
    drawn = ax.bar(xs, [0.0 if y is None else y for y in ys], width=width, label=bar if grouped else None,
                   color=f"C{j % 10}")
    for rect, y in zip(drawn, ys):
      x_mid = rect.get_x() + rect.get_width() / 2
      if y is None:
        rect.set_visible(False)
        ax.annotate("n/a", (x_mid, 0), ha="center", va="bottom", fontsize=7)
      else:
        ax.annotate(f"{y:.3g}", (x_mid, rect.get_height()), ha="center", va="bottom", fontsize=7)
  if grouped:
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(list(groups))
    ax.legend(fontsize=8)
  else:
    ax.set_xticks(range(len(bars)))
    ax.set_xticklabels(bars, rotation=20, ha="right")
  if ylim is not None:
    ax.set_ylim(*ylim)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.grid(True, axis="y", alpha=0.3)
  return _save(fig, path)


def curves(path: str, runs: Mapping[str, Mapping[str, tuple[Sequence[float], Sequence[float]]]], *,
           xlabel: str = "step", title: str = "") -> str:
  """Training curves: `{metric: {run: (steps, values)}}`, one panel per metric, one line per run.

  E.g. RL accuracy and reward per reward type: `{"accuracy": {"rlvr": (steps, acc), "random": ...}, ...}`.
  """
  return line_panels(path, runs, xlabel=xlabel, title=title, logx=False)


def read_metrics_jsonl(path: str, keys: Sequence[str], *, step_key: str = "step") -> dict[str, tuple[list, list]]:
  """`{key: (steps, values)}` from a metrics.jsonl log, keeping rows that hold the key (eval rows are sparse)."""
  import json
  out: dict[str, tuple[list, list]] = {k: ([], []) for k in keys}
  with open(path) as f:
    for line_no, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}: line {line_no} is not valid JSON ({e.msg}).") from None
      for k in keys:
        if k in row and step_key in row:
          out[k][0].append(row[step_key])
          out[k][1].append(row[k])
  return out
