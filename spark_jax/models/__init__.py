"""Models: the decoder family, presets and Hugging Face checkpoint I/O."""

from spark_jax.models.config import PRESETS, ModelConfig, get_preset
from spark_jax.models.decoder import (KVCache, abstract_params, forward, forward_cached, hidden_states,
                                      init_cache, init_params, logits_from_hidden, param_logical_axes)
from spark_jax.models.hf_io import from_pretrained, save_pretrained, config_from_hf, config_to_hf

__all__ = [
    "PRESETS", "ModelConfig", "get_preset", "KVCache", "abstract_params", "forward", "forward_cached",
    "hidden_states", "init_cache", "init_params", "logits_from_hidden", "param_logical_axes",
    "from_pretrained", "save_pretrained", "config_from_hf", "config_to_hf",
]
