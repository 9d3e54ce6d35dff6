"""The world's tokenizer: byte-level BPE trained on the world's texts, saved as a standard HF tokenizer dir.

Loaded through `spark_jax.tokenizer.Tokenizer.from_pretrained` exactly like a real model's tokenizer
(tokenizer.json + tokenizer_config.json with a ChatML chat template), so every job runs on it unchanged.

Vocabulary (`WORLD_VOCAB` ids, deterministic for a given code version):
  * special tokens `<|endoftext|>` (pad), `<|im_start|>`, `<|im_end|>` (eos: ends every turn), `<think>`,
    `</think>` at ids 0-4. The think markers are special so that the chat layer's decoding (special tokens
    skipped) keeps a policy solution's steps visible to Stage I (see spark_jax/world/task.py);
  * the policy-format tags `<step>`, `</step>`, `<answer>`, `</answer>` as single (non-special) tokens;
  * one token per constant stretch (>= `_MIN_SEGMENT_CHARS` characters) of the project's own prompt texts
    (generator, verifier with and without reference, critic, merger, reward-model prompts), found by
    rendering those functions around sentinel inputs. The prompts stay byte for byte the project's, but a
    tiny model attends over the problem and the solution instead of a thousand tokens of constant prose;
  * the verdict markers of `spark_jax.text.rm` (step markers, the final verdict question) as single tokens;
  * byte-level BPE for the rest.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

from spark_jax.text.rm import FINAL_VERDICT_QUESTION, STEP_CORRECT_MARKER, STEP_INCORRECT_MARKER
from spark_jax.world import task as task_lib

WORLD_VOCAB = 512
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", task_lib.THINK_OPEN, task_lib.THINK_CLOSE)
TAG_TOKENS = (task_lib.STEP_OPEN, task_lib.STEP_CLOSE, task_lib.ANSWER_OPEN, task_lib.ANSWER_CLOSE)
MARKER_TOKENS = (STEP_CORRECT_MARKER, STEP_INCORRECT_MARKER, f"**{FINAL_VERDICT_QUESTION} ")
_MIN_SEGMENT_CHARS = 12
_SENTINEL = "\x00{}\x00"
_VERSION = 2


def prompt_segments() -> list[str]:
  """The constant stretches of every prompt a world job sends, longest first (deterministic)."""
  from spark_jax.stage1 import prompts
  from spark_jax.text.rm import RM_FORMATS, rm_prompt
  p, s, v, c, e = (_SENTINEL.format(i) for i in range(5))
  rendered = [prompts.generator_prompt(p), prompts.verifier_prompt(p, s), prompts.verifier_prompt(p, s, e),
              prompts.critic_prompt(p, s, v), prompts.merger_prompt(p, s, v, c)]
  rendered += [rm_prompt(fmt, p, s) for fmt in RM_FORMATS]
  pieces = set()
  for text in rendered:
    for i, piece in enumerate(text.split("\x00")):
      if i % 2 == 0 and len(piece) >= _MIN_SEGMENT_CHARS:  # odd pieces are the sentinel numbers
        pieces.add(piece)
  return sorted(pieces, key=lambda x: (-len(x), x))


def _corpus(seed: int = 0, n: int = 400) -> list[str]:
  """World texts the BPE merges are learnt from: problems, solutions with errors, verifications, PRM lines."""
  from spark_jax.text.rm import prm_step_line, final_verdict_line
  rng = random.Random(f"tokenizer:{seed}")
  texts = ["user\n", "assistant\n", "system\n"] * n  # the chat template's role headers
  for problem in task_lib.make_problems(seed, n, prefix="tok"):
    solution, _ = task_lib.sample_solution(problem, rng, error_rate=0.5)
    texts += [problem.text, task_lib.visible(solution),
              # "written": the corpus stays the one the tokenizer was first built from, so a change of the
              # bootstrap's verification layout keeps every id (and the generator trained on them) as it is.
              task_lib.noisy_verification(problem, solution, rng, step_accuracy=0.8, check="written")]
    truth = task_lib.step_truth(problem, solution)
    texts.append("\n".join([prm_step_line(k, t) for k, t in enumerate(truth, start=1)]
                           + [final_verdict_line(all(truth))]))
  return texts


def build_tokenizer_json() -> str:
  """The tokenizer.json text (deterministic)."""
  from tokenizers import Tokenizer as RawTokenizer
  from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
  segments = prompt_segments()
  extra = list(TAG_TOKENS) + list(MARKER_TOKENS) + segments
  bpe_size = WORLD_VOCAB - len(extra)
  if bpe_size < 256 + len(SPECIAL_TOKENS) + 64:
    raise ValueError(f"the project's prompts have {len(segments)} constant segments, which leaves only {bpe_size} "
                     f"of WORLD_VOCAB={WORLD_VOCAB} ids to the byte-level BPE; raise WORLD_VOCAB.")
  raw = RawTokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
  raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  raw.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=bpe_size, min_frequency=2, show_progress=False,
                                special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  raw.train_from_iterator(_corpus(), trainer=trainer)
  raw.add_tokens([AddedToken(t, special=False, normalized=False) for t in extra])
  return raw.to_str()


def _tokenizer_config(added: list[dict]) -> dict:
  from spark_jax.tokenizer_qwen import qwen2_chat_template
  return {
      "add_bos_token": False,
      "add_prefix_space": False,
      "added_tokens_decoder": {str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip",
                                                              "single_word", "special")} for t in added},
      "bos_token": None,
      "chat_template": qwen2_chat_template(default_system=None),
      "clean_up_tokenization_spaces": False,
      "eos_token": "<|im_end|>",
      "model_max_length": 4096,
      "pad_token": "<|endoftext|>",
      "split_special_tokens": False,
      "tokenizer_class": "PreTrainedTokenizerFast",
      "unk_token": None,
  }


def build_tokenizer(out_dir: str) -> str:
  """Writes tokenizer.json + tokenizer_config.json to `out_dir` (skipped when an identical build is there).

  Returns `out_dir`. The stamp file holds a hash of the tokenizer.json, so a changed prompt text or code
  version rebuilds it, and two builds are byte-identical.
  """
  from spark_jax import io
  text = build_tokenizer_json()
  digest = hashlib.sha256(f"{_VERSION}\n{text}".encode()).hexdigest()
  out = Path(out_dir)
  stamp = out / "world_tokenizer.stamp"
  if stamp.is_file() and stamp.read_text().strip() == digest and (out / "tokenizer_config.json").is_file():
    return str(out)
  out.mkdir(parents=True, exist_ok=True)
  added = json.loads(text)["added_tokens"]
  io.write_text_atomic(out / "tokenizer.json", text)
  io.write_text_atomic(out / "tokenizer_config.json", json.dumps(_tokenizer_config(added), indent=2) + "\n")
  io.write_text_atomic(stamp, digest + "\n")
  return str(out)


def vocab_size_needed(tokenizer_dir: str) -> int:
  """Number of ids in a built tokenizer (<= WORLD_VOCAB, the world presets' embedding rows)."""
  with open(os.path.join(tokenizer_dir, "tokenizer.json")) as f:
    data = json.load(f)
  return max(max(data["model"]["vocab"].values()), max(t["id"] for t in data["added_tokens"])) + 1
