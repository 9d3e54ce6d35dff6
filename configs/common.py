"""Presets shared by the job configs: model, mesh and the base of every job."""

from ml_collections import ConfigDict


def model(name: str = "tiny-qwen2", init: str = "random", dtype: str = "float32", remat: str = "none",
          scan_layers: bool = True) -> ConfigDict:
  """`name`: a preset (init='random'), a checkpoint directory, a hub repo id, or a packaged model
  ("smollm2-135m-instruct"). `scan_layers`: the layers as one `lax.scan` (compile time independent of
  depth; the default) or unrolled (faster training steps for shallow models, e.g. the toy world's)."""
  return ConfigDict({"name": name, "init": init, "dtype": dtype, "remat": remat, "scan_layers": scan_layers})


def mesh(data: int = -1, fsdp: int = 1, tensor: int = 1) -> ConfigDict:
  """Mesh axis sizes; one may be -1 (= the remaining devices)."""
  return ConfigDict({"data": data, "fsdp": fsdp, "tensor": tensor})


def base(job: str, workdir: str) -> ConfigDict:
  config = ConfigDict()
  config.job = job
  config.workdir = workdir
  config.seed = 0
  config.mesh = mesh()
  config.verbose_logs = False  # also show library INFO logs on the console; they always go to workdir/logs.txt
  return config
