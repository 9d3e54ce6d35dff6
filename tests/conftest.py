"""Test setup: 8 fake CPU devices for sharding tests (must be set before jax is imported)."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The persistent XLA compilation cache that `spark_jax.main` turns on (spark_jax.io.enable_compilation_cache), set
# through the environment so that in-process tests and every subprocess (CLI or script) share it: the suite's many
# small jitted programs compile once per machine, not once per run. spark_jax.io does not import jax.
from spark_jax import io as _io  # noqa: E402

os.environ.setdefault(_io.COMPILATION_CACHE_ENV, _io.cache_dir("jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", str(_io.COMPILATION_CACHE_MIN_COMPILE_S))

import pytest  # noqa: E402


_QUICK_WORLD = """
from configs import demo as demo_config
from spark_jax.world import bootstrap, demo
config = demo_config.get_config()
config.quick = True
config = demo.resolve(config)
bootstrap.run_bootstrap(config, bootstrap.bootstrap_dir(config, ""))
"""


@pytest.fixture(scope="session")
def world():
  """The embedded world's tokenizer and bootstrap models (quick demo settings), trained once per machine.

  Returns the bootstrap summary: tokenizer_dir, generator_dir, verifier_dir (HF checkpoint directories with
  the world tokenizer) and the measured parse rates / accuracies. The models are cached by a fingerprint of
  their settings (spark_jax/world/bootstrap.py), so a second run on the same machine reuses them, and a file
  lock makes a second pytest-xdist worker wait for the first instead of training them again. Training runs
  in a subprocess on one CPU device, as the demo's CLI does: the suite's 8 fake devices would split its
  small batches eight ways on a 2-core machine.
  """
  import json
  import subprocess
  import sys
  from configs import demo as demo_config
  from spark_jax.world import bootstrap, demo
  config = demo_config.get_config()
  config.quick = True
  config = demo.resolve(config)
  root = bootstrap.bootstrap_dir(config, "")
  if bootstrap.finished_summary(root) is None:
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", _QUICK_WORLD], cwd=os.path.dirname(os.path.dirname(__file__)),
                            env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"training the world's models failed:\n{result.stderr[-4000:]}"
  with open(os.path.join(root, "summary.json")) as f:
    return json.load(f)


@pytest.fixture(scope="session")
def export_matches_transformers():
  """(HF export dir, token ids) -> transformers' logits for the ids, after asserting that our loader's logits
  equal them (atol 2e-4): the export check the SFT and RL jobs share. torch is the test-time reference only."""
  def check(export: str, ids):
    import jax.numpy as jnp
    import numpy as np
    import torch
    import transformers
    from spark_jax import models
    hf = transformers.AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    with torch.no_grad():
      ref = hf(torch.tensor([list(ids)])).logits.numpy()
    cfg, params = models.from_pretrained(export)
    ours = np.asarray(models.forward(cfg, params, jnp.asarray([list(ids)])))
    np.testing.assert_allclose(ours, ref, atol=2e-4, rtol=1e-4)
    return ref
  return check


@pytest.fixture(scope="session")
def world_rm(world):
  """fmt -> the quick world's Stage II reward model of that format ("orm", "prm", "prm_cot") on step-consistency
  labels, trained once per machine like `world_prm` (its export directory)."""
  from configs import demo as demo_config
  from spark_jax.world import demo
  made = {}

  def get(fmt: str) -> str:
    if fmt not in made:
      config = demo_config.get_config()
      config.quick = True
      made[fmt] = demo.world_prm(config, world, fmt=fmt)
    return made[fmt]
  return get


@pytest.fixture(scope="session")
def world_prm(world):
  """The quick world's Stage II PRM-CoT (step-consistency labels), trained once per machine from the `world`
  fixture's models by the demo's own Stage I and Stage II (spark_jax/world/demo.py `world_prm`); its export
  directory (world tokenizer). Stage III's reward tests score with it."""
  from configs import demo as demo_config
  from spark_jax.world import demo
  config = demo_config.get_config()
  config.quick = True
  return demo.world_prm(config, world)
