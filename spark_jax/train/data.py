"""SFT input pipeline: chat rows -> tokens + assistant mask -> length-bucketed, fixed-shape global batches.

Stages (each a plain function, so tests and the RL loop can reuse any of them):

1. `spark_jax.io.iter_records` (the project's one record reader): JSONL / JSON / parquet files (a file, a
   directory, a glob) or a Hub dataset id, yielding `(where, row)` so every row error names its source.
2. `tokenize_rows`: filter by `format`/`variant`, render with the chat template and mark the assistant tokens
   (`Tokenizer.render_chat_with_assistant_mask`), handle sequences longer than `max_length`. A reward-model
   row (one with an `rm_prompt` field, stage1/formats.py) takes its prompt ids from `text.rm_ids.rm_prompt_ids`,
   the piecewise construction ProcessBench and the RL reward use, and its reply from
   `Tokenizer.render_reply_after_prompt_ids`: the PRM trains on the ids it is later queried with. Result: one flat
   token array + offsets (`TokenizedExamples`), cached in the workdir as .npz so a restart does not re-tokenize.
3. `make_batch_plan`: which examples make up global batch `step`, and its padded length. Length bucketing:
   each epoch's seeded permutation is cut into windows of `window` global batches; inside a window the
   examples are sorted by length and cut into batches, and the batch order is shuffled. Every batch is padded
   to the smallest bucket boundary that holds its longest example.
4. `SFTBatchSource` + `make_train_loader`: a grain `DataLoader` over the plan (record i = global batch i). Its
   iterator state (`get_state`/`set_state`, or orbax via `grain.checkpoint`) is what the checkpoint stores.

Why bucketing and not packing: the decoder's attention mask is causal x (B×T padding mask); packing several
examples per row needs a segment-aware (block-diagonal) mask, which the decoder does not take. Bucketing keeps
the decoder untouched and, with length-sorted windows, wastes little compute on padding (the loop logs the
padding fraction). Packing would need one decoder change: an optional B×T `segment_ids` argument to
`hidden_states`/`forward`, AND-ed into the attention mask as `segment_ids[:, :, None] == segment_ids[:, None, :]`
(positions restart per segment through the existing `positions` argument); the loss side already works
per token.

Why overlong examples are dropped by default: a reward-model target cut at `max_length` loses its final
verdict line, which is exactly what the reward parser reads; training on it teaches the model to trail off.
`overlong="truncate"` keeps the first `max_length` tokens instead (loss on the assistant tokens left).

Process sharding: every process builds the same plan (same files, same seed) and takes its own contiguous
slice of each global batch's rows, so all processes agree on the step's padded length (a global jax.Array
needs one shape everywhere) while each loads only 1/process_count of the tokens.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from typing import Any, Iterator, Mapping, Sequence

import grain
import numpy as np

from spark_jax import io
from spark_jax.text.rm_ids import rm_prompt_ids
from spark_jax.text.rm import RM_FORMATS, rm_prompt
from spark_jax.tokenizer import first_difference

# Keys of one batch (numpy, host side). Shapes: A accumulation steps x b process-local rows x T padded length.
BATCH_KEYS = ("tokens", "targets", "weights", "mask")
# Part of the tokenized-data cache key: bump it whenever `tokenize_rows` turns the same rows into other ids or
# masks, so caches written under the old rules are not reused (4: reward-model rows use the piecewise prompt).
TOKENIZE_RULES_VERSION = 4


# ------------------------------------------------------------------------------------------------ reading


def source_fingerprint(source: str, split: str = "train") -> str:
  """Cheap identity of a data source (paths, sizes, mtimes; or the hub id) for cache keys."""
  if io.is_hub_id(source) and not os.path.exists(source):
    return f"hub:{source}:{split}"
  parts = []
  for path in io.record_files(source):
    st = os.stat(path)
    parts.append(f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}")
  return "|".join(parts)


# --------------------------------------------------------------------------------------------- tokenizing


@dataclasses.dataclass
class TokenizedExamples:
  """N examples stored flat: example i is tokens[offsets[i]:offsets[i+1]] (and the same slice of loss_mask)."""

  tokens: np.ndarray  # int32, total tokens
  loss_mask: np.ndarray  # uint8, 1 on the tokens the loss is computed on (assistant content + end of turn)
  offsets: np.ndarray  # int64, N + 1
  stats: dict[str, Any] = dataclasses.field(default_factory=dict)
  origins: np.ndarray | None = None  # str, N: "file:line" of each example, for error messages

  def __len__(self) -> int:
    return len(self.offsets) - 1

  @property
  def lengths(self) -> np.ndarray:
    return np.diff(self.offsets)

  def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
    s, e = self.offsets[i], self.offsets[i + 1]
    return self.tokens[s:e], self.loss_mask[s:e]

  def origin(self, i: int) -> str:
    return str(self.origins[i]) if self.origins is not None else f"example {i}"

  def subset(self, indices: Sequence[int]) -> "TokenizedExamples":
    toks, masks, offs = [], [], [0]
    for i in indices:
      t, m = self.example(int(i))
      toks.append(t)
      masks.append(m)
      offs.append(offs[-1] + len(t))
    return TokenizedExamples(
        tokens=np.concatenate(toks) if toks else np.zeros((0,), np.int32),
        loss_mask=np.concatenate(masks) if masks else np.zeros((0,), np.uint8),
        offsets=np.asarray(offs, np.int64), stats=dict(self.stats, examples=len(indices)),
        origins=None if self.origins is None else self.origins[np.asarray(indices, np.int64)])


def _check_messages(where: str, row: Any) -> list[dict]:
  if not isinstance(row, Mapping) or "messages" not in row:
    keys = sorted(row) if isinstance(row, Mapping) else type(row).__name__
    raise ValueError(f"{where}: row has no 'messages' field (it has {keys}); SFT rows must look like "
                     "{'messages': [{'role': 'user', ...}, {'role': 'assistant', ...}], 'format': ...} "
                     "(see spark_jax/stage1/formats.py).")
  messages = row["messages"]
  if not isinstance(messages, (list, tuple)) or not messages:
    raise ValueError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} dicts, got "
                     f"{type(messages).__name__}.")
  for k, m in enumerate(messages):
    if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
      raise ValueError(f"{where}: messages[{k}] must be a dict with string 'role' and 'content', got {m!r:.200}.")
  if not any(m["role"] == "assistant" for m in messages):
    raise ValueError(f"{where}: no assistant message, so there is nothing to train on; every SFT row needs "
                     "the target as an assistant turn.")
  return [{"role": m["role"], "content": m["content"]} for m in messages]


def _rm_prompt_fields(where: str, row: Mapping, messages: list[dict]) -> tuple[str, str, str]:
  """(format, problem, solution) of a row's `rm_prompt` field, checked against the row's user message."""
  spec = row["rm_prompt"]
  if not isinstance(spec, Mapping) or any(not isinstance(spec.get(k), str) for k in ("format", "problem", "solution")):
    raise ValueError(f"{where}: 'rm_prompt' must be a dict of string 'format', 'problem' and 'solution', got "
                     f"{spec!r:.200}; rebuild the row with spark_jax.stage1.formats.sft_example.")
  fmt, problem, solution = spec["format"], spec["problem"], spec["solution"]
  if fmt not in RM_FORMATS or row.get("format", fmt) != fmt:
    raise ValueError(f"{where}: rm_prompt.format {fmt!r} must be one of {RM_FORMATS} and equal the row's "
                     f"'format' {row.get('format')!r}; rebuild the row with spark_jax.stage1.formats.sft_example.")
  if [m["role"] for m in messages] != ["user", "assistant"]:
    raise ValueError(f"{where}: a row with 'rm_prompt' must have exactly a user then an assistant message, got "
                     f"roles {[m['role'] for m in messages]}; rebuild it with spark_jax.stage1.formats.sft_example.")
  expected = rm_prompt(fmt, problem, solution)
  if messages[0]["content"] != expected:
    raise ValueError(f"{where}: messages[0]['content'] is not rm_prompt(rm_prompt.format, rm_prompt.problem, "
                     f"rm_prompt.solution) ({first_difference(messages[0]['content'], expected)}); the two fields "
                     "must describe one prompt: rebuild the row with spark_jax.stage1.formats.sft_example.")
  return fmt, problem, solution


def _render_row(where: str, row: Mapping, messages: list[dict], tokenizer) -> tuple[list[int], list[int]]:
  """Ids and loss mask of one row. A reward-model row's prompt is the canonical piecewise ids the PRM also
  sees at ProcessBench and RL time (text/rm_ids.py); any other row is its chat rendering tokenized whole."""
  if row.get("rm_prompt") is None:  # parquet and hub datasets give a null where a row lacks the field
    return tokenizer.render_chat_with_assistant_mask(messages)
  fmt, problem, solution = _rm_prompt_fields(where, row, messages)
  return tokenizer.render_reply_after_prompt_ids(messages, rm_prompt_ids(tokenizer, fmt, problem, solution))


def _matches(where: str, row: Mapping, key: str, allowed: Sequence[str]) -> bool:
  if not allowed:
    return True
  if key not in row:
    raise ValueError(f"{where}: row has no {key!r} field but config filters on {key}s {list(allowed)}; clear "
                     f"the filter (empty list) to train on every row.")
  return row[key] in allowed


def tokenize_rows(rows: Iterator[tuple[str, Mapping]], tokenizer, *, max_length: int, overlong: str = "drop",
                  formats: Sequence[str] = (), variants: Sequence[str] = ()) -> TokenizedExamples:
  """Filters, renders and tokenizes chat rows; see the module docstring for the overlong policy.

  Args:
    rows: (where, row) pairs as from `spark_jax.io.iter_records`.
    tokenizer: a `spark_jax.tokenizer.Tokenizer` (`render_chat_with_assistant_mask`; for rows with an
      `rm_prompt` field also `render_reply_after_prompt_ids`, `encode`, `decode` and a chat template).
    max_length: longest sequence kept, in tokens (template included).
    overlong: "drop" (count and skip) or "truncate" (keep the first max_length tokens).
    formats, variants: keep only rows whose "format" / "variant" is listed (empty = keep all).

  Returns:
    The examples plus `stats` (rows read, filtered, dropped/truncated overlong, token counts).
  """
  if overlong not in ("drop", "truncate"):
    raise ValueError(f"overlong={overlong!r}; use 'drop' or 'truncate'.")
  toks, masks, offs, origins = [], [], [0], []
  stats = {"rows": 0, "filtered_out": 0, "dropped_overlong": 0, "truncated_overlong": 0,
           "dropped_no_loss_tokens": 0, "longest_seen": 0}
  for where, row in rows:
    stats["rows"] += 1
    messages = _check_messages(where, row)
    if not (_matches(where, row, "format", formats) and _matches(where, row, "variant", variants)):
      stats["filtered_out"] += 1
      continue
    ids, mask = _render_row(where, row, messages, tokenizer)
    stats["longest_seen"] = max(stats["longest_seen"], len(ids))
    if len(ids) > max_length:
      if overlong == "drop":
        stats["dropped_overlong"] += 1
        continue
      ids, mask = ids[:max_length], mask[:max_length]
      stats["truncated_overlong"] += 1
    # The loss at position t predicts token t+1, so the first token can never carry loss.
    if sum(mask[1:]) == 0:
      stats["dropped_no_loss_tokens"] += 1
      continue
    toks.append(np.asarray(ids, np.int32))
    masks.append(np.asarray(mask, np.uint8))
    offs.append(offs[-1] + len(ids))
    origins.append(where)
  examples = TokenizedExamples(
      tokens=np.concatenate(toks) if toks else np.zeros((0,), np.int32),
      loss_mask=np.concatenate(masks) if masks else np.zeros((0,), np.uint8),
      offsets=np.asarray(offs, np.int64), origins=np.asarray(origins, dtype=str))
  stats.update(examples=len(examples), tokens=int(examples.tokens.size),
               loss_tokens=int(examples.loss_mask.sum()))
  examples.stats = stats
  return examples


def _tokenizer_fingerprint(tokenizer) -> str:
  h = hashlib.sha256(str(getattr(tokenizer, "source", "")).encode())
  src = getattr(tokenizer, "source", None)
  if src and os.path.isdir(src):
    for f in sorted(os.listdir(src)):
      if f.startswith(("tokenizer", "special_tokens", "chat_template", "vocab", "merges")):
        with open(os.path.join(src, f), "rb") as fh:
          h.update(f.encode() + hashlib.sha256(fh.read()).digest())
  return h.hexdigest()


def load_examples(source: str, tokenizer, *, max_length: int, overlong: str = "drop",
                  formats: Sequence[str] = (), variants: Sequence[str] = (), split: str = "train",
                  cache_dir: str | None = None) -> TokenizedExamples:
  """`io.iter_records` + `tokenize_rows`, cached as .npz under `cache_dir` (keyed by files, tokenizer and settings).

  Every process computes the same result; only process 0 writes the cache (atomically).
  """
  key = json.dumps([source_fingerprint(source, split), _tokenizer_fingerprint(tokenizer), max_length, overlong,
                    sorted(formats), sorted(variants), TOKENIZE_RULES_VERSION])
  digest = hashlib.sha256(key.encode()).hexdigest()[:20]
  path = os.path.join(cache_dir, f"tokens-{digest}.npz") if cache_dir else None
  if path and os.path.exists(path):
    with np.load(path, allow_pickle=False) as z:
      ex = TokenizedExamples(tokens=z["tokens"], loss_mask=z["loss_mask"], offsets=z["offsets"],
                             stats=json.loads(str(z["stats"])), origins=z["origins"])
    logging.info("data %s: %d examples from cache %s", source, len(ex), path)
    return ex
  ex = tokenize_rows(io.iter_records(source, split=split), tokenizer, max_length=max_length, overlong=overlong,
                     formats=formats, variants=variants)
  if len(ex) == 0:
    raise ValueError(f"data {source!r}: no examples left ({ex.stats}); check config.formats/variants against "
                     f"the rows' 'format'/'variant' fields and max_length={max_length}.")
  import jax
  if path and jax.process_index() == 0:
    with io.atomic_path(path) as tmp, open(tmp, "wb") as f:
      np.savez(f, tokens=ex.tokens, loss_mask=ex.loss_mask, offsets=ex.offsets, stats=json.dumps(ex.stats),
               origins=ex.origins)
  return ex


def split_holdout(examples: TokenizedExamples, fraction: float, seed: int):
  """(train, held-out) with a seeded `fraction` of the examples held out (at least one when fraction > 0)."""
  n = len(examples)
  k = int(round(n * fraction))
  if fraction > 0:
    k = max(1, k)
  if k >= n:
    raise ValueError(f"eval_fraction={fraction} would hold out {k} of {n} examples, leaving none to train on.")
  perm = np.random.default_rng([seed, 7]).permutation(n)
  held, train = np.sort(perm[:k]), np.sort(perm[k:])
  return examples.subset(train), examples.subset(held)


# ----------------------------------------------------------------------------------------------- planning


def bucket_boundaries(max_length: int, boundaries: Sequence[int] = (), min_bucket: int = 128) -> list[int]:
  """Sorted padded lengths; default: powers of two from `min_bucket`, capped by (and ending at) max_length."""
  if boundaries:
    out = sorted(set(int(b) for b in boundaries if int(b) < max_length)) + [max_length]
  else:
    out, b = [], max(1, min(min_bucket, max_length))
    while b < max_length:
      out.append(b)
      b *= 2
    out.append(max_length)
  return out


@dataclasses.dataclass(frozen=True)
class BatchPlan:
  """rows_IxB[i] are the example indices of optimizer step i's global batch (row-major over accumulation x
  micro-batch); lengths_I[i] its padded length T."""

  rows_IxB: np.ndarray
  lengths_I: np.ndarray

  @property
  def num_steps(self) -> int:
    return int(self.rows_IxB.shape[0])

  def fingerprint(self) -> str:
    h = hashlib.sha256(self.rows_IxB.tobytes())
    h.update(self.lengths_I.tobytes())
    return h.hexdigest()[:16]


def steps_per_epoch(num_examples: int, global_batch: int) -> int:
  return num_examples // global_batch


def make_batch_plan(lengths: np.ndarray, *, global_batch: int, num_steps: int, seed: int,
                    boundaries: Sequence[int], window: int = 32) -> BatchPlan:
  """Deterministic length-bucketed plan of `num_steps` global batches (see the module docstring).

  Epoch e is a permutation seeded by (seed, e) cut into `examples // global_batch` batches: the fewer than
  `global_batch` examples left over are skipped for that epoch only (a different few each epoch), so every
  batch holds distinct examples and each epoch sees every other example once. Inside an epoch, windows of
  `window` batches are sorted by length before being cut into batches, and the batch order in the window
  is shuffled, so similar lengths share a batch without ordering the epoch by length.
  """
  n = len(lengths)
  per_epoch = steps_per_epoch(n, global_batch)
  if per_epoch < 1:
    raise ValueError(f"only {n} training examples for a global batch of {global_batch} sequences; lower "
                     "config.global_batch or add data.")
  boundaries = np.asarray(sorted(boundaries), np.int64)
  if lengths.max() > boundaries[-1]:
    raise ValueError(f"an example of {lengths.max()} tokens exceeds the largest bucket {boundaries[-1]}.")
  rows, lens = [], []
  epoch = 0
  while len(rows) < num_steps:
    perm = np.random.default_rng([seed, epoch]).permutation(n)[:per_epoch * global_batch]
    for w, start in enumerate(range(0, len(perm), window * global_batch)):
      part = perm[start:start + window * global_batch]
      part = part[np.argsort(lengths[part], kind="stable")]
      batches = part.reshape(-1, global_batch)
      for b in batches[np.random.default_rng([seed, epoch, 1_000_003, w]).permutation(len(batches))]:
        rows.append(b)
        lens.append(boundaries[np.searchsorted(boundaries, lengths[b].max())])
    epoch += 1
  return BatchPlan(rows_IxB=np.stack(rows[:num_steps]).astype(np.int64),
                   lengths_I=np.asarray(lens[:num_steps], np.int64))


# ----------------------------------------------------------------------------------------------- batching


def pad_rows(examples: TokenizedExamples, indices: Sequence[int], length: int, pad_id: int,
             real: Sequence[bool] | None = None) -> dict[str, np.ndarray]:
  """Right-padded next-token batch of the given examples: tokens, targets, weights, mask (all b×length).

  `targets[t] = tokens[t+1]` and `weights[t]` is the loss mask of token t+1, so position t's loss trains the
  prediction of the next assistant token. Rows with real=False are fillers (one visible token, zero weight).
  """
  b = len(indices)
  tokens = np.full((b, length), pad_id, np.int32)
  targets = np.full((b, length), pad_id, np.int32)
  weights = np.zeros((b, length), np.float32)
  mask = np.zeros((b, length), np.int32)
  for r, i in enumerate(indices):
    if real is not None and not real[r]:
      mask[r, 0] = 1
      continue
    t, m = examples.example(int(i))
    n = len(t)
    if n > length:
      raise ValueError(f"example {i} has {n} tokens, more than the padded length {length}.")
    tokens[r, :n] = t
    targets[r, :n - 1] = t[1:]
    weights[r, :n - 1] = m[1:]
    mask[r, :n] = 1
  return {"tokens": tokens, "targets": targets, "weights": weights, "mask": mask}


class SFTBatchSource:
  """grain RandomAccessDataSource: record `step` = this process's rows of global batch `step`, A×B×T arrays."""

  def __init__(self, examples: TokenizedExamples, plan: BatchPlan, *, accum_steps: int, pad_id: int,
               process_index: int = 0, process_count: int = 1):
    g = plan.rows_IxB.shape[1]
    if g % accum_steps:
      raise ValueError(f"global batch {g} is not divisible by accum_steps={accum_steps}.")
    micro = g // accum_steps
    if micro % process_count:
      raise ValueError(f"micro batch {micro} is not divisible by the {process_count} processes; each process "
                       "loads an equal slice of every micro batch.")
    self.examples, self.plan, self.accum_steps, self.pad_id = examples, plan, accum_steps, pad_id
    self.local = micro // process_count
    self.process_index, self.process_count = process_index, process_count

  def __len__(self) -> int:
    return self.plan.num_steps

  def __repr__(self) -> str:  # grain validates restored iterator state against repr(data_source)
    return (f"SFTBatchSource(plan={self.plan.fingerprint()}, steps={self.plan.num_steps}, "
            f"accum={self.accum_steps}, process={self.process_index}/{self.process_count})")

  def __getitem__(self, step: int) -> dict[str, np.ndarray]:
    rows_AxB = self.plan.rows_IxB[step].reshape(self.accum_steps, -1)
    lo = self.process_index * self.local
    local_AxB = rows_AxB[:, lo:lo + self.local]
    length = int(self.plan.lengths_I[step])
    parts = [pad_rows(self.examples, r, length, self.pad_id) for r in local_AxB]
    batch = {k: np.stack([p[k] for p in parts]) for k in BATCH_KEYS}
    batch["step"] = np.asarray(step, np.int64)
    return batch


def make_train_loader(source: SFTBatchSource, *, worker_count: int = 0, prefetch: int = 4) -> grain.DataLoader:
  """A grain DataLoader visiting the plan once in order (shuffling is already in the plan)."""
  sampler = grain.samplers.IndexSampler(num_records=len(source), shard_options=grain.sharding.NoSharding(),
                                        shuffle=False, num_epochs=1)
  return grain.DataLoader(data_source=source, sampler=sampler, worker_count=worker_count,
                          read_options=grain.ReadOptions(num_threads=max(1, min(prefetch, 4)),
                                                         prefetch_buffer_size=max(1, prefetch)))


def eval_batches(examples: TokenizedExamples, *, batch_rows: int, boundaries: Sequence[int], pad_id: int,
                 process_index: int = 0, process_count: int = 1,
                 max_batches: int = 0) -> list[dict[str, np.ndarray]]:
  """Every held-out example once (length-sorted, filler rows pad the last batch): this process's b×T rows."""
  if batch_rows % process_count:
    raise ValueError(f"eval batch {batch_rows} is not divisible by the {process_count} processes.")
  order = np.argsort(examples.lengths, kind="stable")
  bounds = np.asarray(sorted(boundaries))
  local = batch_rows // process_count
  out = []
  for start in range(0, len(order), batch_rows):
    idx = order[start:start + batch_rows]
    real = np.ones(batch_rows, bool)
    real[len(idx):] = False
    idx = np.concatenate([idx, np.zeros(batch_rows - len(idx), idx.dtype)])
    length = int(bounds[np.searchsorted(bounds, examples.lengths[idx[real]].max())])
    lo = process_index * local
    out.append(pad_rows(examples, idx[lo:lo + local], length, pad_id, real[lo:lo + local]))
    if max_batches and len(out) >= max_batches:
      break
  return out
