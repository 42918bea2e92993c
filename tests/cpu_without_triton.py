"""Run by test_triton.py in a fresh process whose triton cannot be imported, with MIXTRAL_TRITON=1: loads a
CPU model as generate.py does, prefills and decodes a token, and fails if anything imported triton or
kernels/triton_moe.py."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from checkpoint import load_model, open_checkpoint  # noqa: E402

model = load_model(open_checkpoint(Path(sys.argv[1]) / "model.pth"), "cpu", torch.float32)
model.setup_caches(max_batch_size=1, max_seq_length=16)
with torch.no_grad():
    model(torch.tensor([[1, 2, 3]]), torch.arange(3))
    model(torch.tensor([[4]]), torch.tensor([3]))
assert "kernels.triton_moe" not in sys.modules and "triton" not in sys.modules, "triton was imported"
