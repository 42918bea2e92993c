# One matrix times one vector, the whole of a decode step's work, with each CPU kernel on offer: PyTorch's
# own (F.linear, its int8 kernel, fbgemm's dynamic int8 linear) and this repo's (kernels/cpu.cpp, built for
# every instruction set the CPU runs). Prints a markdown table of the weight bytes each reads per second.
# Several matrices of the given shape are cycled through, more bytes than any cache holds, so every
# product reads its weights from memory.
#
#   python scripts/bench_kernels.py                      # 14336 x 4096: one Mixtral expert's w1
#   python scripts/bench_kernels.py --rows 32000 --cols 1024 --threads 1
import argparse
import statistics
import sys
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


def candidates(rows: int, cols: int, copies: int) -> dict:
    """name -> (bytes of weights one call reads, [callables, one per copy of the weights])."""
    g = torch.Generator().manual_seed(0)
    full = [torch.randn(rows, cols, generator=g) / cols ** 0.5 for _ in range(copies)]
    bf16 = [w.to(torch.bfloat16) for w in full]
    int8 = [parse_format("int8").quantize(w) for w in bf16]
    x = torch.randn(1, cols, generator=g).to(torch.bfloat16)
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
    # This repo's kernels, built for each instruction set the CPU runs (the first is the default).
    int4 = [parse_format("int4:g32").quantize(w) for w in bf16] if parse_format("int4:g32").row_problem(cols) is None else []
    for isa in cpu_kernels.supported() if cpu_kernels.available() else []:
        kernels = cpu_kernels.load(isa)
        found[f"kernels/cpu.cpp {isa}, bf16"] = (rows * cols * 2, [lambda w=w, k=kernels: k.linear(x, w, None) for w in bf16])
        found[f"kernels/cpu.cpp {isa}, int8"] = (rows * cols, [
            lambda t=t, k=kernels: k.linear(x, t[""], t["scales"]) for t in int8])
        if int4:  # whole groups of 32; the scales count in the bytes read
            found[f"kernels/cpu.cpp {isa}, int4:g32"] = (sum(v.nbytes for v in int4[0].values()), [
                lambda t=t, k=kernels: k.linear(x, t[""], t["scales"]) for t in int4])
    return found


def main(argv=None):
    p = argparse.ArgumentParser(description="GB/s of weights read by each CPU matrix-vector kernel.",
                                formatter_class=HelpFormatter)
    p.add_argument("--rows", type=int, default=14336, help="output rows of the weight (Mixtral's expert width)")
    p.add_argument("--cols", type=int, default=4096, help="inputs of the weight (Mixtral's model width)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's, the physical cores)")
    p.add_argument("--runs", type=int, default=5, help="passes over all copies; the median is reported")
    p.add_argument("--mb", type=int, default=1024, help="bf16 megabytes of weights cycled through (beyond any cache)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    copies = max(2, (args.mb << 20) // (args.rows * args.cols * 2))
    bandwidth = Bandwidth("cpu")
    print(f"- machine: {machine_name('cpu')}")
    print(f"- {copies} matrices of {args.rows} x {args.cols} cycled; memory read {bandwidth.measure() / 1e9:.1f} GB/s "
          f"(the benchmark's probe)\n")
    print("| kernel | GB/s of weights | G weights/s |")
    print("| --- | ---: | ---: |")
    with torch.no_grad():
        for name, (nbytes, calls) in candidates(args.rows, args.cols, copies).items():
            calls[0]()  # warm-up

            def every_copy():
                for call in calls:
                    call()
            rate = statistics.median(nbytes * len(calls) / seconds(every_copy) for _ in range(args.runs))
            weights = rate * args.rows * args.cols / nbytes
            print(f"| {name} | {fmt(rate / 1e9)} | {fmt(weights / 1e9)} |", flush=True)


if __name__ == "__main__":
    main()
