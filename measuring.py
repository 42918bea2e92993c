# What generate.py reports and scripts/benchmark.py measures: the time device work takes, the bytes of
# weights a decode step reads (with a batch, from the experts its tokens chose, counted on the device),
# and the memory of the process: its peak, and what the device has available.
import contextlib
import os
import resource
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from model import Transformer


# ----------------------------------------------------------------------------- time

def synchronize(device):
    """Waits for the device's queued work, so that a timer around it measures the work. Before CUDA has
    started nothing can be queued: nothing to wait for, and the timer does not start it."""
    if str(device).startswith("cuda") and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class Timer:
    """Seconds of work on a device: the device's queue is waited for at the start and at the stop.

        with Timer(device) as timer:
            work()
        timer.seconds

    or timer.start() and timer.stop() where the start is inside a callback."""

    def __init__(self, device="cpu"):
        self.device, self.began, self.seconds = device, None, None

    def start(self) -> "Timer":
        synchronize(self.device)
        self.began = time.perf_counter()
        return self

    def lap(self) -> float:
        """Seconds since the start, the device's queue waited for; the timer runs on."""
        synchronize(self.device)
        return time.perf_counter() - self.began

    def stop(self) -> float:
        self.seconds = self.lap()
        return self.seconds

    def __enter__(self) -> "Timer":
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def seconds(fn: Callable, device="cpu") -> float:
    """The seconds fn() takes on the device."""
    with Timer(device) as timer:
        fn()
    return timer.seconds


# ----------------------------------------------------------------------------- bytes read

def weight_bytes(model: Transformer) -> int:
    """Bytes of the model's weights (its state dict: not the KV cache or the rotary tables)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def active_weight_bytes(model: Transformer, tokens: int = 1, experts_per_layer: Optional[float] = None) -> int:
    """Bytes of weights one decode step of `tokens` tokens reads: everything but the embedding table (a row
    per token) and the experts (experts_per_layer of the E in each layer; one token reads K)."""
    config = model.config
    chosen = config.num_activated_experts if experts_per_layer is None else experts_per_layer
    total = 0
    for name, t in model.state_dict().items():
        nbytes = t.numel() * t.element_size()
        if name.startswith("tok_embeddings."):
            nbytes = nbytes // config.vocab_size * tokens
        elif ".block_sparse_moe.w" in name:  # expert weights and their scales
            nbytes = round(nbytes * chosen / config.num_experts)
        total += nbytes
    return total


class ExpertReads:
    """The distinct experts each MoE layer's calls chose, summed on the device (see counting_expert_reads)."""

    def __init__(self, layers: list):
        self.layers = layers

    def reset(self):
        for moe in self.layers:
            moe.expert_reads.zero_()

    def read(self) -> int:
        """Their sum over the layers since the last reset (one host sync)."""
        return int(sum(moe.expert_reads for moe in self.layers))

    def per_layer(self, steps: int) -> float:
        """Experts read per layer and step, over the `steps` steps since the last reset."""
        return self.read() / (len(self.layers) * steps)

    def step_bytes(self, model: Transformer, sequences: int, steps: int) -> tuple:
        """(the bytes of weights one of those `steps` steps of a batch of `sequences` read, on average; the
        experts per layer it read)."""
        experts = self.per_layer(steps)
        return active_weight_bytes(model, sequences, experts), experts


@contextlib.contextmanager
def counting_expert_reads(model: Transformer):
    """Has every MoE layer count, on the device, the distinct experts each of its calls chose: what a
    step of a batch reads, since its kernels read each chosen expert once for all the tokens that chose
    it. Yields an ExpertReads; on leaving, the hooks and the counts are removed. The count is a buffer of
    the layer, so a compiled step (CUDA graphs included) updates it in place; a step compiled inside has
    the counting in its graph, so it is run inside only."""
    layers = [layer.block_sparse_moe for layer in model.layers]
    hooks = []
    for moe in layers:
        moe.register_buffer("expert_reads", torch.zeros((), dtype=torch.int64, device=model.norm.weight.device),
                            persistent=False)

        def count(gate, inputs, logits, moe=moe):  # logits [N, E]: the router's choice is their top K
            chosen = logits.topk(moe.num_activated_experts, dim=-1).indices.flatten()
            moe.expert_reads += torch.zeros_like(logits[0], dtype=torch.int64).index_fill_(0, chosen, 1).sum()
        hooks.append(moe.gate.register_forward_hook(count))
    try:
        yield ExpertReads(layers)
    finally:
        for hook in hooks:
            hook.remove()
        for moe in layers:
            del moe.expert_reads


# ----------------------------------------------------------------------------- memory

def reset_peak_memory(device: str):
    """Starts a new peak for peak_memory_gb (the benchmark measures each phase on its own)."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    else:
        with contextlib.suppress(OSError):  # Linux: 5 resets the peak resident set size (VmHWM) to the current one
            Path("/proc/self/clear_refs").write_text("5")


def peak_memory_gb(device: str) -> float:
    """What the process held at its peak: the CUDA caching allocator's reserved memory, or the peak
    resident set size (Linux's VmHWM, which reset_peak_memory resets; elsewhere ru_maxrss)."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_reserved() / 1e9
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e9  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux reports KiB


def available_memory(device: str) -> Optional[int]:
    """Bytes that can be allocated on the device now without swapping: Linux's MemAvailable (elsewhere
    the physical memory) on a CPU, the free memory of a CUDA device; None where it cannot be told."""
    if torch.device(device).type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if torch.device(device).type != "cpu":
        return None
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # kB
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
