"""Batch sampling job around the pure cores: validate, batch (continuous or static), run, restore order.

With `batching="continuous"` (the default) the prompts flow through `max_batch_rows` decode slots that are
refilled as prompts finish (`sampling.continuous`, `sampling.slots`). With `batching="static"` (below), they
are sorted by length and cut into batches of at most `max_batch_rows`
decode rows, each batch left-padded to a bucketed prompt length and a bucketed prompt count, so a long job
compiles a handful of programs (`compiled_program_count()` counts them process-wide). Results come back in
the original prompt order.

Batch sizes (`plan_batches`). On a mesh the decode rows split evenly over the r = data x fsdp row shards, so a
batch holds a multiple of g = r / gcd(r, num_samples) prompts: the fewest whose rows fill every shard
equally. A full batch holds the most such prompts whose rows fit `max_batch_rows` (at least g: when g prompts'
rows already exceed it, the batch holds those g). The last, partial batch rounds its prompt count up to g
times a power of two, so a job compiles few batch shapes. Padding prompts exist only there, and their rows
start done (`generate_core(row_active_N=...)`): they cost a prefill and ride along in each decode step's
shapes, but never keep the loop running. Example: 4 prompts x 16 samples on 8 row shards is one batch of 4
prompts (64 rows, 8 per device), not 8 prompts of which half are padding. When a batch's prompt count does
not divide over the r shards, its prompt arrays (and the prefill over them) are replicated while its decode
rows stay sharded.

Parameters. `generate(..., params=...)` runs with other parameters of the same shapes and dtypes (the RL
policy after each update) through the same compiled programs: on a mesh they are laid out with
`models.load.param_shardings` (free when they already are), and the program key holds their shapes, dtypes
and shardings, never their values.

Reproducibility: prompt i's sample s draws from fold_in(fold_in(PRNGKey(seed), i), s), i being the prompt's
index in the caller's list. Batching, sorting and padding therefore never change which random numbers a row
sees: the same seed gives the same samples whatever `max_batch_rows` is (up to float rounding of the logits
between batch shapes, which can flip a sampled token only at a near-tie).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from spark_jax import sharding as shd
from spark_jax.models import decoder, load
from spark_jax.models.config import ModelConfig
from spark_jax.sampling import core

FINISH_REASONS = {core.FINISH_LENGTH: "length", core.FINISH_STOP_TOKEN: "stop_token"}
DEFAULT_MAX_BATCH_ROWS = 32
MIN_PROMPT_BUCKET = 16


@dataclasses.dataclass(frozen=True)
class Sample:
  """One generated continuation.

  Attributes:
    tokens: generated ids; the stop token, or the token that completed a stop string, is included.
    logprobs: log-probability of each token under the model's full softmax at temperature 1.
    finish_reason: "stop_token", "stop_string" or "length".
    stop: the stop token id or stop string (as passed) that ended the row; None for "length".
  """

  tokens: list[int]
  logprobs: list[float]
  finish_reason: str
  stop: int | str | bytes | None = None


@dataclasses.dataclass
class SamplingStats:
  """Running totals of an engine's calls.

  Static batching: batches launched, decode rows launched (padding included), rows that were padding, and
  sampled token positions (`CoreOutput.steps`, summed over batches: the decode loop's trip count).
  Continuous batching: admissions, slot rows, 0, and decode-loop trips. Both: `tokens` generated and
  `row_steps`, the decode rows the loops ran (rows x trips, finished and padding rows included), so
  `occupancy` = tokens / row_steps is the share of the compute that produced output.
  """

  batches: int = 0
  rows: int = 0
  padding_rows: int = 0
  steps: int = 0
  tokens: int = 0
  row_steps: int = 0

  @property
  def occupancy(self) -> float:
    return self.tokens / self.row_steps if self.row_steps else 0.0


# Compiled programs, process-wide: (cfg, settings, batch prompts, prompt bucket, table shape, mesh, params
# signature).
_PROGRAMS: dict[tuple, Any] = {}
_COMPILE_SECONDS: dict[tuple, float] = {}


def compiled_program_count() -> int:
  """How many distinct sampling programs this process has compiled (each key compiles once)."""
  return len(_PROGRAMS)


def compile_seconds() -> float:
  """Total seconds spent compiling sampling programs in this process."""
  return float(sum(_COMPILE_SECONDS.values()))


def _next_pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def bucket_length(n: int, buckets: Sequence[int] | None = None) -> int:
  """The padded prompt length for an n-token prompt: the smallest configured bucket >= n, else a power of two
  (at least MIN_PROMPT_BUCKET); lengths above the largest configured bucket round up to a multiple of it."""
  if buckets:
    for b in sorted(buckets):
      if b >= n:
        return int(b)
    top = max(buckets)
    return int(math.ceil(n / top) * top)
  return max(MIN_PROMPT_BUCKET, _next_pow2(n))


@jax.jit
def _row_keys_jit(base, prompt_indices_B, samples_A):
  per_prompt = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(base, prompt_indices_B)
  return jax.vmap(lambda k: jax.vmap(jax.random.fold_in, in_axes=(None, 0))(k, samples_A))(per_prompt)


def _row_keys(seed: int, prompt_indices: np.ndarray, num_samples: int) -> np.ndarray:
  """Raw uint32 key data, one key per decode row: fold_in(fold_in(PRNGKey(seed), prompt index), sample).

  Jitted: run op by op, the nested vmaps cost more host time per batch than a small model's whole batch."""
  per_row = _row_keys_jit(jax.random.PRNGKey(seed), np.asarray(prompt_indices, np.uint32), np.arange(num_samples))
  return np.asarray(per_row).reshape(len(prompt_indices) * num_samples, -1)


def plan_batches(num_prompts: int, num_samples: int, max_batch_rows: int, row_multiple: int = 1
                 ) -> list[tuple[int, int]]:
  """(prompts taken from the job, prompts in the batch's shape) for each batch, in order; see the module docstring.

  `row_multiple` is the number of row shards (data x fsdp); every batch's rows (prompts in the shape x
  num_samples) are a multiple of it.
  """
  if num_prompts < 0 or num_samples <= 0 or max_batch_rows <= 0 or row_multiple <= 0:
    raise ValueError(f"plan_batches(num_prompts={num_prompts}, num_samples={num_samples}, max_batch_rows="
                     f"{max_batch_rows}, row_multiple={row_multiple}): counts must be positive (prompts >= 0).")
  granule = row_multiple // math.gcd(row_multiple, num_samples)
  full = max(granule, (max_batch_rows // num_samples) // granule * granule)
  plan = []
  for start in range(0, num_prompts, full):
    n = min(full, num_prompts - start)
    plan.append((n, min(full, granule * _next_pow2(-(-n // granule)))))
  return plan


class SamplingEngine:
  """Runs sampling jobs for one model architecture: programs cached, parameters an argument of every call.

  Args:
    cfg: the model config.
    params: default params of every call (stacked layers, as `init_params` / `from_pretrained` return them);
      None: every call passes its own.
    mesh: optional (data, fsdp, tensor) mesh; decode rows shard over ("data", "fsdp"), weights by
      `models.load.param_shardings`.
    max_batch_rows: decode rows (prompts x num_samples) per batch at most (see the module docstring for the
      one case that exceeds it).
    prompt_buckets: allowed padded prompt lengths; default: powers of two from 16.
    progress: show a tqdm bar (prompts done, generated tokens/s, ETA).
    batching: "continuous" (default; `sampling.continuous`): max_batch_rows decode slots that waiting prompts
      enter as others finish; "static": sorted batches, each decoded until its longest row is done.
    refill_every: continuous: decode steps per call at most (the host's chance to refill and report).
    refill_fraction: continuous: a decode call also returns once this share of the slot groups is free (and
      prompts wait to fill them).
    unstack_layers: decode with per-layer weights and cache buffers (see `core.generate_core`); None: on CPU
      only, where it is about 2x faster.

  `stats` (a `SamplingStats`) accumulates over calls.
  """

  def __init__(self, cfg: ModelConfig, params: decoder.Params | None, *, mesh: Mesh | None = None,
               max_batch_rows: int = DEFAULT_MAX_BATCH_ROWS, prompt_buckets: Sequence[int] | None = None,
               progress: bool = True, batching: str = "continuous", refill_every: int = 64,
               refill_fraction: float = 0.25, unstack_layers: bool | None = None):
    if max_batch_rows <= 0:
      raise ValueError(f"max_batch_rows={max_batch_rows}: must be a positive number of decode rows per batch.")
    if batching not in ("continuous", "static"):
      raise ValueError(f"batching={batching!r}: choose 'continuous' (slots refilled as rows finish) or 'static'.")
    if refill_every <= 0 or not 0.0 < refill_fraction <= 1.0:
      raise ValueError(f"refill_every={refill_every}, refill_fraction={refill_fraction}: need a positive step count "
                       "and a fraction in (0, 1].")
    self.batching = batching
    self.unstack_layers = jax.default_backend() == "cpu" if unstack_layers is None else bool(unstack_layers)
    self.refill_every = int(refill_every)
    self.refill_fraction = float(refill_fraction)
    if prompt_buckets is not None and (not prompt_buckets or min(prompt_buckets) <= 0):
      raise ValueError(f"prompt_buckets={prompt_buckets!r}: give positive lengths, or None for powers of two.")
    self.cfg = cfg
    self.mesh = mesh
    self.max_batch_rows = int(max_batch_rows)
    self.prompt_buckets = tuple(sorted(prompt_buckets)) if prompt_buckets else None
    self.progress = progress
    self._row_multiple = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
    self._param_shardings = None if mesh is None else load.param_shardings(cfg, mesh)
    self.params = None if params is None else self.place_params(params)
    self.stats = SamplingStats()

  def place_params(self, params: decoder.Params) -> decoder.Params:
    """`params` as the programs take them: on the mesh by `param_shardings` (a no-op for params already laid
    out so), else as device arrays. Errors name the first leaf whose shape or structure does not fit `cfg`."""
    expected = decoder.abstract_params(self.cfg)
    if jax.tree.structure(params) != jax.tree.structure(expected):
      raise ValueError("params do not have the tree structure of the model config's parameters (stacked layers, "
                       "as init_params / from_pretrained return them); got "
                       f"{sorted(params) if isinstance(params, dict) else type(params).__name__} at the top level.")
    for (path, leaf), want in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(expected)):
      if tuple(np.shape(leaf)) != tuple(want.shape):
        raise ValueError(f"params{jax.tree_util.keystr(path)} has shape {tuple(np.shape(leaf))}; the model config "
                         f"needs {tuple(want.shape)}.")
    if self.mesh is None:
      return jax.tree.map(jnp.asarray, params)
    return jax.device_put(params, self._param_shardings)

  # ------------------------------------------------------------------------------------------ programs

  def _program(self, settings: core.SamplingParams, batch: int, length: int, table_shape, args):
    key = (self.cfg, settings, batch, length, table_shape, self.mesh, self._params_signature(args[0]),
           self.unstack_layers)
    if key not in _PROGRAMS:
      cfg = self.cfg

      def run(params, tokens, lengths, keys, active, budgets, table):
        return core.generate_core(cfg, params, tokens, lengths, keys, settings, table, row_active_N=active,
                                  row_budget_N=budgets, unstack_layers=self.unstack_layers)

      t0 = time.perf_counter()
      with shd.use_mesh(self.mesh):
        _PROGRAMS[key] = jax.jit(run).lower(*args).compile()
      _COMPILE_SECONDS[key] = time.perf_counter() - t0
    return _PROGRAMS[key]

  def _params_signature(self, params):
    return (jax.tree.structure(params), tuple((x.shape, x.dtype, x.sharding) for x in jax.tree.leaves(params)))

  def _slot_program(self, kind: str, settings: core.SamplingParams, shape_key, args, make_fn):
    """A compiled continuous-batching program (`sampling.continuous`), cached like the static ones."""
    from spark_jax.sampling import continuous

    table = args[-1] if args else None
    key = (kind, self.cfg, settings, shape_key, None if table is None else tuple(table.bytes_VxW.shape), self.mesh,
           self._params_signature(args[0]) if args else None)
    if key not in _PROGRAMS:
      t0 = time.perf_counter()
      _PROGRAMS[key] = continuous.compile_program(make_fn(), args, self.mesh, donate_state=kind != "init")
      _COMPILE_SECONDS[key] = time.perf_counter() - t0
    return _PROGRAMS[key]

  def _unstacked(self, params):
    from spark_jax.sampling import continuous

    with shd.use_mesh(self.mesh):
      return continuous.unstack_layers(params)

  def _place_replicated_args(self, args):
    """Host arrays of a slot program's arguments as device arrays (replicated on a mesh); device trees pass."""
    if self.mesh is None:
      return tuple(jnp.asarray(a) if isinstance(a, (np.ndarray, np.generic)) else a for a in args)
    rep = shd.replicated(self.mesh)
    return tuple(jax.device_put(a, rep) if isinstance(a, (np.ndarray, np.generic)) else a for a in args)

  def _place_rows(self, x: np.ndarray) -> jax.Array:
    """Shards dimension 0 over the row shards when it divides evenly, else replicates (see plan_batches)."""
    if self.mesh is None:
      return jnp.asarray(x)
    if x.shape[0] % self._row_multiple:
      return jax.device_put(x, shd.replicated(self.mesh))
    spec = PartitionSpec(("data", "fsdp"), *([None] * (x.ndim - 1)))
    return jax.device_put(x, NamedSharding(self.mesh, spec))

  def _place_replicated(self, tree):
    if self.mesh is None or tree is None:
      return tree
    return jax.device_put(tree, shd.replicated(self.mesh))

  # ------------------------------------------------------------------------------------------------ run

  def generate(self, prompts: Sequence[Sequence[int]], settings: core.SamplingParams, *, seed: int = 0,
               prompt_indices: Sequence[int] | None = None, params: decoder.Params | None = None,
               token_bytes: Sequence[bytes] | None = None, stop_labels: Sequence[str | bytes] | None = None,
               max_new_tokens: Sequence[int] | None = None) -> list[list[Sample]]:
    """Samples `settings.num_samples` continuations per prompt; returns them in the prompts' order.

    Args:
      prompts: token-id lists (unpadded, at least one token each).
      settings: static sampling settings.
      seed: the job's seed (see the module docstring for how rows derive their keys).
      prompt_indices: a global index per prompt (e.g. its row in the job's input); row keys fold in this index,
        so a prompt's samples do not depend on which batch, shard or process it lands in. Default 0..n-1.
      params: this call's parameters (None: the engine's own). Same shapes and dtypes as before reuse the
        compiled programs (see the module docstring).
      token_bytes: bytes of each token id (e.g. `Tokenizer.token_bytes_table()`); needed for stop strings.
      stop_labels: how to report each of settings.stop_strings in `Sample.stop` (default: the bytes).
      max_new_tokens: a token budget per prompt, each in 1..settings.max_new_tokens (vLLM's per-request
        `max_tokens`); default: settings.max_new_tokens for all. Rows that reach it finish with "length".
    """
    cfg = self.cfg
    if params is None:
      if self.params is None:
        raise ValueError("SamplingEngine.generate: this engine was built with params=None, so every call must pass "
                         "params=...")
      params = self.params
    else:
      params = self.place_params(params)
    prompts = _validate_prompts(prompts, cfg, settings.max_new_tokens)
    if prompt_indices is None:
      prompt_indices = range(len(prompts))
    prompt_indices = [int(i) for i in prompt_indices]
    if len(prompt_indices) != len(prompts) or min(prompt_indices, default=0) < 0:
      raise ValueError(f"prompt_indices: need one non-negative index per prompt ({len(prompts)}); "
                       f"got {len(prompt_indices)} (min {min(prompt_indices, default=0)}).")
    table = None
    if settings.stop_strings:
      if token_bytes is None:
        raise ValueError("stop_strings need token_bytes, the bytes of every token id (e.g. "
                         "Tokenizer.token_bytes_table()), to match generated text on device.")
      table = self._place_replicated(core.make_stop_table(token_bytes, cfg.vocab_size))
    labels = list(stop_labels) if stop_labels is not None else list(settings.stop_strings)
    budgets = _validate_budgets(max_new_tokens, len(prompts), settings.max_new_tokens)
    ns = settings.num_samples
    results: list[list[Sample] | None] = [None] * len(prompts)
    bar = None
    if self.progress:
      from tqdm.auto import tqdm
      bar = tqdm(total=len(prompts), unit="prompt", desc=f"sampling ({self.batching})", dynamic_ncols=True)
    t_start, generated = time.perf_counter(), 0

    def done(i, tokens, logprobs, lengths, finish):
      nonlocal generated
      results[i] = [_to_sample(tokens[r], logprobs[r], int(lengths[r]), int(finish[r]), settings, labels)
                    for r in range(ns)]
      generated += int(np.sum(lengths))
      self.stats.tokens += int(np.sum(lengths))
      if bar is not None:
        bar.update(1)
        bar.set_postfix_str(f"{generated / max(time.perf_counter() - t_start, 1e-9):.1f} tok/s")

    try:
      if prompts and self.batching == "continuous":
        from spark_jax.sampling import continuous

        continuous.run(self, params, prompts, settings, seed=seed, prompt_indices=prompt_indices, budgets=budgets,
                       table=table, on_done=done)
      elif prompts:
        self._generate_static(params, prompts, settings, seed, prompt_indices, budgets, table, done)
    finally:
      if bar is not None:
        bar.close()
    return results  # type: ignore[return-value]

  def _generate_static(self, params, prompts, settings, seed, prompt_indices, budgets, table, done) -> None:
    ns = settings.num_samples
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    chunks, start = [], 0
    for taken, batch in plan_batches(len(prompts), ns, self.max_batch_rows, self._row_multiple):
      chunks.append((order[start:start + taken], batch))
      start += taken
    pending = None  # (chunk, batch, outputs): fetch one batch while the next one runs
    for planned in chunks + [None]:
      launched = None
      if planned is not None:
        chunk, batch = planned
        launched = (chunk, batch,
                    self._launch(params, chunk, batch, prompts, prompt_indices, budgets, settings, seed, table))
        self.stats.batches += 1
        self.stats.rows += batch * ns
        self.stats.padding_rows += (batch - len(chunk)) * ns
      if pending is not None:
        done_chunk, done_batch, out = pending
        tokens, logprobs, lengths, finish, steps = jax.device_get(
            (out.tokens_NxM, out.logprobs_NxM, out.lengths_N, out.finish_N, out.steps))
        self.stats.steps += int(steps)
        self.stats.row_steps += int(steps) * done_batch * ns
        for j, idx in enumerate(done_chunk):
          rows = slice(j * ns, (j + 1) * ns)
          done(idx, tokens[rows], logprobs[rows], lengths[rows], finish[rows])
      pending = launched

  def _launch(self, params, chunk, batch: int, prompts, prompt_indices, budgets, settings: core.SamplingParams,
              seed: int, table):
    ns = settings.num_samples
    length = bucket_length(max(len(prompts[i]) for i in chunk), self.prompt_buckets)
    tokens = np.zeros((batch, length), np.int32)
    lengths = np.ones((batch,), np.int32)  # padding prompts: one token; their rows start done
    indices = np.zeros((batch,), np.int64)
    budget_B = np.ones((batch,), np.int32)
    active = np.repeat(np.arange(batch) < len(chunk), ns)
    for j, i in enumerate(chunk):
      p = prompts[i]
      tokens[j, length - len(p):] = p
      lengths[j] = len(p)
      indices[j] = prompt_indices[i]
      budget_B[j] = budgets[i]
    keys = _row_keys(seed, indices, ns)
    args = (params, self._place_rows(tokens), self._place_rows(lengths), self._place_rows(keys),
            self._place_rows(active), self._place_rows(np.repeat(budget_B, ns)), table)
    table_shape = None if table is None else tuple(table.bytes_VxW.shape)
    program = self._program(settings, batch, length, table_shape, args)
    return program(*args)


def _to_sample(tokens, logprobs, n: int, finish: int, settings: core.SamplingParams, labels) -> Sample:
  stop = None
  if finish == core.FINISH_STOP_TOKEN:
    reason, stop = "stop_token", int(tokens[n - 1])
  elif finish >= core.FINISH_STOP_STRING:
    reason, stop = "stop_string", labels[finish - core.FINISH_STOP_STRING]
  else:
    reason = "length"
  return Sample(tokens=[int(t) for t in tokens[:n]], logprobs=[float(x) for x in logprobs[:n]],
                finish_reason=reason, stop=stop)


def _validate_budgets(budgets, num_prompts: int, cap: int) -> np.ndarray:
  if budgets is None or (num_prompts == 0 and len(budgets) == 0):
    return np.full((num_prompts,), cap, np.int32)
  arr = np.asarray(budgets)
  if arr.shape != (num_prompts,) or not np.issubdtype(arr.dtype, np.integer):
    raise ValueError(f"max_new_tokens: need one integer token budget per prompt ({num_prompts}); got an array of "
                     f"shape {arr.shape} and dtype {arr.dtype}.")
  bad = np.flatnonzero((arr < 1) | (arr > cap))
  if bad.size:
    raise ValueError(f"max_new_tokens[{int(bad[0])}] = {int(arr[bad[0]])}: each prompt's budget must be in "
                     f"1..{cap} (settings.max_new_tokens, the slots' size); raise settings.max_new_tokens or lower it.")
  return arr.astype(np.int32)


def _validate_prompts(prompts, cfg: ModelConfig, max_new_tokens: int) -> list[np.ndarray]:
  if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
    raise TypeError(f"prompts must be a list of token-id lists; got {type(prompts).__name__}.")
  context = cfg.max_position_embeddings
  out = []
  for i, p in enumerate(prompts):
    if isinstance(p, (str, bytes)):
      raise TypeError(f"prompts[{i}] is a {type(p).__name__}; tokenize it first (prompts are token-id lists).")
    arr = np.asarray(p)
    if arr.ndim != 1:
      raise ValueError(f"prompts[{i}] has shape {arr.shape}; each prompt must be a flat list of token ids.")
    if arr.size == 0:
      raise ValueError(f"prompts[{i}] is empty; every prompt needs at least one token (e.g. the BOS token).")
    if not np.issubdtype(arr.dtype, np.integer):
      raise TypeError(f"prompts[{i}] has dtype {arr.dtype}; token ids must be integers.")
    if arr.min() < 0 or arr.max() >= cfg.vocab_size:
      raise ValueError(f"prompts[{i}] has token id {int(arr.min() if arr.min() < 0 else arr.max())} outside "
                       f"[0, {cfg.vocab_size}) (the model's vocab_size).")
    if arr.size > context:
      raise ValueError(f"prompts[{i}] has {arr.size} tokens, longer than the model's context of {context} "
                       "(max_position_embeddings); truncate it.")
    if arr.size + max_new_tokens > context:
      raise ValueError(f"prompts[{i}] has {arr.size} tokens and max_new_tokens={max_new_tokens}: "
                       f"{arr.size + max_new_tokens} positions exceed the model's context of {context}; "
                       "shorten the prompt or lower max_new_tokens.")
    out.append(arr.astype(np.int32))
  return out


def generate(cfg: ModelConfig, params: decoder.Params, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
             num_samples: int = 1, stop_token_ids: Sequence[int] = (), stop_strings: Sequence[str | bytes] = (),
             seed: int = 0, mesh: Mesh | None = None, token_bytes: Sequence[bytes] | None = None,
             max_batch_rows: int = DEFAULT_MAX_BATCH_ROWS, prompt_buckets: Sequence[int] | None = None,
             progress: bool = False, batching: str = "continuous",
             max_new_tokens_per_prompt: Sequence[int] | None = None) -> list[list[Sample]]:
  """Samples `num_samples` continuations of each prompt (token-id lists); one list of `Sample`s per prompt.

  Nothing stops a row early unless `stop_token_ids` or `stop_strings` say so (the model's EOS is not
  implied). Stop strings (str as UTF-8, or bytes) need `token_bytes`, the bytes of each token id
  (`Tokenizer.token_bytes_table()`). Temperature 0 is greedy. See `SamplingEngine` for batching and
  `spark_jax.sampling.core` for the exact filter and stop-string rules.
  """
  if isinstance(stop_token_ids, (int, np.integer)):
    stop_token_ids = (stop_token_ids,)
  if isinstance(stop_strings, (str, bytes)):
    stop_strings = (stop_strings,)
  for t in stop_token_ids:
    if not isinstance(t, (int, np.integer)) or isinstance(t, bool) or not 0 <= t < cfg.vocab_size:
      raise ValueError(f"stop_token_ids contains {t!r}: each must be a token id in [0, {cfg.vocab_size}).")
  encoded = []
  for s in stop_strings:
    if not isinstance(s, (str, bytes)) or not s:
      raise ValueError(f"stop_strings contains {s!r}: each must be a non-empty str or bytes.")
    encoded.append(s.encode("utf-8") if isinstance(s, str) else bytes(s))
  if stop_strings and token_bytes is None:
    raise ValueError("stop_strings were given without token_bytes: pass token_bytes=tokenizer.token_bytes_table() "
                     "(the bytes of every token id) so stop strings can be matched on device.")
  settings = core.SamplingParams(
      max_new_tokens=max_new_tokens, temperature=float(temperature), top_p=float(top_p), top_k=top_k,
      min_p=float(min_p), num_samples=num_samples, stop_token_ids=tuple(int(t) for t in stop_token_ids),
      stop_strings=tuple(encoded))
  engine = SamplingEngine(cfg, params, mesh=mesh, max_batch_rows=max_batch_rows, prompt_buckets=prompt_buckets,
                          progress=progress, batching=batching)
  return engine.generate(prompts, settings, seed=seed, token_bytes=token_bytes, stop_labels=list(stop_strings),
                         max_new_tokens=max_new_tokens_per_prompt)
