"""The SFT job: `run_sft(config)` trains a generative reward model on Stage I chat rows and exports it.

    python -m spark_jax.main --config=configs/sft_prm.py --config.data=<stage I sft dir> --config.workdir=...

What a run does, in order:
1. Tokenizes the data (cached in workdir/data_cache) and plans the length-bucketed global batches
   (`spark_jax.train.data`); the plan is a pure function of (files, tokenizer, config), so every process and
   every restart sees the same batches.
2. Restores the latest checkpoint in workdir/checkpoints if there is one (then the base model is not even
   read), otherwise loads the base model (or random weights) straight into its mesh sharding.
3. Trains: step t is dispatched before step t-1's metrics are fetched, so the host (data loading, logging)
   overlaps the device. Every step's metrics are checked: a NaN/Inf loss or gradient norm stops the run with
   an error naming the step. Console (tqdm), TensorBoard (workdir/tensorboard) and workdir/metrics.jsonl get
   loss, lr, grad norm, tokens/s and MFU; held-out loss every `eval_every` steps.
4. Checkpoints (orbax; params, optimizer state, grain iterator state, step) every `checkpoint_every` steps
   and at the end, exports the final weights with `save_pretrained` (+ tokenizer files) to `export_dir`, and
   writes workdir/summary.json. Rerunning a finished config only re-exports and rewrites the summary.

Checkpoint layout: workdir/checkpoints/<step>/{state, data, meta}: `state` = {"step", "params" (fp32
master), "opt_state"} as an orbax PyTree (each host writes its shards), `data` = grain iterator state (one
JSON per process), `meta` = JSON with the batch-plan fingerprint, num_steps and global batch, checked on
restore so a changed dataset or batch config cannot silently resume into a different run.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import time
from typing import Any

import jax
import numpy as np
from ml_collections import ConfigDict

from spark_jax import sharding as shd
from spark_jax.train import data as data_lib
from spark_jax.train import perf
from spark_jax.train import step as step_lib


def default_config() -> ConfigDict:
  """Every SFT knob with its default (D9 for the optimisation ones). Required: `data` (and `model.name`).

  model.name      a checkpoint directory, a hub id (online), a packaged model, or a preset (init="random").
  model.init      "pretrained" | "random" (random weights: tests, benchmarks).
  model.dtype     compute dtype of activations/matmuls ("bfloat16" on accelerators); master weights and
                  optimizer moments are always `param_dtype` (fp32).
  model.remat     "none" | "full" | "save_dots" (ModelConfig.remat).
  tokenizer       tokenizer directory; "" = the model's checkpoint directory (required for random presets).
  data            Stage I SFT rows: a .jsonl/.json/.parquet file, a directory of them, a glob, or a hub id.
  data_split      split name for a hub id.
  format          one reward-model format to train (shorthand for formats=(format,)); "" = use `formats`.
  formats         keep rows whose "format" is listed ("orm", "prm", "prm_cot", "think_prm"); () = all.
  variants        keep rows whose "variant" is listed; () = all.
  eval_data       held-out rows (same forms as `data`); "" = none or `eval_fraction` of `data`.
  eval_split      split name for a hub id eval set.
  eval_fraction   fraction of `data` held out (seeded) when eval_data is ""; 0 = no held-out loss.
  eval_batch      rows per eval batch; 0 = micro batch.
  eval_max_batches  cap per evaluation (a seeded subset of the held-out set); 0 = all.
  max_length      longest sequence (template included) in tokens; D9: 8192.
  overlong        "drop" (default; a cut target loses its verdict) | "truncate".
  max_overlong_fraction  error when more than this fraction of rows is dropped as overlong.
  bucket_boundaries  padded lengths; () = powers of two from `min_bucket` up to max_length.
  min_bucket      smallest automatic bucket.
  bucket_window   global batches per length-sorting window (larger = less padding, less randomness).
  global_batch    sequences per optimizer update (D9: 64).
  micro_batch     sequences per forward/backward (all devices together); 0 = global_batch. Gradients of
                  global_batch / micro_batch micro-batches are accumulated inside one jitted step.
  epochs          passes over the data when num_steps = 0 (D9: 3; may be fractional).
  num_steps       optimizer updates; 0 = epochs x (examples // global_batch).
  lr, warmup_ratio, schedule, end_lr_ratio   AdamW peak lr (D9 1e-5), warm-up fraction (D9 0.03),
                  "cosine" (D9) | "constant", final lr as a fraction of the peak.
  weight_decay    decoupled weight decay on matrices (norms and biases excluded); 0 = HF Trainer default.
  grad_clip       global-norm clipping threshold; 0 = off.
  adam_b1, adam_b2, adam_eps  AdamW moments (HF Trainer defaults).
  param_dtype     master weight / optimizer dtype ("float32").
  logits_chunk    positions per chunk of the output head in the loss (memory vs. speed).
  seed            data order and held-out split (and random init).
  mesh            {"data", "fsdp", "tensor"} sizes, one may be -1 (the rest of the devices).
  mesh_devices    use only the first N devices (single-process only); 0 = all.
  workdir         checkpoints, tensorboard, metrics.jsonl, summary.json, data cache.
  checkpoint_every, keep_checkpoints   save every K updates (and at the end); how many to keep.
  eval_every      held-out loss every K updates (and at the end); 0 = only at the end.
  log_every       console/TensorBoard every K updates.
  export_dir      "" = workdir/export; "none" = no export.
  export_dtype    dtype of the exported safetensors ("bfloat16" like the Qwen release; "float32" exact).
  peak_flops_per_device  FLOP/s for MFU; 0 = the table in spark_jax/train/perf.py (CPU: measured).
  data_workers    grain worker processes (0 = in-process; >0 needs absl flags parsed, as main.py does).
  data_prefetch   batches read ahead.
  progress_bar    tqdm bar on process 0.
  debug_stop_after  stop after this many updates without a final checkpoint (simulates a preemption).
  """
  c = ConfigDict()
  c.job = "sft"
  c.workdir = "runs/sft"
  c.seed = 0
  c.mesh = ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
  c.mesh_devices = 0
  c.model = ConfigDict({"name": "Qwen/Qwen2.5-14B-Instruct", "init": "pretrained", "dtype": "bfloat16",
                        "remat": "full"})
  c.tokenizer = ""
  c.data = ""
  c.data_split = "train"
  c.format = ""
  c.formats = ()
  c.variants = ()
  c.eval_data = ""
  c.eval_split = "test"
  c.eval_fraction = 0.0
  c.eval_batch = 0
  c.eval_max_batches = 0
  c.max_length = 8192
  c.overlong = "drop"
  c.max_overlong_fraction = 0.05
  c.bucket_boundaries = ()
  c.min_bucket = 256
  c.bucket_window = 32
  c.global_batch = 64
  c.micro_batch = 0
  c.epochs = 3.0
  c.num_steps = 0
  c.lr = 1e-5
  c.warmup_ratio = 0.03
  c.schedule = "cosine"
  c.end_lr_ratio = 0.0
  c.weight_decay = 0.0
  c.grad_clip = 1.0
  c.adam_b1 = 0.9
  c.adam_b2 = 0.999
  c.adam_eps = 1e-8
  c.param_dtype = "float32"
  c.logits_chunk = 1024
  c.checkpoint_every = 500
  c.keep_checkpoints = 2
  c.eval_every = 500
  c.log_every = 10
  c.export_dir = ""
  c.export_dtype = "bfloat16"
  c.peak_flops_per_device = 0.0
  c.data_workers = 0
  c.data_prefetch = 4
  c.progress_bar = True
  c.debug_stop_after = 0
  return c


# --------------------------------------------------------------------------------------------- helpers


def _names(value, field: str) -> tuple[str, ...]:
  """A tuple of names from a tuple/list or a comma-separated string (as a --config.formats=prm,orm flag gives)."""
  if isinstance(value, str):
    value = (value,)
  if not isinstance(value, (tuple, list)) or not all(isinstance(v, str) for v in value):
    raise TypeError(f"config.{field}={value!r}: use a tuple of names or a comma-separated string.")
  return tuple(n.strip() for v in value for n in v.split(",") if n.strip())


def with_defaults(config) -> ConfigDict:
  """`default_config()` overlaid with `config`, so a job config only needs the fields it changes.

  A key the SFT job does not know is an error that names it.
  """
  full = default_config()

  def merge(dst: ConfigDict, src, prefix: str) -> None:
    for key, value in src.items():
      if isinstance(value, (dict, ConfigDict)) and isinstance(dst.get(key), ConfigDict):
        merge(dst[key], value, f"{prefix}{key}.")
        continue
      if key not in dst:
        raise KeyError(f"config.{prefix}{key} is not an SFT setting; see spark_jax.train.loop.default_config "
                       "for the fields (a misspelt field must not be silently ignored).")
      dst[key] = value

  merge(full, config.to_dict() if isinstance(config, ConfigDict) else dict(config), "")
  return full


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


class _Writer:
  """Console (tqdm), TensorBoard and metrics.jsonl on process 0; silent elsewhere."""

  def __init__(self, workdir: str, enabled: bool, total: int, initial: int, progress_bar: bool):
    self.enabled = enabled
    self.tb = None
    self.jsonl = None
    self.bar = None
    if not enabled:
      return
    import tqdm
    from tensorboardX import SummaryWriter
    self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
    self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
    self.bar = tqdm.tqdm(total=total, initial=initial, disable=not progress_bar, dynamic_ncols=True,
                         desc="sft", unit="step")

  def record(self, entry: dict) -> None:
    if self.enabled:
      self.jsonl.write(json.dumps(entry) + "\n")
      self.jsonl.flush()

  def scalars(self, step: int, values: dict, prefix: str) -> None:
    if self.enabled:
      for k, v in values.items():
        self.tb.add_scalar(f"{prefix}/{k}", v, step)
      self.tb.flush()

  def console(self, line: str) -> None:
    if self.enabled:  # tqdm.write keeps the bar intact; other processes stay quiet
      import tqdm
      tqdm.tqdm.write(line)

  def advance(self, n: int, postfix: dict | None = None) -> None:
    if self.enabled and self.bar is not None:
      if postfix:
        self.bar.set_postfix(postfix, refresh=False)
      self.bar.update(n)

  def close(self) -> None:
    if self.enabled:
      self.bar.close()
      self.tb.close()
      self.jsonl.close()


def _check_finite(step: int, metrics: dict, last_checkpoint: int | None, ckpt_dir: str,
                  rows: list[str]) -> None:
  bad = {k: metrics[k] for k in ("loss", "grad_norm") if k in metrics and not math.isfinite(metrics[k])}
  if bad:
    where = (f"the last checkpoint is step {last_checkpoint} in {ckpt_dir}" if last_checkpoint
             else "no checkpoint was written yet")
    shown = ", ".join(rows[:8]) + (f" and {len(rows) - 8} more" if len(rows) > 8 else "")
    raise FloatingPointError(
        f"step {step}: {', '.join(f'{k}={v}' for k, v in bad.items())} is not finite; the run stopped ({where}). "
        f"The step's batch holds rows {shown}. Lower config.lr or config.grad_clip, try float32 compute "
        "(config.model.dtype) to rule out bf16 overflow, or check those rows.")


# ------------------------------------------------------------------------------------------------ run


def run_sft(config) -> dict:
  """Trains, checkpoints, evaluates and exports per `config` (see `default_config`); returns the summary."""
  from spark_jax.jobs import write_summary
  from spark_jax.models import hf_io
  from spark_jax.models.load import load_model
  from spark_jax.tokenizer import Tokenizer
  import orbax.checkpoint as ocp
  import grain

  t_start = time.time()
  config = with_defaults(config)
  if not config.data:
    raise ValueError("config.data is empty; point it at the Stage I SFT rows (a .jsonl/.parquet file, a "
                     "directory of them, a glob or a hub dataset id).")
  workdir = os.path.abspath(config.workdir)
  os.makedirs(workdir, exist_ok=True)
  pi, pc = jax.process_index(), jax.process_count()
  devices = jax.devices()[:int(config.mesh_devices)] if config.mesh_devices else None
  mesh = shd.make_mesh(config.mesh.to_dict(), devices=devices)
  batch_ways = mesh.shape["data"] * mesh.shape["fsdp"]

  # ---- batch geometry
  global_batch = int(config.global_batch)
  micro = int(config.micro_batch) or global_batch
  if global_batch % micro:
    raise ValueError(f"config.global_batch={global_batch} is not a multiple of config.micro_batch={micro}.")
  if micro % batch_ways or micro % pc:
    raise ValueError(f"config.micro_batch={micro} must be divisible by the mesh's data x fsdp = {batch_ways} "
                     f"(mesh {dict(mesh.shape)}) and by the {pc} processes; change micro_batch or the mesh.")
  accum = global_batch // micro
  eval_rows = int(config.eval_batch) or micro
  if eval_rows % batch_ways or eval_rows % pc:
    raise ValueError(f"config.eval_batch={eval_rows} must be divisible by data x fsdp = {batch_ways} and by "
                     f"the {pc} processes.")

  # ---- model config and tokenizer (no weights yet)
  base_cfg, ckpt_dir = _model_source(config)
  cfg = base_cfg.replace(dtype=config.model.dtype, remat=config.model.remat)
  tok_dir = config.tokenizer or ckpt_dir
  if not tok_dir:
    raise ValueError(f"config.tokenizer is empty and model {config.model.name!r} (init='random') has no "
                     "checkpoint directory to take one from; set config.tokenizer to a tokenizer directory.")
  tokenizer = Tokenizer.from_pretrained(tok_dir)

  # ---- data
  from spark_jax.text.rm import RM_FORMATS
  formats = (config.format,) if config.format else _names(config.formats, "formats")
  variants = _names(config.variants, "variants")
  unknown = sorted(set(formats) - set(RM_FORMATS))
  if unknown:
    raise ValueError(f"config.formats has unknown format(s) {unknown}; the reward-model formats are {RM_FORMATS}.")
  cache_dir = os.path.join(workdir, "data_cache")
  load = functools.partial(data_lib.load_examples, tokenizer=tokenizer, max_length=int(config.max_length),
                           overlong=config.overlong, formats=formats,
                           variants=variants, cache_dir=cache_dir)
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
  if top_id >= cfg.vocab_size:
    raise ValueError(f"tokenizer {tok_dir!r} produced token id {top_id}, but model {config.model.name!r} has "
                     f"vocab_size={cfg.vocab_size}; use the tokenizer that belongs to the model.")
  boundaries = data_lib.bucket_boundaries(int(config.max_length), tuple(config.bucket_boundaries),
                                          int(config.min_bucket))
  num_steps = int(config.num_steps) or int(float(config.epochs) * data_lib.steps_per_epoch(len(train_ex),
                                                                                          global_batch))
  if num_steps < 1:
    raise ValueError(f"{len(train_ex)} training examples x {config.epochs} epochs give no full global batch of "
                     f"{global_batch}; lower config.global_batch or set config.num_steps.")
  plan = data_lib.make_batch_plan(train_ex.lengths, global_batch=global_batch, num_steps=num_steps,
                                  seed=int(config.seed), boundaries=boundaries, window=int(config.bucket_window))
  pad_id = int(tokenizer.pad_token_id)
  source = data_lib.SFTBatchSource(train_ex, plan, accum_steps=accum, pad_id=pad_id, process_index=pi,
                                   process_count=pc)
  loader = data_lib.make_train_loader(source, worker_count=int(config.data_workers),
                                      prefetch=int(config.data_prefetch))
  data_iter = iter(loader)
  eval_sets = []
  if eval_ex is not None and len(eval_ex):
    if config.eval_max_batches:
      keep = np.random.default_rng([int(config.seed), 11]).permutation(len(eval_ex))
      eval_ex = eval_ex.subset(np.sort(keep[:int(config.eval_max_batches) * eval_rows]))
    eval_sets = data_lib.eval_batches(eval_ex, batch_rows=eval_rows, boundaries=boundaries, pad_id=pad_id,
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
  ckpt_dir_abs = os.path.join(workdir, "checkpoints")
  manager = ocp.CheckpointManager(
      ckpt_dir_abs, options=ocp.CheckpointManagerOptions(max_to_keep=int(config.keep_checkpoints), create=True))
  meta = {"plan": plan.fingerprint(), "num_steps": num_steps, "global_batch": global_batch,
          "examples": len(train_ex), "max_length": int(config.max_length)}
  latest = manager.latest_step()
  if latest is not None:
    saved_meta = manager.restore(latest, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    if saved_meta.get("plan") != meta["plan"]:
      raise ValueError(
          f"{ckpt_dir_abs}/{latest}: the checkpoint was written for a different data plan ({saved_meta}) than "
          f"this config gives ({meta}): the data files, tokenizer, seed or batch settings changed. Restore the "
          "original settings to resume, or use a new config.workdir to start over.")
    target = step_lib.abstract_state(cfg, tx, mesh)
    restored = manager.restore(latest, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), data=grain.checkpoint.CheckpointRestore(data_iter)))
    state = restored["state"]
    start = int(jax.device_get(state["step"]))
    logging.info("resumed from %s/%d", ckpt_dir_abs, latest)
  else:
    with shd.use_mesh(mesh):
      _, params, _ = load_model(config.model.name, init=config.model.init, dtype=config.param_dtype,
                                mesh=mesh, seed=int(config.seed), remat=config.model.remat)
      state = step_lib.init_state(cfg, params, tx, mesh)
    del params
    start = 0

  def save(step: int) -> None:
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iter),
        meta=ocp.args.JsonSave(dict(meta, step=step))), force=True)

  def evaluate(params) -> dict[str, float]:
    if not eval_sets:
      return {}
    totals: dict[str, float] = {}
    with shd.use_mesh(mesh):
      outs = [eval_step(params, _global(b, eval_sharding, eval_rows, 0)) for b in eval_sets]
    for o in jax.device_get(outs):
      for k, v in o.items():
        totals[k] = totals.get(k, 0.0) + float(v)
    den = max(totals.pop("tokens"), 1.0)
    return {"eval_loss": totals.pop("loss_sum") / den, "eval_accuracy": totals.get("accuracy_sum", 0.0) / den}

  # ---- the loop
  peak, peak_how = perf.total_peak_flops(mesh.devices.flat, config.model.dtype, float(config.peak_flops_per_device))
  writer = _Writer(workdir, pi == 0, num_steps, start, bool(config.progress_bar))
  writer.console(f"sft: {len(train_ex)} train / {len(eval_ex) if eval_ex is not None else 0} held-out "
                 f"examples, {num_steps} steps of {global_batch} sequences ({accum} x {micro}), buckets "
                 f"{boundaries}, mesh {dict(mesh.shape)}, steps {start}->{num_steps}, peak FLOP/s {peak:.3g} "
                 f"({peak_how})")
  stop_at = num_steps
  if config.debug_stop_after and start < int(config.debug_stop_after) < num_steps:
    stop_at = int(config.debug_stop_after)
  last_ckpt = latest
  pending = None  # (step number, metrics future, seq length)
  t_prev = None
  window: list[dict] = []
  totals = {"seq_tokens": 0.0, "tokens": 0.0, "time": 0.0, "flops": 0.0}
  last_eval: dict[str, float] = {}
  train_losses: list[float] = []

  def finish(p) -> dict:
    nonlocal t_prev
    step_no, fut, seq_len = p
    m = {k: float(v) for k, v in jax.device_get(fut).items()}
    now = time.perf_counter()
    dt = now - t_prev if t_prev is not None else 0.0
    first = t_prev is None
    t_prev = now
    _check_finite(step_no, m, last_ckpt, ckpt_dir_abs,
                  [train_ex.origin(int(i)) for i in plan.rows_SxG[step_no - 1]])
    m["seq_len"] = seq_len
    m["step_time_s"] = dt
    m["tokens_per_s"] = m["seq_tokens"] / dt if dt > 0 else 0.0
    m["mfu"] = perf.mfu(m["seq_tokens"], seq_len, dt, cfg, cfg.remat, peak) if dt > 0 else 0.0
    if not first:  # the first fetched step includes compilation
      totals["seq_tokens"] += m["seq_tokens"]
      totals["time"] += dt
      totals["flops"] += m["mfu"] * dt * peak
    totals["tokens"] += m["tokens"]
    train_losses.append(m["loss"])
    writer.record({"step": step_no, **m})
    window.append(m)
    if step_no % int(config.log_every) == 0 or step_no == stop_at:
      avg = {k: float(np.mean([w[k] for w in window])) for k in ("loss", "accuracy", "tokens_per_s", "mfu")}
      writer.scalars(step_no, {**avg, "lr": m["lr"], "grad_norm": m["grad_norm"], "seq_len": seq_len}, "train")
      writer.console(f"step {step_no}/{num_steps}  loss {avg['loss']:.4f}  acc {avg['accuracy']:.3f}  "
                     f"lr {m['lr']:.3g}  grad_norm {m['grad_norm']:.3f}  tok/s {avg['tokens_per_s']:.0f}  "
                     f"mfu {avg['mfu']:.3f}  T {seq_len}")
      window.clear()
    writer.advance(1, {"loss": f"{m['loss']:.4f}"})
    return m

  def log_eval(step_no: int) -> None:
    nonlocal last_eval
    if not eval_sets:
      return
    last_eval = evaluate(state["params"])
    writer.record({"step": step_no, **last_eval})
    writer.scalars(step_no, last_eval, "eval")
    writer.console(f"step {step_no}: eval_loss {last_eval['eval_loss']:.4f}  "
                   f"eval_acc {last_eval['eval_accuracy']:.3f}")

  try:
    for step_idx in range(start, stop_at):
      local = next(data_iter)
      seq_len = int(local["tokens"].shape[-1])
      batch = _global(local, train_sharding, micro, 1)
      with shd.use_mesh(mesh):
        state, metrics = train_step(state, batch)
      if pending is not None:
        finish(pending)
      pending = (step_idx + 1, metrics, seq_len)
      done = step_idx + 1
      ckpt_due = config.checkpoint_every and done % int(config.checkpoint_every) == 0 and done < num_steps
      eval_due = config.eval_every and done % int(config.eval_every) == 0 and done < num_steps
      if ckpt_due or eval_due:
        finish(pending)  # never checkpoint or evaluate an unchecked step
        pending = None
      if ckpt_due:
        save(done)
        last_ckpt = done
      if eval_due:
        log_eval(done)
      if ckpt_due or eval_due:
        t_prev = time.perf_counter()  # the next step's time should not include the save or the evaluation
    if pending is not None:
      finish(pending)
      pending = None

    final_step = int(jax.device_get(state["step"]))
    stopped_early = final_step < num_steps
    export_dir = ""
    if not stopped_early:
      if manager.latest_step() != final_step:
        save(final_step)
      log_eval(final_step)
      if config.export_dir != "none":
        export_dir = os.path.abspath(config.export_dir or os.path.join(workdir, "export"))
        export_cfg = cfg.replace(dtype=config.export_dtype, remat="none")
        cast = jax.jit(lambda p: jax.tree.map(lambda x: x.astype(config.export_dtype), p))
        hf_io.save_pretrained(export_cfg, cast(state["params"]), export_dir,
                              tokenizer_dir=tokenizer.source if os.path.isdir(tokenizer.source) else None)
        writer.console(f"exported step {final_step} to {export_dir}")
  finally:
    writer.close()
    manager.wait_until_finished()
    manager.close()

  summary = {
      "job": "sft",
      "workdir": workdir,
      "model": config.model.name,
      "final_step": final_step,
      "num_steps": num_steps,
      "stopped_early": stopped_early,
      "resumed_from": latest,
      "steps_this_run": len(train_losses),
      "train_loss_last": train_losses[-1] if train_losses else None,
      "train_loss_mean_last_10": float(np.mean(train_losses[-10:])) if train_losses else None,
      **last_eval,
      "train_examples": len(train_ex),
      "eval_examples": len(eval_ex) if eval_ex is not None else 0,
      "data_stats": stats,
      "global_batch": global_batch,
      "accum_steps": accum,
      "micro_batch": micro,
      "buckets": boundaries,
      "padding_fraction": float(1.0 - train_ex.lengths[plan.rows_SxG].sum() /
                                (plan.lengths_S.astype(np.float64) * global_batch).sum()),
      "loss_tokens_this_run": totals["tokens"],
      "tokens_per_s": totals["seq_tokens"] / totals["time"] if totals["time"] else None,
      "mfu": totals["flops"] / totals["time"] / peak if totals["time"] and peak else None,
      "peak_flops": peak,
      "peak_flops_source": peak_how,
      "elapsed_s": time.time() - t_start,
      "export_dir": export_dir,
      "checkpoint_dir": ckpt_dir_abs,
      "mesh": dict(mesh.shape),
  }
  if pi == 0:
    write_summary(workdir, summary)
  return summary
