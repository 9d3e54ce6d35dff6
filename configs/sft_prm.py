"""Stage II: supervised fine-tuning of a generative reward model on Stage I data (D9 defaults).

  python -m spark_jax.main --config=configs/sft_prm.py \
      --config.data=runs/stage1/aggregate/datasets/step_consistency --config.format=prm_cot \
      --config.model.name=/models/Qwen2.5-14B-Instruct --config.mesh.fsdp=-1 --config.mesh.data=1
  python -m spark_jax.main --config=configs/sft_prm.py:demo   # SmolLM2-135M on the Stage I demo output

Every field and its meaning: spark_jax/train/loop.py `default_config`.
"""

from spark_jax.train.loop import default_config


def get_config(variant: str = ""):
  config = default_config()
  config.workdir = "runs/sft_prm"
  config.data = "runs/stage1/aggregate/datasets/step_consistency"
  config.format = "prm"
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
