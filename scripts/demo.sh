#!/usr/bin/env bash
# The whole pipeline on any machine, no GPU and no network: a small random-weight Mixtral checkpoint
# in the hub's layout -> the real converter -> the generator on the CPU. The text is meaningless
# (random weights); the run shows the pipeline and the speed. Extra arguments go to generate.py.
set -euo pipefail
cd "$(dirname "$0")/.."
CHECKPOINT_DIR=${CHECKPOINT_DIR:-checkpoints/tiny-mixtral}
python scripts/make_tiny_checkpoint.py --checkpoint_dir "$CHECKPOINT_DIR"
python scripts/convert_hf_checkpoint.py --checkpoint_dir "$CHECKPOINT_DIR"
python generate.py --checkpoint_path "$CHECKPOINT_DIR/model.pth" --device cpu --max_new_tokens 100 --num_samples 3 "$@"
