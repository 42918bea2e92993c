# benchmark.py --verify: before any speed is reported, the decode step compiled for the device exactly as
# generate.py compiles it is checked against the eager model on the CPU, both in float32, on the tiny
# shape. A fast path that is wrong on one device only (CUDA graphs, the GPU's quantized expert paths) shows
# up here instead of as a fast wrong result. On another device the eager CPU model runs on PyTorch's own
# kernels: the CPU kernels' int8 activations (int4 weights) would differ from the device by more than
# the tolerance.
import contextlib
import copy

import torch

from errors import UserError
from formats import FullPrecision, Scheme
from generation import decode_compile_options
from kernels import cpu as cpu_kernels
from model import Transformer
from scripts.bench_common import model_args, random_model

# float32 on both sides: kernels differ in summation order only (TF32 stays off for float32 matmuls);
# on the CPU, the int8 kernels' int16 activations are further within 2^-15 of each block's largest value,
# and the int4 kernels take the same int8 activations in the compiled and in the eager step.
TOLERANCE = 1e-3


def device_twin(model: Transformer, device: str) -> Transformer:
    """The same weights on `device`: the model whose compiled step is checked."""
    return copy.deepcopy(model).to(device)


@torch.no_grad()
def verify_decode(device: str, scheme: Scheme = Scheme.of(FullPrecision()), steps: int = 6, seed: int = 0) -> float:
    """The largest relative error of the compiled step's logits over `steps` decoded positions."""
    config = model_args("tiny")
    reference = random_model(config, "cpu", torch.float32, scheme, seed=seed)
    model = device_twin(reference, device)
    reference.setup_caches(max_batch_size=1, max_seq_length=64)
    model.setup_caches(max_batch_size=1, max_seq_length=64)
    step = torch.compile(lambda x, pos: model(x, pos), fullgraph=True, options=decode_compile_options(device))
    idx = torch.randint(0, config.vocab_size, (1, 4 + steps), generator=torch.Generator().manual_seed(seed))
    reference_kernels = contextlib.nullcontext() if device == "cpu" else cpu_kernels.turned_off()
    with reference_kernels:
        reference(idx[:, :4], torch.arange(4))  # eager prefill on both, then one token at a time
    model(idx[:, :4].to(device), torch.arange(4, device=device))
    errors = []
    for i in range(4, 4 + steps):
        got = step(idx[:, i:i + 1].to(device), torch.tensor([i], dtype=torch.int, device=device)).float().cpu()
        with reference_kernels:
            want = reference(idx[:, i:i + 1], torch.tensor([i], dtype=torch.int)).float()
        errors.append(((got - want).norm() / want.norm()).item())
    return max(errors)


def check(device: str, scheme: Scheme = Scheme.of(FullPrecision())):
    """Prints the verdict; raises UserError (the benchmark stops) when the two disagree."""
    error = verify_decode(device, scheme)
    verdict = "agree" if error < TOLERANCE else "DISAGREE"
    label = f", {scheme.spec}" if scheme.quantized else ""
    print(f"verify: compiled decode on {device} vs eager on cpu (tiny shape, float32{label}): "
          f"logits {verdict}, relative error {error:.2e}", flush=True)
    if error >= TOLERANCE:
        raise UserError(f"the compiled decode step on {device} disagrees with the eager model "
                        f"(relative error {error:.2e}); not benchmarking a wrong result")
