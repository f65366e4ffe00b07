#!/usr/bin/env bash
# One-GPU benchmark: software versions, the bf16 matmul ceiling, attention kernels (time and error), our train
# step at LLaMA2-7B width and 4096 context (as many layers as fit) with its MFU, and transformers + torch on the
# same GPU. Each measurement is its own process with its own time limit, so an out-of-memory row costs only that
# row; everything is appended to OUTDIR/log.txt as it happens.
#
#   launch/bench_gpu.sh OUTDIR [STEP...]   steps: matmul attention attention-packed attention-overflow
#                                          attention-old mesh-old mesh mesh-scan causal-only mesh-small
#                                          torch-small layers-remat no-triton-gemm accum2 lora13b-ours
#                                          lora13b-peft pre7b-ours pre7b-torch lora13b-dots
#                                          lora13b-offload pre7b-offload decode7b (default: all)
#   SMOKE=1: tiny shapes, to check the script on a CPU.
#   OLD=DIR: attention-old and mesh-old run on the package in DIR (an earlier checkout, e.g. from `git archive`),
#   paired with the current one on the same machine.
#   If our package fails its smoke step under the installed flax and .whl/ holds wheels (flax 0.12.8, what we
#   test with), they are installed to /tmp/site and the smoke step is retried with them.
set -u
OUTDIR=${1:-bench-gpu}
STEPS=("${@:2}")
mkdir -p "$OUTDIR"
LOG=$OUTDIR/log.txt
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.94}

if [ "${SMOKE:-0}" = 1 ]; then
  MODEL=tiny SEQ=64 LAYERS=2 ATT=xla BIG=4 SMALL=2 HEADS=4 HD=16 LIMIT=120
else
  MODEL=llama2-7b SEQ=4096 LAYERS=8 ATT=cudnn BIG=4 SMALL=2 HEADS=32 HD=128 LIMIT=150
fi

step() {  # step NAME LIMIT_S COMMAND...: run, log, and say how it ended
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s)
  echo "===== $name: $*" >>"$LOG"
  timeout "$limit" "$@" >>"$LOG" 2>&1
  rc=$?
  echo "===== $name: rc=$rc in $(( $(date +%s) - start )) s" | tee -a "$LOG"
}
CLI=("$PY" -m mellama_jax.cli)

step versions 60 "$PY" -c "
import jax, flax, optax, sys
print(sys.version); print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__)
print(jax.devices())
from mellama_jax.model import attention
import inspect
print('cudnn packed-layout API:', inspect.signature(attention._cudnn_module.dot_product_attention))
try:
    import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)
except Exception as e: print('torch/transformers:', e)"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv >>"$LOG"
smoke() { step smoke 90 "${CLI[@]}" bench mesh --model tiny --layouts data=1 --seq 64 --batch 2 --warmup 1 --steps 1 \
  --dtype bfloat16 model.attention=xla; }  # the package itself; cuDNN is the attention step's
if ! smoke | grep -q "rc=0" && [ -d .whl ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=$PWD:/tmp/site
  smoke
fi

want() { [ ${#STEPS[@]} -eq 0 ] || [[ " ${STEPS[*]} " == *" $1 "* ]]; }

# the bf16 matmul ceiling on this device (8192^3, median of 20), beside the datasheet peak
want matmul && step matmul 60 "$PY" -c "
import time, statistics, jax, jax.numpy as jnp
n = 512 if jax.default_backend() == 'cpu' else 8192
a, b = (jax.random.normal(jax.random.key(i), (n, n), jnp.bfloat16) for i in (0, 1))
f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32).astype(jnp.bfloat16))
f(a, b).block_until_ready(); ts = []
for _ in range(20):
    s = time.perf_counter(); f(a, b).block_until_ready(); ts.append(time.perf_counter() - s)
print('MATMUL_BF16_TFLOPS', 2 * n**3 / statistics.median(ts) / 1e12)"

# attention: forward + backward at 4096 context, one document per row; then two rows of four packed documents:
# cudnn (cuDNN's packed layout) and cudnn_causal (ignores them; its error shows it) against xla; then 40 documents,
# more than the packed layout's default room (32): cudnn falls back to the document mask as a bias
want attention && step attention 90 "${CLI[@]}" bench attention --seq "$SEQ" --heads "$HEADS" --kv-heads "$HEADS" \
  --head-dim "$HD"
want attention-packed && step attention-packed 90 "${CLI[@]}" bench attention --batch 2 --seq "$SEQ" --heads "$HEADS" \
  --kv-heads "$HEADS" --head-dim "$HD" --docs 4 --impls xla,cudnn,cudnn_causal
want attention-overflow && step attention-overflow 90 "${CLI[@]}" bench attention --seq "$SEQ" --heads "$HEADS" \
  --kv-heads "$HEADS" --head-dim "$HD" --docs 40 --impls xla,cudnn

# a command prefix that runs in the package at OLD (from inside it: `python -m` puts the working directory first)
# shellcheck disable=SC2016
IN_OLD=(bash -c 'cd "$1" && shift && exec "$@"' _ "${OLD:-}" env PYTHONPATH="${PYTHONPATH/#"$PWD"/"${OLD:-}"}")
[ -n "${OLD:-}" ] && want attention-old && step attention-old 90 "${IN_OLD[@]}" "${CLI[@]}" bench attention --seq "$SEQ" \
  --heads "$HEADS" --kv-heads "$HEADS" --head-dim "$HD" --docs 4 --impls xla,cudnn

mesh() {  # mesh NAME BATCH REMAT OVERRIDES... (XLA_FLAGS from the caller's MESH_XLA_FLAGS)
  local name=$1 batch=$2 remat=$3
  shift 3
  want "$name" || return 0
  step "$name" "$LIMIT" env XLA_FLAGS="${MESH_XLA_FLAGS:-}" "${CLI[@]}" bench mesh --model "$MODEL" --layouts data=1 \
    --seq "$SEQ" --batch "$batch" --remat "$remat" --dtype bfloat16 --warmup 2 --steps 5 "model.num_layers=$LAYERS" \
    "model.attention=$ATT" "model.scan_unroll=$LAYERS" "$@"
}
# the headline row, with a device trace and the optimized HLO (summarise with `bench trace`)
if [ -n "${OLD:-}" ] && want mesh-old; then
  step mesh-old "$LIMIT" "${IN_OLD[@]}" "${CLI[@]}" bench mesh --model "$MODEL" \
    --layouts data=1 --seq "$SEQ" --batch "$BIG" --remat none --dtype bfloat16 --warmup 2 --steps 5 \
    "model.num_layers=$LAYERS" "model.attention=$ATT"
fi
# (layers unrolled, scan_unroll = layers: no per-layer slices of the stacked weights, no stacked residuals)
mesh mesh "$BIG" none --profile "$OUTDIR/prof"
mesh mesh-scan "$BIG" none model.scan_unroll=1
mesh mesh-small "$SMALL" none
want torch-small && step torch-small "$LIMIT" "${CLI[@]}" bench baseline --model "$MODEL" --seq "$SEQ" --batch "$SMALL" \
  --lora-rank 0 --dtype bfloat16 --sides torch --warmup 2 --steps 5 "model.num_layers=$LAYERS"
mesh causal-only "$BIG" none model.attention=cudnn_causal
mesh layers-remat "$BIG" full "model.num_layers=$((2 * LAYERS))"
MESH_XLA_FLAGS=--xla_gpu_enable_triton_gemm=false mesh no-triton-gemm "$BIG" none
# twice the batch in two microbatches: one optimizer update per 2 x BIG sequences
mesh accum2 "$((2 * BIG))" none train.grad_accum=2
# the paper's stages at real depth (issue: performance at real depth), each side in its own process:
# (a) Me-LLaMA 13B-chat LoRA: 40 layers, 4096 tokens, the recipe's rank 8 / alpha 16 on all seven projections,
#     bf16 frozen base, full remat (the recipe's), against PEFT + transformers with gradient checkpointing;
# (b) LLaMA2-7B continual pretraining at 32 layers: fp32 master weights and Adam, full remat, against torch.
if [ "${SMOKE:-0}" = 1 ]; then M13=tiny M7=tiny DEPTH_SEQ=64; else M13=llama2-13b M7=llama2-7b DEPTH_SEQ=4096; fi
LORA13=("lora.targets=[wq,wk,wv,wo,w_gate,w_up,w_down]" lora.alpha=16 lora.base_dtype=bfloat16 model.remat=full)
depth() {  # depth NAME MODEL MODES SIDE OVERRIDES...
  local name=$1 model=$2 modes=$3 side=$4
  shift 4
  want "$name" && step "$name" "${DEPTH_LIMIT:-170}" "${CLI[@]}" bench baseline --model "$model" --seq "$DEPTH_SEQ" \
    --batch "${DEPTH_BATCH:-4}" --lora-rank 8 --dtype bfloat16 --modes "$modes" --sides "$side" --warmup 1 --steps 3 "$@"
}
depth lora13b-ours "$M13" lora ours "${LORA13[@]}" "model.attention=$ATT"
depth lora13b-peft "$M13" lora torch "${LORA13[@]}"
depth pre7b-ours "$M7" full ours model.remat=full "model.attention=$ATT"
depth pre7b-torch "$M7" full torch model.remat=full
# selective remat at the same depths (the last model.remat wins): the projections' outputs kept on the device
# (dots) or copied to the host's memory and back (offload); device_peak_bytes beside `plan` for the same override
depth lora13b-dots "$M13" lora ours "${LORA13[@]}" "model.attention=$ATT" model.remat=dots
depth lora13b-offload "$M13" lora ours "${LORA13[@]}" "model.attention=$ATT" model.remat=offload
depth pre7b-offload "$M7" full ours "model.attention=$ATT" model.remat=offload
# bf16 decoding at 7B width and depth, batch 1/16/64, against transformers' generate on the same GPU
if [ "${SMOKE:-0}" = 1 ]; then DECODE=(--model tiny --batches "1,2" --repeats 1); else DECODE=(--model llama2-7b --repeats 3); fi
want decode7b && step decode7b "${DECODE_LIMIT:-400}" "${CLI[@]}" bench decode --dtype bfloat16 "${DECODE[@]}"

grep -h "^MATMUL_BF16\|^| \|\"tokens_per_s\"\|\"mfu\"\|\"device_peak_bytes\"\|\"fwd_bwd_ms\"\|\"impl\"\|\"error\"" "$LOG"
