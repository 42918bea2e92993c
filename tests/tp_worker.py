"""Started under torchrun by test_tp.py: loads a checkpoint tensor-parallel exactly as generate.py
does and writes, per rank, what the rank holds; with --tokens, also the logits of the torch.compiled
sharded model over those tokens, fed one at a time through the KV cache as decoding does (one
graph to compile: the test stays quick on two cores)."""
import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from generate import PRECISIONS, load_model  # noqa: E402
from tp import maybe_init_dist  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--checkpoint_path", type=Path, required=True)
parser.add_argument("--out", type=Path, required=True, help="folder for rank{r}.json and logits.pt")
parser.add_argument("--precision", choices=list(PRECISIONS), default="float32")
parser.add_argument("--tokens", type=Path, default=None, help="a [1, T] token tensor (torch.save) to run compiled")
args = parser.parse_args()

rank = maybe_init_dist("cpu")
assert rank is not None, "run me under torchrun with at least 2 processes"
model = load_model(args.checkpoint_path, "cpu", PRECISIONS[args.precision], rank, dist.get_world_size())

# The storage's size, not the tensor's: a slice that kept the whole checkpoint tensor alive counts in full.
held = {name: {"shape": list(t.shape), "storage_bytes": t.untyped_storage().nbytes(), "element_size": t.element_size()}
        for name, t in model.state_dict().items()}
(args.out / f"rank{rank}.json").write_text(json.dumps(held))

if args.tokens is not None:
    idx = torch.load(args.tokens)
    model.setup_caches(max_batch_size=1, max_seq_length=64)
    forward = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        steps = [forward(idx[:, i:i + 1], torch.tensor([i])) for i in range(idx.size(1))]
    if rank == 0:
        torch.save(torch.cat(steps, dim=1).float(), args.out / "logits.pt")
dist.destroy_process_group()
