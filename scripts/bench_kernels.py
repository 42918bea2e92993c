# One matrix times one vector, the whole of a decode step's work, with each CPU kernel on offer: PyTorch's
# own (F.linear, its int8 kernel, fbgemm's dynamic int8 linear) and this repo's (kernels/cpu.cpp, built for
# every instruction set the CPU runs, in every weight format it takes). Prints a markdown table of the
# weight bytes each reads per second. Several matrices of the given shape are cycled through, more bytes
# than any cache holds, so every product reads its weights from memory.
#
# --moe measures the mixture of experts instead: one token through a layer of Mixtral's experts (8 of
# 14336 x 4096, top 2), each call choosing another pair, so that the weights read are the chosen
# experts' w1, w3 and w2, from memory.
#
#   python scripts/bench_kernels.py                      # 14336 x 4096: one Mixtral expert's w1
#   python scripts/bench_kernels.py --rows 32000 --cols 1024 --threads 1
#   python scripts/bench_kernels.py --moe --isa avx2 --formats int4 q4_k
#   python scripts/bench_kernels.py --no-torch --threads 1 --rows 512 --cols 4096 --mb 8 --cpu-time  # in cache
import argparse
import itertools
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cli import HelpFormatter  # noqa: E402
from formats import parse_format  # noqa: E402
from kernels import cpu as cpu_kernels  # noqa: E402
from measuring import seconds  # noqa: E402
from scripts.bench_common import Bandwidth, fmt, machine_name  # noqa: E402

# GGUF's block formats: (values, bytes) per block and where its fp16 d and dmin lie (ggml-common.h).
GGUF = {"q8_0": (32, 34, (0,)), "q4_0": (32, 18, (0,)), "q4_k": (256, 144, (0, 2)), "q5_k": (256, 176, (0, 2)),
        "q6_k": (256, 210, (208,))}
FORMAT_NAMES = ["bf16", "int8", "int4", *GGUF]
LABELS = {"int4": "int4:g32"}  # scales count in the bytes read, in every format


def gguf_blocks(name: str, shape: tuple, g) -> torch.Tensor:
    """Random blocks of GGUF format `name` for weights of `shape` [..., rows, cols]: random bytes with
    small finite scales (the kernels' speed does not depend on the values)."""
    values, nbytes, scales_at = GGUF[name]
    *rows, cols = shape
    blocks = torch.randint(0, 256, (*rows, cols // values, nbytes), dtype=torch.uint8, generator=g)
    for at in scales_at:
        blocks[..., at:at + 2] = torch.tensor([1e-3], dtype=torch.float16).view(torch.uint8)
    return blocks.flatten(-2)


def stored(name: str, shape: tuple, g) -> tuple:
    """Weights of `shape` in format `name`, random: (weight, scales or None, the kernels' format name)."""
    *rows, cols = shape
    if name == "bf16":
        return torch.randn(shape, generator=g).to(torch.bfloat16) / cols ** 0.5, None, "full"
    if name == "int8":
        return (torch.randint(-127, 128, shape, dtype=torch.int8, generator=g),
                (torch.rand(rows, generator=g) / 100).to(torch.bfloat16), "int8")
    if name == "int4":  # groups of 32
        return (torch.randint(0, 256, (*rows, cols // 2), dtype=torch.uint8, generator=g),
                (torch.rand(*rows, cols // 32, generator=g) / 100).to(torch.bfloat16), "int4")
    return gguf_blocks(name, shape, g), None, name


def thread_seconds(fn) -> float:
    """The CPU seconds this thread spends in fn()."""
    start = time.thread_time()
    fn()
    return time.thread_time() - start


def nbytes(t: tuple) -> int:
    return sum(x.nbytes for x in t[:2] if x is not None)


def torch_candidates(rows: int, cols: int, copies: int, x: torch.Tensor) -> dict:
    """PyTorch's own kernels: name -> (bytes of weights one call reads, [callables, one per copy])."""
    g = torch.Generator().manual_seed(0)
    full = [torch.randn(rows, cols, generator=g) / cols ** 0.5 for _ in range(copies)]
    bf16 = [w.to(torch.bfloat16) for w in full]
    int8 = [parse_format("int8").quantize(w) for w in bf16]
    found = {"torch F.linear, bf16": (rows * cols * 2, [lambda w=w: F.linear(x, w) for w in bf16])}
    if cols % 16 == 0:  # otherwise its bf16 path returns inf and nan, or crashes
        found["torch _weight_int8pack_mm"] = (rows * cols, [
            lambda t=t: torch.ops.aten._weight_int8pack_mm(x, t[""], t["scales"]) for t in int8])
    with warnings.catch_warnings():  # torch marks fbgemm's Python-side quantization deprecated
        warnings.simplefilter("ignore")
        try:
            packed = [torch.ops.quantized.linear_prepack(
                torch.quantize_per_channel(w, (t["scales"].float()), torch.zeros(rows, dtype=torch.long), 0, torch.qint8),
                None) for w, t in zip(full, int8)]
            xf = x.float()
            found["torch fbgemm linear_dynamic, int8"] = (rows * cols, [
                lambda p=p: torch.ops.quantized.linear_dynamic(xf, p) for p in packed])
        except (RuntimeError, AttributeError) as e:
            print(f"fbgemm unavailable here: {e}", file=sys.stderr)
    return found


def fits(name: str, rows: int, cols: int) -> bool:
    """Whether a format stores rows of `cols` values (whole groups or blocks)."""
    return cols % {"int4": 32, **{k: v[0] for k, v in GGUF.items()}}.get(name, 1) == 0


def linear_candidates(rows: int, cols: int, copies: int, x: torch.Tensor, isas: list, names: list):
    """This repo's linear in each format and instruction set: yields (name, bytes one call reads, callables)."""
    g = torch.Generator().manual_seed(0)
    for name in names:
        if not fits(name, rows, cols):
            continue
        weights = [stored(name, (rows, cols), g) for _ in range(copies)]  # made once for every set
        for isa in isas:
            kernels = cpu_kernels.load(isa)
            yield f"kernels/cpu.cpp {isa}, {LABELS.get(name, name)}", nbytes(weights[0]), [
                lambda t=t, k=kernels: k.linear(x, *t) for t in weights]


# Mixtral 8x7B's experts: E of them, w1 and w3 [I, D], w2 [D, I]; each token chooses 2.
E, D, I = 8, 4096, 14336


def moe_candidates(x: torch.Tensor, isas: list, names: list):
    """This repo's moe, one token, in each format and instruction set: yields (name, bytes of the two chosen
    experts' weights, callables). Each callable chooses another pair, all 8 experts in 4 calls."""
    g = torch.Generator().manual_seed(0)
    pairs = [torch.tensor([[2 * i, 2 * i + 1]]) for i in range(E // 2)]
    routing = torch.tensor([[0.5, 0.5]], dtype=x.dtype)
    for name in names:
        if name == "bf16":  # 2.8 GB of experts: left out here
            continue
        w1, w3, w2 = stored(name, (E, I, D), g), stored(name, (E, I, D), g), stored(name, (E, D, I), g)
        chosen = 2 * sum(nbytes(w) for w in (w1, w3, w2)) // E
        for isa in isas:
            kernels = cpu_kernels.load(isa)
            yield f"kernels/cpu.cpp {isa}, {LABELS.get(name, name)}", chosen, [
                lambda p=p, k=kernels: k.moe(x, p, routing, w1[0], w3[0], w2[0], w1[1], w3[1], w2[1], w1[2])
                for p in pairs]
        del w1, w3, w2


def main(argv=None):
    p = argparse.ArgumentParser(description="GB/s of weights read by each CPU matrix-vector kernel.",
                                formatter_class=HelpFormatter)
    p.add_argument("--rows", type=int, default=14336, help="output rows of the weight (Mixtral's expert width)")
    p.add_argument("--cols", type=int, default=4096, help="inputs of the weight (Mixtral's model width)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's, the physical cores)")
    p.add_argument("--runs", type=int, default=5, help="passes over all copies; the median is reported")
    p.add_argument("--mb", type=int, default=1024, help="bf16 megabytes of weights cycled through (beyond any cache)")
    p.add_argument("--moe", action="store_true", help="one token through a layer of Mixtral's experts instead")
    p.add_argument("--isa", nargs="+", default=None, help="this repo's kernels for these instruction sets only")
    p.add_argument("--formats", nargs="+", default=FORMAT_NAMES, choices=FORMAT_NAMES, help="this repo's kernels in these only")
    p.add_argument("--no-torch", action="store_true", help="leave out PyTorch's kernels")
    p.add_argument("--cpu-time", action="store_true",
                   help="time by this thread's CPU time (with --threads 1 the kernels run in it): on a shared "
                        "machine other processes' turns do not count. For weights that stay in cache (small "
                        "--rows, --mb), to see what the arithmetic allows")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_time and torch.get_num_threads() != 1:
        p.error("--cpu-time measures this thread alone: add --threads 1")
    timed = thread_seconds if args.cpu_time else seconds
    isas = [i for i in cpu_kernels.supported() if args.isa is None or i in args.isa] if cpu_kernels.available() else []
    copies = max(2, (args.mb << 20) // (args.rows * args.cols * 2))
    bandwidth = Bandwidth("cpu")
    print(f"- machine: {machine_name('cpu')}, {torch.get_num_threads()} threads"
          f"{'; timed in this thread CPU time' if args.cpu_time else ''}")
    shape = (f"one token through {E} experts of {I} x {D} (2 chosen)" if args.moe else
             f"{copies} matrices of {args.rows} x {args.cols} cycled")
    print(f"- {shape}; memory read {bandwidth.measure() / 1e9:.1f} GB/s (the benchmark's probe)\n")
    print("| kernel | GB/s of weights | G weights/s |")
    print("| --- | ---: | ---: |")
    x = torch.randn(1, D if args.moe else args.cols, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    values = 2 * 3 * I * D if args.moe else args.rows * args.cols  # weights one call reads
    # Made as they are measured, one format at a time (all at once would not fit a small machine's memory).
    if args.moe:
        found = moe_candidates(x, isas, args.formats)
    else:
        torch_ones = {} if args.no_torch else torch_candidates(args.rows, args.cols, copies, x)
        found = itertools.chain(((name, n, calls) for name, (n, calls) in torch_ones.items()),
                                linear_candidates(args.rows, args.cols, copies, x, isas, args.formats))
    with torch.no_grad():
        for name, nbytes_read, calls in found:
            calls[0]()  # warm-up

            def every_copy():
                for call in calls:
                    call()
            rate = statistics.median(nbytes_read * len(calls) / timed(every_copy) for _ in range(args.runs))
            print(f"| {name} | {fmt(rate / 1e9)} | {fmt(rate / nbytes_read * values / 1e9)} |", flush=True)


if __name__ == "__main__":
    main()
