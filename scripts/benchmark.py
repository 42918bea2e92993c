# Benchmarks Mixtral decode and prefill against the machine's memory bandwidth.
#
# At batch 1 a decoded token reads every weight it uses once: the attention weights, the K active
# experts of each layer and the output head (measuring.active_weight_bytes). Those bytes over the
# memory bandwidth measured in the same run give the limit, in tokens/s; decode is reported as a
# fraction of it. A decode step of a batch (--batch_sizes) reads each expert that any of its tokens
# chose once: the distinct experts are counted on the device (measuring.counting_expert_reads), and its
# fraction is of the limit for the bytes its steps read. The machine is shared and noisy, so bandwidth
# and decode are measured in alternating rounds and each fraction is the median of per-round ratios.
# The probe, the rounds and the shapes are in scripts/bench_common.py; --compare-hf's transformers rows
# come from scripts/compare_hf.py, --verify's check from scripts/verify_decode.py.
#
#   python scripts/benchmark.py --model cpu-bench --compile                  # random weights, no checkpoint
#   python scripts/benchmark.py --model cpu-bench --compile --batch_sizes 1 2 4 8 --prefill_lengths
#   python scripts/benchmark.py --model Mixtral-8x7B-v0.1 --n_layer 16 --device cuda --compile
#   python scripts/benchmark.py --model Mixtral-8x7B-v0.1 --n_layer 16 --device cuda --compile --triton
#   python scripts/benchmark.py --model cpu-bench --format int4:g32 --compile --profile   # where a step's time goes
#   python scripts/benchmark.py --checkpoint_path checkpoints/x/model.pth --compare-hf
import argparse
import contextlib
import gc
import os
import statistics
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from checkpoint import load_model, open_checkpoint  # noqa: E402
from cli import PRECISIONS, HelpFormatter, check_device, one_line_errors  # noqa: E402
from dispatch import TRITON_VARIABLE  # noqa: E402
from errors import UserError  # noqa: E402
from formats import Int4, Scheme, parse_scheme  # noqa: E402
from generation import Settings, compile_steps, round_up  # noqa: E402
from layers import model_scheme, quantize_module  # noqa: E402
from measuring import Timer, active_weight_bytes, available_memory, counting_expert_reads, seconds  # noqa: E402
from model import ModelArgs, kv_cache_bytes, transformer_configs  # noqa: E402
from writing import readable_size  # noqa: E402
from scripts import verify_decode  # noqa: E402
from scripts.bench_common import (BENCH_SHAPES, Bandwidth, Bench, Decode, decode_rounds, fmt,  # noqa: E402
                                  limit_tokens_per_s, machine_name, model_args, prefill_rounds, random_model,
                                  random_prompts)
from scripts.compare_hf import compare_hf  # noqa: E402
from scripts.make_tiny_checkpoint import write_random_checkpoint  # noqa: E402


def prefill_flops(c: ModelArgs, length: int) -> float:
    """Floating-point operations (2 per multiply-add) of one forward over a prompt of `length` tokens:
    each token through wqkv, wo, the router, its K experts and the output head, and causal attention
    (query i meets i keys, in q @ k.T and in scores @ v)."""
    weights_per_token = c.n_layer * (c.dim * (c.n_head + 2 * c.n_local_heads) * c.head_dim + c.n_head * c.head_dim * c.dim
                                     + c.dim * c.num_experts
                                     + c.num_activated_experts * 3 * c.dim * c.intermediate_size) + c.dim * c.vocab_size
    attention = c.n_layer * c.n_head * 2 * (2 * c.head_dim) * length * (length + 1) / 2
    return 2.0 * weights_per_token * length + attention


@torch.no_grad()
def matmul_gflops(device: str, c: ModelArgs, tokens: int = 512, rounds: int = 3) -> float:
    """The float32 rate of a prompt-sized matmul, [tokens, D] @ [D, I], best of `rounds`: what prefill's
    GFLOP/s is compared with."""
    a = torch.randn(tokens, c.dim, device=device)
    b = torch.randn(c.dim, c.intermediate_size, device=device)
    a @ b  # warm-up
    return 2 * tokens * c.dim * c.intermediate_size / min(seconds(lambda: a @ b, device) for _ in range(rounds)) / 1e9


def parameter_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def chosen_scheme(args) -> Scheme:
    """The scheme --format (or the older --int8, --int4 --groupsize: int4 everywhere) asks the weights to be
    quantized to in memory, as quantize.py would write it (full: as they are)."""
    if args.format is not None and (args.int8 or args.int4):
        raise UserError("--format names the format: drop --int8 / --int4")
    spec = args.format or (f"int4:g{args.groupsize}:attn4" if args.int4 else "int8" if args.int8 else "full")
    return parse_scheme(spec, target_config(args))  # a preset (q4_k_m) places its formats by the layer count


def target_config(args) -> ModelArgs:
    """The shape benchmarked: the checkpoint's, or the named shape's."""
    if args.checkpoint_path is not None:
        return open_checkpoint(args.checkpoint_path).config
    return model_args(args.model, args.n_layer)


@dataclass
class Summary:
    """The run's figures that head the table."""
    name: str  # the checkpoint, or the named shape with random weights
    kind: str  # the weight format, or the precision
    weight_bytes: int  # what a batch-1 decode step reads
    total_bytes: int
    compile_s: Optional[float]  # the first decode warm-up (compilation included)
    matmul_gflop_per_s: Optional[float]  # with prefill rows only


def run(args) -> list:
    device, precision = args.device, PRECISIONS[args.precision]
    scheme = chosen_scheme(args)
    generator = torch.Generator().manual_seed(args.seed)
    with Timer(device) as building:
        if args.checkpoint_path is not None:
            model = load_model(open_checkpoint(args.checkpoint_path), device, precision)
            if scheme.quantized:  # refused, in one line, if the checkpoint is quantized already
                quantize_module(model, model.config, scheme)
            name = str(args.checkpoint_path)
        else:
            model = random_model(model_args(args.model, args.n_layer), device, precision, scheme, seed=args.seed)
            name = f"{args.model} (random weights)"
    config = model.config
    weight_bytes = active_weight_bytes(model)
    total_bytes = parameter_bytes(model)
    stored = model_scheme(model)  # a quantized checkpoint says its own formats
    kind = stored.spec if stored.quantized else args.precision
    print(f"model: {name}, {config.n_layer} layers, dim {config.dim}, {config.num_experts} experts top-"
          f"{config.num_activated_experts}, {kind}; weights {total_bytes / 1e9:.2f} GB, "
          f"{weight_bytes / 1e9:.3g} GB read per decoded token; built/loaded in {building.seconds:.1f} s", flush=True)

    bench = Bench(device, args.runs, Bandwidth(device, args.probe_mb and args.probe_mb << 20), config.vocab_size,
                  generator)
    prefill_fn, decode_fn = compile_steps(device, args.compile, args.compile_prefill)
    settings = Settings(device, args.max_new_tokens, temperature=0.8, top_k=200, prefill_fn=prefill_fn,
                        decode_fn=decode_fn)
    del decode_fn  # settings holds it, and lets go of it (and of its CUDA graphs) before transformers loads

    def ours(length):  # this repo's prefill of `length` tokens
        return lambda idx: prefill_fn(model, idx, torch.arange(length, device=device), settings.sampling(idx.size(0)))

    rows, compile_s = [], None
    # The steps are compiled and run while counting, from the first decode round to the last measurement.
    with counting_expert_reads(model) if max(args.batch_sizes) > 1 else contextlib.nullcontext() as counts:
        if args.decode_prompts:
            decode, compile_s = decode_rows(args, model, settings, counts, weight_bytes, bench)
            rows += decode
            if args.profile:
                profile_decode(args, model, settings, bench)
        if args.prefill_lengths:
            rows += prefill_rows(args, model, ours, bench)
        if args.compare_hf:
            settings.decode_fn = None
            gc.collect()
            rows += compare_hf(args, precision, bench, weight_bytes, {length: ours(length) for length in args.prefill_lengths})

    if not bench.bandwidth.read:  # prefill only: probe once
        bench.bandwidth.measure()
    matmul = matmul_gflops(device, config) if args.prefill_lengths else None
    print_table(args, Summary(name, kind, weight_bytes, total_bytes, compile_s, matmul), rows, bench.bandwidth)
    return rows


def decode_rows(args, model, settings: Settings, counts, weight_bytes: int, bench: Bench) -> tuple:
    """(a decode row per prompt length and batch size, the seconds of the first warm-up: compilation). counts:
    the experts the steps read (an ExpertReads), None when every batch is of one."""
    engine = "this repo" + (" (compiled)" if args.compile else "") + triton_label(bench.device)
    # One cache size for every prompt, so the compiled step is traced once per batch size.
    decode_len = round_up(max(args.decode_prompts) + max(args.batch_sizes) + args.max_new_tokens)
    with torch.device(bench.device):
        model.setup_caches(max_batch_size=max(args.batch_sizes), max_seq_length=min(decode_len, model.config.block_size))
    rows, compile_s = [], None
    for prompt_len in args.decode_prompts:
        for batch in args.batch_sizes:
            decode = Decode(prompt_len, args.max_new_tokens, batch, args.ragged)
            # Warm-up: compiles the decode step on the first prompt (timed), settles caches on the others.
            with Timer(bench.device) as warm_up:
                prompts = random_prompts(decode.lengths(), bench.vocab, bench.generator, bench.device)
                replace(settings, max_new_tokens=min(args.max_new_tokens, 8)).generate_batch(model, prompts)
            if compile_s is None:
                compile_s = warm_up.seconds
            step_bytes = weight_bytes
            if batch > 1:  # the distinct experts the run's decode steps chose, per layer and step
                def step_bytes(batch=batch):
                    return counts.step_bytes(model, batch, args.max_new_tokens - 1)[0]
            on_decode = None if counts is None else counts.reset
            row = decode_rounds(generate_decode_seconds(model, settings, on_decode), decode, step_bytes, engine, bench)
            rows.append(row)
            print(f"decode {row.tokens}: {row.median_tps:.2f} tokens/s", flush=True)
    return rows, compile_s


def profile_decode(args, model, settings: Settings, bench: Bench, top: int = 12):
    """Prints where a decode step's time goes: the decode steps of one more run at batch 1 (the first prompt
    length) under torch.profiler, each op's self time (its own, not its callees') per step, the largest first. The
    hand-written kernels are ops of their own (mixtral_cpu_<set>::moe, ::linear); a compiled step's fused
    PyTorch code shows as its generated kernels; what is left of the step is Python and dispatch."""
    prompts = random_prompts([args.decode_prompts[0]], bench.vocab, bench.generator, bench.device)
    prof, timer = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]), Timer(bench.device)

    def on_token(seqs):  # the prefill's token: the decode steps start now
        if timer.began is None:
            timer.start()
            prof.start()
    settings.generate_batch(model, prompts, on_token)
    prof.stop()
    steps = args.max_new_tokens - 1
    step_ms = timer.stop() * 1e3 / steps
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    print(f"\n- profile of one run at batch 1 (prompt {args.decode_prompts[0]}, {args.max_new_tokens} new tokens, "
          f"profiled: {step_ms:.2f} ms a step); self time per decode step\n")
    print("| op | calls a step | ms a step | share of the step |")
    print("| --- | ---: | ---: | ---: |")
    for e in events[:top]:
        ms = e.self_cpu_time_total / 1e3 / steps
        print(f"| {e.key[:70]} | {e.count / steps:.1f} | {ms:.3f} | {ms / step_ms:.1%} |")
    rest = sum(e.self_cpu_time_total for e in events[top:]) / 1e3 / steps
    print(f"| (the other {len(events) - top} ops) | | {rest:.3f} | {rest / step_ms:.1%} |", flush=True)


def generate_decode_seconds(model, settings: Settings, on_decode=None):
    """decode_rounds' timer for this repo: generate_batch(), timed from its first new tokens (prefill done),
    when on_decode() is called too."""
    def decode_seconds(prompts):
        timer = Timer(settings.device)

        def on_token(seqs):
            if timer.began is None:  # the prefill's tokens: decoding starts now
                if on_decode is not None:
                    on_decode()
                timer.start()

        settings.generate_batch(model, prompts, on_token)
        return timer.stop()
    return decode_seconds


def prefill_rows(args, model, ours, bench: Bench) -> list:
    """A prefill row per prompt length: plain forwards over the prompt, the cache grown to hold the longest.
    ours(length): this repo's prefill of that many tokens."""
    config = model.config
    with torch.device(bench.device):
        model.setup_caches(max_batch_size=1,
                           max_seq_length=min(round_up(max(args.prefill_lengths) + 1), config.block_size))
    rows = []
    for length in args.prefill_lengths:
        row = prefill_rounds(ours(length), length, "this repo" + (" (compiled)" if args.compile_prefill else ""), bench)
        row.gflop_per_s = row.median_tps / length * prefill_flops(config, length) / 1e9
        rows.append(row)
        print(f"prefill {length}: {row.median_tps:.1f} tokens/s", flush=True)
    return rows


def triton_label(device: str) -> str:
    """The decode path's kernels, where MIXTRAL_TRITON (or --triton) chose kernels/triton_moe.py's."""
    value = os.environ.get(TRITON_VARIABLE, "")
    return f", {TRITON_VARIABLE}={value}" if device.startswith("cuda") and value not in ("", "0") else ""


def use_triton(device: str):
    """--triton: MIXTRAL_TRITON=1 for this process, before anything is compiled. On another device the
    run goes on, on that device's own kernels, and says so (scripts/gpu_check.sh's CPU rehearsal)."""
    if device.startswith("cuda"):
        os.environ[TRITON_VARIABLE] = "1"
    else:
        print(f"note: --triton: the Triton kernels run on CUDA only; measuring {device}'s own kernels",
              file=sys.stderr, flush=True)


def print_table(args, summary: Summary, rows: list, bandwidth: Bandwidth):
    bw_read, bw_copy = statistics.median(bandwidth.read), statistics.median(bandwidth.copy)
    limit = limit_tokens_per_s(bw_read, summary.weight_bytes)  # decoding reads: the read probe's bandwidth
    print()
    print(f"### Mixtral benchmark: {summary.name}, {summary.kind}, batch {', '.join(map(str, args.batch_sizes))}")
    print()
    print(f"- machine: {machine_name(args.device)}")
    print(f"- memory bandwidth, same run (median of {len(bandwidth.read)} probes, each the median of 5 passes): "
          f"read {bw_read / 1e9:.1f} GB/s (copy {bw_copy / 1e9:.1f} GB/s); limit = read {bw_read / 1e9:.1f} GB/s / "
          f"{summary.weight_bytes / 1e9:.3g} GB per token = {fmt(limit)} tokens/s")
    compiled = ("decode" if args.compile else "none") + (" + prefill" if args.compile_prefill else "")
    warm = f"{summary.compile_s:.1f} s" if summary.compile_s is not None else "-"
    print(f"- weights {summary.total_bytes / 1e9:.2f} GB; compiled: {compiled}; decode warm-up (incl. compile) {warm}")
    if summary.matmul_gflop_per_s is not None:
        print(f"- float32 matmul of one expert over 512 tokens ([512, D] @ [D, I]), same run: "
              f"{summary.matmul_gflop_per_s:.1f} GFLOP/s, to compare prefill's GFLOP/s with")
    print(f"- medians of {args.runs} runs after warm-up")
    print()
    print("| engine | phase | tokens | tokens/s | GB read per step | GB/s | GFLOP/s | % of limit | peak memory GB |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        step = fmt(row.gb_per_step) if row.gb_per_step is not None else "-"
        gbs = fmt(row.gb_per_s) if row.gb_per_s is not None else "-"
        gflops = fmt(row.gflop_per_s) if row.gflop_per_s is not None else "-"
        frac = fmt(100 * statistics.median(row.fractions)) if row.fractions else "-"
        peak = f"{row.peak_gb:.2f}" if row.peak_gb is not None else "-"
        print(f"| {row.engine} | {row.phase} | {row.tokens} | {fmt(row.median_tps)} | {step} | {gbs} | {gflops} | {frac} "
              f"| {peak} |")
    for row in rows:
        if row.speedups:
            print(f"\nprefill {row.tokens}: this repo / transformers = {statistics.median(row.speedups):.2f}x "
                  f"(median of {len(row.speedups)} alternating rounds; per round: "
                  f"{', '.join(f'{x:.2f}' for x in row.speedups)})")
    sys.stdout.flush()


DEFAULT_PREFILL_LENGTHS = [128, 512, 2048]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Benchmark Mixtral decode and prefill against the memory-bandwidth limit.",
                                formatter_class=HelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint_path", type=Path, default=None, help="a converted model.pth (config.json beside it)")
    src.add_argument("--model", type=str, default="cpu-bench",
                     help=f"a named shape with random weights: {', '.join([*BENCH_SHAPES, *transformer_configs])}")
    p.add_argument("--n_layer", type=int, default=None, help="build only this many layers (named shapes)")
    p.add_argument("--precision", choices=list(PRECISIONS), default="bfloat16",
                   help="dtype of activations and unquantized weights")
    p.add_argument("--format", default=None,
                   help="quantize the weights in memory to this scheme, as quantize.py --format would (int8, "
                        "int4:g32, int4:g32:attn4, ...); default: as they are")
    quantized = p.add_mutually_exclusive_group()
    quantized.add_argument("--int8", action="store_true", help="as --format int8")
    quantized.add_argument("--int4", action="store_true", help="as --format int4:g<groupsize>:attn4 (int4 everywhere)")
    p.add_argument("--groupsize", type=int, choices=Int4.GROUP_SIZES, default=32, help="--int4's group size")
    p.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="device to run on: cuda when available, else cpu")
    p.add_argument("--compile", action="store_true", help="compile the decode step (CUDA graphs on a GPU)")
    p.add_argument("--compile_prefill", action="store_true", help="compile prefill too (dynamic shapes)")
    p.add_argument("--triton", action="store_true",
                   help=f"decode on CUDA with the Triton kernels (kernels/triton_moe.py), as {TRITON_VARIABLE}=1 does")
    p.add_argument("--decode_prompts", type=int, nargs="*", default=[5], help="prompt lengths for decode runs")
    p.add_argument("--max_new_tokens", type=int, default=100, help="tokens decoded per run")
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[1],
                   help="decode batches of these sizes (tokens/s summed over the batch); beyond 1, every MoE layer "
                        "also counts the distinct experts each step chose, for the bytes a step reads")
    p.add_argument("--ragged", action="store_true",
                   help="batches of prompts of different lengths (the decode prompt length, then one more token "
                        "each): every sequence decodes at its own positions, as with --prompts_file")
    p.add_argument("--prefill_lengths", type=int, nargs="*", default=None,
                   help=f"prompt lengths for prefill runs (default: {' '.join(map(str, DEFAULT_PREFILL_LENGTHS))}, "
                        f"those beyond the model's context skipped)")
    p.add_argument("--runs", type=int, default=5, help="measured runs per row (the median is reported)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--probe_mb", type=int, default=None,
                   help="bandwidth probe buffer in MiB (default 1024 on CPU, 4096 on GPU: far beyond any cache)")
    p.add_argument("--compare_hf", "--compare-hf", dest="compare_hf", action="store_true",
                   help="also run the checkpoint through transformers (hub-layout folder)")
    p.add_argument("--verify", action="store_true",
                   help="first check the compiled decode step on --device against eager float32 on the CPU "
                        "(tiny shape; quantized with --int8 or --int4); stop if they disagree")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and prompts")
    p.add_argument("--profile", action="store_true",
                   help="after the decode rows, profile one more run at batch 1 and print each op's share of a step")
    p.add_argument("--write_checkpoint", type=Path, default=None, metavar="DIR",
                   help="only write --model's shape with random weights to DIR in the hub's layout (for "
                        "--compare-hf) and convert it to DIR/model.pth, then exit")
    return p.parse_args(argv)


def check_args(args):
    args.default_prefill = args.prefill_lengths is None
    if args.default_prefill:
        args.prefill_lengths = list(DEFAULT_PREFILL_LENGTHS)
    if args.compare_hf:
        if args.checkpoint_path is None:
            raise UserError("--compare-hf needs --checkpoint_path of a hub-layout folder (config.json + safetensors)")
        folder = Path(args.checkpoint_path).parent
        if not any(folder.glob("model*.safetensors")):
            raise UserError(f"--compare-hf: no model*.safetensors in {folder} for transformers to load")
        if chosen_scheme(args).quantized:
            raise UserError("--compare-hf compares full-precision weights; drop --format (--int8, --int4)")
    if args.n_layer is not None and args.n_layer < 1:
        raise UserError(f"--n_layer must be at least 1, got {args.n_layer}")
    if args.max_new_tokens < 2:
        raise UserError("--max_new_tokens must be at least 2 (one prefill token, then decode)")
    if min(args.decode_prompts + args.prefill_lengths + [1]) < 1:
        raise UserError("prompt lengths must be positive")
    if not args.decode_prompts and not args.prefill_lengths:
        raise UserError("nothing to measure: give --decode_prompts or --prefill_lengths")
    if min(args.batch_sizes) < 1:
        raise UserError(f"--batch_sizes must be at least 1, got {min(args.batch_sizes)}")
    if args.runs < 1:
        raise UserError(f"--runs must be at least 1, got {args.runs}")
    for flag, value in (("--threads", args.threads), ("--probe_mb", args.probe_mb)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    check_device(args.device)


def check_fits(args, config: ModelArgs):
    """Before the model is built or loaded: every length within its context, the decode KV cache within
    the device's memory (the allocator's failure is a traceback, or on a CPU the out-of-memory killer).
    The default prefill lengths beyond a short context are skipped, with a note; lengths asked for are
    refused."""
    context = config.block_size
    if args.decode_prompts:
        longest = max(args.decode_prompts) + (max(args.batch_sizes) - 1 if args.ragged else 0)
        if longest + args.max_new_tokens > context:
            raise UserError(f"decode prompts of up to {longest} tokens plus --max_new_tokens {args.max_new_tokens} "
                            f"exceed the model's context of {context} tokens; shorten one of them")
    beyond = [n for n in args.prefill_lengths if n > context]
    if beyond and not args.default_prefill:
        raise UserError(f"--prefill_lengths {' '.join(map(str, beyond))} exceed the model's context of {context} "
                        f"tokens; drop them")
    if beyond:
        print(f"note: --prefill_lengths {' '.join(map(str, beyond))} skipped: beyond the model's context of {context} "
              f"tokens", file=sys.stderr, flush=True)
        args.prefill_lengths = [n for n in args.prefill_lengths if n <= context]
        if not args.prefill_lengths and not args.decode_prompts:
            raise UserError(f"nothing to measure: every prefill length is beyond the model's context of {context} "
                            f"tokens; give --prefill_lengths up to {context}")
    if args.decode_prompts:
        batch, precision = max(args.batch_sizes), PRECISIONS[args.precision]
        positions = min(round_up(max(args.decode_prompts) + batch + args.max_new_tokens), context)  # as decode_rows
        needed, available = kv_cache_bytes(config, batch, positions, precision), available_memory(args.device)
        if available is not None and needed > available:
            raise UserError(f"--batch_sizes {batch} asks for a KV cache of {readable_size(needed)} ({batch} sequences of "
                            f"{positions} positions in {args.precision}), more than the {readable_size(available)} of "
                            f"memory available on {args.device}; lower it")


def main(argv=None):
    args = parse_args(argv)
    with one_line_errors():
        check_args(args)
        if args.threads:
            torch.set_num_threads(args.threads)
        if args.triton:
            use_triton(args.device)
        if args.write_checkpoint is not None:
            path = write_random_checkpoint(args.write_checkpoint, model_args(args.model, args.n_layer),
                                           PRECISIONS[args.precision])
            print(f"wrote {path}; benchmark it with --checkpoint_path {path} --compare-hf")
            return
        check_fits(args, target_config(args))
        if args.verify:
            verify_decode.check(args.device, chosen_scheme(args))
        run(args)


if __name__ == "__main__":
    main()
