"""Format SFT of the policy before RL: teach a base model the `<think>` / `<step>` / `<answer>\\boxed{}</answer>`
layout (docs/method.md, policy format) with the Stage II trainer (`spark_jax.train.sft`).

  python -m spark_jax.main --config=configs/format_sft.py --config.data=<chat rows> \
      --config.model.name=Qwen/Qwen2.5-Math-7B
  python -m spark_jax.main --config=configs/format_sft.py:world   # the embedded world's format data

Data: chat rows `{"messages": [{"role": "user", "content": <policy prompt>}, {"role": "assistant",
"content": <step-tagged solution>}]}` in JSONL / parquet, or a hub id (online) holding that layout; the user
turn must be what the RL job sends (configs/rl.py `data.template`: spark_jax.rl.policy renders it). The loss is
on the assistant turn only. Offline, the world's bootstrap writes such rows (its generator data, the Stage I
generator prompt + policy-format solutions; RL on the world uses `data.template="generator"` to match).
The export directory is what configs/rl.py takes as the policy.

Optimisation follows the paper's format-SFT recipe (lr 5e-6, 2 epochs, global batch 64, max length 4096);
every other field as in configs/sft_prm.py.
"""

from configs import common
from configs.sft_prm import sft_config


def get_config(variant: str = ""):
  config = sft_config()
  config.workdir = "runs/format_sft"
  config.export_dir = "runs/format_sft/export"
  config.model = common.model("Qwen/Qwen2.5-Math-7B", init="pretrained", dtype="bfloat16", remat="full")
  config.data = "runs/format_sft/data"
  config.format = ""  # format-SFT rows carry no reward-model format
  config.lr = 5e-6
  config.epochs = 2.0
  config.max_length = 4096
  config.global_batch = 64
  if variant == "world":
    from configs import demo as demo_config
    from spark_jax.world import bootstrap, demo
    world = demo.resolve(demo_config.get_config())
    boot = bootstrap.bootstrap_dir(world, "runs/world/bootstrap")
    config.workdir = "runs/format_sft_world"
    config.export_dir = "runs/format_sft_world/export"
    config.data = f"{boot}/data/generator.jsonl"
    config.tokenizer = f"{boot}/tokenizer"
    config.model = common.model(world.bootstrap.generator_preset, init="random", dtype="float32")
    config.max_length = 512
    config.global_batch = 16
    config.num_steps = 200
    config.lr = 1e-3
    config.warmup_ratio = 0.05
    config.checkpoint_every = 100
    config.eval_every = 0
  elif variant:
    raise ValueError(f"unknown format_sft config variant {variant!r}; use '' or 'world'.")
  config.lock()
  return config
