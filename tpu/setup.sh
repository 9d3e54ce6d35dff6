#!/usr/bin/env bash
# Installs spark_jax on every worker of a TPU VM (single host or pod slice).
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a tpu/setup.sh [git-url-or-path]
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
REPO=${1:-https://github.com/your-org/spark_jax.git}
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  set -e
  [ -d spark_jax ] || git clone $REPO spark_jax
  cd spark_jax && git pull --ff-only || true
  python3 -m venv ~/venv && source ~/venv/bin/activate
  pip install -U pip && pip install -e '.[tpu]'
"
