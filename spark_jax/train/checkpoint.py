"""Checkpoints of any training job: an arbitrary state pytree + data-iterator state + a settings fingerprint.

Layout (orbax CheckpointManager): `<directory>/<step>/{state, meta[, data]}`:
- `state`: the state pytree as an orbax PyTree (each host writes its own shards; restore re-shards onto the
  target's shardings, so a run may resume on a different device count or mesh);
- `meta`: JSON {"step", "fingerprint", "extra"}: the settings fingerprint checked on restore, and a job's own
  JSON-serialisable extras (the RL prompt iterator position, its RNG key, ...);
- `data`: a grain iterator's state (one JSON per process), when the job passes one.

The fingerprint is a flat {"key": value} dict of every setting that changes the result (the job decides which;
see `config_fingerprint`). Restoring with a different fingerprint is a `FingerprintMismatch` that lists the
changed keys, unless the checkpointer was made with resume="force", which resumes anyway and reports them.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Iterable, Mapping

import jax

RESUME_MODES = ("auto", "force")


class FingerprintMismatch(ValueError):
  """The checkpoint was written with other result-changing settings than this run's."""


def _plain(value: Any) -> Any:
  """JSON-normalised value (tuples become lists, numpy scalars plain numbers), so saved == fresh compares."""
  return json.loads(json.dumps(value, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def config_fingerprint(config, exclude: Iterable[str] = (), **derived: Any) -> dict[str, Any]:
  """Flat {"a.b": value} of every field of `config` except `exclude` (a name excludes its whole subtree), plus
  `derived` values (e.g. the resolved step count, a hash of the tokenized data).

  Jobs list what does *not* change the result (logging, checkpoint cadence, the mesh), so a new setting is
  fingerprinted by default: forgetting it errs on the side of refusing a resume.
  """
  skip = set(exclude)
  flat: dict[str, Any] = {}

  def walk(node, prefix: str) -> None:
    for key in sorted(node):
      name = f"{prefix}{key}"
      if name in skip:
        continue
      value = node[key]
      if isinstance(value, Mapping) or hasattr(value, "to_dict"):
        walk(value.to_dict() if hasattr(value, "to_dict") else value, f"{name}.")
      else:
        flat[name] = _plain(value)

  walk(config.to_dict() if hasattr(config, "to_dict") else dict(config), "")
  for key, value in derived.items():
    flat[key] = _plain(value)
  return flat


def changed_keys(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
  """Keys whose values differ, including keys present on one side only."""
  return sorted(k for k in set(saved) | set(now) if saved.get(k, "<absent>") != now.get(k, "<absent>"))


class Checkpointer:
  """Save/restore of (state pytree, extras, data iterator) under `directory`, guarded by `fingerprint`.

  Args:
    directory: checkpoint root (created).
    fingerprint: flat dict of the result-changing settings (`config_fingerprint`).
    keep: how many checkpoints to keep.
    resume: "auto" (a changed fingerprint is an error) or "force" (resume anyway; the changes are logged and
      returned by `restore_latest` in `extra["changed_settings"]`).
  """

  def __init__(self, directory: str, *, fingerprint: Mapping[str, Any], keep: int = 2, resume: str = "auto"):
    import orbax.checkpoint as ocp
    if resume not in RESUME_MODES:
      raise ValueError(f"resume={resume!r}: use 'auto' (refuse a checkpoint written with other settings) or "
                       "'force' (resume anyway).")
    self.directory, self.resume = directory, resume
    self.fingerprint = _plain(dict(fingerprint))
    self._ocp = ocp
    self._manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(max_to_keep=int(keep),
                                                                                          create=True))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def check(self, step: int) -> list[str]:
    """The keys whose values changed since checkpoint `step`; raises `FingerprintMismatch` unless forced."""
    ocp = self._ocp
    meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    saved = meta.get("fingerprint") if isinstance(meta, dict) else None
    if saved is None:
      changed = ["<no fingerprint in the checkpoint: written by an older version>"]
    else:
      changed = changed_keys(saved, self.fingerprint)
    if changed and self.resume != "force":
      lines = [f"  {k}: {saved.get(k, '<absent>')!r} -> {self.fingerprint.get(k, '<absent>')!r}"
               for k in changed if saved is not None]
      raise FingerprintMismatch(
          f"{self.directory}/{step}: the checkpoint was written with other settings; changed: {changed}\n"
          + "\n".join(lines) + "\nRestore those settings to resume, use a new workdir to start over, or pass "
          "--config.resume=force to resume with the new settings anyway.")
    if changed:
      logging.warning("resuming %s/%d with changed settings (resume=force): %s", self.directory, step, changed)
    return changed

  def restore_latest(self, target: Any, data_iter=None) -> tuple[Any, dict] | None:
    """(state, extra) of the latest checkpoint, or None when there is none.

    target: a pytree of arrays or `jax.ShapeDtypeStruct`s with shardings: the restored state takes their
      shapes, dtypes and shardings (not those it was saved with), so the mesh may change between runs.
    data_iter: a grain iterator restored in place (pass it when `save` got one).
    extra: what `save` got as `extra`, plus "step" and "changed_settings" (non-empty only under force).
    """
    step = self.latest_step()
    if step is None:
      return None
    changed = self.check(step)
    ocp = self._ocp
    abstract = jax.tree.map(
        lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else
        jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), target)
    items = {"state": ocp.args.StandardRestore(abstract), "meta": ocp.args.JsonRestore()}
    if data_iter is not None:
      import grain
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    extra = dict(restored["meta"].get("extra") or {})
    extra.update(step=step, changed_settings=changed)
    return restored["state"], extra

  def save(self, step: int, state: Any, extra: Mapping[str, Any] | None = None, data_iter=None) -> None:
    """Writes checkpoint `step` (asynchronously; `wait`/`close` block until it is on disk)."""
    ocp = self._ocp
    items = {"state": ocp.args.StandardSave(state),
             "meta": ocp.args.JsonSave({"step": int(step), "fingerprint": self.fingerprint,
                                        "extra": _plain(dict(extra or {}))})}
    if data_iter is not None:
      import grain
      items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    self._manager.save(int(step), args=ocp.args.Composite(**items), force=True)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
