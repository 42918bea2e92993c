"""Started under torchrun by test_tp.py: loads a checkpoint tensor-parallel exactly as generate.py
does and writes, per rank, the shape and storage size of every tensor the rank holds."""
import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from checkpoint import load_model, open_checkpoint  # noqa: E402
from tp import maybe_init_dist  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--checkpoint_path", type=Path, required=True)
parser.add_argument("--out", type=Path, required=True, help="folder for rank{r}.json")
args = parser.parse_args()

rank = maybe_init_dist("cpu")
assert rank is not None, "run me under torchrun with at least 2 processes"
model = load_model(open_checkpoint(args.checkpoint_path), "cpu", torch.float32, rank, dist.get_world_size())

# The storage's size, not the tensor's: a slice that kept the whole checkpoint tensor alive counts in full.
held = {name: {"shape": list(t.shape), "storage_bytes": t.untyped_storage().nbytes()}
        for name, t in model.state_dict().items()}
(args.out / f"rank{rank}.json").write_text(json.dumps(held))
dist.destroy_process_group()
