#!/usr/bin/env bash
# One device call (at most 8 minutes on one H100/H200; about 6 on an H200, 2026-11-28): full-width
# Mixtral 8x7B with random weights at batch 1, compiled with CUDA graphs, prompts of 5 and 512 tokens,
# 200 new tokens each:
#   1. int8 weights, all 32 layers;
#   2. bf16 weights, as many layers as the free memory holds (32 on a 141 GB card, about 24 on 80 GB).
# Each first checks its compiled decode step against the eager model on a tiny shape (--verify), then
# prints tokens/s, achieved bandwidth, the card's measured read/copy bandwidth and the fraction of the
# limit (scripts/benchmark.py). Each run has its own time limit; a failing run is reported and the next
# one still runs.
#
#   bash scripts/gpu_check.sh                 # on the GPU machine
#   GPU_CHECK_TINY=1 bash scripts/gpu_check.sh  # the same script on a tiny shape on CPU, in seconds
#                                               # (GPU_CHECK_COMPILE=1: compiled too, a minute or two)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}

if [ "${GPU_CHECK_TINY:-0}" = 1 ]; then
  shape=(--model tiny --device cpu --probe_mb 64)
  lengths=(--decode_prompts 5 32 --max_new_tokens 8 --prefill_lengths 32 --runs 2)
  compile=()   # compiling on CPU takes a minute or more: GPU_CHECK_COMPILE=1 adds it (and --verify)
  [ "${GPU_CHECK_COMPILE:-0}" = 1 ] && compile=(--compile --verify)
  layers=1
  limit=300
else
  if ! $PY -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    echo "error: no CUDA GPU visible to $PY; run this on the GPU machine, or GPU_CHECK_TINY=1 for the CPU rehearsal" >&2
    exit 1
  fi
  shape=(--model Mixtral-8x7B-v0.1 --device cuda)
  lengths=(--decode_prompts 5 512 --max_new_tokens 200 --prefill_lengths 512 --runs 3)
  compile=(--compile --verify)
  limit=230  # seconds per run: both runs and the start fit in one 8-minute call
  # bf16 layers: what fits in the free memory after the head, the 4 GiB bandwidth probe and headroom
  # for the KV cache, CUDA graphs and compilation.
  layers=$($PY - <<'EOF'
import torch
free, total = torch.cuda.mem_get_info()
dim, inter, experts, vocab, kv = 4096, 14336, 8, 32000, 1024
per_layer = 2 * (3 * experts * inter * dim + dim * (4096 + 2 * kv) + 4096 * dim)  # bf16 bytes
fixed = 2 * 2 * vocab * dim + (4 << 30) + (6 << 30)
print(max(1, min(32, int((free - fixed) // per_layer))))
EOF
)
  nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.max.memory --format=csv || true
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" || true
fi

status=0
echo "== int8, all layers"
timeout "$limit" $PY scripts/benchmark.py "${shape[@]}" --int8 "${compile[@]}" "${lengths[@]}" \
  || { echo "int8 run failed (exit $?; 124 = over ${limit} s)"; status=1; }
echo
echo "== bf16, ${layers} layers"
timeout "$limit" $PY scripts/benchmark.py "${shape[@]}" --n_layer "$layers" --precision bfloat16 "${compile[@]}" \
  "${lengths[@]}" || { echo "bf16 run failed (exit $?; 124 = over ${limit} s)"; status=1; }
exit $status
