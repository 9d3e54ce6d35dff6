#!/usr/bin/env bash
# Runs one spark_jax job on all workers of a TPU pod slice. JAX's multi-host runtime does the rest:
# spark_jax.main calls jax.distributed.initialize() (TPU workers discover each other), every process
# loads only its own parameter shards and takes its own data shards.
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a tpu/launch.sh configs/sft_prm.py --config.workdir=gs://bucket/run1
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
CONFIG=${1:?usage: tpu/launch.sh configs/<job>.py [--config.key=value ...]}
shift
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  source ~/venv/bin/activate && cd spark_jax &&
  python -m spark_jax.main --config=$CONFIG $* 2>&1 | tee -a ~/spark_jax_\$(hostname).log
"
