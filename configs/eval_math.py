"""Math evaluation (docs/method.md, D11): MATH500, AIME24, AIME25, AMC23, OlympiadBench, Minerva.

  # a policy trained by spark_jax (exported HF dir), in its own <think>/<step>/<answer> format:
  python -m spark_jax.main --config=configs/eval_math.py --config.model.name=runs/rl/export
  # an instruct model that never saw the policy format, with avg@16 beside greedy pass@1:
  python -m spark_jax.main --config=configs/eval_math.py --config.model.name=Qwen/Qwen2.5-Math-7B-Instruct \
      --config.prompt_template=generator --config.num_samples=16
  # quick look: --config.limit=8 (problems per benchmark)

Writes per-benchmark pass@1 / avg@k / pass@k and their average to scores.json and table.md in the workdir.
"""

from configs import common

_BENCHMARKS = ("math500", "aime24", "aime25", "amc23", "olympiadbench", "minerva_math")


def get_config():
  config = common.base("eval_math", workdir="runs/eval_math")
  config.model = common.model("smollm2-135m-instruct", init="pretrained")
  config.data = "data"  # folder holding <benchmark>/test.jsonl
  config.benchmarks = _BENCHMARKS  # gsm8k is also available
  config.limit = 0  # problems per benchmark (the first ones in file order); 0 = all
  config.prompt_template = "policy"  # policy (<think>/<step>/<answer>) | generator (Stage I's `Answer:` prompt)
  config.thinking = "auto"  # chat template's enable_thinking: auto | on | off
  config.greedy = True  # pass@1 with greedy decoding (D11's default)
  config.num_samples = 4  # k for avg@k and pass@k; 0 = greedy only
  config.temperature = 0.6  # D11
  config.top_p = 0.95  # D11
  config.max_new_tokens = 4096
  config.shard_size = 32  # problems per atomically written shard
  config.max_batch_rows = 64  # decode rows per engine batch (prompts x samples)
  config.batching = "continuous"  # or "static" (docs/method.md, further knobs)
  config.grading_workers = 4  # 0 = grade in this process (debugging: a hanging answer cannot be killed there)
  config.grading_timeout_s = 10.0
  config.lock()
  return config
