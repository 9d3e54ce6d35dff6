"""Chat-level sampling shell shared by every job that asks a model something (generator, verifier,
critic/merger, reward model on ProcessBench, math evals): user messages (or prompt ids) in, decoded
completions out.

It owns the model, its tokenizer and the mesh; the arrays go through the one sampling engine.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from spark_jax import sharding
from spark_jax.models.load import load_model
from spark_jax.tokenizer import Tokenizer


@dataclasses.dataclass
class Completion:
  text: str
  num_tokens: int
  finish_reason: str

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


@dataclasses.dataclass
class ChatModel:
  cfg: object
  params: object
  tokenizer: Tokenizer
  mesh: object
  name: str
  max_batch_rows: int = 64
  batching: str = "continuous"

  def __post_init__(self):
    from spark_jax.sampling.engine import SamplingEngine
    # One engine per model: weights are placed once and compiled programs are reused across calls.
    self.engine = SamplingEngine(self.cfg, self.params, mesh=self.mesh, max_batch_rows=self.max_batch_rows,
                                 progress=False, batching=self.batching)  # the job's shard bar reports progress
    self._token_bytes = None

  @classmethod
  def load(cls, model_config, mesh_config, *, seed: int = 0, max_batch_rows: int = 64,
           batching: str = "continuous") -> "ChatModel":
    """`model_config`: a configs.common.model() ConfigDict. The checkpoint must carry a tokenizer."""
    mesh = sharding.make_mesh(dict(mesh_config))
    with sharding.use_mesh(mesh):
      cfg, params, ckpt_dir = load_model(model_config.name, init=model_config.init, dtype=model_config.dtype,
                                         mesh=mesh, seed=seed,
                                         scan_layers=bool(model_config.get("scan_layers", True)))
    if ckpt_dir is None:
      raise ValueError(f"model {model_config.name!r} (init={model_config.init!r}) has no tokenizer: chat jobs need "
                       "a checkpoint directory with tokenizer files (or the packaged smollm2-135m-instruct).")
    return cls(cfg, params, Tokenizer.from_pretrained(ckpt_dir), mesh, model_config.name, max_batch_rows, batching)

  def render(self, user_message: str, *, enable_thinking: bool | None = None) -> list[int]:
    return self.tokenizer.apply_chat_template([{"role": "user", "content": user_message}],
                                              add_generation_prompt=True, tokenize=True,
                                              enable_thinking=enable_thinking)

  def sample(self, user_messages: Sequence[str], *, enable_thinking: bool | None = None, **sampling: Any
             ) -> list[list[Completion]]:
    """Each user message through the chat template, then `sample_ids` (`sampling`: its keyword arguments)."""
    return self.sample_ids([self.render(m, enable_thinking=enable_thinking) for m in user_messages], **sampling)

  def sample_ids(self, prompts: Sequence[Sequence[int]], *, num_samples: int = 1, temperature: float = 0.0,
                 top_p: float = 1.0, max_new_tokens: int = 512, seed: int = 0, stop_strings: Sequence[str] = (),
                 prompt_indices: Sequence[int] | None = None) -> list[list[Completion]]:
    """One list of `num_samples` completions per prompt, in order; special tokens are not decoded.

    `prompts` are complete prompt ids (chat template included): for prompts defined as ids rather than text,
    such as the reward model's piecewise prompt (text/rm_ids.rm_prompt_ids).
    """
    from spark_jax.sampling.core import SamplingParams
    if not prompts:
      return []
    settings = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                              num_samples=num_samples, stop_token_ids=tuple(self.tokenizer.end_of_turn_ids),
                              stop_strings=tuple(s.encode() for s in stop_strings))
    if stop_strings and self._token_bytes is None:
      self._token_bytes = self.tokenizer.token_bytes_table(self.cfg.vocab_size)
    results = self.engine.generate(prompts, settings, seed=seed, prompt_indices=prompt_indices,
                                   token_bytes=self._token_bytes)
    return [[Completion(self.tokenizer.decode(r.tokens, skip_special_tokens=True), len(r.tokens), r.finish_reason)
             for r in per_prompt] for per_prompt in results]
