"""Stage III: GRPO with the PRM as the reward, inside the jitted step (D10 defaults).

  python -m spark_jax.main --config=configs/rl.py                  # the paper's setting (real models)
  python -m spark_jax.main --config=configs/rl.py --config.reward.type=rlvr
  python -m spark_jax.main --config=configs/rl.py:world            # the embedded world on CPU, minutes

The paper's policy is Qwen2.5-Math-7B after format SFT (configs/format_sft.py writes runs/format_sft/export);
its PRM is the Stage II PRM-CoT model (configs/sft_prm.py, base Qwen2.5-14B-Instruct; same tokenizer family,
which the in-graph reward checks). Every field and its meaning: spark_jax/rl/loop.py `default_config`.
"""

from configs import common
from spark_jax.rl.loop import default_config


def get_config(variant: str = ""):
  config = default_config()
  config.workdir = "runs/rl"
  config.policy = common.model("runs/format_sft/export", init="pretrained", dtype="bfloat16", remat="full")
  config.prm = common.model("runs/sft_prm/export", init="pretrained", dtype="bfloat16")
  config.data.train = "data/skywork_math_8k/problems_8k.jsonl"
  config.data.val = "data/math500/test.jsonl"
  config.eval_prompts = 100
  config.mesh = common.mesh(data=1, fsdp=-1, tensor=1)
  config.export_dir = "runs/rl/export"
  if variant == "world":
    world_config(config)
  elif variant:
    raise ValueError(f"unknown rl config variant {variant!r}; use '' or 'world'.")
  config.lock()
  return config


def world_config(config):
  """The embedded world: its tiny format-trained policy and PRM-CoT (spark_jax.world bootstrap), CPU-sized."""
  from spark_jax.world import bootstrap
  models = bootstrap.ensure_models()
  config.workdir = "runs/rl_world"
  config.policy = common.model(models["policy"], init="pretrained", dtype="float32")
  config.prm = common.model(models["prm"], init="pretrained", dtype="float32")
  config.data.train = models["rl_train"]
  config.data.val = models["rl_val"]
  config.data.template = "plain"
  config.mesh = common.mesh(data=-1)
  config.prompts_per_step = 16
  config.group_size = 8
  config.max_prompt_tokens = 128
  config.max_response = 96
  config.reward.prm_max_new_tokens = 160
  config.lr = 1e-4
  config.beta = 0.0
  config.num_steps = 30
  config.eval_every = 5
  config.eval_prompts = 64
  config.checkpoint_every = 10
  config.export_dir = "runs/rl_world/export"
