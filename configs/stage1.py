"""Stage I: generate -> verify (+ reference-guided) -> critique -> aggregate, in one command.

  python -m spark_jax.main --config=configs/stage1.py            # the paper's setting (needs real models)
  python -m spark_jax.main --config=configs/stage1.py:demo       # SmolLM2-135M, 8 problems, on a laptop

The per-step configs (generate.py, verify.py, critique.py, aggregate.py) are this config with another
`job`; all share one workdir, so a step reads what the previous one wrote.
"""

from configs import common


def stage1_config(job: str = "stage1", variant: str = "") -> "common.ConfigDict":
  config = common.base(job, workdir="runs/stage1")
  config.data = "data/skywork_math_8k/problems_8k.jsonl"  # the full 8,000-problem pool (packaged data)
  config.problem_field = "problem"
  config.answer_field = "answer"  # "" when there is no ground truth
  config.id_field = "id"
  config.limit = 0  # 0 = all problems
  config.on_error = "skip"  # bad rows: "skip" (counted in the summary) or "raise" (error names file and row)
  config.shard_size = 16  # items per atomically written shard (problems for generate, solutions after)
  config.max_batch_rows = 64  # decode rows per engine batch (prompts x samples)
  config.batching = "continuous"  # or "static" (docs/method.md, further knobs)
  config.generator = common.model("Qwen/Qwen2.5-14B-Instruct", init="pretrained", dtype="bfloat16")
  config.verifier = common.model("Qwen/Qwen3-32B", init="pretrained", dtype="bfloat16")

  config.generate = common.ConfigDict()
  config.generate.num_solutions = 8  # M (D1)
  config.generate.temperature = 0.7
  config.generate.top_p = 0.95
  config.generate.max_new_tokens = 8192
  config.generate.curation = "reference"  # D2: reference | verifier_majority | none
  config.generate.curation_cap = 3
  config.generate.curation_seed = 42
  config.generate.grading_workers = 4
  config.generate.grading_timeout_s = 20.0

  config.verify = common.ConfigDict()
  config.verify.num_verifications = 16  # N (D3)
  config.verify.temperature = 0.8
  config.verify.top_p = 0.95
  config.verify.max_new_tokens = 8192
  config.verify.thinking = "auto"  # chat template's enable_thinking: auto | on | off
  config.verify.reference = True  # also run the reference-guided baseline (D7)
  config.verify.reference_num_verifications = 8

  config.critique = common.ConfigDict()
  config.critique.enabled = True  # meta-critique variants (D6)
  config.critique.max_new_tokens = 8192

  config.aggregate = common.ConfigDict()
  config.aggregate.step_tie = "incorrect"  # D4: incorrect | correct | drop
  config.aggregate.outcome_tie = "No"  # No | Yes | drop
  # A step index is voted only when more than this fraction of the verifications with step verdicts reach
  # it (0.5 = a majority; 0 = the literal per-step majority of D4, where one verification suffices).
  config.aggregate.step_quorum = 0.5
  config.aggregate.step_match_final = False  # step_consistency selection also requires final == y*
  # Targets that contradict themselves (all steps correct but final No, or a step incorrect but final Yes):
  # "keep" (faithful; counted in the manifest and the data-quality table) | "drop" (from the variant, all formats).
  config.aggregate.contradictions = "keep"
  config.aggregate.formats = ("orm", "prm", "prm_cot", "think_prm")
  config.aggregate.variants = ("single", "outcome_consistency", "step_consistency", "meta_critique",
                               "meta_critique_outcome", "reference_guided")

  if variant == "demo":
    config.workdir = "runs/stage1_demo"
    config.data = "data/skywork_math_8k/problems_256.jsonl"  # the first 256 problems of the pool
    config.limit = 8
    config.shard_size = 4
    config.generator = common.model("smollm2-135m-instruct", init="pretrained")
    config.verifier = common.model("smollm2-135m-instruct", init="pretrained")
    config.generate.num_solutions = 4
    config.generate.max_new_tokens = 160
    config.generate.grading_workers = 1
    # A 135M model solves almost none of these problems, so reference balancing would keep no solution.
    config.generate.curation = "none"
    config.verify.num_verifications = 4
    config.verify.reference_num_verifications = 2
    config.verify.max_new_tokens = 160
    config.critique.max_new_tokens = 160
  elif variant:
    raise ValueError(f"unknown stage1 config variant {variant!r}; use '' or 'demo'.")
  config.lock()
  return config


def get_config(variant: str = ""):
  return stage1_config("stage1", variant)
