#!/usr/bin/env bash
# The whole pipeline on any machine, no GPU and no network, on a real (small) trained model: the
# Mixtral-architecture checkpoint shipped in assets/tiny-stdlib (trained on the Python standard
# library's source by scripts/train_tiny.py; see its README.md) -> the real converter -> int8 and int4
# quantization -> the generator on the CPU, completing a line of Python in each format, greedily, so
# that the three texts differ only by what quantization changed. Extra arguments go to generate.py.
set -euo pipefail
cd "$(dirname "$0")/.."
ASSET=assets/tiny-stdlib
CHECKPOINT_DIR=${CHECKPOINT_DIR:-checkpoints/tiny-stdlib}
PROMPT=${PROMPT:-"def is_prime(n):"}
# The hub-layout files, copied so that what the converter and the quantizer write stays out of assets/.
mkdir -p "$CHECKPOINT_DIR"
cp "$ASSET/config.json" "$ASSET/model.safetensors" "$ASSET/tokenizer.model" "$CHECKPOINT_DIR/"
python scripts/convert_hf_checkpoint.py --checkpoint_dir "$CHECKPOINT_DIR"
python quantize.py --checkpoint_path "$CHECKPOINT_DIR/model.pth" --mode int8
python quantize.py --checkpoint_path "$CHECKPOINT_DIR/model.pth" --mode int4
for format in "bf16 model.pth" "int8 model_int8.pth" "int4 model_int4.g32.pth"; do
    read -r label file <<< "$format"
    echo
    echo "===== $label ($CHECKPOINT_DIR/$file) ====="
    python generate.py --checkpoint_path "$CHECKPOINT_DIR/$file" --device cpu --prompt "$PROMPT" \
        --max_new_tokens 100 --num_samples 1 --temperature 0 "$@"
done
