"""Stage III: GRPO with the PRM as the reward, inside the jitted step (D10 defaults).

  python -m spark_jax.main --config=configs/rl.py                  # the paper's setting (real models)
  python -m spark_jax.main --config=configs/rl.py --config.reward.type=rlvr
  python -m spark_jax.main --config=configs/rl.py:world            # the embedded world on CPU, minutes
  python -m spark_jax.main --config=configs/rl.py:world_quick      # the quick world's bootstrap models (CI size)

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
  elif variant == "world_quick":
    world_config(config, quick=True)
  elif variant:
    raise ValueError(f"unknown rl config variant {variant!r}; use '', 'world' or 'world_quick'.")
  config.lock()
  return config


def world_config(config, quick: bool = False):
  """The embedded world on CPU: the world's format-trained tiny policy (its bootstrap generator) as the policy.

  `world`: the PRM is the PRM-CoT that the world demo trains in Stage II (run
  `python -m spark_jax.main --config=configs/demo.py` first). `world_quick`: the quick demo's bootstrap models
  (the ones the test suite's `world` fixture trains and caches) and their Stage II PRM-CoT
  (spark_jax/world/demo.py `world_prm`, the suite's `world_prm` fixture: trained on first use, then cached).

  RL prompts are fresh world problems (`spark_jax.world.task`), written once next to the run with their
  answers; validation problems come from another seed (held out from the RL prompts).
  """
  import json
  import os
  from configs import demo as demo_config
  from spark_jax.world import bootstrap, demo, task
  world = demo_config.get_config()
  if quick:
    world.quick = True
  world = demo.resolve(world)
  boot = bootstrap.bootstrap_dir(world, os.path.join(world.workdir, "bootstrap"))
  if quick:
    summary = os.path.join(boot, "summary.json")
    if not os.path.exists(summary):
      raise FileNotFoundError(f"{summary} is missing: train the quick world's models first "
                              "(`python -m spark_jax.main --config=configs/demo.py --config.quick=True`, or the "
                              "test suite's `world` fixture); they are cached by their settings' fingerprint.")
    with open(summary) as f:
      prm_dir = demo.world_prm(world, json.load(f))  # trained once per machine (minutes), then cached
  else:
    stage2 = os.path.join(os.path.abspath(world.workdir), "stage2", "summary.json")
    if not os.path.exists(stage2):
      raise FileNotFoundError(f"{stage2} is missing: the world's PRM comes from the demo's Stage II; run "
                              "`python -m spark_jax.main --config=configs/demo.py` first (or use the "
                              "world_quick variant, whose PRM trains on first use).")
    with open(stage2) as f:
      prm_dir = json.load(f)["runs"]["step_consistency/prm_cot"]["export_dir"]
  config.workdir = "runs/rl_world_quick" if quick else "runs/rl_world"
  tc = bootstrap.task_config(world)
  data_dir = os.path.abspath(os.path.join("runs", "rl_world_data", bootstrap.fingerprint(world)))
  train, val = os.path.join(data_dir, "problems.jsonl"), os.path.join(data_dir, "val.jsonl")
  if not os.path.exists(val):
    os.makedirs(data_dir, exist_ok=True)
    task.write_problems(train, task.make_problems(12345, 512, tc, prefix="rl"))
    task.write_problems(val, task.make_problems(54321, 256, tc, prefix="val"))
  config.policy = common.model(os.path.join(boot, "generator", "export"), init="pretrained", dtype="float32")
  config.prm = common.model(prm_dir, init="pretrained", dtype="float32")
  config.data.train = train
  config.data.val = val
  config.data.template = "generator"
  config.mesh = common.mesh(data=-1)
  config.prompts_per_step = 16
  config.group_size = 8
  config.max_prompt_tokens = 256
  config.max_response = 96
  config.reward.prm_max_new_tokens = 160
  config.lr = 1e-5
  config.beta = 0.0
  config.num_steps = 30
  config.eval_every = 5
  config.eval_prompts = 256
  config.checkpoint_every = 10
  config.export_dir = "none"
