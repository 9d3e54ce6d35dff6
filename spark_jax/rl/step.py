"""The GRPO step: one jitted rollout-and-reward program, then a jitted update (docs/method.md, Stage III).

rollout_and_reward (one `jit`, no host round trip for every learned reward and `random`):

  policy prompts --generate_core(policy params, G samples per prompt, shared prefill)--> responses
    --format gate on tokens (token-level automata: exactly one \\boxed{}, one <answer>...</answer>, nothing
      after </answer>)--> valid rows, cut after the last </answer>
    --PRM prompt packing (template ids + problem ids + cut response ids, left-padded)-->
    --generate_core(PRM params, greedy; rows failing the gate start done)--> PRM outputs
    --verdict markers on tokens--> final verdict, step verdict counts --> rewards --> advantages

Rollouts and PRM calls run in `lax.map` over row blocks (`rollout_chunk` prompts, `prm_chunk` rows per
block) so a 256 x 16 batch holds one block's caches at a time; per-call work (the decode layout of the
weights) is done once outside the map. `rlvr` (math_verify) is the one reward graded on the host: its
program stops after the gate, the host grades, and a second small program computes the advantages.

update: recomputes the rollouts' log-probs with the policy (pi_old before the first optimizer step, verl's
default; `use_sampler_logprobs` takes the sampler's instead; with one mini-batch and one epoch the
recomputation is the update's own forward pass), the reference's log-probs when beta > 0, and runs AdamW
steps of the GRPO loss over mini-batches, each its own dispatch of one jitted step.

Sequence layout shared by both programs: a row is its prompt, LEFT-padded to P, followed by its response,
RIGHT-padded to R (T = P + R). Positions skip the padding, exactly as the sampler numbered them, so the
trainer's log-probs of the response are the sampler's up to rounding (the logged `logprob_gap`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from spark_jax import sharding as shd
from spark_jax.models import ModelConfig
from spark_jax.models import decoder
from spark_jax.rl import advantages as adv_lib
from spark_jax.rl import loss as loss_lib
from spark_jax.sampling import core
from spark_jax.train import step as train_step

F32 = jnp.float32

# Reward types (docs/method.md, Stage III rewards). The PRM output format each learned type reads.
REWARD_FORMATS = {
    "orm": "orm",
    "prm_outcome": "prm",
    "prm_cot_outcome": "prm_cot",
    "prm_step_avg": "prm",
    "prm_cot_step_avg": "prm_cot",
    "selective_advantage": "prm_cot",
    "selective_advantage_half": "prm_cot",
    "global_step": "prm_cot",
    "global_step_no_penalty": "prm_cot",
    "random": None,
    "rlvr": None,
}
REWARD_TYPES = tuple(REWARD_FORMATS)
# The types whose released code queried the PRM-CoT model with the ORM prompt (the D10 bug a knob reproduces).
_ORM_PROMPT_BUG_TYPES = ("selective_advantage", "selective_advantage_half", "global_step")


def check_reward_type(reward_type: str) -> str:
  if reward_type not in REWARD_FORMATS:
    raise ValueError(f"reward.type={reward_type!r} is not a reward type; use one of {REWARD_TYPES}.")
  return reward_type


@dataclasses.dataclass(frozen=True)
class RolloutSettings:
  """Static settings of the rollout-and-reward program (hashable: one compiled program per value).

  group_size: rollouts per prompt (G). max_response: response budget R. rollout: the policy's sampling
  settings are built from temperature/top_p/top_k and the stop ids. prm_max_new_tokens: PRM output budget.
  rollout_chunk: prompts per rollout block (0 = all). prm_chunk: rows per PRM block (0 = all).
  reward_type: one of REWARD_TYPES. rlvr_gate: gate rlvr too (D12: off is the faithful baseline; learned and
  random rewards are always gated).
  prm_all_rows: send every row to the PRM whatever the gate says (benchmarks: real reward time on random
  weights); the reward still multiplies by the gate. orm_prompt_bug: reproduce the released code's ORM
  prompt for three step-level types (D10). adv_scale: "group" (default) | "batch" | "none".
  """

  group_size: int
  max_response: int
  stop_token_ids: tuple[int, ...]
  reward_type: str = "prm_cot_outcome"
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0
  prm_max_new_tokens: int = 256
  prm_stop_token_ids: tuple[int, ...] = ()
  rollout_chunk: int = 0
  prm_chunk: int = 0
  rlvr_gate: bool = False
  prm_all_rows: bool = False
  orm_prompt_bug: bool = False
  adv_scale: str = "group"
  min_steps_selective: int = 4
  min_steps_global: int = 3
  max_steps: int = 20

  def __post_init__(self):
    check_reward_type(self.reward_type)
    if self.group_size < 1:
      raise ValueError(f"group_size={self.group_size}: need at least one rollout per prompt.")
    if self.adv_scale not in ("group", "batch", "none"):
      raise ValueError(f"adv_scale={self.adv_scale!r}; use 'group', 'batch' or 'none'.")

  @property
  def prm_format(self) -> str | None:
    fmt = REWARD_FORMATS[self.reward_type]
    if fmt is not None and self.orm_prompt_bug and self.reward_type in _ORM_PROMPT_BUG_TYPES:
      return "orm"
    return fmt

  @property
  def policy_sampling(self) -> core.SamplingParams:
    return core.SamplingParams(max_new_tokens=self.max_response, temperature=self.temperature, top_p=self.top_p,
                               top_k=self.top_k, num_samples=self.group_size, stop_token_ids=self.stop_token_ids)

  @property
  def prm_sampling(self) -> core.SamplingParams:
    return core.SamplingParams(max_new_tokens=self.prm_max_new_tokens, temperature=0.0,
                               stop_token_ids=self.prm_stop_token_ids)

  @property
  def gated(self) -> bool:
    return self.rlvr_gate or self.reward_type != "rlvr"


# ------------------------------------------------------------------------------------------ rollout


def _blocks(x, n_blocks: int):
  """Leading axis N -> n_blocks x (N / n_blocks) (row blocks for `lax.map`)."""
  return x.reshape((n_blocks, x.shape[0] // n_blocks) + x.shape[1:])


def _unblock(x):
  if x.ndim == 1:  # a per-call scalar of the core (decode steps run): the longest block's
    return jnp.max(x)
  return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def _num_blocks(total: int, chunk: int, what: str) -> int:
  """Blocks of `chunk` rows (0, or at least `total`: one block)."""
  chunk = total if not chunk or chunk >= total else chunk
  if total % chunk:
    raise ValueError(f"{what}={chunk} does not divide the {total} rows of the batch; pick a divisor of {total}.")
  return total // chunk


def _layer_weights(params):
  """The decode layout of the weights, made once outside a block map (CPU: per-layer copies; elsewhere the
  stacked weights are read as they are, so there is nothing to make)."""
  return decoder.unstack_layers(params) if core.decodes_unstacked() else None


def rollout(cfg: ModelConfig, settings: RolloutSettings, params, prompt_tokens_BxP, prompt_lengths_B,
            row_keys_N) -> core.CoreOutput:
  """G samples of each prompt (prompt-major rows), `rollout_chunk` prompts per `lax.map` block."""
  B = prompt_tokens_BxP.shape[0]
  nb = _num_blocks(B, settings.rollout_chunk, "rollout_chunk")
  sampling = settings.policy_sampling

  if nb == 1:
    return core.generate_core(cfg, params, prompt_tokens_BxP, prompt_lengths_B, row_keys_N, sampling)
  layers = _layer_weights(params)

  def block(xs):
    toks, lens, keys = xs
    return core.generate_core(cfg, params, toks, lens, keys, sampling, layer_weights=layers)

  out = jax.lax.map(block, (_blocks(prompt_tokens_BxP, nb), _blocks(prompt_lengths_B, nb),
                            _blocks(row_keys_N, nb)))
  return jax.tree.map(_unblock, out)


def prm_generate(cfg: ModelConfig, settings: RolloutSettings, params, prompt_tokens_NxU, prompt_lengths_N,
                 active_N) -> core.CoreOutput:
  """Greedy PRM outputs for every row, `prm_chunk` rows per block; inactive rows start done (no tokens)."""
  N = prompt_tokens_NxU.shape[0]
  nb = _num_blocks(N, settings.prm_chunk, "prm_chunk")
  sampling = settings.prm_sampling
  keys_N = jax.random.split(jax.random.PRNGKey(0), N)  # greedy: the keys are never drawn from

  if nb == 1:
    return core.generate_core(cfg, params, prompt_tokens_NxU, prompt_lengths_N, keys_N, sampling,
                              row_active_N=active_N)
  layers = _layer_weights(params)

  def block(xs):
    toks, lens, keys, active = xs
    return core.generate_core(cfg, params, toks, lens, keys, sampling, row_active_N=active, layer_weights=layers)

  out = jax.lax.map(block, tuple(_blocks(x, nb) for x in (prompt_tokens_NxU, prompt_lengths_N, keys_N, active_N)))
  return jax.tree.map(_unblock, out)


# ------------------------------------------------------------------------------------------ rewards


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RewardTables:
  """Device-side inputs of the in-graph reward, built once on the host (`make_reward_tables`).

  gate / verdicts / steps: the token-level automata (rl/automata.py) of the format gate, the PRM's verdict
  markers and the policy's `<step>` tags; prm_template: the PRM prompt's fixed pieces as ids
  (rl/prm_prompt.py). Any of them may be None when the reward type does not read it.
  """

  gate: Any
  verdicts: Any
  steps: Any
  prm_template: Any


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RolloutOutput:
  """What the rollout-and-reward program returns (N = B x G rows, prompt-major; R = response budget)."""

  response_tokens_NxR: jax.Array
  response_lengths_N: jax.Array
  sampler_logprobs_NxR: jax.Array
  format_ok_N: jax.Array
  rewards_N: jax.Array
  advantages_NxR: jax.Array
  stats: dict[str, jax.Array]


def _response_mask(lengths_N, R):
  return jnp.arange(R)[None, :] < lengths_N[:, None]


def _check_shape(what: str, x, shape: tuple[int, ...]) -> None:
  """Raised while tracing, so a reward function of the wrong shape fails before anything runs (broadcasting
  an (N, 1) reward against (N,) masks would silently give an N x N array)."""
  if tuple(x.shape) != shape:
    raise ValueError(f"{what} of shape {tuple(x.shape)}; a reward is one number per rollout and an advantage one "
                     f"per response token: expected {shape}. Fix the reward function (spark_jax/rl/step.py).")


def _outcome_rewards(settings: RolloutSettings, verdicts, key, N: int):
  """Per-row reward before the gate: y, 0.4 k/n + 0.6 y, or a fair coin (random)."""
  t = settings.reward_type
  if t == "random":
    return jax.random.bernoulli(key, 0.5, (N,)).astype(F32)
  y_N = (verdicts.final_N == 1).astype(F32)
  if t in ("prm_step_avg", "prm_cot_step_avg"):
    n_N = (verdicts.correct_N + verdicts.incorrect_N).astype(F32)
    frac_N = jnp.where(n_N > 0, verdicts.correct_N / jnp.maximum(n_N, 1.0), 0.0)
    return 0.4 * frac_N + 0.6 * y_N
  return y_N


def advantages(settings: RolloutSettings, rewards_N, response_lengths_N, R: int, verdicts=None, steps=None):
  """Token advantages N x R from the rewards (and, for the step-level types, the step verdicts and ends)."""
  G = settings.group_size
  mask_NxR = _response_mask(response_lengths_N, R)
  t = settings.reward_type
  if t in ("selective_advantage", "selective_advantage_half"):
    a_NxR = adv_lib.selective(rewards_N, G, mask_NxR, steps.ends_NxY, steps.count_N, verdicts.steps_NxY,
                              verdicts.num_steps_N, half=(t == "selective_advantage_half"),
                              min_steps=settings.min_steps_selective, max_steps=settings.max_steps)
  elif t in ("global_step", "global_step_no_penalty"):
    a_NxR = adv_lib.global_step(rewards_N, G, mask_NxR, steps.ends_NxY, steps.count_N, verdicts.steps_NxY,
                                verdicts.num_steps_N, penalty=(t == "global_step"),
                                min_steps=settings.min_steps_global, max_steps=settings.max_steps)
  else:
    a_N = adv_lib.scaled(rewards_N, G, settings.adv_scale)
    a_NxR = jnp.broadcast_to(a_N[:, None], mask_NxR.shape)
  return jnp.where(mask_NxR, a_NxR, 0.0).astype(F32)


def _group_stats(rewards_N, G: int):
  r_BxA = rewards_N.reshape(-1, G)
  return {"reward_mean": jnp.mean(rewards_N), "reward_std": jnp.std(rewards_N),
          "zero_variance_groups": jnp.mean(jnp.all(r_BxA == r_BxA[:, :1], axis=1).astype(F32))}


def _correlation(x_N, y_N):
  x, y = x_N - jnp.mean(x_N), y_N - jnp.mean(y_N)
  den = jnp.sqrt(jnp.sum(x * x) * jnp.sum(y * y))
  return jnp.where(den > 0, jnp.sum(x * y) / jnp.maximum(den, 1e-12), 0.0)


def rollout_and_gate(policy_cfg: ModelConfig, settings: RolloutSettings, policy_params, tables: RewardTables,
                     prompt_tokens_BxP, prompt_lengths_B, key):
  """Rollouts, the gate on tokens, and the policy-side monitors (the first half of every reward)."""
  from spark_jax.rl import automata
  B = prompt_tokens_BxP.shape[0]
  N = B * settings.group_size
  rollout_key, reward_key = jax.random.split(key)
  row_keys_N = jax.vmap(functools.partial(jax.random.fold_in, rollout_key))(jnp.arange(N))
  out = rollout(policy_cfg, settings, policy_params, prompt_tokens_BxP, prompt_lengths_B, row_keys_N)
  gate = automata.run_gate(tables.gate, out.tokens_NxM, out.lengths_N)
  steps = automata.run_step_ends(tables.steps, out.tokens_NxM, out.lengths_N)
  ok_N = gate.ok_N if settings.gated else jnp.ones_like(gate.ok_N)
  stats = {"format_violation": 1.0 - jnp.mean(gate.ok_N.astype(F32)),
           "text_after_answer": jnp.mean(gate.text_after_answer_N.astype(F32)),
           "response_length": jnp.mean(out.lengths_N.astype(F32)),
           "truncated": jnp.mean((out.finish_N == core.FINISH_LENGTH).astype(F32)),
           "steps_per_response": jnp.mean(steps.count_N.astype(F32))}
  return out, gate, steps, ok_N, reward_key, stats


def rollout_and_reward(policy_cfg: ModelConfig, prm_cfg: ModelConfig | None, settings: RolloutSettings,
                       policy_params, prm_params, tables: RewardTables, prompt_tokens_BxP, prompt_lengths_B,
                       problem_tokens_BxQ, problem_lengths_B, key) -> RolloutOutput:
  """The whole in-graph program for every reward type but `rlvr` (see `rlvr_advantages`). Traceable."""
  from spark_jax.rl import automata
  if settings.reward_type == "rlvr":
    raise ValueError("rollout_and_reward: reward 'rlvr' is graded on the host; use rollout_and_gate, grade, "
                     "then rlvr_advantages.")
  out, gate, steps, ok_N, reward_key, stats = rollout_and_gate(
      policy_cfg, settings, policy_params, tables, prompt_tokens_BxP, prompt_lengths_B, key)
  N, R = out.tokens_NxM.shape
  verdicts = None
  if settings.prm_format is not None:
    from spark_jax.rl import prm_prompt
    prm_tokens_NxU, prm_lengths_N = prm_prompt.pack(
        tables.prm_template, problem_tokens_BxQ, problem_lengths_B, out.tokens_NxM, gate.cut_N,
        settings.group_size)
    active_N = jnp.ones_like(ok_N) if settings.prm_all_rows else ok_N
    prm_out = prm_generate(prm_cfg, settings, prm_params, prm_tokens_NxU, prm_lengths_N, active_N)
    verdicts = automata.run_verdicts(tables.verdicts, prm_out.tokens_NxM, prm_out.lengths_N)
    queried = active_N.astype(F32)
    nq = jnp.maximum(jnp.sum(queried), 1.0)
    stats.update({
        "prm_verdict_yes": jnp.sum(queried * (verdicts.final_N == 1)) / nq,
        "prm_verdict_no": jnp.sum(queried * (verdicts.final_N == 0)) / nq,
        "prm_verdict_none": jnp.sum(queried * (verdicts.final_N < 0)) / nq,
        "prm_output_length": jnp.sum(queried * prm_out.lengths_N) / nq,
        "prm_prompt_length": jnp.sum(queried * prm_lengths_N) / nq})
  rewards_N = _outcome_rewards(settings, verdicts, reward_key, N)
  _check_shape(f"reward type {settings.reward_type!r} gave rewards", rewards_N, (N,))
  rewards_N = rewards_N * ok_N.astype(F32)
  if settings.reward_type in ("selective_advantage", "selective_advantage_half"):
    # The strict step-count penalty, as advantages.selective applies it, so the reported reward is the one used.
    bad_N = (steps.count_N < settings.min_steps_selective) | (steps.count_N > settings.max_steps)
    rewards_N = jnp.where((verdicts.num_steps_N > 0) & bad_N, 0.0, rewards_N)
  adv_NxR = advantages(settings, rewards_N, out.lengths_N, R, verdicts, steps)
  _check_shape(f"reward type {settings.reward_type!r} gave advantages", adv_NxR, (N, R))
  stats.update(_group_stats(rewards_N, settings.group_size))
  stats["reward_step_correlation"] = _correlation(rewards_N, steps.count_N.astype(F32))
  return RolloutOutput(out.tokens_NxM, out.lengths_N, out.logprobs_NxM, ok_N, rewards_N, adv_NxR, stats)


def rlvr_advantages(settings: RolloutSettings, rewards_N, ok_N, response_lengths_N, steps_count_N, R: int):
  """The second half of `rlvr`: host-graded rewards (x the gate when rlvr_gate) -> advantages and stats."""
  rewards_N = rewards_N.astype(F32) * ok_N.astype(F32)
  stats = _group_stats(rewards_N, settings.group_size)
  stats["reward_step_correlation"] = _correlation(rewards_N, steps_count_N.astype(F32))
  return rewards_N, advantages(settings, rewards_N, response_lengths_N, R), stats


# ------------------------------------------------------------------------------------------- update


@dataclasses.dataclass(frozen=True)
class UpdateSettings:
  """Static settings of the update (docs/method.md D10 defaults).

  clip_low / clip_high: ratio clip range (asymmetric when they differ); dual_clip: c of the dual clip for
  negative advantages (0 = off); beta: KL coefficient (0 = no reference model); kl_type: "k1" | "k2" | "k3";
  loss_agg: "token-mean" | "seq-mean-token-mean" | "seq-mean-token-sum-norm"; logits_chunk: positions per
  vocabulary-projection chunk; compute_dtype: activations (master weights stay fp32); micro_batch: rows per
  forward/backward pass, all devices together (0 = the whole mini-batch): the update sums the gradients of
  its micro-batches inside one jitted step, and the log-prob passes (pi_old, reference) run one micro-batch
  at a time, so activation memory is bounded by micro_batch x T whatever the rollout batch (verl's
  ppo_micro_batch_size, TRL's gradient accumulation).
  """

  clip_low: float = 0.2
  clip_high: float = 0.2
  dual_clip: float = 3.0
  beta: float = 0.001
  kl_type: str = "k3"
  loss_agg: str = "token-mean"
  logits_chunk: int = 1024
  compute_dtype: str = "float32"
  micro_batch: int = 0


def sequences(prompt_tokens_BxP, prompt_lengths_B, response_tokens_NxR, response_lengths_N, group_size: int):
  """(tokens_NxT, mask_NxT): each row's left-padded prompt followed by its right-padded response."""
  P = prompt_tokens_BxP.shape[1]
  R = response_tokens_NxR.shape[1]
  prompts_NxP = jnp.repeat(prompt_tokens_BxP, group_size, axis=0)
  plen_N = jnp.repeat(prompt_lengths_B, group_size)
  pmask_NxP = jnp.arange(P)[None, :] >= (P - plen_N)[:, None]
  tokens_NxT = jnp.concatenate([jnp.where(pmask_NxP, prompts_NxP, 0), response_tokens_NxR], axis=1)
  mask_NxT = jnp.concatenate([pmask_NxP, _response_mask(response_lengths_N, R)], axis=1)
  return tokens_NxT.astype(jnp.int32), mask_NxT


def response_logprobs(cfg: ModelConfig, params, tokens_NxT, mask_NxT, R: int, chunk: int = 1024):
  """log p(response token j | everything before it) under `params`, N x R fp32 (0 past each response)."""
  positions_NxT = decoder.default_positions(mask_NxT)
  lp = train_step.token_logprobs(cfg, params, tokens_NxT[:, :-1], tokens_NxT[:, 1:],
                                 positions_BxT=positions_NxT[:, :-1], mask_BxT=mask_NxT[:, :-1], chunk=chunk)
  lp_NxR = lp[:, -R:]
  return jnp.where(mask_NxT[:, -R:], lp_NxR, 0.0)


def micro_batches(rows: int, micro_batch: int) -> int:
  """How many micro-batches a batch of `rows` splits into (micro_batch 0 = one)."""
  if micro_batch <= 0 or micro_batch >= rows:
    return 1
  if rows % micro_batch:
    raise ValueError(f"micro_batch={micro_batch} does not divide the {rows} rows of a (mini-)batch; pick a divisor "
                     "(config.micro_batch).")
  return rows // micro_batch


def _split(x, A: int):
  """N x ... -> A x (N / A) x ...: micro-batch a holds rows a, a + A, a + 2A, ... A strided split keeps each
  device's contiguous block of rows on that device (no resharding), and every loss aggregation is a sum over
  rows, so which rows share a micro-batch does not change the result."""
  return jnp.swapaxes(x.reshape((x.shape[0] // A, A) + x.shape[1:]), 0, 1)


def _merge(x_AxB):
  """The inverse of `_split`."""
  x = jnp.swapaxes(x_AxB, 0, 1)
  return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def make_logprob_fn(cfg: ModelConfig, mesh, *, chunk: int = 1024, compute_dtype: str = "float32",
                    micro_batch: int = 0):
  """Jitted `(params, tokens_NxT, mask_NxT, R) -> logprobs_NxR` (pi_old and the reference, no gradient), one
  micro-batch of rows at a time (`lax.map`) when micro_batch > 0."""
  dtype = jnp.dtype(compute_dtype)

  @functools.partial(jax.jit, static_argnums=(3,), out_shardings=shd.replicated(mesh))
  def fn(params, tokens_NxT, mask_NxT, R):
    params = train_step._cast(params, dtype)
    A = micro_batches(tokens_NxT.shape[0], micro_batch)
    if A == 1:
      return response_logprobs(cfg, params, tokens_NxT, mask_NxT, R, chunk)
    lp_AxBxR = jax.lax.map(lambda tm: response_logprobs(cfg, params, tm[0], tm[1], R, chunk),
                           (_split(tokens_NxT, A), _split(mask_NxT, A)))
    return _merge(lp_AxBxR)

  return fn


def make_update_step(cfg: ModelConfig, tx: optax.GradientTransformation, schedule, mesh,
                     settings: UpdateSettings):
  """Jitted `update(state, batch) -> (state, metrics, logprobs_NxR)`: one AdamW step of the GRPO loss on one
  mini-batch; `logprobs_NxR` are the response log-probs under the parameters before the step (no gradient).

  batch: tokens_NxT, mask_NxT (sequence layout above), old_logprobs_NxR, advantages_NxR, ref_logprobs_NxR
  (zeros when beta = 0). `old_logprobs_NxR=None` is the on-policy step (one mini-batch, one epoch, pi_old
  recomputed): pi_old is then the step's own forward pass, held constant (TRL's shortcut for one iteration),
  which is the separate recomputation up to float rounding and saves a forward pass over the batch.
  The loss is the mean over the whole mini-batch (however many devices and micro-batches it spans): with
  `settings.micro_batch` the step scans over micro-batches and sums their gradients, each micro-batch's loss
  normalised by the mini-batch's token and row counts, so every aggregation mode is exact. Metrics: loss, pg_loss, kl, clip_frac,
  entropy (sampled-token estimate: -mean log p of the rollout's own tokens), grad_norm, lr.
  """
  dtype = jnp.dtype(settings.compute_dtype)
  sh = train_step.state_shardings(cfg, tx, mesh)
  rep = shd.replicated(mesh)

  def loss_fn(p32, batch, num_tokens, num_rows):
    R = batch["advantages_NxR"].shape[1]
    lp_NxR = response_logprobs(cfg, train_step._cast(p32, dtype), batch["tokens_NxT"], batch["mask_NxT"], R,
                               settings.logits_chunk)
    mask_NxR = batch["mask_NxT"][:, -R:]
    old_NxR = batch["old_logprobs_NxR"]
    if old_NxR is None:
      old_NxR = jax.lax.stop_gradient(lp_NxR)
    loss, aux = loss_lib.grpo_loss(
        lp_NxR, old_NxR, batch["advantages_NxR"], mask_NxR,
        ref_logprobs_NxR=batch["ref_logprobs_NxR"] if settings.beta > 0 else None,
        clip_low=settings.clip_low, clip_high=settings.clip_high, dual_clip=settings.dual_clip,
        beta=settings.beta, kl_type=settings.kl_type, agg=settings.loss_agg, num_tokens=num_tokens,
        num_rows=num_rows)
    aux = dict(aux, entropy=-jnp.sum(jnp.where(mask_NxR, lp_NxR, 0.0)) / num_tokens)
    return loss, (aux, jax.lax.stop_gradient(lp_NxR))

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def update(state, batch):
    R = batch["advantages_NxR"].shape[1]
    N = batch["tokens_NxT"].shape[0]
    # The mini-batch's own counts are the denominators of every micro-batch's loss and metrics, so their sum
    # is the mini-batch's loss (and mean metrics) exactly, whatever the split.
    num_tokens = jnp.maximum(jnp.sum(batch["mask_NxT"][:, -R:].astype(F32)), 1.0)
    A = micro_batches(N, settings.micro_batch)
    if A == 1:
      (loss, (aux, lp_NxR)), grads = grad_fn(state["params"], batch, num_tokens, N)
    else:
      micro = {k: None if v is None else _split(v, A) for k, v in batch.items()}

      def body(carry, mb):
        (l, (a, lp)), g = grad_fn(state["params"], mb, num_tokens, N)
        acc = jax.tree.map(jnp.add, carry, (l, a, g))
        return jax.lax.with_sharding_constraint(acc, carry_sh), lp

      first = jax.tree.map(lambda v: v[0], micro)
      aux0 = jax.tree.map(lambda x: jnp.zeros(x.shape, F32),  # the forward's shapes only: no backward traced
                          jax.eval_shape(loss_fn, state["params"], first, num_tokens, N)[1][0])
      carry0 = (jnp.zeros((), F32), aux0, jax.tree.map(lambda p: jnp.zeros(p.shape, F32), state["params"]))
      carry_sh = (rep, jax.tree.map(lambda _: rep, carry0[1]), sh["params"])
      (loss, aux, grads), lp_AxBxR = jax.lax.scan(body, carry0, micro)
      lp_NxR = _merge(lp_AxBxR)
    grads = jax.lax.with_sharding_constraint(grads, sh["params"])
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": jnp.asarray(schedule(state["step"]), F32),
               **{k: jnp.asarray(v, F32) for k, v in aux.items()}}
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics, lp_NxR

  return jax.jit(update, out_shardings=(sh, rep, rep), donate_argnums=(0,))
