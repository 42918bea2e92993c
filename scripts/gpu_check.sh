#!/usr/bin/env bash
# One device call (at most 10 minutes on one H100/H200): full-width Mixtral 8x7B with random weights,
# 16 of its 32 layers, at batch 1, compiled with CUDA graphs, decoding 200 new tokens after prompts of
# 5 and 512 tokens, five runs:
#   1. int8 weights, the compiled path (inductor's kernels), and prefill of 512 tokens;
#   2. int8 weights, the Triton kernels (kernels/triton_moe.py, MIXTRAL_TRITON=1 via --triton);
#   3. and 4. the same in bf16 (fewer layers where the free memory cannot hold 16);
#   5. int4 weights (groups of 32), the Triton kernels (its compiled path dequantizes: no contender).
# 16 layers, not 32: compilation takes most of a run and grows with the layers, and five runs must fit
# one call; each run's fraction of the limit counts the bytes of the layers it has.
# Each run first checks its compiled decode step against the eager model on a tiny shape (--verify),
# then prints tokens/s, achieved bandwidth, the card's measured read/copy bandwidth and the fraction of
# the limit (scripts/benchmark.py). Each run has its own time limit; a failing run is reported and the
# next one still runs.
#
#   bash scripts/gpu_check.sh                 # on the GPU machine
#   GPU_CHECK_TINY=1 bash scripts/gpu_check.sh  # the same script on a tiny shape on CPU, in seconds (the
#                                               # Triton runs measure the CPU's kernels: a rehearsal)
#                                               # (GPU_CHECK_COMPILE=1: compiled too, a minute or two)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}

if [ "${GPU_CHECK_TINY:-0}" = 1 ]; then
  shape=(--model tiny --device cpu --probe_mb 64)
  lengths=(--decode_prompts 5 32 --max_new_tokens 8 --runs 2)
  prefill=(--prefill_lengths 32)
  compile=()   # compiling on CPU takes a minute or more: GPU_CHECK_COMPILE=1 adds it (and --verify)
  [ "${GPU_CHECK_COMPILE:-0}" = 1 ] && compile=(--compile --verify)
  layers=1
  bf16_layers=1
  limit=300
else
  if ! $PY -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    echo "error: no CUDA GPU visible to $PY; run this on the GPU machine, or GPU_CHECK_TINY=1 for the CPU rehearsal" >&2
    exit 1
  fi
  shape=(--model Mixtral-8x7B-v0.1 --device cuda)
  lengths=(--decode_prompts 5 512 --max_new_tokens 200 --runs 3)
  prefill=(--prefill_lengths 512)
  compile=(--compile --verify)
  limit=110  # seconds per run: five runs and the start fit in one 10-minute call
  layers=16
  # bf16 layers: what fits in the free memory after the head, the 4 GiB bandwidth probe and headroom
  # for the KV cache, CUDA graphs and compilation (16 on any card of 80 GB or more).
  bf16_layers=$($PY - <<'PYEOF'
import torch
free, total = torch.cuda.mem_get_info()
dim, inter, experts, vocab, kv = 4096, 14336, 8, 32000, 1024
per_layer = 2 * (3 * experts * inter * dim + dim * (4096 + 2 * kv) + 4096 * dim)  # bf16 bytes
fixed = 2 * 2 * vocab * dim + (4 << 30) + (6 << 30)
print(max(1, min(16, int((free - fixed) // per_layer))))
PYEOF
)
  nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.max.memory --format=csv || true
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" || true
fi

status=0
run() {  # run TITLE ARGS...: one benchmark run under the time limit, reported whatever its end
  local title=$1; shift
  echo "== $title"
  timeout "$limit" $PY scripts/benchmark.py "${shape[@]}" "${compile[@]}" "${lengths[@]}" "$@" \
    || { echo "$title: run failed (exit $?; 124 = over ${limit} s)"; status=1; }
  echo
}
# Prefill does not take the Triton kernels (they are for the few tokens of a decode step): measured once.
run "int8, ${layers} layers, compiled path" --n_layer "$layers" --int8 "${prefill[@]}"
run "int8, ${layers} layers, Triton kernels" --n_layer "$layers" --int8 --triton --prefill_lengths
run "bf16, ${bf16_layers} layers, compiled path" --n_layer "$bf16_layers" --precision bfloat16 "${prefill[@]}"
run "bf16, ${bf16_layers} layers, Triton kernels" --n_layer "$bf16_layers" --precision bfloat16 --triton --prefill_lengths
run "int4, ${layers} layers, Triton kernels" --n_layer "$layers" --int4 --triton --prefill_lengths
exit $status
