#!/usr/bin/env bash
# N training processes on this machine, each with its own simulated CPU devices: multi-host JAX for
# development and CI. Every process gets the same config and overrides.
#
#   launch/local.sh [--dry-run] [-n PROCESSES] [-d DEVICES_PER_PROCESS] [-p PORT] CONFIG [key=value ...]
#
# Processes talk through a coordinator on 127.0.0.1 (loopback only). If one exits with an error the others
# are stopped, and the script exits with that status.
set -euo pipefail

processes=2
devices=4
port=${MELLAMA_PORT:-12355}
dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    -n) processes="$2"; shift 2 ;;
    -d) devices="$2"; shift 2 ;;
    -p) port="$2"; shift 2 ;;
    *) break ;;
  esac
done
if [[ $# -lt 1 ]]; then
  echo "usage: $0 [--dry-run] [-n PROCESSES] [-d DEVICES] [-p PORT] CONFIG [key=value ...]" >&2
  exit 2
fi
config="$1"
shift
python=${PYTHON:-python3}

pids=()
for ((i = 0; i < processes; i++)); do
  env_vars=(COORDINATOR_ADDRESS="127.0.0.1:${port}" NUM_PROCESSES="${processes}" PROCESS_ID="${i}"
            MELLAMA_CPU_DEVICES="${devices}" JAX_PLATFORMS=cpu)
  command=("${python}" -m mellama_jax.cli train --config "${config}" "$@")
  if [[ ${dry_run} -eq 1 ]]; then
    echo "env ${env_vars[*]} ${command[*]}"
    continue
  fi
  env "${env_vars[@]}" "${command[@]}" &
  pids+=("$!")
done
[[ ${dry_run} -eq 1 ]] && exit 0

status=0
for ((n = 0; n < processes; n++)); do
  if ! wait -n; then
    status=$?
    echo "local.sh: a training process exited with status ${status}; stopping the others" >&2
    kill "${pids[@]}" 2>/dev/null || true
    wait || true
    break
  fi
done
exit "${status}"
