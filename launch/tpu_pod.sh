#!/usr/bin/env bash
# Me-LLaMA training on a Cloud TPU VM pod: the same command on every worker; JAX detects the pod itself.
#
#   TPU_NAME=my-v5p-128 ZONE=us-east5-a launch/tpu_pod.sh configs/me-llama-70b-pretrain.yaml [key=value ...]
#   DRY_RUN=1 WORKERS=16 TPU_NAME=x ZONE=y launch/tpu_pod.sh CONFIG ...   # print the per-worker commands
#
# The repository (and its .venv) must be present at the same path on every worker (REPO, default: this one).
set -euo pipefail

config=${1:?usage: tpu_pod.sh CONFIG [key=value ...]}
shift
tpu=${TPU_NAME:?set TPU_NAME}
zone=${ZONE:?set ZONE}
repo=${REPO:-$(cd "$(dirname "$0")/.." && pwd)}

args=$(printf ' %q' "$@")
remote="cd ${repo} && .venv/bin/python -m mellama_jax.cli train --config $(printf '%q' "${config}")${args}"
if [[ "${DRY_RUN:-0}" == "1" ]]; then
  workers=${WORKERS:-4}
  echo "gcloud compute tpus tpu-vm ssh ${tpu} --zone ${zone} --worker=all --command \"${remote}\""
  for ((i = 0; i < workers; i++)); do
    echo "worker ${i}: ${remote}"
  done
  exit 0
fi
gcloud compute tpus tpu-vm ssh "${tpu}" --zone "${zone}" --worker=all --command "${remote}"
