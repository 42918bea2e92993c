# benchmark.py --verify: before any speed is reported, the decode step compiled for the device exactly as
# generate.py compiles it is checked against the eager model on the CPU, both in float32, on the tiny
# shape. A fast path that is wrong on one device only (CUDA graphs, the GPU's int8 expert path) shows up
# here instead of as a fast wrong result.
import copy

import torch

from generate import decode_compile_options
from model import Transformer, UserError
from scripts.benchmark import model_args, random_model

# float32 on both sides: kernels differ in summation order only (TF32 stays off for float32 matmuls);
# the int8 CPU kernels' int16 activations are further within 2^-15 of each block's largest value.
TOLERANCE = 1e-3


def device_twin(model: Transformer, device: str) -> Transformer:
    """The same weights on `device`: the model whose compiled step is checked."""
    return copy.deepcopy(model).to(device)


@torch.no_grad()
def verify_decode(device: str, int8: bool = False, steps: int = 6, seed: int = 0) -> float:
    """The largest relative error of the compiled step's logits over `steps` decoded positions."""
    config = model_args("tiny")
    reference = random_model(config, "cpu", torch.float32, int8=int8, seed=seed)
    model = device_twin(reference, device)
    reference.setup_caches(max_batch_size=1, max_seq_length=64)
    model.setup_caches(max_batch_size=1, max_seq_length=64)
    step = torch.compile(lambda x, pos: model(x, pos), fullgraph=True, options=decode_compile_options(device))
    idx = torch.randint(0, config.vocab_size, (1, 4 + steps), generator=torch.Generator().manual_seed(seed))
    reference(idx[:, :4], torch.arange(4))  # eager prefill on both, then one token at a time
    model(idx[:, :4].to(device), torch.arange(4, device=device))
    errors = []
    for i in range(4, 4 + steps):
        want = reference(idx[:, i:i + 1], torch.tensor([i], dtype=torch.int)).float()
        got = step(idx[:, i:i + 1].to(device), torch.tensor([i], dtype=torch.int, device=device)).float().cpu()
        errors.append(((got - want).norm() / want.norm()).item())
    return max(errors)


def check(device: str, int8: bool = False):
    """Prints the verdict; raises UserError (the benchmark stops) when the two disagree."""
    error = verify_decode(device, int8=int8)
    verdict = "agree" if error < TOLERANCE else "DISAGREE"
    print(f"verify: compiled decode on {device} vs eager on cpu (tiny shape, float32{', int8' if int8 else ''}): "
          f"logits {verdict}, relative error {error:.2e}", flush=True)
    if error >= TOLERANCE:
        raise UserError(f"the compiled decode step on {device} disagrees with the eager model "
                        f"(relative error {error:.2e}); not benchmarking a wrong result")
