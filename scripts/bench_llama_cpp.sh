#!/usr/bin/env bash
# The peer figures of BENCHMARKS.md: llama.cpp's llama-bench on the same weights this repo's benchmark reads.
# It builds llama-bench and llama-quantize from a llama.cpp source tree you give (a git clone of
# https://github.com/ggml-org/llama.cpp, or a release's source), converts a hub-layout checkpoint (config.json,
# safetensors, tokenizer.model) to BF16 GGUF with that tree's convert_hf_to_gguf.py, quantizes it to Q8_0 and
# Q4_0 with its llama-quantize, and prints llama-bench's table for each: prompt processing (-p) and token
# generation (-n) in tokens/s.
#
#   bash scripts/bench_llama_cpp.sh LLAMA_CPP_SOURCE CHECKPOINT_DIR [THREADS] [-- LLAMA_BENCH_ARGS...]
#
# CHECKPOINT_DIR: e.g. what `python scripts/benchmark.py --model cpu-bench --write_checkpoint DIR` writes, so
# that both benchmarks read the same weights. THREADS: as benchmark.py's --threads (default: the physical
# cores, as torch counts them). LLAMA_BENCH_ARGS go to llama-bench (e.g. -- --repack 0 where a CPU crashes in
# llama.cpp's repacked weight layout). Environment: BUILD_DIR (default LLAMA_CPP_SOURCE/build), GGUF_DIR
# (default CHECKPOINT_DIR/gguf: made once, kept), TYPES (default "bf16 q8_0 q4_0"), PROMPT (512), GEN (64),
# REPS (3), PYTHON (default python: it runs the converter, which needs numpy, sentencepiece and torch).
# Needs cmake and a C++ compiler. Measure with nothing else running, in rounds interleaved with ours.
set -euo pipefail

usage="usage: bash scripts/bench_llama_cpp.sh LLAMA_CPP_SOURCE CHECKPOINT_DIR [THREADS] [-- LLAMA_BENCH_ARGS...]"
fail() { echo "error: $*" >&2; exit 1; }

[[ $# -ge 2 ]] || { echo "$usage" >&2; exit 2; }
src=$1 checkpoint=$2
shift 2
threads=""
if [[ $# -gt 0 && $1 != "--" ]]; then threads=$1; shift; fi
if [[ $# -gt 0 ]]; then
    [[ $1 == "--" ]] || fail "unexpected argument $1; llama-bench's own arguments go after --"
    shift
fi
PY=${PYTHON:-python}

# Every argument is checked before anything is built or written.
[[ -d $src ]] || fail "$src is not a folder: give the path of a llama.cpp source tree (git clone https://github.com/ggml-org/llama.cpp)"
[[ -f $src/CMakeLists.txt && -f $src/convert_hf_to_gguf.py ]] ||
    fail "$src is not a llama.cpp source tree: it lacks CMakeLists.txt or convert_hf_to_gguf.py"
[[ -f $checkpoint/config.json ]] && compgen -G "$checkpoint/*.safetensors" > /dev/null ||
    fail "$checkpoint is not a hub-layout checkpoint (config.json and *.safetensors); write one with python scripts/benchmark.py --model cpu-bench --write_checkpoint $checkpoint"
[[ -f $checkpoint/tokenizer.model ]] || fail "$checkpoint has no tokenizer.model, which the GGUF converter needs"
if [[ -z $threads ]]; then
    threads=$("$PY" -c "import torch; print(torch.get_num_threads())" 2>/dev/null) || threads=$(nproc)
fi
[[ $threads =~ ^[1-9][0-9]*$ ]] || fail "THREADS must be a positive whole number, got '$threads'"
for variable in PROMPT GEN REPS; do
    [[ ${!variable:-1} =~ ^[0-9]+$ ]] || fail "$variable must be a whole number, got '${!variable}'"
done
types=${TYPES:-bf16 q8_0 q4_0}
for type in $types; do
    [[ $type =~ ^(bf16|f16|f32|q8_0|q4_0|q4_1|q5_0|q5_1|q2_k|q3_k_m|q4_k_m|q5_k_m|q6_k)$ ]] ||
        fail "TYPES: $type is not one this script makes (bf16, f16, f32, q8_0, q4_0, q4_1, q5_0, q5_1, q2_k, q3_k_m, q4_k_m, q5_k_m, q6_k)"
done
command -v cmake > /dev/null || fail "cmake is not installed; llama.cpp builds with it"

build=${BUILD_DIR:-$src/build}
if [[ ! -x $build/bin/llama-bench || ! -x $build/bin/llama-quantize ]]; then
    echo "building llama-bench and llama-quantize in $build (minutes, once)…" >&2
    cmake -S "$src" -B "$build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF > "$build.log" 2>&1 &&
        cmake --build "$build" --target llama-bench llama-quantize -j "$(nproc)" >> "$build.log" 2>&1 ||
        fail "the build failed; its output is in $build.log"
fi

out=${GGUF_DIR:-$checkpoint/gguf}
mkdir -p "$out"
if [[ ! -f $out/bf16.gguf ]]; then
    echo "converting $checkpoint to $out/bf16.gguf…" >&2
    "$PY" "$src/convert_hf_to_gguf.py" "$checkpoint" --outtype bf16 --outfile "$out/bf16.gguf.tmp" > "$out/convert.log" 2>&1 ||
        fail "llama.cpp's converter failed; its output is in $out/convert.log"
    mv "$out/bf16.gguf.tmp" "$out/bf16.gguf"
fi
for type in $types; do
    [[ -f $out/$type.gguf ]] && continue
    if [[ $type == f16 || $type == f32 ]]; then
        "$PY" "$src/convert_hf_to_gguf.py" "$checkpoint" --outtype "$type" --outfile "$out/$type.gguf.tmp" \
            > "$out/convert.log" 2>&1 || fail "llama.cpp's converter failed; its output is in $out/convert.log"
    else
        "$build/bin/llama-quantize" "$out/bf16.gguf" "$out/$type.gguf.tmp" "${type^^}" > "$out/quantize.log" 2>&1 ||
            fail "llama-quantize failed for $type; its output is in $out/quantize.log"
    fi
    mv "$out/$type.gguf.tmp" "$out/$type.gguf"
done

commit=$(git -C "$src" rev-parse --short HEAD 2>/dev/null || echo "not a git checkout")
cpu=$(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2 | xargs || true)
echo "llama.cpp ($src, commit $commit), $threads threads, ${cpu:-unknown CPU}; -p ${PROMPT:-512} -n ${GEN:-64} -r ${REPS:-3} $*"
header=1
for type in $types; do
    table=$("$build/bin/llama-bench" -m "$out/$type.gguf" -t "$threads" -p "${PROMPT:-512}" -n "${GEN:-64}" \
                -r "${REPS:-3}" "$@" 2>/dev/null) ||
        { echo "| $type: llama-bench failed (exit status $?; on some CPUs its repacked layout crashes: try -- --repack 0) |"; continue; }
    if [[ $header == 1 ]]; then
        grep -E '^\|' <<< "$table"
        header=0
    else
        grep -E '^\|' <<< "$table" | tail -n +3
    fi
done
