"""The RL job's bad-input errors and its host pieces (prompt data, prompt iterator, tokenizer check)."""

import json

import numpy as np
import pytest

from spark_jax.rl import loop as rl_loop
from spark_jax.rl import policy as policy_lib


def _write_jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


def test_rl_prompt_without_the_problem_field_names_file_and_row(tmp_path):
  src = _write_jsonl(tmp_path / "rl.jsonl", [{"problem": "1+1?", "answer": "2"}, {"question": "2+2?"}])
  with pytest.raises(KeyError, match=r"rl.jsonl row 2: no problem text under key 'problem'.*question"):
    policy_lib.load_rl_prompts(src)


def test_rl_prompts_nested_keys_json_lists_and_missing_answers(tmp_path):
  rows = [{"extra_info": {"question": "What is 3?"}, "reward_model": {"ground_truth": '["3"]'}},
          {"extra_info": {"question": "What is 4?"}, "reward_model": {}}]
  src = _write_jsonl(tmp_path / "nested.jsonl", rows)
  got = policy_lib.load_rl_prompts(src, problem_key="extra_info.question", answer_key="reward_model.ground_truth")
  assert [(p.problem, p.ground_truth) for p in got] == [("What is 3?", ["3"]), ("What is 4?", "")]
  with pytest.raises(KeyError, match=r"row 2: no ground truth under key 'reward_model.ground_truth'"):
    policy_lib.load_rl_prompts(src, problem_key="extra_info.question", answer_key="reward_model.ground_truth",
                               require_answer=True)


def test_parquet_prompts(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  path = tmp_path / "rl.parquet"
  pq.write_table(pa.Table.from_pylist([{"problem": "a", "answer": "1"}, {"problem": "b", "answer": "2"}]), path)
  got = policy_lib.load_rl_prompts(str(path), limit=1)
  assert [(p.problem, p.ground_truth, p.index) for p in got] == [("a", "1", 0)]


def _config(**kw):
  c = rl_loop.default_config()
  for k, v in kw.items():
    node, *rest = k.split(".")
    if rest:
      c[node][rest[0]] = v
    else:
      c[k] = v
  return c


def test_unknown_reward_type_and_group_size_errors():
  with pytest.raises(ValueError, match="reward.type='prm_magic' is not a reward type"):
    rl_loop.check_config(_config(**{"reward.type": "prm_magic"}))
  with pytest.raises(ValueError, match="mini_batches=3 does not divide the 4 x 2 = 8 rollouts"):
    rl_loop.check_config(_config(prompts_per_step=4, group_size=2, mini_batches=3))
  with pytest.raises(ValueError, match="group_size=4 does not divide the mini-batch of 2"):
    rl_loop.check_config(_config(prompts_per_step=2, group_size=4, mini_batches=4))
  rl_loop.check_config(_config(prompts_per_step=4, group_size=2, mini_batches=2))


def test_response_budget_larger_than_the_cache():
  from spark_jax.models import get_preset
  cfg = get_preset("tiny-qwen2")  # 1024 positions
  with pytest.raises(ValueError, match=r"policy: prompt budget 512 \+ output budget 1024 = 1536 tokens exceeds"):
    rl_loop.check_budget(cfg, 512, 1024, "policy")
  rl_loop.check_budget(cfg, 512, 512, "policy")


class _Tok:
  def __init__(self, table):
    self.table = table

  def token_bytes_table(self):
    return list(self.table)


def test_prm_with_another_tokenizer_names_both_models():
  a, b = _Tok([b"a", b"b", b"c"]), _Tok([b"a", b"x", b"c"])
  with pytest.raises(ValueError, match=r"policy 'pol' and PRM 'rm' have different tokenizers .*id 1"):
    rl_loop.check_same_tokenizer(a, b, "pol", "rm")
  rl_loop.check_same_tokenizer(a, _Tok([b"a", b"b", b"c"]), "pol", "rm")


def test_prompt_iterator_epochs_and_resume():
  it = rl_loop.PromptIterator(5, seed=3)
  first = it.take(3) + it.take(4)
  assert sorted(first[:5]) == list(range(5))  # one full epoch before any repeat
  state = it.state()
  rest = it.take(6)
  again = rl_loop.PromptIterator(5, seed=3)
  again.restore(state)
  assert again.take(6) == rest


def test_padding_helpers():
  t, n = rl_loop.left_pad([[1, 2], [3]], 3)
  assert t.tolist() == [[0, 1, 2], [0, 0, 3]] and n.tolist() == [2, 1]
  t, n = rl_loop.right_pad([[1, 2], [3]], 3)
  assert t.tolist() == [[1, 2, 0], [3, 0, 0]] and n.tolist() == [2, 1]
  assert np.asarray(t).dtype == np.int32
