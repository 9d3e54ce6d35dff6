"""ProcessBench (3,400 cases, F1 per split and their average).

  # a PRM trained by spark_jax (exported HF dir), its format must match training:
  python -m spark_jax.main --config=configs/processbench.py --config.model.name=runs/sft_prm/export \
      --config.format=prm
  # any instruct model as a critic, with 8-vote majority:
  python -m spark_jax.main --config=configs/processbench.py --config.mode=critic --config.num_votes=8 \
      --config.model.name=Qwen/Qwen2.5-7B-Instruct
  # quick look: --config.limit=20 (cases per split)
"""

from configs import common


def get_config():
  config = common.base("processbench", workdir="runs/processbench")
  config.model = common.model("smollm2-135m-instruct", init="pretrained")
  config.mode = "prm"  # prm | critic
  config.format = "prm"  # prm | prm_cot | think_prm (mode=prm)
  config.data = "data/processbench"
  config.splits = ("gsm8k", "math", "olympiadbench", "omnimath")
  config.limit = 0  # cases per split (half all-correct, half erroneous); 0 = all
  config.max_new_tokens = 4096
  config.num_votes = 1  # critic mode: samples per case, majority vote
  config.temperature = 0.7  # critic mode with num_votes > 1
  config.top_p = 0.95
  config.shard_size = 64
  config.max_batch_rows = 64
  config.batching = "continuous"  # or "static" (docs/method.md, further knobs)
  config.lock()
  return config
