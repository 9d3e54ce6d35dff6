"""A thin tokenizer layer over `transformers.AutoTokenizer` for SPARK jobs.

Why a wrapper at all: the sampler, the SFT trainer and the RL loop need a handful of things that HF tokenizers
expose inconsistently across versions and families (transformers 4 vs 5 return types of `apply_chat_template`,
`clean_up_tokenization_spaces` silently editing decoded text, which ids end a turn, the raw bytes of a token).
This module pins those down once:

* `encode`/`decode` are exact: no BOS is added unless asked, decoding never "cleans up" spaces, so
  `decode(encode(text)) == text` for byte-level BPE vocabularies (modulo NFC normalisation where the tokenizer
  normalises).
* `apply_chat_template` always renders the template to text first and then encodes that text without adding
  special tokens, so the ids are the same whatever the installed transformers version returns.
* `token_bytes_table` gives the bytes each id decodes to, so the sampler can match stop strings on the byte
  stream even when a stop string (or a multi-byte character) is split across tokens.
* `render_chat_with_assistant_mask` marks the tokens the SFT loss is computed on;
  `render_reply_after_prompt_ids` does the same after prompt ids the caller built (the PRM's piecewise prompt).

Any standard HF tokenizer directory works (`tokenizer.json` + `tokenizer_config.json`): Qwen2/2.5/3,
Llama-3, SmolLM2 (GPT-2-style byte-level BPE) and, for everything except `token_bytes_table`'s exactness
guarantee, sentencepiece-style vocabularies. The offline Qwen2.5 tokenizer is built by
`spark_jax.tokenizer_qwen.build_qwen2_tokenizer`.
"""

from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

Message = Mapping[str, Any]

# Added tokens that end a turn or a document in the families we support. `end_of_turn_ids` includes the ones
# present in a vocabulary (as added tokens) on top of the tokenizer's eos and generation_config.json's eos ids.
KNOWN_END_OF_TURN_TOKENS = (
    "<|im_end|>",  # ChatML: Qwen, SmolLM2.
    "<|endoftext|>",  # Qwen / GPT-2 end of document; a Qwen base model ends its answers with it.
    "<|eot_id|>",  # Llama-3 end of turn.
    "<|end_of_text|>",  # Llama-3 end of document.
    "<end_of_turn>",  # Gemma.
)


def first_difference(got: str, expected: str, context: int = 40) -> str:
  """Where two texts first differ, with a little context, for error messages about mismatched renderings."""
  k = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
  lo = max(0, k - context)
  return (f"they first differ at character {k}: {got[lo:k + context]!r} vs expected "
          f"{expected[lo:k + context]!r}")


def vocabulary_difference(a: "Tokenizer", b: "Tokenizer") -> str | None:
  """None when two tokenizers spell every id with the same bytes; else a short description of the first
  difference (for errors that name both models)."""
  ta, tb = a.token_bytes_table(), b.token_bytes_table()
  if ta == tb:
    return None
  first = next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), min(len(ta), len(tb)))
  return f"{len(ta)} vs {len(tb)} ids; first difference at id {first}"


class TokenizerNotFoundError(OSError):
  """A tokenizer could not be found locally nor fetched from the Hugging Face Hub."""


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
  """GPT-2's byte -> printable-character alphabet used by every byte-level BPE vocabulary.

  Byte-level BPE stores each token as a string over 256 printable characters, one per byte, so that a vocabulary
  can be JSON text. Printable Latin-1 bytes map to themselves; the other 68 bytes map to U+0100.. in order.

  Returns:
    A dict from byte value (0..255) to its one-character representation.
  """
  printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
  printable += list(range(ord("®"), ord("ÿ") + 1))
  byte_values = printable[:]
  chars = printable[:]
  extra = 0
  for b in range(256):
    if b not in printable:
      byte_values.append(b)
      chars.append(256 + extra)
      extra += 1
  return dict(zip(byte_values, map(chr, chars)))


@functools.cache
def unicode_to_bytes() -> dict[str, int]:
  """The inverse of `bytes_to_unicode`: one alphabet character -> its byte value."""
  return {c: b for b, c in bytes_to_unicode().items()}


def _looks_like_local_path(path_or_repo_id: str) -> bool:
  """A hub id is `name` or `org/name`; anything else (absolute, ./, ~, a/b/c) can only be a local path."""
  return (
      os.path.isabs(path_or_repo_id)
      or path_or_repo_id.startswith((".", "~"))
      or path_or_repo_id.count("/") > 1
      or "\\" in path_or_repo_id
  )


class Tokenizer:
  """A SPARK tokenizer: a `transformers` tokenizer plus exact bytes, stop ids and assistant masks.

  Construct with `Tokenizer.from_pretrained(dir_or_repo_id)` or wrap an already-loaded HF tokenizer with
  `Tokenizer(hf_tokenizer)`. The wrapped tokenizer is available as `.hf` for anything not covered here.
  """

  def __init__(self, hf_tokenizer: Any, source: str | None = None):
    self._hf = hf_tokenizer
    self._source = source if source is not None else getattr(hf_tokenizer, "name_or_path", "<in-memory>")
    self._token_bytes: tuple[bytes, ...] | None = None

  # --------------------------------------------------------------------------------------------- loading

  @classmethod
  def from_pretrained(cls, path_or_repo_id: str | os.PathLike[str], **hf_kwargs: Any) -> "Tokenizer":
    """Loads a tokenizer from a local directory or, if online, a Hugging Face Hub repo id.

    Args:
      path_or_repo_id: A directory holding `tokenizer.json` (and usually `tokenizer_config.json`), or a hub repo
        id such as "Qwen/Qwen2.5-0.5B-Instruct".
      **hf_kwargs: Forwarded to `transformers.AutoTokenizer.from_pretrained` (e.g. `revision`).

    Returns:
      The wrapped tokenizer.

    Raises:
      FileNotFoundError: A local path that does not exist or has no tokenizer files.
      TokenizerNotFoundError: A repo id that could not be fetched (offline, no network, or no such repo).
    """
    import transformers  # pylint: disable=g-import-not-at-top  # Lazy: it imports torch (seconds).

    name = os.fspath(path_or_repo_id)
    path = Path(name).expanduser()
    if path.is_file():
      raise FileNotFoundError(
          f"Tokenizer path {name!r} is a file; pass the directory that holds tokenizer.json and "
          "tokenizer_config.json instead."
      )
    if path.is_dir():
      if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise FileNotFoundError(
            f"Tokenizer directory {str(path)!r} has no tokenizer.json, tokenizer_config.json or tokenizer.model; "
            "pass a directory saved with `save_pretrained` (or built with "
            "spark_jax.tokenizer_qwen.build_qwen2_tokenizer)."
        )
      return cls(transformers.AutoTokenizer.from_pretrained(str(path), **hf_kwargs), source=str(path))
    if _looks_like_local_path(name):
      raise FileNotFoundError(
          f"Tokenizer directory {name!r} does not exist; check the path (it is not a hub repo id either)."
      )
    try:
      hf = transformers.AutoTokenizer.from_pretrained(name, **hf_kwargs)
    except Exception as e:  # transformers raises OSError, ValueError or hub errors depending on the failure.
      offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
      why = "HF_HUB_OFFLINE is set" if offline else "the hub is unreachable or the repo does not exist"
      raise TokenizerNotFoundError(
          f"Could not load tokenizer {name!r}: it is not a local directory and it could not be fetched from the "
          f"Hugging Face Hub ({why}). Pass a local tokenizer directory instead (for Qwen2/2.5 build one offline "
          f"with spark_jax.tokenizer_qwen.build_qwen2_tokenizer). Underlying error: {type(e).__name__}: {e}"
      ) from e
    return cls(hf, source=name)

  # --------------------------------------------------------------------------------------------- basics

  @property
  def hf(self) -> Any:
    """The wrapped `transformers` tokenizer."""
    return self._hf

  @property
  def source(self) -> str:
    """Where the tokenizer was loaded from (a directory or a repo id)."""
    return self._source

  def __repr__(self) -> str:
    return f"Tokenizer(source={self._source!r}, vocab_size={self.vocab_size}, eos_token_id={self._hf.eos_token_id})"

  def __len__(self) -> int:
    return self.vocab_size

  @property
  def vocab_size(self) -> int:
    """Number of token ids, added tokens included (`len(hf_tokenizer)`).

    This can be smaller than the model's embedding rows (Qwen2.5 pads its embedding to 151,936 rows for 151,665
    tokens); ids at or past `vocab_size` decode to nothing.
    """
    return len(self._hf)

  @property
  def eos_token_id(self) -> int:
    """The tokenizer's eos id (for a chat model, its end-of-turn token, e.g. `<|im_end|>` for Qwen2.5)."""
    eos = self._hf.eos_token_id
    if eos is None:
      raise ValueError(
          f"Tokenizer {self._source!r} defines no eos_token; set `eos_token` in its tokenizer_config.json."
      )
    return int(eos)

  @property
  def pad_token_id(self) -> int:
    """The pad id; the eos id when the tokenizer defines no pad token.

    Padding positions are always masked out of attention and losses, so which id fills them does not matter as
    long as it is a valid id; falling back to eos keeps Llama-style tokenizers (no pad token) usable.
    """
    pad = self._hf.pad_token_id
    return int(pad) if pad is not None else self.eos_token_id

  @functools.cached_property
  def end_of_turn_ids(self) -> tuple[int, ...]:
    """The ids a generation job passes as stop tokens, eos first.

    eos, then the eos ids of a `generation_config.json` next to the tokenizer (Qwen2.5 lists `<|im_end|>` and
    `<|endoftext|>` there), then any of `KNOWN_END_OF_TURN_TOKENS` that the vocabulary has as an added token.
    For Qwen: (`<|im_end|>`, `<|endoftext|>`); for SmolLM2: (`<|im_end|>`, `<|endoftext|>`).
    """
    ids: list[int] = []
    if self._hf.eos_token_id is not None:
      ids.append(int(self._hf.eos_token_id))
    gen_config = Path(self._source) / "generation_config.json"
    if gen_config.is_file():
      eos = json.loads(gen_config.read_text()).get("eos_token_id")
      ids.extend(int(i) for i in ([] if eos is None else [eos] if isinstance(eos, int) else eos))
    added = {tok.content: i for i, tok in self._hf.added_tokens_decoder.items()}
    ids.extend(added[t] for t in KNOWN_END_OF_TURN_TOKENS if t in added)
    if not ids:
      raise ValueError(
          f"Tokenizer {self._source!r} has no eos token and none of {KNOWN_END_OF_TURN_TOKENS}; set `eos_token` "
          "in its tokenizer_config.json so generation knows when to stop."
      )
    return tuple(dict.fromkeys(ids))

  # --------------------------------------------------------------------------------------------- encode / decode

  def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
    """Token ids of `text`. Special-token strings in `text` become their ids (HF's default)."""
    if not isinstance(text, str):
      raise TypeError(f"Tokenizer.encode takes a str, got {type(text).__name__}; use encode_batch for lists.")
    return list(self._hf.encode(text, add_special_tokens=add_special_tokens))

  def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
    """Token ids of each text (tokenized in parallel by the Rust backend when there is one)."""
    if isinstance(texts, str):
      raise TypeError("Tokenizer.encode_batch takes a list of str, got a single str; use encode for one text.")
    if not texts:
      return []
    backend = getattr(self._hf, "backend_tokenizer", None)
    if backend is not None:
      # Straight to the Rust backend (what the HF fast tokenizer calls anyway): building a BatchEncoding of
      # offsets and masks costs more than the tokenization itself for many short texts.
      encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
      return [encoding.ids for encoding in encode(list(texts), add_special_tokens=add_special_tokens)]
    return [list(ids) for ids in self._hf(list(texts), add_special_tokens=add_special_tokens)["input_ids"]]

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
    """Text of `ids`, never "cleaning up" spaces (so decode inverts encode and matches `token_bytes_table`)."""
    return self._hf.decode(
        [int(i) for i in ids], skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False
    )

  def decode_batch(self, batch: Sequence[Sequence[int]], skip_special_tokens: bool = False) -> list[str]:
    """`decode` of each id sequence."""
    return [self.decode(ids, skip_special_tokens=skip_special_tokens) for ids in batch]

  # --------------------------------------------------------------------------------------------- chat

  def apply_chat_template(
      self,
      messages: Sequence[Message],
      add_generation_prompt: bool = True,
      tokenize: bool = True,
      enable_thinking: bool | None = None,
      **template_kwargs: Any,
  ) -> list[int] | str:
    """Renders a conversation with the tokenizer's chat template.

    Args:
      messages: [{"role": "system"|"user"|"assistant", "content": str}, ...].
      add_generation_prompt: Append the header that opens an assistant turn (e.g. "<|im_start|>assistant\\n").
      tokenize: Return token ids (True) or the rendered text (False).
      enable_thinking: Passed to templates that read it (Qwen3); left out when None so other templates see
        exactly what they expect.
      **template_kwargs: Extra variables for the template.

    Returns:
      Token ids, or the rendered text. Ids are `encode(text)` without extra special tokens: the template already
      writes every control token (BOS included for templates that have one).
    """
    text = self._render(messages, add_generation_prompt, enable_thinking, template_kwargs)
    return self.encode(text) if tokenize else text

  def _render(
      self,
      messages: Sequence[Message],
      add_generation_prompt: bool,
      enable_thinking: bool | None,
      template_kwargs: Mapping[str, Any],
  ) -> str:
    if getattr(self._hf, "chat_template", None) is None:
      raise ValueError(
          f"Tokenizer {self._source!r} has no chat template; use an instruct model's tokenizer directory or set "
          "`chat_template` in its tokenizer_config.json."
      )
    kwargs = dict(template_kwargs)
    if enable_thinking is not None:
      kwargs["enable_thinking"] = enable_thinking
    text = self._hf.apply_chat_template(
        [dict(m) for m in messages], add_generation_prompt=add_generation_prompt, tokenize=False, **kwargs
    )
    if not isinstance(text, str):
      raise TypeError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, expected str.")
    return text

  def render_chat_with_assistant_mask(
      self,
      messages: Sequence[Message],
      enable_thinking: bool | None = None,
      **template_kwargs: Any,
  ) -> tuple[list[int], list[int]]:
    """Tokenizes a full conversation and marks the tokens the SFT loss is computed on.

    The mask is 1 on the tokens of each assistant message's content and on the end-of-turn token that closes
    that message (e.g. `<|im_end|>`), so the model learns to stop; it is 0 on everything the template writes
    around the content (role headers, the "\\n" after `<|im_end|>`) and on all other messages.

    How: the assistant content of message i is the text between the rendering of messages[:i] with the
    generation prompt and the rendering of messages[:i+1]; both must be prefixes of the full rendering (true for
    ChatML, Llama-3 and SmolLM2 templates; not for templates that rewrite earlier turns, e.g. Qwen3 dropping old
    reasoning, which raise). Tokens are assigned to that character span by their offsets: a token is masked iff
    it starts inside the span and is not after the span's last end-of-turn token. A token that straddles the
    span's start (e.g. content that begins with "\\n" merged with the header's "\\n") is left unmasked, so the
    loss never trains the model to write template text. If the template closes the turn without an end-of-turn
    token, every token starting inside the span is masked.

    Args:
      messages: The whole conversation, assistant turns included.
      enable_thinking: As in `apply_chat_template`.
      **template_kwargs: Extra template variables.

    Returns:
      (ids, mask): `ids == apply_chat_template(messages, add_generation_prompt=False)`, and a 0/1 list of the
      same length.
    """
    if not messages:
      raise ValueError("render_chat_with_assistant_mask got no messages; pass at least one assistant turn.")
    full = self._render(messages, False, enable_thinking, template_kwargs)
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
      if message.get("role") != "assistant":
        continue
      before = self._render(messages[:i], True, enable_thinking, template_kwargs)
      through = self._render(messages[: i + 1], False, enable_thinking, template_kwargs)
      if not (through.startswith(before) and full.startswith(through)):
        raise ValueError(
            f"The chat template of {self._source!r} does not render conversation prefixes as prefixes of the "
            f"full conversation (assistant message {i}), so assistant tokens cannot be located; render each "
            "training example so that it ends with the assistant turn to train on."
        )
      spans.append((len(before), len(through)))

    return self._ids_with_assistant_mask(full, spans)

  def render_reply_after_prompt_ids(
      self,
      messages: Sequence[Message],
      prompt_ids: Sequence[int],
      enable_thinking: bool | None = None,
      **template_kwargs: Any,
  ) -> tuple[list[int], list[int]]:
    """`render_chat_with_assistant_mask` for a conversation whose prompt the caller has tokenized itself.

    For prompts defined as ids rather than text (the reward model's piecewise prompt, text/rm_ids.py):
    `messages` ends with the one assistant turn to train on, and `prompt_ids` are the caller's ids of
    `messages[:-1]` rendered with the generation prompt. The reply is the text the full rendering has after
    that prompt (assistant content, end of turn, what the template writes after it), tokenized on its own and
    masked by `render_chat_with_assistant_mask`'s rule, so both methods train the same assistant tokens.

    Returns:
      (prompt_ids + reply ids, zeros over the prompt + the reply's mask).

    Raises:
      ValueError: the last message is not the assistant's, the template does not render the prompt as a
        prefix of the conversation, or `prompt_ids` do not decode to the rendered prompt.
    """
    if not messages or messages[-1].get("role") != "assistant":
      raise ValueError("render_reply_after_prompt_ids needs a conversation ending with the assistant turn to "
                       f"train on; its roles are {[m.get('role') for m in messages]}.")
    prompt = self._render(messages[:-1], True, enable_thinking, template_kwargs)
    full = self._render(messages, False, enable_thinking, template_kwargs)
    if not full.startswith(prompt):
      raise ValueError(
          f"The chat template of {self._source!r} does not render the prompt turns as a prefix of the full "
          "conversation, so the assistant reply cannot be cut off after the prompt ids."
      )
    decoded = self.decode(prompt_ids)
    if decoded != prompt:
      raise ValueError(
          f"prompt_ids do not decode to the chat-rendered prompt turns ({first_difference(decoded, prompt)}); "
          "pass the ids of messages[:-1] rendered with the generation prompt."
      )
    reply = full[len(prompt):]
    reply_ids, reply_mask = self._ids_with_assistant_mask(reply, [(0, len(reply))])
    return list(prompt_ids) + reply_ids, [0] * len(prompt_ids) + reply_mask

  def _ids_with_assistant_mask(self, text: str, spans: Sequence[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """Ids of `text` and the SFT mask of the assistant character `spans` (rule: `render_chat_with_assistant_mask`)."""
    if not getattr(self._hf, "is_fast", False):
      raise NotImplementedError(
          f"assistant masks need token offsets, which {type(self._hf).__name__} (a slow tokenizer) "
          f"of {self._source!r} does not give; save the tokenizer with a tokenizer.json (fast tokenizer)."
      )
    encoding = self._hf(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoding["input_ids"])
    offsets = encoding["offset_mapping"]
    stops = set(self.end_of_turn_ids)
    mask = [0] * len(ids)
    for start, end in spans:
      inside = [k for k, (s, _) in enumerate(offsets) if start <= s < end]
      closing = [k for k in inside if ids[k] in stops]
      last = closing[-1] if closing else (inside[-1] if inside else -1)
      for k in inside:
        if k <= last:
          mask[k] = 1
    return ids, mask

  # --------------------------------------------------------------------------------------------- bytes

  def token_bytes_table(self, size: int | None = None) -> list[bytes]:
    """The bytes each token id decodes to, indexed by id.

    The sampler matches stop strings on the concatenated bytes of generated tokens, which is exact even when a
    stop string or a multi-byte UTF-8 character is split across tokens (decoding token by token is not).

    * Byte-level BPE (Qwen, GPT-2, SmolLM2, Llama-3): each character of the vocabulary string maps back through
      GPT-2's byte alphabet to one raw byte, exactly as the `ByteLevel` decoder does (including its rule that a
      token with a character outside the alphabet decodes to that token's UTF-8). Concatenating the table's
      entries for any ids equals the UTF-8 of `decode(ids)` when that decode is valid UTF-8.
    * Sentencepiece-style (`▁` for spaces, `<0xNN>` byte-fallback pieces: Llama-2, Mistral, Gemma): `▁` -> b" ",
      `<0xNN>` -> that byte, other pieces -> their UTF-8. This is the token as it reads mid-stream: the
      decoder's stripping of one leading space at the very start of a decode is not applied, which is what a stop
      matcher over generated text wants.
    * Added/special tokens -> the UTF-8 of their content (e.g. b"<|im_end|>").

    Args:
      size: Length of the table; ids past `vocab_size` (a model's padded embedding rows) map to b"". Defaults
        to `vocab_size`.

    Returns:
      A new list of `size` bytes objects.

    Raises:
      NotImplementedError: For tokenizers whose decoder is neither byte-level nor sentencepiece-style.
      ValueError: If `size` is smaller than `vocab_size`.
    """
    if self._token_bytes is None:
      self._token_bytes = tuple(self._build_token_bytes())
    table = list(self._token_bytes)
    if size is not None:
      if size < len(table):
        raise ValueError(
            f"token_bytes_table(size={size}) is smaller than the tokenizer's {len(table)} ids; pass the model's "
            "vocab size (>= tokenizer.vocab_size)."
        )
      table.extend([b""] * (size - len(table)))
    return table

  def _decoder_config(self) -> dict[str, Any]:
    backend = getattr(self._hf, "backend_tokenizer", None)
    if backend is None:
      raise NotImplementedError(
          f"Tokenizer {self._source!r} ({type(self._hf).__name__}) has no `tokenizers` backend, so its token bytes "
          "cannot be derived; save it as a fast tokenizer (tokenizer.json)."
      )
    decoder = backend.decoder
    return {} if decoder is None else json.loads(decoder.__getstate__())

  def _build_token_bytes(self) -> list[bytes]:
    config = self._decoder_config()
    kinds = {d.get("type") for d in config.get("decoders", [config])}
    n = len(self._hf)
    added = {int(i): tok.content for i, tok in self._hf.added_tokens_decoder.items()}
    pieces: list[str | None] = [None] * n
    for piece, i in self._hf.backend_tokenizer.get_vocab(with_added_tokens=False).items():
      if 0 <= i < n:
        pieces[i] = piece
    table: list[bytes] = []
    if "ByteLevel" in kinds:
      # str.translate maps each alphabet character to the latin-1 character of its byte; every other character
      # becomes one that latin-1 cannot encode, so `.encode("latin-1")` fails exactly for off-alphabet tokens.
      to_latin1: dict[int, int] = {cp: 0x10FFFF for cp in range(256)}
      to_latin1.update({ord(c): b for c, b in unicode_to_bytes().items()})
      for i, piece in enumerate(pieces):
        if i in added:
          table.append(added[i].encode("utf-8"))
        elif piece is None:
          table.append(b"")
        else:
          try:
            table.append(piece.translate(to_latin1).encode("latin-1"))
          except UnicodeEncodeError:  # The ByteLevel decoder's rule for tokens outside its alphabet.
            table.append(piece.encode("utf-8"))
      return table
    if kinds & {"Metaspace", "Replace", "ByteFallback"}:
      byte_piece = re.compile(r"<0x([0-9A-Fa-f]{2})>")
      for i, piece in enumerate(pieces):
        if i in added:
          table.append(added[i].encode("utf-8"))
        elif piece is None:
          table.append(b"")
        elif (m := byte_piece.fullmatch(piece)) is not None:
          table.append(bytes([int(m.group(1), 16)]))
        else:
          table.append(piece.replace("▁", " ").encode("utf-8"))
      return table
    raise NotImplementedError(
        f"token_bytes_table supports byte-level BPE and sentencepiece-style tokenizers; {self._source!r} has "
        f"decoder {config.get('type')!r} ({sorted(k for k in kinds if k)}). Use a byte-level tokenizer or extend "
        "Tokenizer._build_token_bytes for this decoder."
    )
