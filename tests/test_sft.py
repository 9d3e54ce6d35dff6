"""SFT trainer: assistant-only loss mask, overfitting, 1- vs 8-device equality, resume, HF export, NaN stop.

One tiny training run (module fixture) serves several tests: its losses are the "uninterrupted" reference
for the resume test, its export is what transformers reloads, and a poisoned copy of its export drives the
NaN test. The runs share shapes and optimizer constants, so with the persistent compilation cache (set for
this module only) the train step compiles once for one device and once for eight.
"""

from __future__ import annotations

import json
import os
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spark_jax import models
from spark_jax import sharding as shd
from spark_jax.models.hf_io import _CheckpointReader, write_safetensors
from spark_jax.train import data as data_lib
from spark_jax.train import sft
from spark_jax.train import step as step_lib

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
          "{% endif %}")
NUM_STEPS = 100
RARE = "Ω"  # appears in exactly one training row (its bytes in no other row): the NaN test poisons it


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
  """Persistent compilation cache for this module: identical train steps across runs compile once."""
  old = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
  jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  yield
  jax.config.update("jax_compilation_cache_dir", old[0])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", old[1])


def _rows(n: int, seed: int, fmt: str = "prm", rare_at: int | None = None) -> list[dict]:
  """PRM-shaped rows whose single step label is cued in the solution ("good"/"bad"): learnable in 100 steps."""
  r = random.Random(seed)
  rows = []
  for i in range(n):
    ok = r.random() < 0.6
    a, b = r.randint(1, 99), r.randint(1, 99)
    problem = f"What is {a} + {b}{' ' + RARE if i == rare_at else ''}?"
    target = (f"Step 1: {'Correct' if ok else 'Incorrect'}\n"
              f"**Verification: Is the answer correct (Yes/No)? {'Yes' if ok else 'No'}**")
    rows.append({"messages": [
        {"role": "user", "content": f"Problem: {problem}\n\nStudent Solution: Step 1: {'good' if ok else 'bad'}."
                                    "\n\nLet's verify step by step."},
        {"role": "assistant", "content": target}], "format": fmt, "variant": "test", "problem_id": str(i)})
  return rows


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
  """A tiny byte-level BPE tokenizer with a ChatML template, trained in-test (no hub, < 1 s)."""
  from tokenizers import Tokenizer as HFTokenizer, decoders, models as tok_models, pre_tokenizers, trainers
  out = tmp_path_factory.mktemp("tokenizer")
  tok = HFTokenizer(tok_models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  corpus = [json.dumps(r["messages"]) for r in _rows(64, 99)] + ["user assistant Yes No"]
  tok.train_from_iterator(corpus, trainer)
  tok.save(str(out / "tokenizer.json"))
  (out / "tokenizer_config.json").write_text(json.dumps({
      "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
      "chat_template": CHATML, "clean_up_tokenization_spaces": False}))
  return str(out)


@pytest.fixture(scope="module")
def tokenizer(tok_dir):
  from spark_jax.tokenizer import Tokenizer
  return Tokenizer.from_pretrained(tok_dir)


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
  d = tmp_path_factory.mktemp("data")
  train = d / "train.jsonl"
  # 32 PRM rows (one with the rare character) + 8 ORM rows that the format filter must drop.
  train.write_text("".join(json.dumps(r) + "\n" for r in _rows(32, 0, rare_at=5) + _rows(8, 1, fmt="orm")))
  held = d / "eval.jsonl"
  held.write_text("".join(json.dumps(r) + "\n" for r in _rows(8, 2)))
  return str(train), str(held)


def _config(workdir, tok_dir, data_files, **overrides):
  from configs.sft_prm import get_config
  c = get_config()
  c.model.name, c.model.init, c.model.dtype, c.model.remat = "tiny-qwen2", "random", "float32", "none"
  c.tokenizer = tok_dir
  c.data, c.eval_data = data_files
  c.format, c.formats = "", ("prm",)
  c.workdir = str(workdir)
  c.mesh_devices = 1
  c.max_length, c.min_bucket = 96, 96
  c.global_batch, c.micro_batch = 8, 4  # 2 accumulation steps
  c.num_steps = NUM_STEPS
  c.lr, c.warmup_ratio, c.adam_b2 = 1e-2, 0.1, 0.95
  c.checkpoint_every, c.eval_every, c.log_every = 0, 50, 25
  c.export_dtype = "float32"
  c.progress_bar = False
  for k, v in overrides.items():
    c[k] = v
  return c


def _losses(workdir) -> dict[int, float]:
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      entry = json.loads(line)
      if "loss" in entry:
        out[entry["step"]] = entry["loss"]  # a resumed run re-logs steps after the checkpoint: keep the last
  return out


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tok_dir, data_files):
  workdir = tmp_path_factory.mktemp("full")
  summary = sft.run_sft(_config(workdir, tok_dir, data_files))
  return str(workdir), summary


# ------------------------------------------------------------------------------------------------ data


def test_loss_mask_covers_exactly_the_assistant_tokens(tokenizer, data_files):
  examples = data_lib.load_examples(data_files[0], tokenizer, max_length=96, formats=("prm",))
  assert examples.stats["filtered_out"] == 8 and len(examples) == 32
  rows = _rows(32, 0, rare_at=5)
  batch = data_lib.pad_rows(examples, range(4), 96, tokenizer.pad_token_id)
  im_end = tokenizer.hf.convert_tokens_to_ids("<|im_end|>")
  for r in range(4):
    tokens, mask = examples.example(r)
    content = rows[r]["messages"][1]["content"]
    prompt_ids = tokenizer.apply_chat_template(rows[r]["messages"][:1], add_generation_prompt=True)
    expected = [0] * len(prompt_ids) + [1] * (len(tokenizer.encode(content)) + 1) + [0]  # content, <|im_end|>, "\n"
    assert mask.tolist() == expected, f"row {r}"
    assert tokens[:len(prompt_ids)].tolist() == prompt_ids
    assert tokenizer.decode(tokens[mask == 1]) == content + "<|im_end|>"
    assert tokens[mask == 1][-1] == im_end
    # The batch puts the weight of token t+1 at position t (next-token prediction) and nothing on padding.
    n = len(tokens)
    w = batch["weights"][r]
    assert w[:n - 1].tolist() == mask[1:].tolist() and not w[n - 1:].any()
    assert batch["targets"][r, :n - 1].tolist() == tokens[1:].tolist()
    assert batch["mask"][r].sum() == n



def test_parquet_rows_and_bad_rows(tokenizer, data_files, tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  rows = [json.loads(line) for line in open(data_files[0])]
  pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
  a = data_lib.load_examples(str(tmp_path / "train.parquet"), tokenizer, max_length=96, formats=("prm",))
  b = data_lib.load_examples(data_files[0], tokenizer, max_length=96, formats=("prm",))
  assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.loss_mask, b.loss_mask)
  assert a.origin(0).endswith("train.parquet[0]")
  short = data_lib.load_examples(data_files[0], tokenizer, max_length=60, formats=("prm",))
  assert short.stats["dropped_overlong"] == 32 - len(short) > 0 and short.lengths.max() <= 60
  cut = data_lib.load_examples(data_files[0], tokenizer, max_length=60, formats=("prm",), overlong="truncate")
  assert len(cut) == 32 and cut.stats["truncated_overlong"] == short.stats["dropped_overlong"]
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
  with pytest.raises(ValueError, match=rf"{bad}:2: no assistant message"):
    data_lib.load_examples(str(bad), tokenizer, max_length=96)


def test_batch_plan_is_deterministic_bucketed_and_split_by_process():
  lengths = np.random.default_rng(0).integers(5, 300, size=200)
  bounds = data_lib.bucket_boundaries(300, (), 64)
  assert bounds == [64, 128, 256, 300]
  plan = data_lib.make_batch_plan(lengths, global_batch=16, num_steps=30, seed=3, boundaries=bounds, window=4)
  again = data_lib.make_batch_plan(lengths, global_batch=16, num_steps=30, seed=3, boundaries=bounds, window=4)
  other = data_lib.make_batch_plan(lengths, global_batch=16, num_steps=30, seed=4, boundaries=bounds, window=4)
  assert plan.fingerprint() == again.fingerprint() != other.fingerprint()
  for rows, length in zip(plan.rows_IxB, plan.lengths_I):
    assert length in bounds and lengths[rows].max() <= length
    assert length == min(b for b in bounds if b >= lengths[rows].max())
  # Each epoch (12 full batches of 200 examples) visits 192 distinct examples, a different order each time.
  epochs = plan.rows_IxB[:24].reshape(2, -1)
  assert [len(set(e.tolist())) for e in epochs] == [192, 192] and not np.array_equal(*epochs)
  # Two processes take disjoint halves of every micro batch; together they make the global batch.
  ex = data_lib.TokenizedExamples(tokens=np.arange(lengths.sum(), dtype=np.int32) % 50,
                                  loss_mask=np.ones(lengths.sum(), np.uint8),
                                  offsets=np.concatenate([[0], np.cumsum(lengths)]))
  parts = [data_lib.SFTBatchSource(ex, plan, accum_steps=2, pad_id=0, process_index=i, process_count=2)[7]
           for i in range(2)]
  assert parts[0]["tokens"].shape == (2, 4, plan.lengths_I[7])
  whole = np.concatenate([p["mask"].sum(-1) for p in parts], axis=1).reshape(-1)
  assert sorted(whole.tolist()) == sorted(lengths[plan.rows_IxB[7]].tolist())
  # Eval batches cover every example exactly once, filler rows carry no weight.
  evals = data_lib.eval_batches(ex.subset(range(37)), batch_rows=8, boundaries=bounds, pad_id=0)
  assert sum(int(b["mask"].sum(-1).astype(bool).sum()) for b in evals) == 40  # 37 real + 3 fillers
  assert sum(float(b["weights"].sum()) for b in evals) == float(sum(lengths[:37] - 1))


# ------------------------------------------------------------------------------------------------ training


def test_tiny_model_overfits_32_examples(full_run):
  workdir, summary = full_run
  losses = _losses(workdir)
  assert sorted(losses) == list(range(1, NUM_STEPS + 1))
  assert losses[1] > 3.0
  assert summary["train_loss_mean_last_10"] < 0.05, summary
  assert summary["train_examples"] == 32 and summary["accum_steps"] == 2
  assert summary["eval_loss"] < 0.5 and summary["tokens_per_s"] > 0 and summary["mfu"] > 0
  assert os.path.exists(os.path.join(workdir, "summary.json"))
  assert os.listdir(os.path.join(workdir, "tensorboard"))


def test_resume_after_kill_gives_the_same_losses(full_run, tmp_path, tok_dir, data_files):
  reference = _losses(full_run[0])
  workdir = tmp_path / "killed"
  # "Kill" after step 25: the last checkpoint is step 20, steps 21-25 are lost and redone after the restart.
  first = sft.run_sft(_config(workdir, tok_dir, data_files, checkpoint_every=20, debug_stop_after=25))
  assert first["stopped_early"] and first["final_step"] == 25 and not first["export_dir"]
  second = sft.run_sft(_config(workdir, tok_dir, data_files, checkpoint_every=20, debug_stop_after=32))
  assert second["resumed_from"] == 20 and second["final_step"] == 32 and second["steps_this_run"] == 12
  resumed = _losses(workdir)
  for s in range(1, 33):
    np.testing.assert_allclose(resumed[s], reference[s], rtol=1e-6, err_msg=f"step {s}")


def test_sharded_step_matches_one_device(tokenizer, data_files):
  """The same 5 global batches on one device (2 accumulated micro batches of 4) and on a (data 2, fsdp 2,
  tensor 2) mesh of 8 fake devices (one micro batch of 8): sharding and accumulation leave the curve alone."""
  assert jax.device_count() == 8, "tests/conftest.py should give 8 fake CPU devices"
  cfg = models.get_preset("tiny-qwen2")
  examples = data_lib.load_examples(data_files[0], tokenizer, max_length=96, formats=("prm",))
  plan = data_lib.make_batch_plan(examples.lengths, global_batch=8, num_steps=NUM_STEPS, seed=0, boundaries=[96])
  sources = {a: data_lib.SFTBatchSource(examples, plan, accum_steps=a, pad_id=tokenizer.pad_token_id) for a in (1, 2)}
  rng = np.random.default_rng(0)  # numpy init: random.normal per leaf compiles slowly on CPU
  params = jax.tree.map(lambda a: (rng.normal(size=a.shape) * 0.02).astype(np.float32),
                        models.abstract_params(cfg))
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: np.ones_like(x) if "scale" in jax.tree_util.keystr(p) else x, params)

  def curve(mesh, accum):
    tx, sched = step_lib.make_optimizer(cfg, lr=1e-2, total_steps=NUM_STEPS, warmup_ratio=0.1, b2=0.95)
    loss_fn = lambda p, b: step_lib.sft_loss(cfg, p, b)
    with shd.use_mesh(mesh):
      state = step_lib.init_state(cfg, params, tx, mesh)
      train_step = step_lib.make_train_step(cfg, tx, sched, loss_fn, mesh)
      out = []
      for s in range(5):
        batch = {k: v for k, v in sources[accum][s].items() if k != "step"}
        state, m = train_step(state, jax.device_put(batch, step_lib.batch_sharding(mesh)))
        out.append((float(m["loss"]), float(m["grad_norm"])))
    assert state["params"]["embed"].sharding.spec == shd.logical_to_spec(("vocab", "embed"))
    return np.asarray(out)

  one = curve(shd.make_mesh({"data": 1}, devices=jax.devices()[:1]), accum=2)
  eight = curve(shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}), accum=1)
  np.testing.assert_allclose(eight, one, atol=1e-4, rtol=1e-4)
  assert one[-1, 0] < one[0, 0]


def test_export_reloads_in_transformers_with_identical_logits(full_run, tokenizer, export_matches_transformers):
  import transformers
  export = full_run[1]["export_dir"]
  assert os.path.exists(os.path.join(export, "tokenizer.json"))
  messages = _rows(3, 7)[2]["messages"][:1]
  hf_tok = transformers.AutoTokenizer.from_pretrained(export)
  ids = tokenizer.apply_chat_template(messages)
  assert hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == \
      tokenizer.apply_chat_template(messages, tokenize=False)
  ref = export_matches_transformers(export, ids)
  # The trained PRM answers its own format: greedy next tokens after the prompt start with "Step".
  assert tokenizer.decode([int(np.argmax(ref[0, -1]))]).startswith("Step")


def test_nan_loss_stops_the_run_naming_the_step(full_run, tmp_path, tok_dir, data_files, tokenizer):
  """Poison the embedding rows of the bytes of a character that only one training row contains."""
  export = full_run[1]["export_dir"]
  poisoned = tmp_path / "poisoned"
  poisoned.mkdir()
  for f in os.listdir(export):
    if not f.endswith(".safetensors"):
      (poisoned / f).write_bytes(open(os.path.join(export, f), "rb").read())
  reader = _CheckpointReader(export)
  tensors = {n: np.array(reader.get(n)) for n in reader.names()}
  rare_ids = tokenizer.encode(RARE)
  tensors["model.embed_tokens.weight"][rare_ids] = np.nan
  write_safetensors(str(poisoned / "model.safetensors"), tensors)

  examples = data_lib.load_examples(data_files[0], tokenizer, max_length=96, formats=("prm",))
  holders = [i for i in range(len(examples)) if set(rare_ids) & set(examples.example(i)[0].tolist())]
  assert len(holders) == 1
  plan = data_lib.make_batch_plan(examples.lengths, global_batch=8, num_steps=NUM_STEPS, seed=0,
                                  boundaries=[96], window=32)
  expected = 1 + next(s for s in range(plan.num_steps) if holders[0] in plan.rows_IxB[s])

  config = _config(tmp_path / "nan", tok_dir, data_files)
  config.model.name, config.model.init = str(poisoned), "pretrained"
  with pytest.raises(FloatingPointError, match=rf"^step {expected}: loss=nan") as err:
    sft.run_sft(config)
  assert f"{data_files[0]}:6" in str(err.value)  # the poisoned row (index 5) is line 6 of the file
  assert sorted(_losses(tmp_path / "nan")) == list(range(1, expected))


def test_chunked_loss_matches_the_plain_computation():
  """The chunked head (T not a multiple of the chunk, so the pad path runs) == full logits, values and grads."""
  cfg = models.get_preset("tiny-qwen2-tied")
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape) * 0.05, jnp.float32),
                        models.abstract_params(cfg))
  B, T = 4, 40
  tokens = rng.integers(0, cfg.vocab_size, (B, T)).astype(np.int32)
  mask = np.ones((B, T), np.int32)
  mask[:, 30:] = 0
  batch = {"tokens": tokens, "targets": np.roll(tokens, -1, -1), "mask": mask,
           "weights": (rng.random((B, T)) < 0.5).astype(np.float32) * mask}

  def plain(p):
    logits = models.forward(cfg, p, batch["tokens"], mask=batch["mask"])
    logp = jax.nn.log_softmax(logits, -1)
    nll = -jnp.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
    return jnp.sum(nll * batch["weights"])

  chunked = lambda p: step_lib.sft_loss(cfg, p, batch, logits_chunk=16)[0]
  both = jax.jit(lambda p: (jax.value_and_grad(plain)(p), jax.value_and_grad(chunked)(p)))
  (a, ga), (b, gb) = both(params)
  np.testing.assert_allclose(b, a, rtol=1e-5)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6, rtol=1e-4), gb, ga)



def test_token_logprobs_match_a_direct_log_softmax():
  """Per-token log-probs (chunk 7 does not divide T = 19, so the pad path and the scan run) == log_softmax of
  the full logits at the target, with padding and explicit positions (gradients: the sft_loss test above)."""
  cfg = models.get_preset("tiny-qwen2")
  rng = np.random.default_rng(2)
  params = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape) * 0.05, jnp.float32),
                        models.abstract_params(cfg))
  B, T = 3, 19
  tokens = rng.integers(0, cfg.vocab_size, (B, T)).astype(np.int32)
  targets = rng.integers(0, cfg.vocab_size, (B, T)).astype(np.int32)
  mask = np.ones((B, T), np.int32)
  mask[1, 12:] = 0
  positions = np.broadcast_to(np.arange(T, dtype=np.int32) + 3, (B, T))

  def direct(p):
    logits = models.forward(cfg, p, tokens, mask=mask, positions=positions)
    return jnp.take_along_axis(jax.nn.log_softmax(logits, -1), targets[..., None], -1)[..., 0]

  ours = lambda p: step_lib.token_logprobs(cfg, p, tokens, targets, positions_BxT=positions, mask_BxT=mask, chunk=7)
  want, got = jax.jit(lambda p: (direct(p), ours(p)))(params)
  assert got.shape == (B, T) and got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got) * mask, np.asarray(want) * mask, atol=1e-5, rtol=1e-5)
  assert np.all(np.asarray(got)[mask == 1] < 0)
  # One chunk (chunk >= T) takes the loop-free path and gives the same values.
  one = step_lib.token_logprobs(cfg, params, tokens, targets, positions_BxT=positions, mask_BxT=mask, chunk=64)
  np.testing.assert_allclose(np.asarray(one) * mask, np.asarray(got) * mask, atol=1e-6)


def test_resume_checks_the_settings_fingerprint_but_not_the_mesh(tmp_path, tok_dir, data_files, capfd):
  """A changed learning rate is refused, naming it; a new device count, log cadence and checkpoint cadence
  resume (with the same losses); the console shows no library INFO lines, which go to workdir/logs.txt."""
  from absl import logging as absl_logging
  from spark_jax.train import checkpoint as ckpt_lib
  workdir = tmp_path / "fp"
  sft.run_sft(_config(workdir, tok_dir, data_files, checkpoint_every=2, debug_stop_after=3))
  reference = _losses(workdir)  # steps 1-3 on one device; the resumed run redoes step 3 on two
  with pytest.raises(ckpt_lib.FingerprintMismatch, match=r"changed: \['adam_b2', 'lr'\]") as err:
    sft.run_sft(_config(workdir, tok_dir, data_files, lr=2e-2, adam_b2=0.99, debug_stop_after=5))
  assert "--config.resume=force" in str(err.value) and "0.01 -> 0.02" in str(err.value)
  # As `python -m spark_jax.main` runs it: absl's handler on the root logger at INFO verbosity.
  absl_logging.use_absl_handler()
  verbosity = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.INFO)
  capfd.readouterr()
  try:
    from spark_jax import jobs  # the one job shell routes library logs, for every job
    summary = jobs.run(_config(workdir, tok_dir, data_files, mesh_devices=2, log_every=1, checkpoint_every=3,
                               debug_stop_after=5))
  finally:
    absl_logging.set_verbosity(verbosity)
    import logging
    logging.getLogger().removeHandler(absl_logging.get_absl_handler())
  out, console = capfd.readouterr()
  assert summary["resumed_from"] == 2 and summary["final_step"] == 5 and summary["mesh"]["data"] == 2
  resumed = _losses(workdir)
  for s in range(1, 4):
    np.testing.assert_allclose(resumed[s], reference[s], rtol=1e-5, err_msg=f"step {s}")
  assert "resumed from" in out + console and "step 4/100" in out + console
  library = [line for line in console.splitlines() if line[:1] == "I" and line[1:5].isdigit()]
  assert not library and "orbax" not in console, library[:5]
  log = (workdir / "logs.txt").read_text()
  assert "orbax" in log or "checkpoint" in log.lower(), log[:2000]


def test_fingerprint_holds_the_result_settings_only():
  from configs.sft_prm import get_config
  from spark_jax.train import checkpoint as ckpt_lib
  base = ckpt_lib.config_fingerprint(get_config(), sft.NOT_RESULT, plan="abc")
  assert base["lr"] == 1e-5 and base["model.name"] == "Qwen/Qwen2.5-14B-Instruct" and base["plan"] == "abc"
  assert not {"mesh.data", "mesh_devices", "log_every", "checkpoint_every", "workdir", "resume"} & set(base)
  for key, value in [("lr", 2e-5), ("seed", 1), ("warmup_ratio", 0.1), ("schedule", "constant"),
                     ("global_batch", 32), ("max_length", 4096)]:
    c = get_config()
    c[key] = value
    assert ckpt_lib.changed_keys(base, ckpt_lib.config_fingerprint(c, sft.NOT_RESULT, plan="abc")) == [key]
  c = get_config()
  c.model.name, c.log_every, c.mesh.fsdp = "other", 1, 4
  assert ckpt_lib.changed_keys(base, ckpt_lib.config_fingerprint(c, sft.NOT_RESULT, plan="abc")) == ["model.name"]


def test_checkpointer_restores_any_pytree_onto_another_mesh_and_force_overrides(tmp_path):
  """The RL job's use: a state pytree + JSON extras; restored onto a different sharding; force resumes."""
  from spark_jax.train import checkpoint as ckpt_lib
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  state = {"w": jax.device_put(jnp.arange(16.0).reshape(8, 2), one), "step": jnp.asarray(3, jnp.int32)}
  ck = ckpt_lib.Checkpointer(str(tmp_path), fingerprint={"lr": 1.0, "data": "x"})
  assert ck.restore_latest(state) is None
  ck.save(3, state, extra={"rng": [1, 2], "position": 7})
  ck.close()
  mesh = shd.make_mesh({"data": 8})
  target = {"w": jax.ShapeDtypeStruct((8, 2), jnp.float32, sharding=jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec("data"))), "step": jax.ShapeDtypeStruct((), jnp.int32)}
  again = ckpt_lib.Checkpointer(str(tmp_path), fingerprint={"lr": 1.0, "data": "x"})
  restored, extra = again.restore_latest(target)
  np.testing.assert_array_equal(restored["w"], np.arange(16.0).reshape(8, 2))
  assert restored["w"].sharding.spec == jax.sharding.PartitionSpec("data") and int(restored["step"]) == 3
  assert extra == {"rng": [1, 2], "position": 7, "step": 3, "changed_settings": []}
  changed = {"lr": 2.0, "data": "x", "new_knob": 1}
  with pytest.raises(ckpt_lib.FingerprintMismatch, match=r"changed: \['lr', 'new_knob'\]"):
    ckpt_lib.Checkpointer(str(tmp_path), fingerprint=changed).restore_latest(target)
  forced = ckpt_lib.Checkpointer(str(tmp_path), fingerprint=changed, resume="force").restore_latest(target)
  assert forced[1]["changed_settings"] == ["lr", "new_knob"]


def test_lr_schedule_values():
  """Warm-up starts at peak/warmup (no wasted update), reaches the peak, decays by a cosine to the end lr."""
  cfg = models.get_preset("tiny-qwen2")
  _, sched = step_lib.make_optimizer(cfg, lr=1e-3, total_steps=100, warmup_ratio=0.1, end_lr_ratio=0.1)
  lr = lambda s: float(sched(s))
  np.testing.assert_allclose([lr(0), lr(4), lr(9)], [1e-4, 5e-4, 1e-3], rtol=1e-6)
  np.testing.assert_allclose(lr(10), 1e-3, rtol=1e-6)  # decay starts at the peak
  np.testing.assert_allclose(lr(55), 1e-4 + 0.5 * 9e-4 * (1 + np.cos(np.pi * 0.5)), rtol=1e-6)  # half way
  np.testing.assert_allclose([lr(100), lr(150)], [1e-4, 1e-4], rtol=1e-6)  # the end lr, held after the end
  assert all(lr(s) > lr(s + 1) for s in range(10, 100))
  _, const = step_lib.make_optimizer(cfg, lr=1e-3, total_steps=100, warmup_ratio=0.05, schedule="constant")
  np.testing.assert_allclose([float(const(s)) for s in (0, 4, 5, 60, 99)], [2e-4, 1e-3, 1e-3, 1e-3, 1e-3], rtol=1e-6)
  _, none = step_lib.make_optimizer(cfg, lr=1e-3, total_steps=10, warmup_ratio=0.0)
  np.testing.assert_allclose([float(none(0)), float(none(5)), float(none(10))], [1e-3, 5e-4, 0.0], atol=1e-9)
  with pytest.raises(ValueError, match="schedule='linear'"):
    step_lib.make_optimizer(cfg, lr=1e-3, total_steps=10, schedule="linear")


def test_fine_tuning_with_another_tokenizer_is_an_error(full_run, tmp_path, tok_dir, data_files):
  """A checkpoint that ships its tokenizer, fine-tuned with config.tokenizer pointing at another vocabulary,
  would learn from ids its embeddings never saw: the job names both and stops before training."""
  from tokenizers import Tokenizer as HFTokenizer, decoders, models as tok_models, pre_tokenizers, trainers
  other = tmp_path / "other_tokenizer"
  other.mkdir()
  tok = HFTokenizer(tok_models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(["a different corpus, a different list of merges"] * 8, trainer)
  tok.save(str(other / "tokenizer.json"))
  for name in ("tokenizer_config.json",):
    (other / name).write_bytes(open(os.path.join(tok_dir, name), "rb").read())
  export = full_run[1]["export_dir"]
  c = _config(tmp_path / "run", str(other), data_files)
  c.model.name, c.model.init = export, "pretrained"
  with pytest.raises(ValueError, match=r"config.tokenizer=.*and the tokenizer of checkpoint .* differ \(.*first "
                                       r"difference at id \d+\)"):
    sft.run_sft(c)
  c = _config(tmp_path / "run_same", tok_dir, data_files)  # the checkpoint's own vocabulary passes the check
  c.model.name, c.model.init = export, "pretrained"
  from spark_jax.tokenizer import Tokenizer
  sft._check_checkpoint_tokenizer(Tokenizer.from_pretrained(tok_dir), export, c)
