# A prompt's products on one Mixtral expert's shapes (x [M, 4096] times w1 [14336, 4096], and h [M, 14336]
# times w2 [4096, 14336]), with each CPU path on offer: PyTorch's bf16 matmul (AMX through oneDNN where
# the CPU has it), the path quantized prompts took before the prompt kernels (a full-precision copy of
# the weights, then PyTorch's matmul), torch's int8 kernels (_int_mm with activations rounded to int8 per
# token, _weight_int8pack_mm), and kernels/cpu_prompt.cpp for every instruction set the CPU runs, with
# AMX and without. Prints a markdown table of GFLOP/s (2 per multiply-add), the median of rounds that
# take every candidate in turn (a shared machine drifts; interleaving spreads the drift over all).
#
#   python scripts/bench_prompt.py                        # M = 128 (a 512-token prompt's share per expert) and 512
#   python scripts/bench_prompt.py --tokens 512 --threads 2 --runs 7
#   python scripts/bench_prompt.py --rounding             # the activations' rounding each path adds, against bf16's
#   python scripts/bench_prompt.py --prefill 512 --model Mixtral-8x7B-v0.1 --n_layer 2 --threads 2
#
# --prefill: whole prompts through a random model of each format (bf16, int8, int4), quantized ones with
# the prompt kernels and with the path before them (dispatch.prompt_kernel answering no), in alternating
# rounds on the same model: a ratio that a shared machine's drift disturbs less than separate runs.
import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from formats import Blocks, Int4, Int8  # noqa: E402
import layers  # noqa: E402
from kernels import cpu as cpu_kernels  # noqa: E402
from measuring import seconds  # noqa: E402
from scripts.bench_common import fmt, machine_name  # noqa: E402


def int_mm(x, t):
    """torch._int_mm with x rounded to int8 per token (its largest magnitude / 127), the weight's row
    scales and the tokens' applied to the int32 products."""
    scale = x.float().abs().amax(dim=-1, keepdim=True) / 127
    q = (x.float() / scale).round().to(torch.int8)
    return (torch._int_mm(q, t[""].T) * scale * t["scales"].float()).to(x.dtype)


def candidates(tokens: int, rows: int, cols: int) -> dict:
    """name -> callable, on x [tokens, cols] bf16 and random weights [rows, cols]."""
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(rows, cols, generator=g) / cols ** 0.5).to(torch.bfloat16)
    x = torch.randn(tokens, cols, generator=g).to(torch.bfloat16)
    stored = {name: (f, f.quantize(w)) for name, f in (("int8", Int8()), ("int4", Int4(32)), ("q4_k", Blocks("q4_k")),
                                                        ("q6_k", Blocks("q6_k")))}
    found = {"torch F.linear, bf16": lambda: F.linear(x, w)}
    for name, (fmt_, t) in stored.items():
        # What dispatch.py's 'prompt' path runs without the prompt kernels: a full-precision copy, then the matmul.
        found[f"dequantize + F.linear, {name}"] = lambda f=fmt_, t=t: layers.prompt_linear(f, x, t)
    t8 = stored["int8"][1]
    found["torch._int_mm, int8 (activations int8 per token)"] = lambda: int_mm(x, t8)
    found["torch _weight_int8pack_mm, int8"] = lambda: torch.ops.aten._weight_int8pack_mm(x, t8[""], t8["scales"])
    for isa in cpu_kernels.supported():
        ops = cpu_kernels.load(isa)
        with cpu_kernels.using(isa):
            paths = [True, False] if ops.prompt_use_amx(True) else [False]
            ops.prompt_use_amx(cpu_kernels.amx_wanted())
        for amx in paths:
            for name, (fmt_, t) in stored.items():
                def call(ops=ops, amx=amx, fmt_=fmt_, t=t):
                    ops.prompt_use_amx(amx)
                    return ops.prompt_linear(x, fmt_.kernel_weight(t), t.get("scales"), fmt_.name)
                found[f"kernels/cpu_prompt.cpp {isa}{' + AMX' if amx else ''}, {name}"] = call
    return found


def measure(args):
    print(f"- machine: {machine_name('cpu')}\n")
    print("| kernel | " + " | ".join(f"{m} x {k} by {n} x {k}" for m in args.tokens for n, k in args.shapes) + " |")
    print("| --- |" + " ---: |" * (len(args.tokens) * len(args.shapes)))
    results = {}
    with torch.no_grad():
        for m in args.tokens:
            for n, k in args.shapes:
                calls = candidates(m, n, k)
                times = {name: [] for name in calls}
                for call in calls.values():
                    call()  # warm-up (and builds)
                for _ in range(args.runs):
                    for name, call in calls.items():
                        times[name].append(seconds(call))
                for name, ts in times.items():
                    results.setdefault(name, []).append(2 * m * n * k / statistics.median(ts) / 1e9)
    for name, rates in results.items():
        print(f"| {name} | " + " | ".join(fmt(r) for r in rates) + " |", flush=True)
    for isa in cpu_kernels.supported():
        cpu_kernels.load(isa).prompt_use_amx(cpu_kernels.amx_wanted())


def rounding(args):
    """The relative error each way of rounding activations adds to x @ w.T, next to rounding x to bf16:
    Gaussian activations, and the same with a few channels 30 times larger (trained models' outliers,
    which set their blocks' scale)."""
    g = torch.Generator().manual_seed(0)
    K = 4096
    w = torch.randn(1024, K, generator=g, dtype=torch.float64) / K ** 0.5

    def blocks(x, size, top):
        b = x.unflatten(-1, (-1, size))
        step = b.abs().amax(dim=-1, keepdim=True) / top
        return ((b / step).round() * step).flatten(-2)

    ways = {"bf16": lambda x: x.to(torch.bfloat16).double()}
    for size in (32, 64, 128, K):
        ways[f"int8, blocks of {size}"] = lambda x, s=size: blocks(x, s, 127)
    for size in (64, 256, K):
        ways[f"int16, blocks of {size}"] = lambda x, s=size: blocks(x, s, 32767)
    print("| activations rounded to | error of x @ w.T, Gaussian x | with outlier channels | over bf16's (Gaussian / outliers) |")
    print("| --- | ---: | ---: | ---: |")
    x = torch.randn(256, K, generator=g, dtype=torch.float64)
    outliers = x.clone()
    outliers[:, torch.randint(0, K, (8,), generator=g)] *= 30
    exact = {"gauss": x @ w.T, "outliers": outliers @ w.T}
    errors = {name: [((way(v) @ w.T - exact[key]).norm() / exact[key].norm()).item()
                     for key, v in (("gauss", x), ("outliers", outliers))] for name, way in ways.items()}
    for name, (e, o) in errors.items():
        print(f"| {name} | {e:.2e} | {o:.2e} | {e / errors['bf16'][0]:.2f} / {o / errors['bf16'][1]:.2f} |")


def prefill(args):
    import dispatch
    from formats import parse_scheme
    from generation import prefill as prefill_step, sampling
    from scripts.bench_common import model_args, random_model
    config = model_args(args.model, args.n_layer)
    idx = torch.randint(0, config.vocab_size, (1, args.prefill), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(args.prefill)
    kernels = dispatch.prompt_kernel
    print(f"- machine: {machine_name('cpu')}; {args.model}, {config.n_layer} layers, prompt of {args.prefill} tokens\n")
    print("| weights | prompt tokens/s, prompt kernels | before them | ratio (median of rounds) |")
    print("| --- | ---: | ---: | ---: |")
    s = sampling(1, "cpu", temperature=0.8, top_k=200)
    for spec in ("full", "int8", "int4:g32:attn4", "q4_k_a6"):
        model = random_model(config, "cpu", torch.bfloat16, parse_scheme(spec))
        model.setup_caches(max_batch_size=1, max_seq_length=args.prefill)
        variants = {"new": kernels, "before": lambda *a: False} if spec != "full" else {"new": kernels}
        rates = {name: [] for name in variants}
        with torch.no_grad():
            for _ in range(args.runs + 1):  # the first round warms up
                for name, choice in variants.items():
                    dispatch.prompt_kernel = choice
                    rates[name].append(args.prefill / seconds(lambda: prefill_step(model, idx, pos, s)))
        dispatch.prompt_kernel = kernels
        new = statistics.median(rates["new"][1:])
        if spec == "full":
            print(f"| bf16 | {fmt(new)} | (unchanged) | |", flush=True)
        else:
            before = statistics.median(rates["before"][1:])
            ratio = statistics.median(a / b for a, b in zip(rates["new"][1:], rates["before"][1:]))
            print(f"| {spec.split(':')[0].replace('_a6', '_a6 (q4_k experts)')} | {fmt(new)} | {fmt(before)} | {ratio:.2f}x |", flush=True)
        del model


def main(argv=None):
    p = argparse.ArgumentParser(description="GFLOP/s of each CPU path for a prompt's products on one expert's shapes.")
    p.add_argument("--tokens", type=int, nargs="+", default=[128, 512], help="rows of x (a 512-token prompt gives each "
                   "of Mixtral's 8 experts 128 on average)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--runs", type=int, default=5, help="rounds over all candidates; the median is reported")
    p.add_argument("--rounding", action="store_true", help="print the activations' rounding errors instead")
    p.add_argument("--prefill", type=int, default=0, help="measure whole prompts of this many tokens instead")
    p.add_argument("--model", default="Mixtral-8x7B-v0.1", help="--prefill's shape (scripts/bench_common.py)")
    p.add_argument("--n_layer", type=int, default=2, help="--prefill's layers")
    args = p.parse_args(argv)
    args.shapes = [(14336, 4096), (4096, 14336)]  # w1 (and w3), w2
    if args.threads:
        torch.set_num_threads(args.threads)
    rounding(args) if args.rounding else prefill(args) if args.prefill else measure(args)


if __name__ == "__main__":
    main()
