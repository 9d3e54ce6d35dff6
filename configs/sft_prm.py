"""Stage II: supervised fine-tuning of a generative reward model on Stage I data (D9 defaults).

  python -m spark_jax.main --config=configs/sft_prm.py \
      --config.data=runs/stage1/aggregate/datasets/step_consistency --config.format=prm_cot \
      --config.model.name=/models/Qwen2.5-14B-Instruct --config.mesh.fsdp=-1 --config.mesh.data=1
  python -m spark_jax.main --config=configs/sft_prm.py:demo   # SmolLM2-135M on the Stage I demo output

The job is `spark_jax.train.sft:run_sft`; every field it reads is set here (library code holds no defaults).

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
workdir         checkpoints, tensorboard, metrics.jsonl, logs.txt, summary.json, data cache.
resume          "auto": resume from workdir/checkpoints when its settings fingerprint matches (a mismatch is
                an error listing the changed settings); "force": resume even so.
checkpoint_every, keep_checkpoints   save every K updates (and at the end); how many to keep.
eval_every      held-out loss every K updates (and at the end); 0 = only at the end.
log_every       console/TensorBoard every K updates.
verbose_logs    also show library INFO logs (orbax, grain, jax) on the console; they always go to logs.txt.
export_dir      "" = workdir/export; "none" = no export.
export_dtype    dtype of the exported safetensors ("bfloat16" like the Qwen release; "float32" exact).
peak_flops_per_device  FLOP/s for MFU; 0 = the table in spark_jax/train/perf.py (CPU: measured).
data_workers    grain worker processes (0 = in-process; >0 needs absl flags parsed, as main.py does).
data_prefetch   batches read ahead.
progress_bar    tqdm bar on process 0.
debug_stop_after  stop after this many updates without a final checkpoint (simulates a preemption).
"""

from configs import common


def sft_config() -> "common.ConfigDict":
  """The paper's Stage II setting (D9) for a 14B model; `get_config` adds the variants."""
  c = common.base("sft", workdir="runs/sft_prm")
  c.model = common.model("Qwen/Qwen2.5-14B-Instruct", init="pretrained", dtype="bfloat16", remat="full")
  c.mesh_devices = 0
  c.tokenizer = ""
  c.data = "runs/stage1/aggregate/datasets/step_consistency"
  c.data_split = "train"
  c.format = "prm"
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
  c.resume = "auto"
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


def get_config(variant: str = ""):
  config = sft_config()
  if variant == "demo":
    config.workdir = "runs/sft_prm_demo"
    config.data = "runs/stage1_demo/aggregate/datasets/step_consistency"
    config.model.name = "smollm2-135m-instruct"
    config.model.dtype = "float32"
    config.model.remat = "none"
    config.max_length = 2048
    config.global_batch = 8
    config.num_steps = 20
    config.checkpoint_every = 10
    config.eval_every = 10
  elif variant:
    raise ValueError(f"unknown sft_prm config variant {variant!r}; use '' or 'demo'.")
  config.lock()
  return config
