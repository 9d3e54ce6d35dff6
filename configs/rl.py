"""Stage III: GRPO with the PRM as the reward, inside the jitted step (D10 defaults).

  python -m spark_jax.main --config=configs/rl.py                  # the paper's setting (real models)
  python -m spark_jax.main --config=configs/rl.py --config.reward.type=rlvr
  python -m spark_jax.main --config=configs/rl.py:world            # the embedded world on CPU, minutes
  python -m spark_jax.main --config=configs/rl.py:world_quick      # the quick world's bootstrap models (CI size)

The paper's policy is Qwen2.5-Math-7B after format SFT (configs/format_sft.py writes runs/format_sft/export);
its PRM is the Stage II PRM-CoT model (configs/sft_prm.py, base Qwen2.5-14B-Instruct; same tokenizer family,
which the in-graph reward checks). Every field and its meaning: `rl_config` below.
"""

from ml_collections import ConfigDict

from configs import common


def rl_config() -> ConfigDict:
  """Every RL knob with its D10 default. Required: `data.train` and the models.

  policy / prm / reference      model specs (common.model); reference "" = the policy's initial weights.
  tokenizer / prm_tokenizer     tokenizer directories ("" = the model's checkpoint directory).
  data.train / data.val         RL prompt sets (JSONL / parquet / directory / hub id); val "" = no evaluation;
                                several val sets separated by commas are scored apart (eval accuracy/<folder>)
                                and averaged (accuracy), eval_prompts each.
  data.problem_key / answer_key fields (dotted paths allowed) of the raw problem and the ground truth.
  data.template                 "chat" | "plain" (policy prompt rendering, rl/policy.py).
  prompts_per_step / group_size B prompts x G rollouts (D10: 256 x 16).
  max_prompt_tokens / max_response  prompt and response budgets (D10: 2048 / 2048).
  temperature / top_p / top_k   rollout sampling (D10: 1, 1, 0).
  reward.type                   one of rl.step.REWARD_TYPES; reward.in_graph False = host reference path.
  reward.prm_max_new_tokens     PRM output budget; reward.prm_chunk / rollout_chunk rows/prompts per block.
  reward.rlvr_gate / orm_prompt_bug / prm_all_rows   D12 / D10 knobs, benchmark knob.
  adv_scale                     "group" | "batch" | "none".
  lr, schedule, warmup_ratio, weight_decay, grad_clip   AdamW (D10: 1e-6 constant, 0, 0.01, 1.0).
  clip_low / clip_high / dual_clip, beta, kl_type, loss_agg   the GRPO loss (D10: 0.2 / 0.2 / 3, 0.001, k3,
                                token-mean).
  mini_batches / ppo_epochs     optimizer steps per rollout batch = mini_batches x ppo_epochs (D10: 1 x 1).
  micro_batch                   rollouts per forward/backward pass, all devices together (0 = the whole
                                mini-batch): gradients of the mini-batch's micro-batches are summed in one
                                jitted step, and the log-prob passes go one micro-batch at a time; it changes
                                memory, not the result (a multiple of the mesh's data x fsdp size).
  use_sampler_logprobs          pi_old = the sampler's log-probs instead of the trainer's recomputation.
  dynamic_sampling / max_sampling_rounds   DAPO's filter of zero-variance groups, refill rounds.
  eval_temperature / eval_samples   validation decoding: greedy pass@1 (0 / 1, D11) or avg@k at a temperature.
  num_steps, eval_every, eval_prompts, eval_max_response, checkpoint_every, keep_checkpoints, log_every,
  export_dir ("" = workdir/export, "none" = no export), progress_bar.
  resume                        "auto" | "force" (resume a checkpoint written with other settings).
  debug_stop_after              stop after this step (tests of resumption); 0 = off.
  grading_workers / grading_timeout_s   the run's one math_verify pool (rlvr rewards, validation): worker
                                processes kept for the whole run, and the per-answer time limit (a hung
                                answer counts as wrong).
  """
  c = common.base("rl", "runs/rl")
  c.policy = common.model("qwen2.5-0.5b", init="random")
  c.prm = common.model("qwen2.5-0.5b", init="random")
  c.reference = ""
  c.tokenizer = ""
  c.prm_tokenizer = ""
  c.data = ConfigDict({"train": "", "val": "", "split": "train", "problem_key": "problem",
                       "answer_key": "answer", "template": "chat", "limit": 0})
  c.prompts_per_step = 256
  c.group_size = 16
  c.max_prompt_tokens = 2048
  c.max_response = 2048
  c.temperature = 1.0
  c.top_p = 1.0
  c.top_k = 0
  c.reward = ConfigDict({"type": "prm_cot_outcome", "in_graph": True, "prm_max_new_tokens": 4096,
                         "prm_chunk": 0, "rollout_chunk": 0, "rlvr_gate": False, "orm_prompt_bug": False,
                         "prm_all_rows": False})
  c.adv_scale = "group"
  c.lr = 1e-6
  c.schedule = "constant"
  c.warmup_ratio = 0.0
  c.weight_decay = 0.01
  c.grad_clip = 1.0
  c.clip_low = 0.2
  c.clip_high = 0.2
  c.dual_clip = 3.0
  c.beta = 0.001
  c.kl_type = "k3"
  c.loss_agg = "token-mean"
  c.logits_chunk = 1024
  c.mini_batches = 1
  c.ppo_epochs = 1
  c.micro_batch = 0
  c.use_sampler_logprobs = False
  c.dynamic_sampling = False
  c.max_sampling_rounds = 3
  c.num_steps = 100
  c.eval_every = 10
  c.eval_prompts = 0
  c.eval_max_response = 0
  c.eval_temperature = 0.0
  c.eval_samples = 1
  c.checkpoint_every = 50
  c.keep_checkpoints = 2
  c.resume = "auto"
  c.debug_stop_after = 0
  c.grading_workers = 4
  c.grading_timeout_s = 10.0
  c.log_every = 1
  c.export_dir = ""
  c.progress_bar = True
  return c


def get_config(variant: str = ""):
  config = rl_config()
  config.workdir = "runs/rl"
  config.policy = common.model("runs/format_sft/export", init="pretrained", dtype="bfloat16", remat="full")
  config.prm = common.model("runs/sft_prm/export", init="pretrained", dtype="bfloat16")
  config.data.train = "data/skywork_math_8k/problems_8k.jsonl"
  # Periodic validation on AIME24, AIME25 and 100 MATH500 problems (per-set accuracy and their average).
  config.data.val = "data/aime24/test.jsonl,data/aime25/test.jsonl,data/math500/test.jsonl"
  config.eval_prompts = 100
  config.mesh = common.mesh(data=1, fsdp=-1, tensor=1)
  # 4,096 rollouts of up to 4k tokens do not fit one forward/backward pass on any accelerator: 16
  # micro-batches of 256 (divisible by any power-of-two device count up to 256).
  config.micro_batch = 256
  config.logits_chunk = 256  # positions x micro-batch rows x 152k fp32 logits per head chunk: 5 GB at 32 rows
  # The caches of 4,096 rollouts at once do not fit either: the 7B policy's K/V (57 KB a token) for 256
  # shared 2k prompts + 4,096 2k responses is ~0.5 TB, the 14B PRM's (197 KB a token) for 4,096 x 8k ~6.6 TB.
  # Blocks of 16 prompts (256 rollouts, ~32 GB) and 64 PRM rows (~100 GB), each split over the devices' data
  # axes; results do not depend on the block sizes.
  config.reward.rollout_chunk = 16
  config.reward.prm_chunk = 64
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
  """
  import json
  import os
  from configs import demo as demo_config
  from spark_jax.world import bootstrap, demo
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
  data_dir = os.path.abspath(os.path.join("runs", "rl_world_data", bootstrap.fingerprint(world)))
  train, val = world_problems(world, data_dir)
  world_settings(config, policy_dir=os.path.join(boot, "generator", "export"), prm_dir=prm_dir, train=train,
                 val=val)


def world_problems(world, data_dir: str, train_problems: int = 512, val_problems: int = 256) -> tuple[str, str]:
  """RL prompts for the world (demo config `world`): fresh problems written once under `data_dir` with their
  answers, and validation problems from another seed (held out from the RL prompts); their two paths."""
  import os
  from spark_jax.world import bootstrap, task
  tc = bootstrap.task_config(world)
  train, val = os.path.join(data_dir, "problems.jsonl"), os.path.join(data_dir, "val.jsonl")
  if not os.path.exists(val):
    os.makedirs(data_dir, exist_ok=True)
    task.write_problems(train, task.make_problems(12345, train_problems, tc, prefix="rl"))
    task.write_problems(val, task.make_problems(54321, val_problems, tc, prefix="val"))
  return train, val


def world_settings(config, *, policy_dir: str, prm_dir: str | None, train: str, val: str):
  """The world's RL sizes on an `rl_config()` (CPU, minutes): the policy and PRM checkpoints, the prompt
  files, and the budgets a world solution (<= 4 steps, ~60 tokens) and its PRM-CoT verification need.

  Validation is avg@4 at temperature 1 (`eval_temperature`, `eval_samples`): the world's generator is
  trained on solutions with injected errors, so it samples them at the training rate while its greedy
  answer is already right; GRPO's gain is the errors it stops sampling.
  """
  config.policy = common.model(policy_dir, init="pretrained", dtype="float32", scan_layers=False)
  if prm_dir:
    config.prm = common.model(prm_dir, init="pretrained", dtype="float32", scan_layers=False)
  config.data.train = train
  config.data.val = val
  config.data.template = "generator"
  config.mesh = common.mesh(data=-1)
  config.prompts_per_step = 16
  config.group_size = 8
  config.micro_batch = 0  # 128 short world rollouts fit one pass, and one block of rollouts and PRM rows
  config.reward.rollout_chunk = 0
  config.reward.prm_chunk = 0
  config.max_prompt_tokens = 256
  config.max_response = 96
  config.reward.prm_max_new_tokens = 160
  config.lr = 1e-4
  config.beta = 0.0
  config.num_steps = 30
  config.eval_every = 5
  config.eval_prompts = 128
  config.eval_temperature = 1.0
  config.eval_samples = 4
  config.checkpoint_every = 10
  config.export_dir = "none"
  config.grading_workers = 1  # one-number answers: one worker keeps up, and the 2 cores stay with the step
