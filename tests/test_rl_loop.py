"""The RL job's bad-input errors and its host pieces (prompt data, prompt iterator, tokenizer check)."""

import json

import numpy as np
import pytest

from configs.rl import rl_config

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
  c = rl_config()
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
  with pytest.raises(ValueError, match="micro_batch=3 does not divide the mini-batch of 4 rollouts"):
    rl_loop.check_config(_config(prompts_per_step=4, group_size=2, mini_batches=2, micro_batch=3))
  rl_loop.check_config(_config(prompts_per_step=4, group_size=2, mini_batches=2, micro_batch=2))
  with pytest.raises(ValueError, match=r"reward.prm_chunk=3 does not divide the 8 rollouts"):
    rl_loop.check_config(_config(prompts_per_step=4, group_size=2, **{"reward.prm_chunk": 3}))
  with pytest.raises(ValueError, match=r"reward.rollout_chunk=3 does not divide the 4 prompts"):
    rl_loop.check_config(_config(prompts_per_step=4, group_size=2, **{"reward.rollout_chunk": 3}))
  # a block or micro-batch at least the whole batch is one block: the paper config's sizes on a small run
  rl_loop.check_config(_config(prompts_per_step=4, group_size=2, micro_batch=256,
                               **{"reward.rollout_chunk": 16, "reward.prm_chunk": 64}))
  with pytest.raises(ValueError, match="grading_workers=0: RL grades"):
    rl_loop.check_config(_config(grading_workers=0))
  with pytest.raises(ValueError, match="grading_timeout_s=0.0"):
    rl_loop.check_config(_config(grading_timeout_s=0.0))


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


# ------------------------------------------------------------------------------- the job, end to end

import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
STEPS = 4


@pytest.fixture(scope="module")
def job_files(tmp_path_factory):
  """A tiny BPE whose merges make `\\boxed{7}` a few tokens (a random policy writes it now and then, so rlvr
  rewards vary), and RL prompts whose answer is 7."""
  from tokenizers import Tokenizer as HFTokenizer, decoders, models as tok_models, pre_tokenizers, trainers
  d = tmp_path_factory.mktemp("rl_job")
  tok = HFTokenizer(tok_models.BPE())
  # No pre-tokenizer split (use_regex=False): merges may cross punctuation, so `\\boxed{7}` becomes one token.
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=280, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(["\\boxed{7}"] * 50, trainer)
  tok.save(str(d / "tokenizer.json"))
  (d / "tokenizer_config.json").write_text(json.dumps({
      "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
      "chat_template": CHATML, "clean_up_tokenization_spaces": False}))
  data = _write_jsonl(d / "prompts.jsonl", [{"problem": f"What is {i} + {7 - i}?", "answer": "7"} for i in range(8)])
  return str(d), data


def _job_args(tok_dir, data, workdir, *extra, export="none"):
  return ["--config=configs/rl.py", f"--config.workdir={workdir}", "--config.policy.name=tiny-qwen2",
          "--config.policy.init=random", "--config.policy.dtype=float32", "--config.policy.remat=none",
          f"--config.tokenizer={tok_dir}", f"--config.data.train={data}", "--config.data.val=", "--config.data.template=bare",
          "--config.mesh.fsdp=1", "--config.mesh.data=-1", "--config.reward.type=rlvr",
          "--config.prompts_per_step=4", "--config.group_size=4", "--config.max_prompt_tokens=64",
          "--config.max_response=16", "--config.lr=0.01", "--config.beta=0.01", "--config.mini_batches=2",
          "--config.micro_batch=4", f"--config.num_steps={STEPS}", "--config.checkpoint_every=1", "--config.progress_bar=False",
          f"--config.export_dir={export}", *extra]


def _main(args, **kw):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  return subprocess.run([sys.executable, "-m", "spark_jax.main", *args], cwd=REPO, env=env, capture_output=True,
                        text=True, **kw)


TIMING = ("time", "tokens_per_s", "step_time_s")


def _metrics(workdir):
  last = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      last[row["step"]] = {k: v for k, v in row.items() if not any(t in k for t in TIMING)}
  return last


def test_rl_job_resumes_after_sigkill_with_identical_metrics_and_export(job_files, tmp_path,
                                                                        export_matches_transformers):
  tok_dir, data = job_files
  ref, killed = str(tmp_path / "ref"), str(tmp_path / "killed")
  done = _main(_job_args(tok_dir, data, ref, export=""), timeout=900)
  assert done.returncode == 0, done.stderr[-3000:]
  reference = _metrics(ref)
  assert sorted(reference) == list(range(1, STEPS + 1))
  assert any(m["reward_mean"] > 0 for m in reference.values()), "rewards never varied: the test proves nothing"
  assert reference[STEPS]["kl"] > 0  # the policy moved away from its reference
  _check_monitors(ref)
  proc = subprocess.Popen([sys.executable, "-m", "spark_jax.main", *_job_args(tok_dir, data, killed, export="")],
                          cwd=REPO,
                          env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=""), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  ckpts = os.path.join(killed, "checkpoints")
  deadline = time.time() + 600
  while time.time() < deadline and proc.poll() is None:
    if os.path.isdir(ckpts) and any(n.isdigit() and int(n) >= 2 for n in os.listdir(ckpts)):
      break
    time.sleep(0.05)
  assert proc.poll() is None, "the job finished before it could be killed; make the run longer"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  again = _main(_job_args(tok_dir, data, killed, export=""), timeout=900)
  assert again.returncode == 0, again.stderr[-3000:]
  resumed = _metrics(killed)
  assert sorted(resumed) == sorted(reference)
  for step in reference:
    for k, v in reference[step].items():
      assert resumed[step][k] == pytest.approx(v, rel=1e-5, abs=1e-6), (step, k)
  with open(os.path.join(killed, "summary.json")) as f:
    assert json.load(f)["final_step"] == STEPS
  _check_export(os.path.join(ref, "export"), os.path.join(killed, "export"), tok_dir, export_matches_transformers)


def _check_monitors(workdir):
  """Every per-step monitor the RL job promises is in metrics.jsonl, in its range (share, length, time)."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  train = [r for r in rows if "loss" in r]
  assert len(train) == STEPS
  shares = ("format_violation", "text_after_answer", "truncated", "zero_variance_groups", "clip_frac",
            "dual_clip_frac", "non_canonical_responses")
  for r in train:
    for k in shares:
      assert 0.0 <= r[k] <= 1.0, (k, r[k])
    assert 0 < r["response_length"] <= 16 and r["steps_per_response"] >= 0  # max_response 16
    assert r["reward_std"] >= 0 and -1.0 <= r["reward_step_correlation"] <= 1.0
    assert r["entropy"] > 0 and r["grad_norm"] > 0 and r["logprob_gap_max"] >= r["logprob_gap_mean"] >= 0
    assert r["logprob_gap_max"] <= 1e-3  # fp32, T = 1, no filters: the gap is rounding
    for k in ("tokens_per_s_per_device", "time_update", "time_rollout", "time_reward"):
      assert r[k] > 0, (k, r)
  assert any(r["zero_variance_groups"] < 1 for r in train)  # some groups' rewards differ: updates had signal


def _check_export(export, resumed_export, tok_dir, export_matches_transformers):
  """The final policy as an HF checkpoint: transformers reloads it with our logits, it is the trained policy
  (not its random init), and the killed-and-resumed run exports the same weights."""
  import jax
  from spark_jax import models
  from spark_jax.models.load import load_model
  from spark_jax.tokenizer import Tokenizer

  assert os.path.exists(os.path.join(export, "tokenizer.json"))
  export_matches_transformers(export, Tokenizer.from_pretrained(tok_dir).encode("What is 3 + 4? \\boxed{7}"))
  _, params = models.from_pretrained(export)
  _, init_params, _ = load_model("tiny-qwen2", init="random", dtype="float32", mesh=None, seed=0, remat="none")
  moved = [float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
           for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(init_params))]
  assert len(moved) == len(jax.tree.leaves(params)) and max(moved) > 1e-3, "the export is the untrained init"
  _, resumed = models.from_pretrained(resumed_export)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(resumed)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)


def test_rl_job_sigterm_checkpoints_and_exits_cleanly(job_files, tmp_path):
  tok_dir, data = job_files
  workdir = str(tmp_path / "term")
  proc = subprocess.Popen([sys.executable, "-m", "spark_jax.main",
                           *_job_args(tok_dir, data, workdir, "--config.num_steps=50")], cwd=REPO,
                          env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=""), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 600
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(metrics) and os.path.getsize(metrics) > 0:
      break
    time.sleep(0.05)
  assert proc.poll() is None
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-3000:]
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  assert summary["interrupted"] is True and 1 <= summary["final_step"] < 50
  assert str(summary["final_step"]) in os.listdir(os.path.join(workdir, "checkpoints"))


def test_dynamic_sampling_keeps_informative_groups_refills_and_tops_up():
  from spark_jax.rl import programs
  from spark_jax.rl.step import RolloutOutput
  G, R = 2, 3

  def roll(rewards, tag):
    n = len(rewards)
    tok = np.full((n, R), tag, np.int32)
    return RolloutOutput(tok, np.full((n,), R, np.int32), np.zeros((n, R), np.float32), np.ones((n,), bool),
                         np.asarray(rewards, np.float32), np.zeros((n, R), np.float32), {"reward_mean": 0.5})

  pt = np.arange(6, dtype=np.int32).reshape(3, 2)
  pl = np.full((3,), 2, np.int32)
  first = roll([1, 1, 0, 1, 0, 0], tag=1)  # groups: agree, differ, agree
  extra = [roll([0, 1, 1, 0, 1, 1], tag=2)]  # differ, differ, agree
  calls = []

  def more(key):
    calls.append(key)
    return extra[0], pt + 100, pl, {}

  out, opt, opl, m = programs.dynamic_sampling(first, pt, pl, G, more, jax_key(), max_rounds=3)
  assert len(calls) == 1 and m["dynamic_sampling_rounds"] == 1 and m["dynamic_sampling_topped_up"] == 0
  assert out.rewards_N.tolist() == [0, 1, 0, 1, 1, 0]  # round-1 group 1, then round-2 groups 0 and 1
  assert opt[:, 0].tolist() == [2, 100, 102] and out.response_tokens_NxR[:, 0].tolist() == [1, 1, 2, 2, 2, 2]
  # No refill allowed: the batch is topped up with agreeing groups and says so.
  out, _, _, m = programs.dynamic_sampling(first, pt, pl, G, more, jax_key(), max_rounds=0)
  assert m["dynamic_sampling_informative_groups"] == pytest.approx(1 / 3)
  assert m["dynamic_sampling_topped_up"] == pytest.approx(2 / 3) and out.rewards_N.shape == (6,)


def jax_key():
  import jax
  return jax.random.PRNGKey(0)


def test_validation_sets_are_named_and_scored_apart(job_files, tmp_path):
  """Several `data.val` sets: each scored apart (accuracy/<folder>) and their plain average as `accuracy`.
  The grader is the run's injected one; here it marks answers right by their gold, so the split is checked."""
  import jax
  from spark_jax import models
  from spark_jax import sharding as shd
  from spark_jax.tokenizer import Tokenizer
  assert rl_loop.validation_sets("data/aime24/test.jsonl, data/math500/test.jsonl") == {
      "aime24": "data/aime24/test.jsonl", "math500": "data/math500/test.jsonl"}
  assert rl_loop.validation_sets("org/hub_set") == {"hub_set": "org/hub_set"}
  with pytest.raises(ValueError, match="two validation sets are named 'a'"):
    rl_loop.validation_sets("x/a/test.jsonl,y/a/test.jsonl")
  tok_dir, _ = job_files
  for name, golds in (("easy", ["1", "1"]), ("hard", ["1", "0", "0", "0"])):
    (tmp_path / name).mkdir()
    _write_jsonl(tmp_path / name / "test.jsonl", [{"problem": f"What is {i}?", "answer": g} for i, g in enumerate(golds)])
  config = _config(**{"data.val": f"{tmp_path}/easy/test.jsonl,{tmp_path}/hard/test.jsonl", "data.template": "bare",
                      "eval_max_response": 4, "max_prompt_tokens": 32})
  cfg = models.get_preset("tiny-qwen2")
  mesh = shd.make_mesh({"data": 1}, devices=jax.devices()[:1])
  graded = []

  def grade(texts, golds):
    graded.append(len(texts))
    return np.asarray([g == "1" for g in golds], np.float32)

  evaluator = rl_loop.Evaluator(config, cfg, models.init_params(cfg), Tokenizer.from_pretrained(tok_dir), mesh, grade)
  m = evaluator(models.init_params(cfg))
  assert graded == [6]  # one generate call and one grading call for both sets
  assert m["accuracy/easy"] == 1.0 and m["accuracy/hard"] == 0.25
  assert m["accuracy"] == pytest.approx(0.625)  # the sets' average, not the 3/6 pooled over rows
  assert 0 < m["response_length"] <= 4
