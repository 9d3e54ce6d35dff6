"""Stage I records do not depend on the shard size: generate + verify on a tiny random-weight model (the real
Qwen2.5 tokenizer, fp32 on CPU) at shard sizes 4 and 16 (6 problems: 2 generate shards against 1, 12 solutions:
3 verify shards against 1) give the same row keys and the same records.

Every row's key comes from (config.seed, the job's salt, the item's global index, the sample index); the shard
size only changes how prompts are batched. If a record ever differs while the keys agree, the cause is a
near-tie token whose logits rounded differently in another batch shape: the assertion message prints the
first differing record so that this can be told apart from a keying bug.
"""

from __future__ import annotations

import json
import os

import pytest

from configs.stage1 import stage1_config
from spark_jax import models
from spark_jax.stage1 import jobs
from spark_jax.tokenizer_qwen import build_qwen2_tokenizer

NUM_PROBLEMS = 6


@pytest.fixture(scope="module")
def chat_model():
  """One ChatModel on one device, shared by both runs, batches of 8 rows.

  Small batches and one device keep the test to a few compiled programs; the shard size still changes
  which items are sampled together and in how many calls. The random weights come from numpy (eager
  `init_params` compiles one random kernel per parameter shape, which costs more than the whole test).
  """
  import jax
  import numpy as np
  from spark_jax import sharding
  from spark_jax.models import decoder
  from spark_jax.sampling.chat import ChatModel
  from spark_jax.tokenizer import Tokenizer
  cfg = models.get_preset("tiny-qwen2").replace(vocab_size=151936, max_position_embeddings=4096)
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map_with_path(
      lambda path, leaf: np.ones(leaf.shape, leaf.dtype) if "scale" in jax.tree_util.keystr(path)
      else (0.02 * rng.standard_normal(leaf.shape)).astype(leaf.dtype), decoder.abstract_params(cfg))
  mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
  model = ChatModel(cfg, params, Tokenizer.from_pretrained(str(build_qwen2_tokenizer())), mesh, "tiny-qwen2-random",
                    max_batch_rows=8)
  # One prompt bucket, and the same sampling settings for both jobs (below): generate and verify then run
  # one compiled program.
  model.engine.prompt_buckets = (2048,)
  return model


def _run(tmp_path, chat_model, monkeypatch, shard_size):
  data = tmp_path / "problems.jsonl"
  with open(data, "w") as f:
    for k in range(NUM_PROBLEMS):
      f.write(json.dumps({"id": f"p{k}", "problem": f"What is {k} + {k}?", "answer": str(2 * k)}) + "\n")
  config = stage1_config("stage1", "demo")
  config.workdir = str(tmp_path / f"shard{shard_size}")
  config.data = str(data)
  config.limit = 0
  config.shard_size = shard_size
  config.generate.curation = "none"
  config.generate.num_solutions = 2
  for job in (config.generate, config.verify):
    job.max_new_tokens = 6
    job.temperature = 0.8
    job.top_p = 1.0  # a full-vocabulary sort per step is slow on CPU; the sampler tests cover top-p
  config.verify.num_verifications = 2
  keys = {}  # (job seed, prompt text) -> prompt index: what the engine folds into the row keys

  def sample(messages, **kwargs):
    indices = kwargs.get("prompt_indices") or range(len(messages))  # the engine's default: the call's order
    for message, index in zip(messages, indices):
      assert keys.setdefault((kwargs["seed"], message), index) == index
    return type(chat_model).sample(chat_model, messages, **kwargs)

  recorder = type("Recorder", (), {"sample": staticmethod(sample)})
  monkeypatch.setattr(jobs, "_chat_model", lambda config, which: recorder)
  jobs.run_generate(config)
  jobs.run_verify(config)
  records = {}
  for job, name in (("generate", "solutions"), ("verify", "verifications")):
    out_dir = os.path.join(config.workdir, job)
    shards = sorted(f for f in os.listdir(out_dir) if f.startswith(name + "-"))
    records[job] = [json.loads(line) for shard in shards for line in open(os.path.join(out_dir, shard))]
  return keys, records


def test_records_and_keys_do_not_depend_on_shard_size(tmp_path, chat_model, monkeypatch):
  keys_4, records_4 = _run(tmp_path, chat_model, monkeypatch, 4)
  keys_16, records_16 = _run(tmp_path, chat_model, monkeypatch, 16)
  assert len(keys_4) == NUM_PROBLEMS + NUM_PROBLEMS * 2  # one key per problem and per solution
  assert keys_4 == keys_16
  for job in ("generate", "verify"):
    assert len(records_4[job]) == len(records_16[job]) > 0
    for a, b in zip(records_4[job], records_16[job]):
      assert a == b, (f"{job}: the first differing record (same row keys, so a near-tie token rounded "
                      f"differently in another batch shape, or a keying bug):\n{a}\n{b}")
