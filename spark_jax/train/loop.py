"""The generic training loop: a jitted step, an iterator of batches, a state; nothing job-specific.

    state, steps_run = loop.run(step_fn, state, batches, start=s, stop=n, on_metrics=..., ...)

Step t is dispatched before step t-1's metrics are fetched, so the host (data loading, logging, the finiteness
check) overlaps the device instead of waiting for it. Before a checkpoint or an evaluation the pending step's
metrics are fetched first: a checkpoint never holds a step whose loss was not checked.

The step's signature is the job's: `step_fn(state, batch, *frozen[, key]) -> (state, metrics)`. `frozen` are
pytrees passed unchanged every step (the RL job's reference and PRM parameters); with `rng` set, the step also
gets `jax.random.fold_in(rng, t)` for step index t, a key that depends on the step alone, so a resumed run
draws the same keys as an uninterrupted one without any key in the checkpoint.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterator, Mapping

import jax

StepFn = Callable[..., tuple[Any, Mapping[str, jax.Array]]]


def run(step_fn: StepFn, state: Any, batches: Iterator[tuple[Any, Mapping[str, float]]], *, start: int, stop: int,
        on_metrics: Callable[[int, dict[str, float]], None], frozen: tuple = (), rng: jax.Array | None = None,
        checkpoint_every: int = 0, save: Callable[[int, Any], None] | None = None, eval_every: int = 0,
        evaluate: Callable[[int, Any], None] | None = None, last_step: int | None = None,
        should_stop: Callable[[], bool] | None = None, mesh=None) -> tuple[Any, int]:
  """Runs steps `start`..`stop`-1 (step t's number is t + 1); returns (state, steps run).

  Args:
    step_fn: jitted `(state, batch, *frozen[, key]) -> (state, metrics)`; metrics are device scalars.
    batches: yields (device batch, host info); `info` (e.g. the padded length) joins the step's metrics.
    on_metrics: `(step number, host metrics)` once per step, in order: write, check finiteness, raise to stop.
      The loop adds "step_time_s": wall time since the previous fetch (the first includes compilation, and time
      spent saving or evaluating is excluded).
    checkpoint_every, save: `save(step number, state)` every K steps, except at `last_step` (the job saves
      the final state itself, after the loop).
    eval_every, evaluate: `evaluate(step number, state)` every K steps, except at `last_step`.
    last_step: the run's final step number (default `stop`).
    should_stop: polled after each step (e.g. a preemption notice); True ends the loop early.
    mesh: entered (`sharding.use_mesh`) around each dispatch, so model code sees its activation shardings.
  """
  from spark_jax import sharding as shd
  last_step = stop if last_step is None else int(last_step)
  pending: tuple[int, Any, Mapping[str, float]] | None = None
  t_prev: float | None = None

  def fetch() -> None:
    nonlocal pending, t_prev
    if pending is None:
      return
    step_no, future, info = pending
    pending = None
    metrics = {k: float(v) for k, v in jax.device_get(future).items()}
    now = time.perf_counter()
    metrics.update(info)
    metrics["step_time_s"] = now - t_prev if t_prev is not None else 0.0
    t_prev = now
    on_metrics(step_no, metrics)

  steps_run = 0
  for t in range(start, stop):
    batch, info = next(batches)
    args = (state, batch, *frozen) + ((jax.random.fold_in(rng, t),) if rng is not None else ())
    with shd.use_mesh(mesh):
      state, future = step_fn(*args)
    fetch()  # step t-1's metrics, while step t runs
    pending = (t + 1, future, dict(info))
    steps_run += 1
    done = t + 1
    ckpt_due = bool(save and checkpoint_every and done % checkpoint_every == 0 and done < last_step)
    eval_due = bool(evaluate and eval_every and done % eval_every == 0 and done < last_step)
    stopping = should_stop is not None and should_stop()
    if ckpt_due or eval_due or stopping:
      fetch()  # never checkpoint, evaluate or stop on an unchecked step
    if ckpt_due:
      save(done, state)
    if eval_due:
      evaluate(done, state)
    if ckpt_due or eval_due:
      t_prev = time.perf_counter()  # the next step's time excludes the save and the evaluation
    if stopping:
      break
  fetch()
  return state, steps_run
