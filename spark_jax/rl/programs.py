"""The host shell around the GRPO step's jitted programs (rl/step.py): compile once, run, time, glue.

`Programs` holds one run's compiled programs and does the host work between them:
  * the in-graph path: one call of the rollout-and-reward program;
  * `rlvr`: rollouts + gate, math_verify grading on the host, then the advantage program;
  * the host reference path (`reward.in_graph=False`): rollouts + gate in the graph, then decode, the PRM
    prompt as ids (text/rm_ids.rm_prompt_ids, the ids the graph packs), the PRM through the sampling
    engine, the rules of rl/rewards.py on text, the step ends from the token bytes
    (rl/rewards.step_end_tokens) and the same advantage functions. Tests compare
    it with the in-graph path; it is also the path for a PRM with another tokenizer;
  * the update: pi_old / reference log-probs, then mini-batches x epochs of jitted AdamW steps (one
    mini-batch and one epoch: pi_old from the update's own forward, no separate pass);
  * dynamic sampling (DAPO): repeat the rollout-and-reward program, bounded rounds, until the batch holds
    enough groups whose rewards differ.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from spark_jax import sharding as shd
from spark_jax.rl import step as rl_step
from spark_jax.rl.step import RewardTables, RolloutOutput, RolloutSettings, UpdateSettings


def make_reward_tables(tokenizer, settings: RolloutSettings, prm_tokenizer, vocab_size: int) -> RewardTables:
  """The automata and the PRM template ids, built on the host once per run."""
  from spark_jax.rl import automata
  token_bytes = tokenizer.token_bytes_table(vocab_size)
  special = automata.special_token_ids(tokenizer)
  gate = automata.build_gate(token_bytes, special)
  steps = automata.build_step_ends(token_bytes, special)
  verdicts = template = None
  if settings.prm_format is not None:
    from spark_jax.rl import prm_prompt
    verdicts = automata.build_verdicts(rl_step.REWARD_FORMATS[settings.reward_type], token_bytes, special)
    template = prm_prompt.build_template(prm_tokenizer, settings.prm_format, special, vocab_size)
  return RewardTables(gate, verdicts, steps, template)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class _Steps:  # the fields of automata.StepResult / VerdictResult the advantage functions read
  ends_NxY: Any = None
  count_N: Any = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class _Verdicts:
  steps_NxY: Any = None
  num_steps_N: Any = None


def _padded(rows: Sequence[Sequence[int]], K: int, fill: int) -> np.ndarray:
  out = np.full((len(rows), K), fill, np.int32)
  for i, r in enumerate(rows):
    out[i, :min(len(r), K)] = list(r)[:K]
  return out


class Programs:
  """One run's compiled programs and the host glue between them (module docstring)."""

  def __init__(self, policy_cfg, prm_cfg, settings: RolloutSettings, update_settings: UpdateSettings, tx, schedule,
               mesh):
    self.policy_cfg, self.prm_cfg, self.settings = policy_cfg, prm_cfg, settings
    self.update_settings, self.mesh = update_settings, mesh
    rep = shd.replicated(mesh)
    self._rollout_and_reward = jax.jit(functools.partial(rl_step.rollout_and_reward, policy_cfg, prm_cfg, settings),
                                       out_shardings=rep)

    def gate_only(params, tables, pt, pl, key):
      out, _, steps, ok_N, _, stats = rl_step.rollout_and_gate(policy_cfg, settings, params, tables, pt, pl, key)
      return out, ok_N, steps.count_N, stats

    self._rollout_and_gate = jax.jit(gate_only, out_shardings=rep)
    self._advantages = jax.jit(self._host_advantages, static_argnums=(5,), out_shardings=rep)
    self._logprobs = rl_step.make_logprob_fn(policy_cfg, mesh, chunk=update_settings.logits_chunk,
                                             compute_dtype=update_settings.compute_dtype,
                                             micro_batch=update_settings.micro_batch)
    self._update = rl_step.make_update_step(policy_cfg, tx, schedule, mesh, update_settings)
    self._engine = None
    self._same_tokenizer = None  # policy and PRM spell every id alike (set on the first host-path PRM call)
    self.last_prm_texts: list[str | None] = []

  def _host_advantages(self, rewards_N, ok_N, lengths_N, steps, verdicts, R):
    s = self.settings
    rewards_N = rewards_N.astype(jnp.float32)
    if s.reward_type == "rlvr":
      rewards_N = rewards_N * ok_N.astype(jnp.float32)
    stats = rl_step._group_stats(rewards_N, s.group_size)
    stats["reward_step_correlation"] = rl_step._correlation(rewards_N, steps.count_N.astype(jnp.float32))
    return rewards_N, rl_step.advantages(s, rewards_N, lengths_N, R, verdicts, steps), stats

  # ------------------------------------------------------------------------------------- rollout + reward

  def rollout_and_reward(self, params, prm_params, tables: RewardTables, pt, pl, qt, ql, key, *,
                         golds: Sequence[Any], problems: Sequence[str], tokenizer, prm_tokenizer=None,
                         in_graph: bool = True, grade: Callable[[list[str], list[Any]], np.ndarray] | None = None
                         ) -> tuple[RolloutOutput, dict[str, float]]:
    """One batch of rollouts with rewards and advantages, and the wall-clock split of its phases.

    `grade(texts, golds) -> 0/1 rewards` grades `rlvr` (the run's long-lived pool: `grader`); without it a
    temporary pool is started for this batch, which costs its worker start-up every call."""
    t0 = time.time()
    s = self.settings
    if s.reward_type != "rlvr" and in_graph:
      out = jax.block_until_ready(self._rollout_and_reward(params, prm_params, tables, pt, pl, qt, ql, key))
      return out, {"time_rollout_and_reward": time.time() - t0}
    core_out, ok_N, _, stats = jax.block_until_ready(self._rollout_and_gate(params, tables, pt, pl, key))
    t1 = time.time()
    from spark_jax.rl import automata
    from spark_jax.rl import rewards as rewards_lib
    tokens, lengths = np.asarray(core_out.tokens_NxM), np.asarray(core_out.lengths_N)
    N, R = tokens.shape
    G = s.group_size
    ids = [tokens[i, :lengths[i]].tolist() for i in range(N)]
    texts = [tokenizer.decode(r, skip_special_tokens=True) for r in ids]
    token_bytes = tokenizer.token_bytes_table(self.policy_cfg.vocab_size)
    special = automata.special_token_ids(tokenizer)
    ends = [rewards_lib.step_end_tokens(token_bytes, r, special) for r in ids]
    K = max([32] + [len(e) for e in ends])
    steps = _Steps(jnp.asarray(_padded(ends, K, -1)), jnp.asarray([len(e) for e in ends], jnp.int32))
    verdicts = _Verdicts(jnp.zeros((N, K), jnp.int32), jnp.zeros((N,), jnp.int32))
    if s.reward_type == "rlvr":
      rewards = (grade or grader(None))(texts, [golds[i // G] for i in range(N)])
    else:
      prm_texts = (self._host_prm(prm_params, texts, ids, problems, prm_tokenizer, token_bytes, special,
                                  tokenizer)
                   if s.prm_format is not None else [None] * N)  # `random` reads no PRM
      self.last_prm_texts = prm_texts  # the PRM outputs of the last host-path batch (tests, debugging)
      coins = np.asarray(jax.random.bernoulli(jax.random.split(key)[1], 0.5, (N,)))
      results = [rewards_lib.host_reward(s.reward_type, texts[i], prm_texts[i], coin=bool(coins[i]),
                                         min_steps=s.min_steps_selective, max_steps=s.max_steps)
                 for i in range(N)]
      rewards = np.asarray([r.reward for r in results], np.float32)
      prm_steps = [[1 if v else -1 for v in r.prm_steps] for r in results]
      verdicts = _Verdicts(jnp.asarray(_padded(prm_steps, K, 0)), jnp.asarray([len(v) for v in prm_steps], jnp.int32))
    r, adv, more = self._advantages(jnp.asarray(rewards), ok_N, core_out.lengths_N, steps, verdicts, R)
    out = RolloutOutput(core_out.tokens_NxM, core_out.lengths_N, core_out.logprobs_NxM, ok_N, r, adv,
                        {**stats, **more})
    return out, {"time_rollout": t1 - t0, "time_reward": time.time() - t1}

  def _host_prm(self, prm_params, texts: list[str], ids: list[list[int]], problems: Sequence[str], prm_tokenizer,
                token_bytes, special, policy_tokenizer=None) -> list[str | None]:
    """PRM outputs for the rows the gate lets through (all rows with prm_all_rows), via the sampling engine."""
    from spark_jax.sampling.engine import SamplingEngine
    s = self.settings
    out: list[str | None] = [None] * len(texts)
    if self._same_tokenizer is None:
      from spark_jax.tokenizer import vocabulary_difference
      self._same_tokenizer = (policy_tokenizer is None or policy_tokenizer is prm_tokenizer
                              or vocabulary_difference(policy_tokenizer, prm_tokenizer) is None)
    ask, prompts = host_prm_prompts(s, texts, ids, problems, prm_tokenizer, token_bytes, special,
                                    None if self._same_tokenizer else policy_tokenizer)
    if not ask:
      return out
    if self._engine is None:
      # Static batches: the in-graph reward runs the static core, and the equality check compares the two.
      self._engine = SamplingEngine(self.prm_cfg, prm_params, mesh=self.mesh, progress=False, batching="static")
    samples = self._engine.generate(prompts, s.prm_sampling, params=prm_params)
    for i, sample in zip(ask, samples):
      out[i] = prm_tokenizer.decode(sample[0].tokens, skip_special_tokens=True)
    return out

  # ------------------------------------------------------------------------------------------------ update

  def update(self, state, ref_params, pt, pl, roll: RolloutOutput, mini_batches: int, epochs: int,
             use_sampler_logprobs: bool):
    """pi_old and reference log-probs, then `epochs` x `mini_batches` AdamW steps; returns mean metrics and
    the sampler/trainer log-prob gap over the response tokens."""
    G, R = self.settings.group_size, np.asarray(roll.response_tokens_NxR).shape[1]
    tokens_NxT, mask_NxT = rl_step.sequences(jnp.asarray(pt), jnp.asarray(pl), jnp.asarray(roll.response_tokens_NxR),
                                             jnp.asarray(roll.response_lengths_N), G)
    sampler_lp = jnp.asarray(roll.sampler_logprobs_NxR)
    # One mini-batch, one epoch, pi_old recomputed: the update's own forward pass is the recomputation
    # (held constant inside the step), so no separate pass over the batch is needed.
    on_policy = mini_batches == 1 and epochs == 1 and not use_sampler_logprobs
    trainer_lp = None if on_policy else self._logprobs(state["params"], tokens_NxT, mask_NxT, R)
    old = sampler_lp if use_sampler_logprobs else trainer_lp
    ref = (self._logprobs(ref_params, tokens_NxT, mask_NxT, R) if self.update_settings.beta > 0
           else jnp.zeros_like(sampler_lp))
    batch = {"tokens_NxT": tokens_NxT, "mask_NxT": mask_NxT, "old_logprobs_NxR": old,
             "advantages_NxR": jnp.asarray(roll.advantages_NxR), "ref_logprobs_NxR": ref}
    size = tokens_NxT.shape[0] // mini_batches
    collected = []
    for _ in range(epochs):
      for m in range(mini_batches):
        mb = jax.tree.map(lambda x, m=m: x[m * size:(m + 1) * size], batch)
        state, metrics, step_lp = self._update(state, mb)
        if trainer_lp is None:
          trainer_lp = step_lp  # on-policy: the log-probs before the (only) step
        collected.append(metrics)
    resp = np.asarray(mask_NxT[:, -R:])
    gap = np.abs(np.asarray(trainer_lp) - np.asarray(sampler_lp))[resp]
    collected = jax.device_get(collected)
    out = {k: float(np.mean([float(c[k]) for c in collected])) for k in collected[0]}
    out["logprob_gap_mean"] = float(gap.mean()) if gap.size else 0.0
    out["logprob_gap_max"] = float(gap.max()) if gap.size else 0.0
    return state, out


def host_prm_prompts(settings: RolloutSettings, texts: list[str], ids: list[list[int]], problems: Sequence[str],
                     prm_tokenizer, token_bytes, special, policy_tokenizer=None) -> tuple[list[int], list[list[int]]]:
  """(rows asked, their PRM prompt ids) on the host: the rows the gate lets through (all with prm_all_rows).

  The one canonical piecewise prompt (text/rm_ids.py). The response is cut after the token in which its last
  `</answer>` ends, special tokens left out. With one tokenizer (`policy_tokenizer` None) it enters as its
  sampled ids, exactly as the graph packs it; a PRM with another tokenizer (`policy_tokenizer` given) gets the
  response's text, decoded by the policy's tokenizer and tokenized alone by its own, as Stage II trained it.
  """
  from spark_jax.rl import rewards as rewards_lib
  from spark_jax.text import rm_ids
  ask = [i for i, t in enumerate(texts) if settings.prm_all_rows or rewards_lib.format_ok(t)]
  prompts = []
  for i in ask:
    response = rm_ids.visible_ids(ids[i][:_cut(ids[i], token_bytes, special)], special)
    if policy_tokenizer is not None:
      response = policy_tokenizer.decode(response, skip_special_tokens=True)
    prompts.append(rm_ids.rm_prompt_ids(prm_tokenizer, settings.prm_format, problems[i // settings.group_size],
                                        response))
  return ask, prompts


def _cut(ids: Sequence[int], token_bytes: Sequence[bytes], special: Sequence[int]) -> int:
  """Tokens up to and including the one in which the last `</answer>` ends (all of them when there is none)."""
  skip = set(int(i) for i in special)
  spelled = [b"" if int(i) in skip else token_bytes[int(i)] for i in ids]
  text = b"".join(spelled)
  end = text.rfind(b"</answer>")
  if end < 0:
    return len(ids)
  last_byte, pos = end + len(b"</answer>") - 1, 0
  for k, piece in enumerate(spelled):
    pos += len(piece)
    if pos > last_byte:
      return k + 1
  return len(ids)


def grader(pool) -> Callable[[list[str], list[Any]], np.ndarray]:
  """`(responses, golds) -> float32 0/1` with the one grader (answers extracted, math_verify bounded in time),
  on `pool` (an evals.grading.GradingPool kept for the run) or, with None, a temporary pool per call."""
  from spark_jax.evals.grading import grade_responses

  def grade(texts: list[str], golds: list[Any]) -> np.ndarray:
    return np.asarray(grade_responses(texts, golds, pool=pool), np.float32)

  return grade


# --------------------------------------------------------------------------------------- dynamic sampling


def _rows(roll: RolloutOutput, rows) -> list[np.ndarray]:
  return [np.asarray(getattr(roll, f))[rows] for f in _ROW_FIELDS]


_ROW_FIELDS = ("response_tokens_NxR", "response_lengths_N", "sampler_logprobs_NxR", "format_ok_N", "rewards_N",
               "advantages_NxR")


def dynamic_sampling(roll: RolloutOutput, pt, pl, group_size: int,
                     sample_more: Callable[[jax.Array], tuple[RolloutOutput, Any, Any, dict]], key,
                     max_rounds: int) -> tuple[RolloutOutput, np.ndarray, np.ndarray, dict[str, float]]:
  """DAPO's dynamic sampling: keep the groups whose rewards differ, refill from new prompts.

  `sample_more(key) -> (roll, pt, pl, timing)` runs the rollout-and-reward program on a fresh batch of the
  same size. After `max_rounds` extra rounds a batch still short of informative groups is topped up with
  dropped ones (zero advantage under group scaling), so the update's shapes never change. Each group keeps
  the advantages of its own round (they are per group). Returns (roll, pt, pl, metrics).
  """
  G = group_size
  B = np.asarray(pt).shape[0]
  kept, spare = [], []  # (round, group index)
  rounds_out = [(roll, np.asarray(pt), np.asarray(pl))]
  rounds = 0
  while True:
    r_BxA = np.asarray(rounds_out[-1][0].rewards_N).reshape(-1, G)
    for b in range(r_BxA.shape[0]):
      (spare if np.all(r_BxA[b] == r_BxA[b, 0]) else kept).append((rounds, b))
    if len(kept) >= B or rounds >= max_rounds:
      break
    rounds += 1
    more, mpt, mpl, _ = sample_more(jax.random.fold_in(key, 1_000_003 + rounds))
    rounds_out.append((more, np.asarray(mpt), np.asarray(mpl)))
  informative = len(kept)
  chosen = (kept + spare)[:B]
  fields = [[] for _ in _ROW_FIELDS]
  pts, pls = [], []
  for rnd, b in chosen:
    r, rpt, rpl = rounds_out[rnd]
    for acc, x in zip(fields, _rows(r, np.arange(b * G, (b + 1) * G))):
      acc.append(x)
    pts.append(rpt[b])
    pls.append(rpl[b])
  out = RolloutOutput(*(np.concatenate(acc) for acc in fields), dict(roll.stats))
  metrics = {"dynamic_sampling_rounds": float(rounds),
             "dynamic_sampling_informative_groups": min(informative, B) / B,
             "dynamic_sampling_topped_up": max(B - informative, 0) / B}
  return out, np.stack(pts), np.stack(pls), metrics
