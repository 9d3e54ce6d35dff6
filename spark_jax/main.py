"""The one entry point: `python -m spark_jax.main --config=configs/<job>.py [--config.key=value ...]`."""

from absl import app, flags
from ml_collections import config_flags

from spark_jax import io, jobs
from spark_jax.sharding import initialize_distributed

_CONFIG = config_flags.DEFINE_config_file("config", None, "A configs/<job>.py file.", lock_config=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments {argv[1:]}; pass settings as --config.key=value.")
  initialize_distributed()
  io.enable_compilation_cache()
  jobs.run(_CONFIG.value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
