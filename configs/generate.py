"""Stage I step `generate` (see configs/stage1.py for every field; `:demo` for the laptop setting)."""

from configs.stage1 import stage1_config


def get_config(variant: str = ""):
  config = stage1_config("generate", variant)
  return config
