#!/usr/bin/env bash
# A Hugging Face LLaMA folder (safetensors) -> parameters that `train.init_from` restores, checked against
# transformers. The start of every Me-LLaMA run: LLaMA2-13B/70B as Meta ships them on the Hub.
#
#   convert/import.sh HF_DIR OUT [--mesh fsdp=8]     (--mesh: store pre-chunked for that mesh's shards)
#
# The dtype is kept (bf16 stays bf16: HF -> ours -> HF is bit-exact). MELLAMA names the command.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 HF_DIR OUT [--mesh LAYOUT]" >&2
  exit 2
fi
HF=$1 OUT=$2
shift 2
MELLAMA=${MELLAMA:-mellama-jax}
"$MELLAMA" convert hf-to-jax "$HF" "$OUT" "$@"
"$MELLAMA" convert verify "$HF" "$OUT"
echo "imported $HF -> $OUT (train.init_from=$OUT)"
