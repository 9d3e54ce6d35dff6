"""A hang-proof process pool for answer grading: many (pred, gold) pairs, a hard per-answer timeout.

Why a pool with hard kills: math_verify calls sympy, and some answers (`10^{10^{7}}`, huge powers of
surds, pathological expressions) take seconds to minutes or hang in C code that no signal interrupts. In an
RL step with thousands of rollouts one such answer must cost at most `timeout_s`, count as wrong and never
block the batch. Workers are started with `spawn` (or `forkserver`), never `fork`: a forked JAX process
can deadlock.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import signal
import time
import weakref
from typing import Any, Iterable, Sequence

from spark_jax.evals.equivalence import (DEFAULT_TIMEOUT_S, CheckFn, default_check, is_equivalent,
                                         math_verify_equal, normalize_gold, quick_verdict)
from spark_jax.text.answers import extract_answer

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
    math_verify_equal("\\frac{1}{2}", ["0.5"])  # is not charged to the first answer's timeout.
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
  A pool is driven by one thread at a time. As with any spawn-based multiprocessing, a script that creates a
  pool must guard its entry point with `if __name__ == "__main__":`, because workers import the main module.
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
      verdict = quick_verdict(pred, gl)
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
    timeout_s: float | None = None,
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
    timeout_s: per-answer time limit, seconds; None takes the pool's own limit (the one the run configured)
      or, without a pool, `DEFAULT_TIMEOUT_S`.
    pool: a long-lived `GradingPool` to reuse (recommended in loops: saves worker start-up).
    extract: run `extract_answer` on each pred first.

  Returns:
    One bool per input, in input order.
  """
  if pool is not None:
    return pool.grade(preds, golds, timeout_s=timeout_s, extract=extract)
  timeout_s = DEFAULT_TIMEOUT_S if timeout_s is None else float(timeout_s)
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
