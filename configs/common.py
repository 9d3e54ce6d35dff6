"""Presets shared by the job configs: model, mesh and the base of every job."""

from ml_collections import ConfigDict


def model(name: str = "tiny-qwen2", init: str = "random", dtype: str = "float32", remat: str = "none") -> ConfigDict:
  """`name`: a preset (init='random'), a checkpoint directory, a hub repo id, or a packaged model
  ("smollm2-135m-instruct")."""
  return ConfigDict({"name": name, "init": init, "dtype": dtype, "remat": remat})


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
