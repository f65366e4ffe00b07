#!/usr/bin/env bash
# A training run -> a Hugging Face release folder, checked against transformers before it is called done.
#
#   convert/release.sh RUN OUT [--dtype bfloat16|float16|float32]
#
# pretrain / sft run: RUN/params -> OUT (safetensors shards, config.json, tokenizer), then `convert verify`.
# lora run:           RUN/adapters over its base (the run's train.init_from) -> OUT/adapter (PEFT) and OUT/merged
#                     (base with the adapters folded in), then `convert verify` of the merged model.
# OUT must not exist yet (or be empty). MELLAMA names the command (default: mellama-jax).
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 RUN OUT [--dtype DTYPE]" >&2
  exit 2
fi
RUN=$1 OUT=$2
shift 2
DTYPE=bfloat16
if [ "${1:-}" = --dtype ]; then DTYPE=${2:?--dtype needs a value}; fi
MELLAMA=${MELLAMA:-mellama-jax}
PY=${PYTHON:-python3}
if [ ! -f "$RUN/config.yaml" ]; then
  echo "error: $RUN: not a training run (no config.yaml)" >&2
  exit 2
fi
# the run's mode and base, through the package's validated config loader
read -r MODE BASE < <("$PY" -c 'import sys; from mellama_jax.config import load_config
c = load_config(sys.argv[1]); print(c.train.mode, c.train.init_from or "-")' "$RUN/config.yaml")
if [ "$MODE" = lora ]; then
  [ -d "$RUN/adapters" ] || { echo "error: $RUN/adapters: the run has not finished" >&2; exit 2; }
  TOK=()  # the tokenizer the run was tuned with (a run carries it), else the base's
  [ -f "$RUN/tokenizer.model" ] && TOK=(--tokenizer "$RUN/tokenizer.model")
  "$MELLAMA" convert jax-to-hf "$BASE" "$OUT/adapter" --adapters "$RUN/adapters"
  "$MELLAMA" convert jax-to-hf "$BASE" "$OUT/merged" --adapters "$RUN/adapters" --merge --dtype "$DTYPE" "${TOK[@]}"
  "$MELLAMA" convert verify "$OUT/merged" "$BASE" --adapters "$RUN/adapters"
else
  [ -d "$RUN/params" ] || { echo "error: $RUN/params: the run has not finished" >&2; exit 2; }
  "$MELLAMA" convert jax-to-hf "$RUN/params" "$OUT" --dtype "$DTYPE"
  "$MELLAMA" convert verify "$OUT" "$RUN/params"
fi
echo "released $RUN ($MODE) -> $OUT"
