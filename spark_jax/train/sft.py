"""The SFT job: `run_sft(config)` trains a generative reward model on Stage I chat rows and exports it.

    python -m spark_jax.main --config=configs/sft_prm.py --config.data=<stage I sft dir> --config.workdir=...

Every setting and its default: configs/sft_prm.py. What a run does, in order:
1. Tokenizes the data (cached in workdir/data_cache) and plans the length-bucketed global batches
   (`spark_jax.train.data`); the plan is a pure function of (files, tokenizer, config), so every process and
   every restart sees the same batches.
2. Restores the latest checkpoint in workdir/checkpoints if there is one (then the base model is not even
   read), otherwise loads the base model (or random weights) straight into its mesh sharding. A checkpoint
   written with other result-changing settings is refused, naming them (`train.checkpoint`; resume="force").
3. Trains with the generic loop (`train.loop`: step t dispatched before step t-1's metrics are fetched);
   every step is checked for a NaN/Inf loss or gradient norm (the error names the step and its rows). Console,
   TensorBoard and workdir/metrics.jsonl get loss, accuracy, lr, grad norm, tokens/s and MFU (`train.metrics`);
   held-out loss every `eval_every` steps. Library logs go to workdir/logs.txt.
4. Checkpoints every `checkpoint_every` steps and at the end, exports the final weights with
   `save_pretrained` (+ tokenizer files) to `export_dir`, and writes workdir/summary.json. Rerunning a
   finished config only re-exports and rewrites the summary.

Checkpoint: state = {"step", "params" (fp32 master), "opt_state"}, the grain iterator's state, and the settings
fingerprint: every config field except those in `NOT_RESULT` (logging, checkpoint cadence, the mesh and
other layout knobs that leave the numbers alone), plus the resolved step count, the batch plan and a hash
of the tokenized training data.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from typing import Any

import jax
import numpy as np

from spark_jax import sharding as shd
from spark_jax.train import checkpoint as ckpt_lib
from spark_jax.train import data as data_lib
from spark_jax.train import loop as loop_lib
from spark_jax.train import metrics as metrics_lib
from spark_jax.train import perf
from spark_jax.train import step as step_lib

# Settings that do not change the trained weights: where and how often things are written, how the work is
# laid out on devices (the mesh, the micro-batch split: the step is the exact token mean over the global
# batch however it is split), held-out evaluation, and the data's location (its tokenized content is hashed).
NOT_RESULT = ("job", "workdir", "mesh", "mesh_devices", "micro_batch", "model.remat", "model.scan_layers",
              "logits_chunk",
              "data", "data_split", "tokenizer", "eval_data", "eval_split", "eval_batch", "eval_max_batches",
              "eval_every", "checkpoint_every", "keep_checkpoints", "log_every", "export_dir", "export_dtype",
              "peak_flops_per_device", "data_workers", "data_prefetch", "progress_bar", "verbose_logs",
              "debug_stop_after", "resume", "max_overlong_fraction")


def _names(value, field: str) -> tuple[str, ...]:
  """A tuple of names from a tuple/list or a comma-separated string (as a --config.formats=prm,orm flag gives)."""
  if isinstance(value, str):
    value = (value,)
  if not isinstance(value, (tuple, list)) or not all(isinstance(v, str) for v in value):
    raise TypeError(f"config.{field}={value!r}: use a tuple of names or a comma-separated string.")
  return tuple(n.strip() for v in value for n in v.split(",") if n.strip())


def _model_source(config) -> tuple[Any, str | None]:
  """(ModelConfig without weights, checkpoint directory or None) — cheap: reads config.json only."""
  from spark_jax.models import config as mcfg
  from spark_jax.models import hf_io
  from spark_jax.models.load import resolve_checkpoint_dir
  name, init = config.model.name, config.model.init
  if init == "random":
    if name not in mcfg.PRESETS:
      raise KeyError(f"config.model.name={name!r} with init='random' must be a preset; known: "
                     f"{sorted(mcfg.PRESETS)}.")
    return mcfg.PRESETS[name], None
  if init != "pretrained":
    raise ValueError(f"config.model.init={init!r}; use 'pretrained' or 'random'.")
  directory = hf_io.resolve_dir(resolve_checkpoint_dir(name))
  path = os.path.join(directory, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"config.model.name={name!r} -> {directory}: config.json is missing.")
  with open(path) as f:
    return hf_io.config_from_hf(json.load(f)), directory


def _check_checkpoint_tokenizer(tokenizer, ckpt_dir: str | None, config) -> None:
  """A pretrained checkpoint fine-tuned with another tokenizer learns from scrambled embeddings, silently:
  when the checkpoint ships its own tokenizer, config.tokenizer must spell every id the same way."""
  from spark_jax.tokenizer import Tokenizer, vocabulary_difference
  if not ckpt_dir or not config.tokenizer or not os.path.exists(os.path.join(ckpt_dir, "tokenizer.json")):
    return
  difference = vocabulary_difference(tokenizer, Tokenizer.from_pretrained(ckpt_dir))
  if difference:
    raise ValueError(f"config.tokenizer={config.tokenizer!r} and the tokenizer of checkpoint {ckpt_dir!r} "
                     f"(config.model.name={config.model.name!r}) differ ({difference}); fine-tuning with another "
                     "tokenizer feeds the model ids it never learnt. Leave config.tokenizer empty to use the "
                     "checkpoint's own, or start from a checkpoint trained with this tokenizer.")


def _global(local: dict[str, np.ndarray], sharding, global_rows: int, row_axis: int) -> dict[str, jax.Array]:
  """Process-local numpy rows -> global jax.Arrays sharded over the batch axis."""
  out = {}
  for k, v in local.items():
    if k == "step":
      continue
    shape = list(v.shape)
    shape[row_axis] = global_rows
    out[k] = jax.make_array_from_process_local_data(sharding, v, tuple(shape))
  return out


def _examples_sha256(examples: data_lib.TokenizedExamples) -> str:
  h = hashlib.sha256()
  for a in (examples.tokens, examples.loss_mask, examples.offsets):
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()[:20]


class _Geometry:
  """Global batch, micro batch and accumulation steps, checked against the mesh and the process count."""

  def __init__(self, config, mesh, process_count: int):
    ways = mesh.shape["data"] * mesh.shape["fsdp"]
    self.global_batch = int(config.global_batch)
    self.micro = int(config.micro_batch) or self.global_batch
    if self.global_batch % self.micro:
      raise ValueError(f"config.global_batch={self.global_batch} is not a multiple of "
                       f"config.micro_batch={self.micro}.")
    if self.micro % ways or self.micro % process_count:
      raise ValueError(f"config.micro_batch={self.micro} must be divisible by the mesh's data x fsdp = {ways} "
                       f"(mesh {dict(mesh.shape)}) and by the {process_count} processes; change micro_batch or "
                       "the mesh.")
    self.accum = self.global_batch // self.micro
    self.eval_rows = int(config.eval_batch) or self.micro
    if self.eval_rows % ways or self.eval_rows % process_count:
      raise ValueError(f"config.eval_batch={self.eval_rows} must be divisible by data x fsdp = {ways} and by "
                       f"the {process_count} processes.")


def _load_data(config, tokenizer, workdir: str, vocab_size: int):
  """(train examples, held-out examples or None, read stats) per the data settings, with their checks."""
  from spark_jax.text.rm import RM_FORMATS
  formats = (config.format,) if config.format else _names(config.formats, "formats")
  variants = _names(config.variants, "variants")
  unknown = sorted(set(formats) - set(RM_FORMATS))
  if unknown:
    raise ValueError(f"config.formats has unknown format(s) {unknown}; the reward-model formats are {RM_FORMATS}.")
  load = functools.partial(data_lib.load_examples, tokenizer=tokenizer, max_length=int(config.max_length),
                           overlong=config.overlong, formats=formats, variants=variants,
                           cache_dir=os.path.join(workdir, "data_cache"))
  train_ex = load(config.data, split=config.data_split)
  stats = dict(train_ex.stats)
  considered = stats["rows"] - stats["filtered_out"]
  if considered and stats["dropped_overlong"] / considered > config.max_overlong_fraction:
    raise ValueError(
        f"data {config.data!r}: {stats['dropped_overlong']} of {considered} rows are longer than "
        f"max_length={config.max_length} tokens (longest {stats['longest_seen']}); raise config.max_length, set "
        f"config.overlong='truncate', or raise config.max_overlong_fraction (now {config.max_overlong_fraction}).")
  eval_ex = None
  if config.eval_data:
    eval_ex = load(config.eval_data, split=config.eval_split)
  elif config.eval_fraction > 0:
    train_ex, eval_ex = data_lib.split_holdout(train_ex, float(config.eval_fraction), int(config.seed))
  top_id = int(train_ex.tokens.max()) if train_ex.tokens.size else 0
  if top_id >= vocab_size:
    raise ValueError(f"tokenizer {tokenizer.source!r} produced token id {top_id}, but model "
                     f"{config.model.name!r} has vocab_size={vocab_size}; use the tokenizer that belongs to the model.")
  return train_ex, eval_ex, stats


def run_sft(config) -> dict:
  """Trains, checkpoints, evaluates and exports per `config` (configs/sft_prm.py); returns the summary."""
  workdir = os.path.abspath(config.workdir)
  os.makedirs(workdir, exist_ok=True)
  from spark_jax.io import write_summary
  from spark_jax.models import hf_io
  from spark_jax.models.load import load_model
  from spark_jax.tokenizer import Tokenizer

  t_start = time.time()
  if not config.data:
    raise ValueError("config.data is empty; point it at the Stage I SFT rows (a .jsonl/.parquet file, a "
                     "directory of them, a glob or a hub dataset id).")
  pi, pc = jax.process_index(), jax.process_count()
  devices = jax.devices()[:int(config.mesh_devices)] if config.mesh_devices else None
  mesh = shd.make_mesh(config.mesh.to_dict(), devices=devices)
  geo = _Geometry(config, mesh, pc)

  # ---- model config and tokenizer (no weights yet), data and batch plan
  base_cfg, ckpt_dir = _model_source(config)
  cfg = base_cfg.replace(dtype=config.model.dtype, remat=config.model.remat,
                         scan_layers=bool(config.model.get("scan_layers", True)))
  tok_dir = config.tokenizer or ckpt_dir
  if not tok_dir:
    raise ValueError(f"config.tokenizer is empty and model {config.model.name!r} (init='random') has no "
                     "checkpoint directory to take one from; set config.tokenizer to a tokenizer directory.")
  tokenizer = Tokenizer.from_pretrained(tok_dir)
  _check_checkpoint_tokenizer(tokenizer, ckpt_dir, config)
  train_ex, eval_ex, stats = _load_data(config, tokenizer, workdir, cfg.vocab_size)
  boundaries = data_lib.bucket_boundaries(int(config.max_length), tuple(config.bucket_boundaries),
                                          int(config.min_bucket))
  num_steps = int(config.num_steps) or int(float(config.epochs) * data_lib.steps_per_epoch(len(train_ex),
                                                                                          geo.global_batch))
  if num_steps < 1:
    raise ValueError(f"{len(train_ex)} training examples x {config.epochs} epochs give no full global batch of "
                     f"{geo.global_batch}; lower config.global_batch or set config.num_steps.")
  plan = data_lib.make_batch_plan(train_ex.lengths, global_batch=geo.global_batch, num_steps=num_steps,
                                  seed=int(config.seed), boundaries=boundaries, window=int(config.bucket_window))
  pad_id = int(tokenizer.pad_token_id)
  source = data_lib.SFTBatchSource(train_ex, plan, accum_steps=geo.accum, pad_id=pad_id, process_index=pi,
                                   process_count=pc)
  data_iter = iter(data_lib.make_train_loader(source, worker_count=int(config.data_workers),
                                              prefetch=int(config.data_prefetch)))
  eval_sets = []
  if eval_ex is not None and len(eval_ex):
    if config.eval_max_batches:
      keep = np.random.default_rng([int(config.seed), 11]).permutation(len(eval_ex))
      eval_ex = eval_ex.subset(np.sort(keep[:int(config.eval_max_batches) * geo.eval_rows]))
    eval_sets = data_lib.eval_batches(eval_ex, batch_rows=geo.eval_rows, boundaries=boundaries, pad_id=pad_id,
                                      process_index=pi, process_count=pc)

  # ---- optimizer, step functions
  tx, schedule = step_lib.make_optimizer(
      cfg, lr=float(config.lr), total_steps=num_steps, warmup_ratio=float(config.warmup_ratio),
      weight_decay=float(config.weight_decay), grad_clip=float(config.grad_clip), b1=float(config.adam_b1),
      b2=float(config.adam_b2), eps=float(config.adam_eps), end_lr_ratio=float(config.end_lr_ratio),
      schedule=config.schedule)
  loss_fn = functools.partial(step_lib.sft_loss, cfg, logits_chunk=int(config.logits_chunk))
  train_step = step_lib.make_train_step(cfg, tx, schedule, loss_fn, mesh, compute_dtype=config.model.dtype)
  eval_step = step_lib.make_eval_step(cfg, loss_fn, mesh, compute_dtype=config.model.dtype)
  train_sharding = step_lib.batch_sharding(mesh, accum=True)
  eval_sharding = step_lib.batch_sharding(mesh, accum=False)

  # ---- checkpoints: restore or initialise
  ckpt_root = os.path.join(workdir, "checkpoints")
  fingerprint = ckpt_lib.config_fingerprint(config, NOT_RESULT, num_steps_resolved=num_steps,
                                            plan=plan.fingerprint(), train_examples=len(train_ex),
                                            train_data_sha256=_examples_sha256(train_ex))
  ckpt = ckpt_lib.Checkpointer(ckpt_root, fingerprint=fingerprint, keep=int(config.keep_checkpoints),
                               resume=config.resume)
  restored = ckpt.restore_latest(step_lib.abstract_state(cfg, tx, mesh), data_iter=data_iter)
  resumed_from = None
  if restored is not None:
    state, extra = restored
    resumed_from = extra["step"]
    start = int(jax.device_get(state["step"]))
  else:
    with shd.use_mesh(mesh):
      _, params, _ = load_model(config.model.name, init=config.model.init, dtype=config.param_dtype,
                                mesh=mesh, seed=int(config.seed), remat=config.model.remat,
                                scan_layers=cfg.scan_layers)
      state = step_lib.init_state(cfg, params, tx, mesh)
    del params
    start = 0

  # ---- the run
  peak, peak_how = perf.total_peak_flops(mesh.devices.flat, config.model.dtype, float(config.peak_flops_per_device))
  writer = metrics_lib.MetricsWriter(workdir, total=num_steps, initial=start, desc="sft",
                                     log_every=int(config.log_every), progress_bar=bool(config.progress_bar))
  writer.console(f"sft: {len(train_ex)} train / {len(eval_ex) if eval_ex is not None else 0} held-out "
                 f"examples, {num_steps} steps of {geo.global_batch} sequences ({geo.accum} x {geo.micro}), "
                 f"buckets {boundaries}, mesh {dict(mesh.shape)}, steps {start}->{num_steps}, peak FLOP/s "
                 f"{peak:.3g} ({peak_how}); library logs: {os.path.join(workdir, metrics_lib.LOG_FILE)}")
  if resumed_from is not None:
    changed = extra["changed_settings"]
    writer.console(f"resumed from {ckpt_root}/{resumed_from}"
                   + (f" with changed settings {changed} (resume=force)" if changed else ""))
  stop_at = num_steps
  if config.debug_stop_after and start < int(config.debug_stop_after) < num_steps:
    stop_at = int(config.debug_stop_after)
  last_ckpt = [ckpt.latest_step()]
  totals = {"seq_tokens": 0.0, "tokens": 0.0, "time": 0.0, "flops": 0.0}
  train_losses: list[float] = []
  last_eval: dict[str, float] = {}

  def batches():
    for local in data_iter:
      yield _global(local, train_sharding, geo.micro, 1), {"seq_len": float(local["tokens"].shape[-1])}

  def on_metrics(step_no: int, m: dict[str, float]) -> None:
    where = (f"the last checkpoint is step {last_ckpt[0]} in {ckpt_root}" if last_ckpt[0]
             else "no checkpoint was written yet")
    rows = [train_ex.origin(int(i)) for i in plan.rows_IxB[step_no - 1]]
    shown = ", ".join(rows[:8]) + (f" and {len(rows) - 8} more" if len(rows) > 8 else "")
    metrics_lib.check_finite(step_no, m, context=f"({where}) The step's batch holds rows {shown}.")
    dt = m["step_time_s"]
    m["tokens_per_s"] = m["seq_tokens"] / dt if dt > 0 else 0.0
    m["mfu"] = perf.mfu(m["seq_tokens"], int(m["seq_len"]), dt, cfg, cfg.remat, peak) if dt > 0 else 0.0
    if train_losses:  # the first fetched step includes compilation
      totals["seq_tokens"] += m["seq_tokens"]
      totals["time"] += dt
      totals["flops"] += m["mfu"] * dt * peak
    totals["tokens"] += m["tokens"]
    train_losses.append(m["loss"])
    writer.write(step_no, m)

  def evaluate(step_no: int, st) -> None:
    nonlocal last_eval
    if not eval_sets:
      return
    sums: dict[str, float] = {}
    with shd.use_mesh(mesh):
      outs = [eval_step(st["params"], _global(b, eval_sharding, geo.eval_rows, 0)) for b in eval_sets]
    for o in jax.device_get(outs):
      for k, v in o.items():
        sums[k] = sums.get(k, 0.0) + float(v)
    den = max(sums.pop("tokens"), 1.0)
    last_eval = {"eval_loss": sums.pop("loss_sum") / den, "eval_accuracy": sums.get("accuracy_sum", 0.0) / den}
    writer.write(step_no, last_eval, prefix="eval")

  def save(step_no: int, st) -> None:
    ckpt.save(step_no, st, data_iter=data_iter)
    last_ckpt[0] = step_no

  export_dir = ""
  try:
    state, _ = loop_lib.run(train_step, state, batches(), start=start, stop=stop_at, on_metrics=on_metrics,
                            checkpoint_every=int(config.checkpoint_every), save=save,
                            eval_every=int(config.eval_every), evaluate=evaluate, last_step=num_steps, mesh=mesh)
    final_step = int(jax.device_get(state["step"]))
    stopped_early = final_step < num_steps
    if not stopped_early:
      if ckpt.latest_step() != final_step:
        save(final_step, state)
      evaluate(final_step, state)
      if config.export_dir != "none":
        export_dir = os.path.abspath(config.export_dir or os.path.join(workdir, "export"))
        export_cfg = cfg.replace(dtype=config.export_dtype, remat="none")
        cast = jax.jit(lambda p: jax.tree.map(lambda x: x.astype(config.export_dtype), p))
        hf_io.save_pretrained(export_cfg, cast(state["params"]), export_dir,
                              tokenizer_dir=tokenizer.source if os.path.isdir(tokenizer.source) else None)
        writer.console(f"exported step {final_step} to {export_dir}")
  finally:
    writer.close()
    ckpt.close()

  summary = {
      "job": "sft",
      "workdir": workdir,
      "model": config.model.name,
      "final_step": final_step,
      "num_steps": num_steps,
      "stopped_early": stopped_early,
      "resumed_from": resumed_from,
      "steps_this_run": len(train_losses),
      "train_loss_last": train_losses[-1] if train_losses else None,
      "train_loss_mean_last_10": float(np.mean(train_losses[-10:])) if train_losses else None,
      **last_eval,
      "train_examples": len(train_ex),
      "eval_examples": len(eval_ex) if eval_ex is not None else 0,
      "data_stats": stats,
      "global_batch": geo.global_batch,
      "accum_steps": geo.accum,
      "micro_batch": geo.micro,
      "buckets": boundaries,
      "padding_fraction": float(1.0 - train_ex.lengths[plan.rows_IxB].sum() /
                                (plan.lengths_I.astype(np.float64) * geo.global_batch).sum()),
      "loss_tokens_this_run": totals["tokens"],
      "tokens_per_s": totals["seq_tokens"] / totals["time"] if totals["time"] else None,
      "mfu": totals["flops"] / totals["time"] / peak if totals["time"] and peak else None,
      "peak_flops": peak,
      "peak_flops_source": peak_how,
      "elapsed_s": time.time() - t_start,
      "export_dir": export_dir,
      "checkpoint_dir": ckpt_root,
      "fingerprint": fingerprint,
      "mesh": dict(mesh.shape),
  }
  if pi == 0:
    write_summary(workdir, summary)
  return summary
