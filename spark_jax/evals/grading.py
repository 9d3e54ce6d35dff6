"""The one answer grader: extraction, equivalence and a hang-proof process pool.

Stage I curation (SPEC 2.3), RL rewards (RLVR baselines, diagnostics) and the math evaluations (D11) all
grade answers here, so that "correct" means the same in every table.

Pipeline for one (response, gold) pair:
  1. `extract_answer(response)`: SPEC 2.3 — drop the reasoning up to `</think>`; the first `Answer:` line;
     else the last `\\boxed{...}` (nested braces matched); else a short last line that looks like math.
  2. `is_equivalent(pred, gold)`: SPEC 2.3 string normalisation and equality first (cheap, and it settles
     most correct answers), then math_verify with both sides parsed as `$…$` (D11).
  3. `grade_batch` / `GradingPool`: many pairs in worker processes with a hard per-answer timeout.

Why a pool with hard kills: math_verify calls sympy, and some answers (`10^{10^{7}}`, huge powers of
surds, pathological expressions) take seconds to minutes or hang in C code that no signal interrupts. In an
RL step with thousands of rollouts one such answer must cost at most `timeout_s`, count as wrong and never
block the batch. Workers are started with `spawn` (or `forkserver`), never `fork`: a forked JAX process
can deadlock.

Gold answers arrive as plain strings, numbers (AMC23 stores 27.0), lists, or the JSON-list strings of
the Skywork data ('["1156"]'); `normalize_gold` turns each into a list of strings, and a prediction is
correct when it matches any of them.
"""

from __future__ import annotations

import ast
import collections
import dataclasses
import functools
import json
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import re
import signal
import threading
import time
import weakref
from typing import Any, Callable, Iterable, Sequence

from spark_jax.text.answers import extract_answer, last_boxed  # noqa: F401  (re-exported for graders)

DEFAULT_TIMEOUT_S = 10.0

# A check function takes (prediction, gold strings, timeout in seconds) and returns correctness. It must be
# a module-level function so that spawned workers can unpickle it.
CheckFn = Callable[[str, list[str], float], bool]

_log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------------
# Gold answers and normalisation
# ---------------------------------------------------------------------------------------------------------


def _scalar_to_str(x: Any) -> str:
  """Numbers to their plain decimal text: 27.0 -> "27" (AMC23 stores integers as floats), 0.5 -> "0.5"."""
  if isinstance(x, bool):
    raise TypeError(f"gold answer {x!r} is a bool; expected a string or a number.")
  if isinstance(x, int):
    return str(x)
  if isinstance(x, float):
    if not math.isfinite(x):
      raise ValueError(f"gold answer {x!r} is not finite; fix the data row.")
    return str(int(x)) if x.is_integer() else repr(x)
  if isinstance(x, str):
    return x
  # numpy scalars (parquet columns) and other number-likes.
  if hasattr(x, "item"):
    return _scalar_to_str(x.item())
  raise TypeError(f"gold answer element {x!r} has type {type(x).__name__}; expected str, int or float.")


def normalize_gold(gt: Any) -> list[str]:
  """Turns a ground truth into a non-empty list of answer strings; a prediction may match any of them.

  Accepts a str, a number, a list/tuple/numpy array of those, or a JSON-list string as in the Skywork
  data ('["1156"]', also '["a", "b"]' for several accepted answers; a Python-literal list of strings
  "['2']" is read the same way). A bracketed string is only unwrapped when it parses to a list of
  *strings*: the interval "[0, 1]" parses to numbers and stays one answer.

  Raises:
    ValueError / TypeError naming the bad value when it is None, empty, or of an unsupported type.
  """
  if gt is None:
    raise ValueError("gold answer is None; every graded row needs a ground truth (check the data row).")
  if hasattr(gt, "tolist") and not isinstance(gt, str):  # numpy arrays from parquet.
    gt = gt.tolist()
  if isinstance(gt, (list, tuple)):
    out: list[str] = []
    for item in gt:
      out.extend(normalize_gold(item))
    if not out:
      raise ValueError(f"gold answer {gt!r} is an empty list; expected at least one answer.")
    return out
  s = _scalar_to_str(gt).strip()
  if s.startswith("[") and s.endswith("]"):
    parsed: Any = None
    try:
      parsed = json.loads(s)
    except ValueError:
      try:
        parsed = ast.literal_eval(s)
      except (ValueError, SyntaxError, MemoryError, RecursionError):
        parsed = None
    if isinstance(parsed, list) and parsed and all(isinstance(p, str) for p in parsed):
      return normalize_gold(parsed)
  if not s:
    raise ValueError(f"gold answer {gt!r} is empty; expected a non-empty answer string.")
  return [s]


_LEFT_RIGHT_RE = re.compile(r"\\(?:left|right)(?![A-Za-z])")
_SPACING_RE = re.compile(r"\\[!,;:> ]")
_DEGREE_RE = re.compile(r"\^\s*\{?\\circ\}?")
_TEXT_WRAP_RE = re.compile(r"^\\(?:text|textbf|mathrm|mbox)\{(.*)\}$")
_INT_FRACTION_RE = re.compile(r"^(-?\d+)/(\d+)$")
_THOUSANDS_RE = re.compile(r"^-?\d{1,3}(,\d{3})+(\.\d+)?$")


def normalize_answer(s: str) -> str:
  """SPEC 2.3 string normalisation, used for the cheap equality check before math_verify.

  SPEC 2.3 rules: remove newlines, `\\left`, `\\right` and spaces; `\\\\` -> `\\`; `lhs=rhs` with a
  left side of at most 3 characters keeps `rhs` ("x=5" -> "5"); `a/b` of integers -> `\\frac{a}{b}`.
  Additions (spellings that graders, math_verify included, treat as the same answer):
  surrounding `$`, `\\dfrac`/`\\tfrac` -> `\\frac`, LaTeX spacing commands, `^\\circ`, `\\%`, a whole-string
  `\\text{...}`, a final period, and thousands separators in plain numbers ("1,000" -> "1000").
  """
  s = s.replace("\n", "")
  s = _LEFT_RIGHT_RE.sub("", s)
  s = s.replace("\\\\", "\\")
  s = _SPACING_RE.sub("", s)
  s = s.replace(" ", "").replace("\t", "")
  s = s.strip("$")
  s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
  s = _DEGREE_RE.sub("", s)
  s = s.replace("\\%", "").replace("%", "")
  if s.endswith("."):
    s = s[:-1]
  m = _TEXT_WRAP_RE.match(s)
  if m and "}" not in m.group(1):
    s = m.group(1)
  if s.count("=") == 1:
    lhs, rhs = s.split("=")
    if len(lhs) <= 3 and rhs:
      s = rhs
  if _THOUSANDS_RE.match(s):
    s = s.replace(",", "")
  m = _INT_FRACTION_RE.match(s)
  if m:
    s = f"\\frac{{{m.group(1)}}}{{{m.group(2)}}}"
  return s


_INT_RE = re.compile(r"^[-+]?\d{1,100}$")  # Bounded: int() refuses strings over 4,300 digits.


def _quick_verdict(pred: str, golds: Sequence[str]) -> bool | None:
  """Settles a pair without math_verify when that is safe; None = ask math_verify.

  True on normalized string equality with any gold (SPEC 2.3's first test). False when the prediction
  and every gold are plain integers after normalisation and differ in value: math_verify compares
  integers exactly, so the verdict is the same, and integer answers (AIME, AMC, GSM8K, most of the
  Skywork pool) are most of what RL grades. ("025" and "25" are equal here, as in math_verify.)
  """
  p = normalize_answer(pred)
  if not p:
    return None
  normalized = [normalize_answer(g) for g in golds]
  if any(p == n for n in normalized):
    return True
  if _INT_RE.match(p) and all(_INT_RE.match(n) for n in normalized):
    return any(int(p) == int(n) for n in normalized)
  return None


# ---------------------------------------------------------------------------------------------------------
# Equivalence with a time bound
# ---------------------------------------------------------------------------------------------------------


class _AnswerTimeout(BaseException):
  """Raised by our SIGALRM handler. A BaseException so that libraries' `except Exception` can't eat it."""


_TIMED_OUT = object()


def _call_with_time_limit(fn: Callable[[], Any], timeout_s: float | None) -> Any:
  """Runs `fn()`; returns `_TIMED_OUT` if it runs past `timeout_s` seconds.

  Uses a one-shot ITIMER_REAL/SIGALRM (sub-second precision), which only the main thread may install.
  Elsewhere, or with `timeout_s` None/<=0, `fn` runs unbounded: bound it by running it in a `GradingPool`
  worker instead. A SIGALRM timer and handler that were already installed (e.g. by pytest-timeout) are
  restored afterwards with their remaining time. A signal cannot interrupt C code that holds the GIL
  (huge integer powers, some regexes); the pool's hard kill covers that case.
  """
  if (
      timeout_s is None
      or timeout_s <= 0
      or not hasattr(signal, "setitimer")
      or threading.current_thread() is not threading.main_thread()
  ):
    return fn()

  state = {"armed": True}

  def handler(signum, frame):  # pylint: disable=unused-argument
    if state["armed"]:
      state["armed"] = False
      raise _AnswerTimeout()

  start = time.monotonic()
  old_handler = signal.signal(signal.SIGALRM, handler)
  old_delay, old_interval = signal.setitimer(signal.ITIMER_REAL, timeout_s)
  restored = {"done": False}

  def disarm() -> None:
    state["armed"] = False
    if restored["done"]:
      return
    restored["done"] = True
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, old_handler if old_handler is not None else signal.SIG_DFL)
    if old_delay > 0:
      remaining = max(old_delay - (time.monotonic() - start), 1e-6)
      signal.setitimer(signal.ITIMER_REAL, remaining, old_interval)

  try:
    try:
      return fn()
    finally:
      disarm()
  except _AnswerTimeout:
    disarm()
    return _TIMED_OUT


_UNESCAPED_DOLLAR_RE = re.compile(r"(?<!\\)\$")


def _as_math(s: str) -> str:
  """Wraps an answer as `$…$` for math_verify unless it already carries math delimiters."""
  if _UNESCAPED_DOLLAR_RE.search(s) or "\\(" in s or "\\[" in s:
    return s
  return f"${s}$"


class _DropTimeoutDisabledWarning(logging.Filter):
  """Drops math_verify's "Timeout is disabled ..." warning: we do bound time, with our own timer."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Timeout is disabled")


_FILTER = _DropTimeoutDisabledWarning()


def _math_verify_equal(pred: str, golds: Sequence[str]) -> bool:
  """math_verify equivalence, with math_verify's own signal timeouts off (the caller bounds time)."""
  from math_verify import verify  # pylint: disable=g-import-not-at-top  (slow import, ~1 s)

  for name in ("math_verify.grader", "math_verify.parser"):
    logger = logging.getLogger(name)
    if _FILTER not in logger.filters:
      logger.addFilter(_FILTER)

  pred_parsed = _parse(_as_math(pred))
  if not pred_parsed and _as_math(pred) != pred:
    # "18 dollars" parses as a product inside `$…$` but as 18 in plain text.
    pred_parsed = _parse(pred)
  if not pred_parsed:
    return False
  for g in golds:
    gold_parsed = _parse(_as_math(g))
    if gold_parsed and verify(gold_parsed, pred_parsed, timeout_seconds=None):
      return True
  return False


@functools.lru_cache(maxsize=8192)
def _parse(text: str) -> list[Any]:
  """math_verify.parse, memoised: RL grades 16 rollouts against one gold, and rollouts repeat answers.

  Only completed parses are cached (a timeout raises through), and verify does not mutate the parsed
  sympy objects, so sharing them is safe.
  """
  from math_verify import parse  # pylint: disable=g-import-not-at-top

  return parse(text, parsing_timeout=None)


def is_equivalent(pred: Any, gold: Any, timeout_s: float | None = DEFAULT_TIMEOUT_S) -> bool:
  """Whether the extracted answer `pred` equals `gold` (any of its answers, see `normalize_gold`).

  Normalized string equality first (SPEC 2.3), then math_verify with both sides parsed as `$…$` (D11;
  a prediction that already holds `$`, `\\(` or `\\[` is parsed as is). math_verify's own signal.alarm
  timeouts are always switched off (`parsing_timeout=None`, `timeout_seconds=None`): they would clobber
  our timer and they fail outside the main thread. Instead the whole check is bounded by `timeout_s`
  with a SIGALRM timer when running in the main thread; in other threads it runs unbounded — use
  `grade_batch`/`GradingPool` there (its workers run checks in their main thread and are killed when
  they overrun). A timeout, a parse failure or any math_verify error counts as not equivalent.

  Args:
    pred: the extracted answer (see `extract_answer`); None or empty is never correct.
    gold: the ground truth, in any form `normalize_gold` accepts.
    timeout_s: seconds for the math_verify part; None or <= 0 = no bound.
  """
  golds = normalize_gold(gold)
  if pred is None:
    return False
  pred = str(pred).strip()
  if not pred:
    return False
  quick = _quick_verdict(pred, golds)
  if quick is not None:
    return quick
  try:
    result = _call_with_time_limit(lambda: _math_verify_equal(pred, golds), timeout_s)
  except Exception:  # pylint: disable=broad-except  (a grader error is a wrong answer, never a crash)
    _log.debug("math_verify failed on pred=%r gold=%r", pred, golds, exc_info=True)
    return False
  return result is True


def default_check(pred: str, golds: list[str], timeout_s: float) -> bool:
  """The check `GradingPool` workers run by default: `is_equivalent` under the worker's soft timer."""
  return is_equivalent(pred, golds, timeout_s=timeout_s)


# ---------------------------------------------------------------------------------------------------------
# Process pool
# ---------------------------------------------------------------------------------------------------------


def _worker_main(conn: multiprocessing.connection.Connection, check_fn: CheckFn,
                 memory_limit_mb: int | None) -> None:
  """Worker loop: one (task id, pred, golds, timeout) at a time, answering (task id, bool).

  Runs in the worker's main thread, so `is_equivalent`'s SIGALRM timer works and most slow answers end
  cleanly at `timeout_s`; the parent kills the worker only when that fails (C code holding the GIL).
  """
  signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the parent, which shuts workers down.
  logging.getLogger("math_verify").setLevel(logging.CRITICAL)  # Per-answer parse noise; our process.
  if memory_limit_mb:
    try:
      import resource  # pylint: disable=g-import-not-at-top  (POSIX only)
      limit = int(memory_limit_mb) * 1024 * 1024
      resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ImportError, ValueError, OSError):
      pass
  try:  # Warm up imports and math_verify's grammar before announcing readiness, so that start-up time
    _math_verify_equal("\\frac{1}{2}", ["0.5"])  # is not charged to the first answer's timeout.
  except Exception:  # pylint: disable=broad-except
    pass
  conn.send(("ready", os.getpid()))
  while True:
    try:
      msg = conn.recv()
    except (EOFError, OSError):
      return
    if msg is None:
      return
    task_id, pred, golds, timeout_s = msg
    start = time.monotonic()
    try:
      ok = bool(check_fn(pred, golds, timeout_s))
    except BaseException:  # pylint: disable=broad-except  (MemoryError, timeouts: the answer is wrong)
      ok = False
    try:
      conn.send((task_id, ok, time.monotonic() - start))
    except (BrokenPipeError, OSError):
      return


@dataclasses.dataclass
class _Worker:
  process: Any
  conn: multiprocessing.connection.Connection
  started: float
  ready: bool = False
  task: tuple[int, int] | None = None  # (call id, index)
  deadline: float = math.inf


def _kill_workers(workers: list[_Worker]) -> None:
  """Stops workers we started: a polite sentinel to idle ones, SIGKILL for the rest and for stragglers.

  Workers hold no state worth saving, so shutdown does not wait for their interpreter teardown.
  """
  for w in workers:
    try:
      if w.ready and w.task is None:
        w.conn.send(None)
      else:  # Busy (possibly hung) or still starting: nothing to wait for.
        w.process.kill()
    except (OSError, ValueError):
      pass
  deadline = time.monotonic() + 0.2  # Interpreter teardown with sympy loaded can take ~1 s; don't wait.
  for w in workers:
    w.process.join(timeout=max(0.0, deadline - time.monotonic()))
    _stop_worker(w)
  workers.clear()


def _stop_worker(worker: _Worker) -> None:
  """SIGKILL if still alive, reap, close the pipe."""
  if worker.process.is_alive():
    worker.process.kill()
  worker.process.join(timeout=5.0)
  try:
    worker.conn.close()
  except OSError:
    pass


def default_num_workers() -> int:
  """Available CPUs (affinity-aware), capped at 8: math_verify is CPU-bound and needs no more for 1k+."""
  try:
    n = len(os.sched_getaffinity(0))
  except AttributeError:
    n = os.cpu_count() or 1
  return max(1, min(8, n))


class GradingPool:
  """Worker processes that grade (pred, gold) pairs with a hard per-answer timeout.

  Keep one pool alive across RL steps or evaluation chunks (`with GradingPool(...) as pool:`): a worker
  costs about a second to start (math_verify and sympy imports), so `grade_batch` without a pool pays that
  once per call.

  Guarantees, per `grade` call:
    * Results come back in input order, one bool per pair.
    * Pairs settled cheaply in the parent (None/empty prediction, normalized string equality, differing
      plain integers) never reach a worker; each distinct remaining (pred, golds) pair is sent once, one
      pair at a time per worker, so one slow pair never holds up the others.
    * Each pair gets `timeout_s` of soft time inside the worker (SIGALRM, checked between Python
      bytecodes); if the worker has not answered `timeout_s + kill_grace_s` after dispatch, it is killed
      (SIGKILL), the pair counts as wrong, and a fresh worker replaces it. A worker that dies (segfault,
      out of memory under `memory_limit_mb`) likewise counts its pair as wrong.
    * `last_stats` holds counts for the last call: n, quick (settled in the parent), sent_to_workers
      (distinct pairs), soft_timeouts, killed, crashes, worker_seconds, seconds.

  Workers start with the `spawn` method by default (`forkserver` also works): JAX processes must not fork.
  A pool is driven by one thread at a time. As with any spawn-based multiprocessing, a script that creates a pool must guard its entry point with
  `if __name__ == "__main__":`, because workers import the main module.
  """

  def __init__(
      self,
      num_workers: int | None = None,
      timeout_s: float = DEFAULT_TIMEOUT_S,
      *,
      kill_grace_s: float = 2.0,
      start_method: str = "spawn",
      memory_limit_mb: int | None = 4096,
      check_fn: CheckFn = default_check,
      startup_timeout_s: float = 120.0,
  ):
    """Configures the pool; workers start lazily on the first `grade` call that needs them.

    Args:
      num_workers: worker processes (default `default_num_workers()`).
      timeout_s: default soft time limit per pair, seconds.
      kill_grace_s: extra seconds past `timeout_s` before a worker is killed.
      start_method: "spawn" or "forkserver"; "fork" is refused (JAX).
      memory_limit_mb: RLIMIT_AS per worker so that an answer like `10^{10^{10}}` raises MemoryError
        (= wrong) instead of exhausting the host; None = no limit.
      check_fn: module-level function (pred, golds, timeout_s) -> bool run in the workers; the default
        is `is_equivalent`. Tests use it to inject hangs.
      startup_timeout_s: a worker that has not become ready by then is killed and replaced.
    """
    if start_method not in ("spawn", "forkserver"):
      raise ValueError(f"start_method={start_method!r}: use 'spawn' or 'forkserver' (JAX processes must "
                       "not fork).")
    if timeout_s is None or timeout_s <= 0:
      raise ValueError(f"timeout_s={timeout_s!r}: a pool needs a positive per-answer timeout.")
    self.num_workers = default_num_workers() if num_workers is None else int(num_workers)
    if self.num_workers < 1:
      raise ValueError(f"num_workers={num_workers!r}: a pool needs at least 1 worker (grade_batch with "
                       "num_workers=0 grades in-process instead).")
    self.timeout_s = float(timeout_s)
    self.kill_grace_s = float(kill_grace_s)
    self.memory_limit_mb = memory_limit_mb
    self.check_fn = check_fn
    self.startup_timeout_s = float(startup_timeout_s)
    self._ctx = multiprocessing.get_context(start_method)
    self._workers: list[_Worker] = []
    self._call_id = 0
    self._closed = False
    self.last_stats: dict[str, float] = {}
    self._finalizer = weakref.finalize(self, _kill_workers, self._workers)

  # Lifecycle -----------------------------------------------------------------------------------------

  def __enter__(self) -> "GradingPool":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def close(self) -> None:
    """Stops all workers. The pool cannot be used afterwards."""
    self._closed = True
    _kill_workers(self._workers)

  def _start_worker(self) -> _Worker:
    parent_conn, child_conn = self._ctx.Pipe(duplex=True)
    process = self._ctx.Process(
        target=_worker_main, args=(child_conn, self.check_fn, self.memory_limit_mb),
        name="spark_jax-grader", daemon=True)
    process.start()
    child_conn.close()  # Our copy; the worker's end closing (death) then shows up as EOF here.
    worker = _Worker(process=process, conn=parent_conn, started=time.monotonic())
    self._workers.append(worker)
    return worker

  def _retire(self, worker: _Worker) -> None:
    _stop_worker(worker)
    self._workers.remove(worker)

  # Grading -------------------------------------------------------------------------------------------

  def grade(self, preds: Sequence[Any], golds: Sequence[Any], *, timeout_s: float | None = None,
            extract: bool = False) -> list[bool]:
    """Grades `preds[i]` against `golds[i]` for all i; see the class docstring for the guarantees.

    Args:
      preds: extracted answers (str or None), or raw responses when `extract` is True.
      golds: ground truths in any form `normalize_gold` accepts.
      timeout_s: per-pair soft limit for this call (default: the pool's).
      extract: run `extract_answer` on each pred first (in this process; it is cheap).

    Raises:
      ValueError: lengths differ, or a gold is unusable (the message names its index).
      RuntimeError: workers keep dying during start-up (the message says why and what to check).
    """
    if self._closed:
      raise RuntimeError("GradingPool.grade called after close(); create a new pool.")
    if len(preds) != len(golds):
      raise ValueError(f"grade: {len(preds)} predictions but {len(golds)} gold answers; pass one gold per "
                       "prediction.")
    timeout_s = self.timeout_s if timeout_s is None else float(timeout_s)
    t0 = time.monotonic()
    texts, gold_lists = _prepare(preds, golds, extract)
    results = [False] * len(texts)
    # Settle what we can here; send each distinct remaining (pred, golds) pair to the workers once
    # (RL rollouts of one prompt often repeat an answer).
    quick = 0
    owners: dict[tuple[str, tuple[str, ...]], list[int]] = {}
    for i, (pred, gl) in enumerate(zip(texts, gold_lists)):
      if pred is None:
        continue
      verdict = _quick_verdict(pred, gl)
      if verdict is not None:
        results[i] = verdict
        quick += 1
      else:
        owners.setdefault((pred, tuple(gl)), []).append(i)
    keys = list(owners)
    stats = {"n": len(texts), "quick": quick, "sent_to_workers": len(keys), "soft_timeouts": 0,
             "killed": 0, "crashes": 0, "worker_seconds": 0.0}
    if keys:
      unique_results = [False] * len(keys)
      try:
        self._run(collections.deque(range(len(keys))), [k[0] for k in keys], [list(k[1]) for k in keys],
                  unique_results, timeout_s, stats)
      except BaseException:
        # In-flight answers would come back into a later call; start clean instead.
        _kill_workers(self._workers)
        raise
      for key, ok in zip(keys, unique_results):
        for i in owners[key]:
          results[i] = ok
    stats["seconds"] = time.monotonic() - t0
    self.last_stats = stats
    return results

  def _run(self, pending: collections.deque[int], texts: list[str], gold_lists: list[list[str]],
           results: list[bool], timeout_s: float, stats: dict[str, float]) -> None:
    """Dispatch/collect loop; returns when every pending pair has a result."""
    self._call_id += 1
    call_id = self._call_id
    outstanding = len(pending)
    startup_failures = 0
    max_startup_failures = 3 * self.num_workers + 3
    while len(self._workers) < min(self.num_workers, len(pending)):
      self._start_worker()

    while outstanding:
      now = time.monotonic()
      # Dispatch to idle workers.
      for w in self._workers:
        if pending and w.ready and w.task is None:
          i = pending.popleft()
          try:
            w.conn.send(((call_id, i), texts[i], gold_lists[i], timeout_s))
          except (BrokenPipeError, OSError):
            pending.appendleft(i)
            w.ready = False  # Its death shows up below as EOF.
            continue
          w.task = (call_id, i)
          w.deadline = now + timeout_s + self.kill_grace_s

      # Wait for a message, a death, or the next deadline.
      deadlines = [w.deadline if w.task is not None else w.started + self.startup_timeout_s
                   for w in self._workers if w.task is not None or not w.ready]  # Busy or starting.
      wait_s = max(0.0, min(deadlines) - time.monotonic()) if deadlines else 1.0
      handles = [w.conn for w in self._workers]
      ready_handles = multiprocessing.connection.wait(handles, timeout=min(wait_s, 5.0))

      for conn in ready_handles:
        w = next((w for w in self._workers if w.conn is conn), None)
        if w is None:
          continue
        try:
          msg = conn.recv()
        except (EOFError, OSError):
          # The worker died: a crash while grading (its pair counts as wrong) or during start-up.
          if w.task is not None:
            stats["crashes"] += 1
            outstanding -= 1
          elif not w.ready:
            startup_failures += 1
            exitcode = w.process.exitcode
            self._retire(w)
            if startup_failures > max_startup_failures:
              raise RuntimeError(
                  f"grading workers keep dying before they are ready (last exit code {exitcode}). Check "
                  "that math_verify imports in a fresh interpreter (`python -c 'import math_verify'`) and "
                  "that the main script has an `if __name__ == \"__main__\":` guard (spawned workers "
                  "import it).")
            continue
          self._retire(w)  # Replacements start below if work remains.
          continue
        if msg[0] == "ready":
          w.ready = True
          continue
        task_id, ok, elapsed = msg
        if w.task is not None and tuple(task_id) == w.task:
          results[w.task[1]] = bool(ok)
          stats["soft_timeouts"] += elapsed >= timeout_s
          stats["worker_seconds"] += elapsed
          outstanding -= 1
          w.task = None
          w.deadline = math.inf

      # Enforce deadlines.
      now = time.monotonic()
      for w in list(self._workers):
        if w.task is not None and now > w.deadline:
          stats["killed"] += 1
          outstanding -= 1  # results[i] stays False.
          w.task = None
          self._retire(w)
          if pending:
            self._start_worker()
        elif not w.ready and now > w.started + self.startup_timeout_s:
          startup_failures += 1
          self._retire(w)
          if startup_failures > max_startup_failures:
            raise RuntimeError(
                f"grading workers did not start within {self.startup_timeout_s:.0f} s "
                f"({startup_failures} tries). The host may be overloaded; raise startup_timeout_s or "
                "lower num_workers.")
      # Keep enough workers for the remaining work (after kills/crashes).
      busy = sum(w.task is not None for w in self._workers)
      while pending and len(self._workers) < min(self.num_workers, busy + len(pending)):
        self._start_worker()


def _prepare(preds: Sequence[Any], golds: Sequence[Any],
             extract: bool) -> tuple[list[str | None], list[list[str]]]:
  """Extraction (optional), text coercion and gold normalisation, naming the index on bad golds."""
  texts: list[str | None] = []
  for p in preds:
    if extract:
      p = extract_answer(p)
    p = None if p is None else str(p).strip()
    texts.append(p or None)
  gold_lists = []
  for i, g in enumerate(golds):
    try:
      gold_lists.append(normalize_gold(g))
    except (TypeError, ValueError) as e:
      raise ValueError(f"golds[{i}] = {g!r} is not a usable gold answer: {e}") from e
  return texts, gold_lists


def grade_batch(
    preds: Sequence[Any],
    golds: Sequence[Any],
    *,
    num_workers: int | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    pool: GradingPool | None = None,
    extract: bool = False,
) -> list[bool]:
  """Grades many answers; a hung or crashing answer counts as wrong and never blocks the batch.

  Args:
    preds: extracted answers (or raw responses with `extract=True`).
    golds: one ground truth per prediction (str, number, list, or JSON-list string).
    num_workers: worker processes for a temporary pool (ignored when `pool` is given). 0 grades in this
      process, serially, bounded only by the SIGALRM timer (main thread) — meant for debugging and tiny
      inputs, since C code that holds the GIL cannot be interrupted there.
    timeout_s: per-answer time limit, seconds.
    pool: a long-lived `GradingPool` to reuse (recommended in loops: saves worker start-up).
    extract: run `extract_answer` on each pred first.

  Returns:
    One bool per input, in input order.
  """
  if pool is not None:
    return pool.grade(preds, golds, timeout_s=timeout_s, extract=extract)
  if num_workers == 0:
    if len(preds) != len(golds):
      raise ValueError(f"grade_batch: {len(preds)} predictions but {len(golds)} gold answers; pass one "
                       "gold per prediction.")
    texts, gold_lists = _prepare(preds, golds, extract)
    return [p is not None and is_equivalent(p, g, timeout_s=timeout_s) for p, g in zip(texts, gold_lists)]
  with GradingPool(num_workers=num_workers, timeout_s=timeout_s) as tmp:
    return tmp.grade(preds, golds, extract=extract)


def grade_responses(responses: Iterable[str | None], golds: Iterable[Any], **kwargs: Any) -> list[bool]:
  """`grade_batch` on raw model responses (answers extracted with `extract_answer`)."""
  return grade_batch(list(responses), list(golds), extract=True, **kwargs)
