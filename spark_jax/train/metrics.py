"""What a training job shows and records: the console bar, TensorBoard, metrics.jsonl, the finiteness stop,
and where library logs go.

- `MetricsWriter`: on process 0 (other processes stay silent), every step's metrics go to
  workdir/metrics.jsonl; every `log_every` steps the means over the window go to TensorBoard
  (workdir/tensorboard, "<prefix>/<name>") and to one console line; a tqdm bar shows steps, their rate, the
  ETA and the latest loss and throughput.
- `check_finite`: a NaN/Inf loss or gradient norm stops the run with an error naming the step.
- `library_logs`: while a job runs, INFO lines of the libraries (orbax's checkpoint-manager internals, grain,
  jax) go to workdir/logs.txt instead of the console, so the console holds the bar and the job's own lines;
  warnings and errors still reach the console, and verbose=True shows everything.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np

LOG_FILE = "logs.txt"


def check_finite(step: int, metrics: Mapping[str, float], keys: Sequence[str] = ("loss", "grad_norm"), *,
                 context: str = "") -> None:
  """Raises FloatingPointError "step N: loss=nan is not finite; ..." when a `keys` metric is NaN or Inf."""
  bad = {k: metrics[k] for k in keys if k in metrics and not math.isfinite(float(metrics[k]))}
  if bad:
    raise FloatingPointError(
        f"step {step}: {', '.join(f'{k}={v}' for k, v in bad.items())} is not finite; the run stopped. "
        + (context + " " if context else "") + "Lower the learning rate or the gradient clipping threshold, try "
        "float32 compute to rule out bf16 overflow, or check the step's data.")


class MetricsWriter:
  """Console (tqdm bar + periodic lines), TensorBoard and metrics.jsonl on process 0; silent elsewhere.

  Args:
    workdir: where tensorboard/ and metrics.jsonl go (metrics.jsonl is appended to: a resumed run re-logs the
      steps after its checkpoint, and readers keep the last entry per step).
    total, initial: the bar's last and first step.
    desc: the bar's label (the job name).
    log_every: TensorBoard and console lines every K "train" steps (and on `flush`).
    console_keys: metrics shown in the console line, in order (others still go to TensorBoard and the file).
    progress_bar: show the tqdm bar.
    enabled: default: process 0 only.
  """

  def __init__(self, workdir: str, *, total: int, initial: int = 0, desc: str = "train", log_every: int = 1,
               console_keys: Sequence[str] = ("loss", "accuracy", "lr", "grad_norm", "tokens_per_s", "mfu"),
               progress_bar: bool = True, enabled: bool | None = None):
    import jax
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.total, self.log_every, self.console_keys = int(total), max(1, int(log_every)), tuple(console_keys)
    self.window: list[dict] = []
    self.tb = self.jsonl = self.bar = None
    if not self.enabled:
      return
    import tqdm
    from tensorboardX import SummaryWriter
    os.makedirs(workdir, exist_ok=True)
    self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
    self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
    self.bar = tqdm.tqdm(total=total, initial=initial, disable=not progress_bar, dynamic_ncols=True, desc=desc,
                         unit="step")

  def write(self, step: int, metrics: Mapping[str, float], prefix: str = "train") -> None:
    """Records one step's metrics. "train" metrics also advance the bar and join the logging window; any
    other prefix (e.g. "eval") goes to TensorBoard and the console at once."""
    if not self.enabled:
      return
    values = {k: float(v) for k, v in metrics.items()}
    self.jsonl.write(json.dumps({"step": int(step), **values}) + "\n")
    self.jsonl.flush()
    if prefix != "train":
      self._emit(step, values, prefix)
      return
    self.window.append(values)
    postfix = {k: f"{values[k]:.4g}" for k in ("loss", "tokens_per_s") if k in values}
    if self.bar is not None:
      self.bar.set_postfix(postfix, refresh=False)
      self.bar.update(max(0, int(step) - self.bar.n))
    if step % self.log_every == 0 or step == self.total:
      self.flush(step)

  def flush(self, step: int) -> None:
    """Means of the window's train metrics to TensorBoard and the console."""
    if not self.enabled or not self.window:
      return
    keys = [k for k in self.window[-1] if all(k in w for w in self.window)]
    means = {k: float(np.mean([w[k] for w in self.window])) for k in keys}
    self.window.clear()
    self._emit(step, means, "train")

  def _emit(self, step: int, values: Mapping[str, float], prefix: str) -> None:
    for k, v in values.items():
      self.tb.add_scalar(f"{prefix}/{k}", v, step)
    self.tb.flush()
    shown = [k for k in self.console_keys if k in values] + sorted(
        k for k in values if prefix != "train" and k not in self.console_keys)
    self.console(f"step {step}/{self.total}" + ("" if prefix == "train" else f" {prefix}") + "  "
                 + "  ".join(f"{k} {_fmt(values[k])}" for k in shown))

  def console(self, line: str) -> None:
    """One line of the job's own output, printed above the bar (process 0 only)."""
    if self.enabled:
      import tqdm
      tqdm.tqdm.write(line)

  def close(self) -> None:
    if self.enabled:
      self.bar.close()
      self.tb.close()
      self.jsonl.close()
      self.enabled = False


def _fmt(v: float) -> str:
  return f"{v:.0f}" if abs(v) >= 1000 else f"{v:.4g}"


class _BelowWarning(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING


@contextlib.contextmanager
def library_logs(workdir: str, *, verbose: bool = False,
                 loggers: Iterable[str] = ("absl", "orbax", "jax", "grain")) -> Iterator[str]:
  """Routes log records of INFO and below to workdir/logs.txt; the console handlers keep WARNING and above
  (all of them with verbose=True). Yields the log file's path; restores every handler and level on exit.

  Why a file and not silence: orbax's manager lines say when each checkpoint was committed and how long it
  took, which is what one reads after a preemption; they are just not console material.
  """
  path = os.path.join(workdir, LOG_FILE)
  os.makedirs(workdir, exist_ok=True)
  root = logging.getLogger()
  handler = logging.FileHandler(path)
  handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
  console_filter = _BelowWarning()
  consoles = [h for h in root.handlers if not isinstance(h, logging.FileHandler)]  # e.g. absl's handler
  if not verbose:
    for h in consoles:
      h.addFilter(console_filter)
  levels = {name: logging.getLogger(name).level for name in ("", *loggers)}
  root.addHandler(handler)  # with a handler on the root, logging's last-resort stderr handler stays unused
  root.setLevel(min(root.level or logging.WARNING, logging.INFO))
  for name in loggers:
    lg = logging.getLogger(name)
    if lg.level == logging.NOTSET or lg.level > logging.INFO:
      lg.setLevel(logging.INFO)
  try:
    yield path
  finally:
    root.removeHandler(handler)
    handler.close()
    for h in consoles:
      h.removeFilter(console_filter)
    for name, level in levels.items():
      logging.getLogger(name).setLevel(level)
