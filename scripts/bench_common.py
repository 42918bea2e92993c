# What the benchmark scripts share: the benchmark shapes and their random-weight models, the memory-
# bandwidth probe and the limit it sets, the rounds of decode and prefill measurements and their table
# rows, and the machine's name. scripts/benchmark.py runs them; scripts/compare_hf.py,
# scripts/verify_decode.py and scripts/bench_kernels.py use them too.
import datetime
import os
import platform
import statistics
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import torch

from errors import UserError
from formats import FullPrecision, Scheme
from layers import quantize_module
from measuring import peak_memory_gb, reset_peak_memory, seconds
from model import ModelArgs, Transformer, transformer_configs

# Shapes for benchmarking only (model.py keeps the published ones). cpu-bench is Mixtral-shaped but
# small enough for a laptop-class CPU (its size is in BENCHMARKS.md).
BENCH_SHAPES = {
    "cpu-bench": dict(block_size=32768, vocab_size=32000, n_layer=8, n_head=16, dim=1024, intermediate_size=3584,
                      n_local_heads=4, head_dim=64, rope_base=1e6, norm_eps=1e-5, num_experts=8,
                      num_activated_experts=2),
    # Seconds to build and run: for testing the harness itself.
    "tiny": dict(block_size=4096, vocab_size=512, n_layer=2, n_head=4, dim=64, intermediate_size=128,
                 n_local_heads=2, head_dim=16, rope_base=1e6, norm_eps=1e-5, num_experts=4,
                 num_activated_experts=2),
}


def model_args(name: str, n_layer: Optional[int] = None) -> ModelArgs:
    if name in BENCH_SHAPES:
        config = ModelArgs(**BENCH_SHAPES[name])
    elif name in transformer_configs:
        config = ModelArgs.from_name(name)
    else:
        raise UserError(f"unknown model {name!r}; known: {', '.join([*BENCH_SHAPES, *transformer_configs])}")
    return replace(config, n_layer=n_layer) if n_layer else config


@torch.no_grad()
def random_model(config: ModelArgs, device: str, precision: torch.dtype,
                 scheme: Scheme = Scheme.of(FullPrecision()), seed: int = 0) -> Transformer:
    """Random weights made in place on the device, one block at a time (no checkpoint, no download),
    then stored in `scheme` as generate.py would load it (layers.py). Each block is
    converted as soon as it exists, so that the full-precision model never has to fit in memory next to
    a quantized one."""
    with torch.device("meta"):
        model = Transformer(config).to(precision)
    torch.manual_seed(seed)
    for module in [model.tok_embeddings, *model.layers, model.norm, model.output]:
        module.to_empty(device=device)
        for p in module.parameters():
            if p.dim() == 1:  # norm weights
                p.fill_(1.0)
            elif module is model.tok_embeddings:
                p.normal_(0.0, 1.0)
            else:  # 1/sqrt(fan_in) keeps activations O(1) through the layers
                p.normal_(0.0, p.shape[-1] ** -0.5)
        if module in model.layers:
            quantize_module(module, config, scheme, layer=list(model.layers).index(module))
    quantize_module(model, config, scheme)  # the output head; blocks already done are kept
    return model.eval()


# ----------------------------------------------------------------------------- the bandwidth limit

def limit_tokens_per_s(bandwidth: float, weight_bytes: int) -> float:
    """The memory-bandwidth limit of batch-1 decode: every active weight byte read once per token."""
    return bandwidth / weight_bytes


def fraction_of_limit(tokens_per_s: float, weight_bytes: int, bandwidth: float) -> float:
    """Achieved bandwidth (active bytes x tokens/s) over the measured bandwidth."""
    return tokens_per_s / limit_tokens_per_s(bandwidth, weight_bytes)


class Bandwidth:
    """Memory bandwidth of the device, from a buffer far larger than any cache: a full read (sum) and a
    copy of one half into the other (read + write, both counted). Decoding reads its weights, so the
    limit is the read probe's; the copy is printed beside it. Each probe is the median of several
    passes: on a shared VM the best of a few passes swings with the odd burst from run to run, the
    median much less. The buffer exists only while a probe runs, so that it never counts in another
    measurement's peak memory."""

    def __init__(self, device: str, nbytes: Optional[int] = None):
        self.device = device
        self.nbytes = nbytes or (4 << 30 if device.startswith("cuda") else 1 << 30)
        self.read, self.copy = [], []
        self.measure(rounds=1)  # warm-up, not recorded
        self.read.clear(), self.copy.clear()

    def measure(self, rounds: int = 5) -> float:
        """Median of `rounds` passes of each probe, recorded; returns this measurement's read bandwidth in
        bytes/s."""
        # float32 (ones: every page touched before timing): the probe measures memory, not bf16 arithmetic.
        buf = torch.ones(self.nbytes // 4, dtype=torch.float32, device=self.device)
        src, dst = buf.chunk(2)
        read = self.nbytes / statistics.median(seconds(buf.sum, self.device) for _ in range(rounds))
        copy = 2 * src.numel() * 4 / statistics.median(seconds(lambda: dst.copy_(src), self.device)
                                                       for _ in range(rounds))
        del buf, src, dst
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()
        self.read.append(read)
        self.copy.append(copy)
        return read


# ----------------------------------------------------------------------------- rounds of measurements

@dataclass
class Row:
    engine: str
    phase: str
    tokens: str
    tokens_per_s: list = field(default_factory=list)
    fractions: list = field(default_factory=list)  # of the bandwidth limit, per round (decode only)
    gb_per_s: Optional[float] = None
    gb_per_step: Optional[float] = None  # weights a decode step reads
    gflop_per_s: Optional[float] = None  # prefill only
    peak_gb: Optional[float] = None
    speedups: list = field(default_factory=list)  # this repo / this row, per alternating round

    @property
    def median_tps(self) -> float:
        return statistics.median(self.tokens_per_s)


@dataclass
class Bench:
    """What every measurement of a run shares: where, how many rounds, the bandwidth probe that precedes
    each decode round, and the random prompts' vocabulary and generator."""
    device: str
    runs: int
    bandwidth: Bandwidth
    vocab: int
    generator: torch.Generator


@dataclass
class Decode:
    """What a decode row measures: a batch of `batch` prompts of prompt_len tokens (ragged: prompt_len,
    prompt_len + 1, ..., so that every sequence decodes at its own positions), each given new_tokens."""
    prompt_len: int
    new_tokens: int
    batch: int = 1
    ragged: bool = False

    def lengths(self) -> list:
        return [self.prompt_len + (b if self.ragged else 0) for b in range(self.batch)]

    def label(self) -> str:
        lengths = self.lengths()
        tokens = f"{self.prompt_len}" if len(set(lengths)) == 1 else f"{lengths[0]}..{lengths[-1]}"
        return f"{tokens} + {self.new_tokens}" + (f", batch {self.batch}" if self.batch > 1 else "")


def random_prompts(lengths: list, vocab: int, generator: torch.Generator, device: str) -> list:
    return [torch.randint(0, vocab, (n,), generator=generator).to(device=device, dtype=torch.int) for n in lengths]


def decode_rounds(decode_seconds: Callable, decode: Decode, weight_bytes, engine: str, bench: Bench) -> Row:
    """Decode tokens/s, summed over the batch of random prompts. decode_seconds(prompts: list of [T_b] int)
    runs the prompts and new_tokens - 1 decode steps after them, and returns the seconds those steps took
    (prefill excluded). weight_bytes: the bytes a step reads, or a function giving those of the run just
    done. Each round is preceded by a bandwidth probe, for its fraction of the limit."""
    row = Row(engine, "decode", decode.label())
    step_bytes = []
    for r in range(bench.runs):
        bw = bench.bandwidth.measure()
        reset_peak_memory(bench.device)
        prompts = random_prompts(decode.lengths(), bench.vocab, bench.generator, bench.device)
        steps_per_s = (decode.new_tokens - 1) / decode_seconds(prompts)
        step_bytes.append(weight_bytes() if callable(weight_bytes) else weight_bytes)
        row.tokens_per_s.append(steps_per_s * decode.batch)
        row.fractions.append(fraction_of_limit(steps_per_s, step_bytes[-1], bw))
        row.peak_gb = max(row.peak_gb or 0.0, peak_memory_gb(bench.device))
    row.gb_per_step = statistics.median(step_bytes) / 1e9
    row.gb_per_s = row.median_tps / decode.batch * row.gb_per_step
    return row


@torch.no_grad()
def prefill_rounds(fn: Callable, length: int, engine: str, bench: Bench) -> Row:
    """Prompt tokens/s of one forward over `length` tokens; fn(idx [1, T]) -> anything."""
    row = Row(engine, "prefill", str(length))
    idx = torch.randint(0, bench.vocab, (1, length), generator=bench.generator).to(bench.device)
    fn(idx)  # warm-up (and compilation for a compiled prefill)
    reset_peak_memory(bench.device)
    for _ in range(bench.runs):
        row.tokens_per_s.append(length / seconds(lambda: fn(idx), bench.device))
    row.peak_gb = peak_memory_gb(bench.device)
    return row


# ----------------------------------------------------------------------------- the table

def machine_name(device: str) -> str:
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device))
        mem = torch.cuda.get_device_properties(torch.device(device)).total_memory / 2**30
        hw = f"{name} ({mem:.0f} GiB)"
    else:
        cpu = platform.processor() or "unknown CPU"
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        hw = f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    return f"{hw}; torch {torch.__version__}; {datetime.date.today().isoformat()}"


def fmt(value: float) -> str:
    """Three significant figures or more: tiny test shapes give tiny numbers that must not print as 0."""
    return f"{value:.1f}" if value >= 100 else f"{value:.2f}" if value >= 1 else f"{value:.3g}"
