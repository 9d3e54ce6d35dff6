"""Decoder configuration and named presets.

One frozen dataclass covers Qwen2/2.5, Qwen3 dense and Llama-3/SmolLM2; the differences are switches
(`qkv_bias`, `qk_norm`, `tie_embeddings`, `head_dim`). It is hashable, so it can be a static argument of
`jax.jit`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

ARCHITECTURES = {
    # HF `architectures[0]` / `model_type` -> our family name.
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "LlamaForCausalLM": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "llama": "llama",
}
HF_ARCHITECTURE = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}
REMAT_POLICIES = ("none", "full", "save_dots")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  family: str  # "qwen2" | "qwen3" | "llama"
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 10_000.0
  rms_norm_eps: float = 1e-6
  max_position_embeddings: int = 32_768
  tie_embeddings: bool = False
  qkv_bias: bool = False
  qk_norm: bool = False
  # Llama-3.1 style frequency scaling; None for plain RoPE.
  rope_scaling: tuple[tuple[str, Any], ...] | None = None
  dtype: str = "float32"  # parameter and activation dtype; norms, softmax and logits are fp32.
  remat: str = "none"  # "none" | "full" | "save_dots"
  # Queries per block of prefill/training attention (memory B×H×chunk×S instead of B×H×T×S); 0 = one block.
  attention_chunk: int = 512
  # Layers as one `lax.scan` over the stacked weights (compile time independent of depth) or unrolled.
  scan_layers: bool = True
  bos_token_id: int | None = None
  eos_token_id: int | tuple[int, ...] | None = None

  def __post_init__(self):
    if self.family not in HF_ARCHITECTURE:
      raise ValueError(f"ModelConfig.family={self.family!r} is not supported; use one of {sorted(HF_ARCHITECTURE)}.")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads} (GQA).")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"ModelConfig.remat={self.remat!r}; use one of {REMAT_POLICIES}.")
    if self.dtype not in DTYPES:
      raise ValueError(f"ModelConfig.dtype={self.dtype!r}; use one of {DTYPES}.")
    if self.rope_scaling is not None and dict(self.rope_scaling).get("rope_type") not in ("llama3", "default"):
      raise ValueError(f"rope_scaling={dict(self.rope_scaling)} is not supported (only 'llama3' and plain RoPE).")

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)

  @property
  def num_params(self) -> int:
    d, f, h, k, dh = self.hidden_size, self.intermediate_size, self.num_heads, self.num_kv_heads, self.head_dim
    attn = d * h * dh * 2 + d * k * dh * 2 + (h * dh + 2 * k * dh if self.qkv_bias else 0) + (2 * dh if self.qk_norm else 0)
    per_layer = attn + 3 * d * f + 2 * d
    head = 0 if self.tie_embeddings else self.vocab_size * d
    return self.num_layers * per_layer + self.vocab_size * d + head + d

  def flops_per_token(self, seq_len: int) -> float:
    """Forward FLOPs per token: 2 x matmul parameters + causal attention (scores and values)."""
    # The input embedding is a gather, not a matmul; a tied output head is still a matmul.
    matmul_params = self.num_params - (0 if self.tie_embeddings else self.vocab_size * self.hidden_size)
    attention = 2 * 2 * self.num_layers * self.num_heads * self.head_dim * seq_len / 2
    return 2.0 * matmul_params + attention


def _preset(**kw) -> ModelConfig:
  return ModelConfig(**kw)


PRESETS: dict[str, ModelConfig] = {
    # Real shapes (from the public config.json files of these checkpoints).
    "qwen2.5-0.5b": _preset(family="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                            num_layers=24, num_heads=14, num_kv_heads=2, head_dim=64, rope_theta=1e6,
                            tie_embeddings=True, qkv_bias=True, eos_token_id=151645),
    "qwen2.5-1.5b": _preset(family="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                            num_layers=28, num_heads=12, num_kv_heads=2, head_dim=128, rope_theta=1e6,
                            tie_embeddings=True, qkv_bias=True, eos_token_id=151645),
    "qwen2.5-7b": _preset(family="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                          num_layers=28, num_heads=28, num_kv_heads=4, head_dim=128, rope_theta=1e6,
                          qkv_bias=True, eos_token_id=151645),
    "qwen2.5-14b": _preset(family="qwen2", vocab_size=152064, hidden_size=5120, intermediate_size=13824,
                           num_layers=48, num_heads=40, num_kv_heads=8, head_dim=128, rope_theta=1e6,
                           rms_norm_eps=1e-5, qkv_bias=True, eos_token_id=151645),
    "qwen2.5-math-7b": _preset(family="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                               num_layers=28, num_heads=28, num_kv_heads=4, head_dim=128, rope_theta=1e4,
                               max_position_embeddings=4096, qkv_bias=True, eos_token_id=151643),
    "qwen3-8b": _preset(family="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                        num_layers=36, num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=1e6,
                        max_position_embeddings=40960, qk_norm=True, eos_token_id=151645),
    "qwen3-32b": _preset(family="qwen3", vocab_size=151936, hidden_size=5120, intermediate_size=25600,
                         num_layers=64, num_heads=64, num_kv_heads=8, head_dim=128, rope_theta=1e6,
                         max_position_embeddings=40960, qk_norm=True, eos_token_id=151645),
    "smollm2-135m": _preset(family="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                            num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=1e5,
                            rms_norm_eps=1e-5, max_position_embeddings=8192, tie_embeddings=True,
                            bos_token_id=1, eos_token_id=2),
    # Tiny test sizes: one per family switch combination.
    "tiny-qwen2": _preset(family="qwen2", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                          num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=1e4, tie_embeddings=False,
                          qkv_bias=True, max_position_embeddings=1024),
    "tiny-qwen2-tied": _preset(family="qwen2", vocab_size=512, hidden_size=64, intermediate_size=128,
                               num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=1e4,
                               tie_embeddings=True, qkv_bias=True, max_position_embeddings=1024),
    "tiny-qwen3": _preset(family="qwen3", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                          num_heads=4, num_kv_heads=2, head_dim=32, rope_theta=1e6, qk_norm=True,
                          max_position_embeddings=1024),
    "tiny-llama": _preset(family="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                          num_heads=4, num_kv_heads=1, head_dim=16, rope_theta=1e5, rms_norm_eps=1e-5,
                          tie_embeddings=True, max_position_embeddings=1024),
    # The embedded world's models (spark_jax/world): the vocabulary of its tokenizer, eos = <|im_end|>.
    "world-tiny": _preset(family="llama", vocab_size=512, hidden_size=64, intermediate_size=256, num_layers=2,
                          num_heads=4, num_kv_heads=4, head_dim=16, rope_theta=1e4, tie_embeddings=True,
                          max_position_embeddings=1024, eos_token_id=2),
    "world-small": _preset(family="llama", vocab_size=512, hidden_size=128, intermediate_size=512, num_layers=4,
                           num_heads=4, num_kv_heads=4, head_dim=32, rope_theta=1e4, tie_embeddings=True,
                           max_position_embeddings=1024, eos_token_id=2),
}


def get_preset(name: str, **overrides) -> ModelConfig:
  if name not in PRESETS:
    raise KeyError(f"Unknown model preset {name!r}; known presets: {sorted(PRESETS)}.")
  return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]
