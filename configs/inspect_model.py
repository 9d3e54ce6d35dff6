"""Load a model, print a logit summary of a prompt and a short greedy continuation.

  python -m spark_jax.main --config=configs/inspect_model.py --config.model.name=smollm2-135m-instruct \
      --config.model.init=pretrained
"""

from configs import common


def get_config():
  config = common.base("inspect_model", workdir="runs/inspect_model")
  config.model = common.model("smollm2-135m-instruct", init="pretrained")
  config.prompt = "What is the sum of the first ten positive integers?"
  config.chat = True
  config.max_new_tokens = 48
  config.lock()
  return config
