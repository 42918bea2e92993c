# Benchmarks Mixtral decode and prefill against the machine's memory bandwidth.
#
# At batch 1 a decoded token reads every weight it uses once: the attention weights, the K active
# experts of each layer and the output head (generate.active_weight_bytes). Those bytes over the
# memory bandwidth measured in the same run give the limit, in tokens/s; decode is reported as a
# fraction of it. A decode step of a batch (--batch_sizes) reads each expert that any of its tokens
# chose once: the distinct experts are counted on the device (generate.count_expert_reads), and its
# fraction is of the limit for the bytes its steps read. The machine is shared and noisy, so bandwidth and decode are measured in
# alternating rounds and each fraction is the median of per-round ratios.
#
#   python scripts/benchmark.py --model cpu-bench --compile                  # random weights, no checkpoint
#   python scripts/benchmark.py --model cpu-bench --compile --batch_sizes 1 2 4 8 --prefill_lengths
#   python scripts/benchmark.py --model Mixtral-8x7B-v0.1 --n_layer 16 --device cuda --compile
#   python scripts/benchmark.py --model Mixtral-8x7B-v0.1 --n_layer 16 --device cuda --compile --triton
#   python scripts/benchmark.py --checkpoint_path checkpoints/x/model.pth --compare-hf
import argparse
import contextlib
import datetime
import gc
import inspect
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from formats import FORMATS, TRITON_VARIABLE, FullPrecision, Int4, quantize_module  # noqa: E402
from generation import PRECISIONS, check_device, compile_steps, generate_batch, load_model, round_up  # noqa: E402
from measuring import (active_weight_bytes, counting_expert_reads, peak_memory_gb, reset_peak_memory,  # noqa: E402
                       synchronize)
from model import ModelArgs, Transformer, UserError, transformer_configs  # noqa: E402
from scripts.make_tiny_checkpoint import write_random_checkpoint  # noqa: E402

# Shapes for benchmarking only (model.py keeps the published ones). cpu-bench is Mixtral-shaped but
# small enough for a laptop-class CPU: 0.79 B parameters, 0.46 GB of active bf16 weights per token.
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


# ----------------------------------------------------------------------------- building the model

@torch.no_grad()
def random_model(config: ModelArgs, device: str, precision: torch.dtype,
                 weight_format: FullPrecision = FORMATS["full precision"], seed: int = 0) -> Transformer:
    """Random weights made in place on the device, one block at a time (no checkpoint, no download),
    then stored in `weight_format` as generate.py would load it (formats.py). Each block is
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
            quantize_module(module, config, weight_format)
    quantize_module(model, config, weight_format)  # the output head; blocks already done are kept
    return model.eval()


def limit_tokens_per_s(bandwidth: float, weight_bytes: int) -> float:
    """The memory-bandwidth limit of batch-1 decode: every active weight byte read once per token."""
    return bandwidth / weight_bytes


def fraction_of_limit(tokens_per_s: float, weight_bytes: int, bandwidth: float) -> float:
    """Achieved bandwidth (active bytes x tokens/s) over the measured bandwidth."""
    return tokens_per_s / limit_tokens_per_s(bandwidth, weight_bytes)


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
    times = []
    for _ in range(rounds):
        synchronize(device)
        t = time.perf_counter()
        a @ b
        synchronize(device)
        times.append(time.perf_counter() - t)
    return 2 * tokens * c.dim * c.intermediate_size / min(times) / 1e9


def parameter_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


# ----------------------------------------------------------------------------- measuring

class Bandwidth:
    """Memory bandwidth of the device, from a buffer far larger than any cache: a full read (sum) and a
    copy of one half into the other (read + write, both counted). Decoding reads its weights, so the
    limit is the read probe's; the copy is printed beside it. Each probe is the median of several
    passes: on a shared VM the best pass of a few swung by a third from run to run (a burst now and
    then), the median much less. The buffer exists only while a probe runs, so that it never counts
    in another measurement's peak memory."""

    def __init__(self, device: str, nbytes: Optional[int] = None):
        self.device = device
        self.nbytes = nbytes or (4 << 30 if device.startswith("cuda") else 1 << 30)
        self.read, self.copy = [], []
        self.measure(rounds=1)  # warm-up, not recorded
        self.read.clear(), self.copy.clear()

    def _time(self, fn) -> float:
        synchronize(self.device)
        t = time.perf_counter()
        fn()
        synchronize(self.device)
        return time.perf_counter() - t

    def measure(self, rounds: int = 5) -> float:
        """Median of `rounds` passes of each probe, recorded; returns this measurement's read bandwidth in
        bytes/s."""
        # float32 (ones: every page touched before timing): the probe measures memory, not bf16 arithmetic.
        buf = torch.ones(self.nbytes // 4, dtype=torch.float32, device=self.device)
        src, dst = buf.chunk(2)
        read = self.nbytes / statistics.median(self._time(buf.sum) for _ in range(rounds))
        copy = 2 * src.numel() * 4 / statistics.median(self._time(lambda: dst.copy_(src)) for _ in range(rounds))
        del buf, src, dst
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()
        self.read.append(read)
        self.copy.append(copy)
        return read


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


def random_prompts(lengths: list, vocab: int, generator: torch.Generator, device: str) -> list:
    return [torch.randint(0, vocab, (n,), generator=generator).to(device=device, dtype=torch.int) for n in lengths]


def batch_lengths(prompt_len: int, batch: int, ragged: bool) -> list:
    """The prompt lengths of a batch: all prompt_len, or (ragged) prompt_len, prompt_len + 1, ... so that
    every sequence decodes at its own positions."""
    return [prompt_len + (b if ragged else 0) for b in range(batch)]


def decode_rounds(decode_seconds, prompt_len: int, new_tokens: int, runs: int, device: str, bandwidth: Bandwidth,
                  weight_bytes, engine: str, vocab: int, generator: torch.Generator, batch: int = 1,
                  ragged: bool = False) -> Row:
    """Decode tokens/s, summed over a batch of `batch` random prompts (of lengths batch_lengths).
    decode_seconds(prompts: list of [T_b] int) runs the prompts and new_tokens - 1 decode steps after them,
    and returns the seconds those steps took (prefill excluded). weight_bytes: the bytes a step reads, or
    a function giving those of the run just done. Each round is preceded by a bandwidth probe, for its
    fraction of the limit."""
    lengths = batch_lengths(prompt_len, batch, ragged)
    tokens = f"{prompt_len}" if len(set(lengths)) == 1 else f"{lengths[0]}..{lengths[-1]}"
    row = Row(engine, "decode", f"{tokens} + {new_tokens}" + (f", batch {batch}" if batch > 1 else ""))
    step_bytes = []
    for r in range(runs):
        bw = bandwidth.measure()
        reset_peak_memory(device)
        prompts = random_prompts(lengths, vocab, generator, device)
        steps_per_s = (new_tokens - 1) / decode_seconds(prompts)
        step_bytes.append(weight_bytes() if callable(weight_bytes) else weight_bytes)
        row.tokens_per_s.append(steps_per_s * batch)
        row.fractions.append(fraction_of_limit(steps_per_s, step_bytes[-1], bw))
        row.peak_gb = max(row.peak_gb or 0.0, peak_memory_gb(device))
    row.gb_per_step = statistics.median(step_bytes) / 1e9
    row.gb_per_s = row.median_tps / batch * row.gb_per_step
    return row


def generate_decode_seconds(model, prefill_fn, decode_fn, new_tokens: int, device: str, on_decode=None):
    """decode_rounds' timer for this repo: generate_batch(), timed from its first new tokens (prefill done),
    when on_decode() is called too."""
    def decode_seconds(prompts):
        marks = []

        def on_token(seqs):
            if not marks:  # the prefill's tokens: decoding starts now
                if on_decode is not None:
                    on_decode()
                synchronize(device)
                marks.append(time.perf_counter())

        generate_batch(model, prompts, new_tokens, temperature=0.8, top_k=200, prefill_fn=prefill_fn,
                       decode_fn=decode_fn, on_token=on_token)
        synchronize(device)
        return time.perf_counter() - marks[0]
    return decode_seconds


@torch.no_grad()
def prefill_rounds(fn, length: int, runs: int, device: str, vocab: int, engine: str,
                   generator: torch.Generator) -> Row:
    """Prompt tokens/s of one forward over `length` tokens; fn(idx [1, T]) -> anything."""
    row = Row(engine, "prefill", str(length))
    idx = torch.randint(0, vocab, (1, length), generator=generator).to(device)
    fn(idx)  # warm-up (and compilation for a compiled prefill)
    reset_peak_memory(device)
    for _ in range(runs):
        synchronize(device)
        t = time.perf_counter()
        fn(idx)
        synchronize(device)
        row.tokens_per_s.append(length / (time.perf_counter() - t))
    row.peak_gb = peak_memory_gb(device)
    return row


# ----------------------------------------------------------------------------- the run

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


def chosen_format(args) -> FullPrecision:
    if args.int4:
        return Int4(args.groupsize)
    return FORMATS["int8" if args.int8 else "full precision"]


def format_label(weight_format: FullPrecision) -> str:
    """'' for full precision (the precision says it), 'int8', 'int4 (groups of 32)'."""
    if isinstance(weight_format, Int4):
        return f"int4 (groups of {weight_format.groupsize})"
    return "" if weight_format is FORMATS["full precision"] else weight_format.name


def run(args) -> list:
    device, precision = args.device, PRECISIONS[args.precision]
    weight_format = chosen_format(args)
    generator = torch.Generator().manual_seed(args.seed)
    t = time.perf_counter()
    if args.checkpoint_path is not None:
        model = load_model(args.checkpoint_path, device, precision)
        if weight_format is not FORMATS["full precision"]:
            quantize_module(model, model.config, weight_format)
        name = str(args.checkpoint_path)
    else:
        model = random_model(model_args(args.model, args.n_layer), device, precision, weight_format, seed=args.seed)
        name = f"{args.model} (random weights)"
    synchronize(device)
    build_s = time.perf_counter() - t
    config = model.config
    weight_bytes = active_weight_bytes(model)
    total_bytes = parameter_bytes(model)
    kind = format_label(weight_format) or args.precision
    print(f"model: {name}, {config.n_layer} layers, dim {config.dim}, {config.num_experts} experts top-"
          f"{config.num_activated_experts}, {kind}; weights {total_bytes / 1e9:.2f} GB, "
          f"{weight_bytes / 1e9:.3g} GB read per decoded token; built/loaded in {build_s:.1f} s", flush=True)

    bandwidth = Bandwidth(device, args.probe_mb and args.probe_mb << 20)
    prefill_fn, decode_fn = compile_steps(device, args.compile, args.compile_prefill)
    engine = "this repo" + (" (compiled)" if args.compile else "") + triton_label(device)
    rows = []

    # Decode: one cache size for every prompt, so the compiled step is traced once per batch size.
    compile_s = None
    if args.decode_prompts:
        decode_len = round_up(max(args.decode_prompts) + max(args.batch_sizes) + args.max_new_tokens)
        with torch.device(device):
            model.setup_caches(max_batch_size=max(args.batch_sizes), max_seq_length=min(decode_len, config.block_size))
    counting = contextlib.ExitStack()  # kept open to the end of the run
    counts = counting.enter_context(counting_expert_reads(model)) if max(args.batch_sizes) > 1 else None
    reset_counts, read_counts = (counts.reset, counts.read) if counts is not None else (None, None)
    for prompt_len in args.decode_prompts:
        for batch in args.batch_sizes:
            # Warm-up: compiles the decode step on the first prompt (timed), settles caches on the others.
            synchronize(device)
            t = time.perf_counter()
            prompts = random_prompts(batch_lengths(prompt_len, batch, args.ragged), config.vocab_size, generator, device)
            generate_batch(model, prompts, min(args.max_new_tokens, 8), temperature=0.8, top_k=200,
                           prefill_fn=prefill_fn, decode_fn=decode_fn)
            synchronize(device)
            if compile_s is None:
                compile_s = time.perf_counter() - t
            step_bytes = weight_bytes
            if batch > 1:  # the distinct experts the run's decode steps chose, per layer and step
                def step_bytes(batch=batch):
                    experts = read_counts() / (config.n_layer * (args.max_new_tokens - 1))
                    return active_weight_bytes(model, batch, experts)
            row = decode_rounds(generate_decode_seconds(model, prefill_fn, decode_fn, args.max_new_tokens, device,
                                                        on_decode=reset_counts),
                                prompt_len, args.max_new_tokens, args.runs, device, bandwidth, step_bytes, engine,
                                config.vocab_size, generator, batch, args.ragged)
            rows.append(row)
            print(f"decode {row.tokens}: {row.median_tps:.2f} tokens/s", flush=True)

    # Prefill: plain forwards over the prompt, the cache grown to hold the longest one.
    if args.prefill_lengths:
        with torch.device(device):
            model.setup_caches(max_batch_size=1,
                               max_seq_length=min(round_up(max(args.prefill_lengths) + 1), config.block_size))
        for length in args.prefill_lengths:
            def ours(idx, length=length):
                return prefill_fn(model, idx, torch.arange(length, device=device), 0.8, 200)
            row = prefill_rounds(ours, length, args.runs, device, config.vocab_size,
                                 "this repo" + (" (compiled)" if args.compile_prefill else ""), generator)
            row.gflop_per_s = row.median_tps / length * prefill_flops(config, length) / 1e9
            rows.append(row)
            print(f"prefill {length}: {row.median_tps:.1f} tokens/s", flush=True)

    if args.compare_hf:
        del decode_fn
        gc.collect()
        ours = {length: (lambda idx, length=length: prefill_fn(model, idx, torch.arange(length, device=device), 0.8, 200))
                for length in args.prefill_lengths}
        rows += compare_hf(args, device, precision, bandwidth, weight_bytes, generator, ours)

    if not bandwidth.read:  # prefill only: probe once
        bandwidth.measure()
    bw_read, bw_copy = statistics.median(bandwidth.read), statistics.median(bandwidth.copy)
    bw = bw_read
    matmul = matmul_gflops(device, config) if args.prefill_lengths else None
    print_table(args, name, kind, rows, weight_bytes, total_bytes, bandwidth.read, bw_read, bw_copy, bw, compile_s, matmul)
    return rows


@torch.no_grad()
def compare_hf(args, device, precision, bandwidth, weight_bytes, generator, ours: dict) -> list:
    """The same checkpoint through transformers' MixtralForCausalLM, eager, in this process.

    Its prefill rounds alternate with ours (ours[length](idx)) on the same prompt, so that both see the
    same machine: a shared machine's load comes and goes by the minute. The ratio printed is the median
    of the per-round ratios; ours' own row (and its peak memory) comes from the run before, without
    transformers loaded. transformers' peak memory includes our model, so it is not reported."""
    from transformers import MixtralForCausalLM
    folder = Path(args.checkpoint_path).parent
    model = MixtralForCausalLM.from_pretrained(folder, dtype=precision).to(device).eval()
    vocab = model.config.vocab_size
    impl = (f"transformers {transformers_version()} (attention {model.config._attn_implementation}, "
            f"experts {getattr(model.config, '_experts_implementation', None) or 'eager'})")
    # transformers 5.24 renamed past_key_values (argument and output) to cache.
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    rows = []
    for length in args.prefill_lengths:
        row = Row(impl, "prefill", str(length))
        idx = torch.randint(0, vocab, (1, length), generator=generator).to(device)
        hf_prefill = lambda: model(idx, use_cache=False).logits[:, -1]  # noqa: E731
        times = {"ours": [], "hf": []}
        for r in range(args.runs + 1):  # round 0 warms both up
            for who, fn in (("ours", lambda: ours[length](idx)), ("hf", hf_prefill)):
                synchronize(device)
                t = time.perf_counter()
                fn()
                synchronize(device)
                if r:
                    times[who].append(time.perf_counter() - t)
        row.tokens_per_s = [length / t for t in times["hf"]]
        row.speedups = [h / o for o, h in zip(times["ours"], times["hf"])]
        rows.append(row)
        print(f"transformers prefill {length}: {row.median_tps:.1f} tokens/s; this repo in the same rounds: "
              f"{statistics.median(length / t for t in times['ours']):.1f} tokens/s", flush=True)
    del ours
    gc.collect()

    def hf_decode_seconds(prompts):  # greedy, with its own (dynamic) KV cache; batch 1
        out = model(prompts[0][None].long(), use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        synchronize(device)
        t = time.perf_counter()
        for _ in range(args.max_new_tokens - 1):
            out = model(token, **{cache_arg: getattr(out, cache_arg)}, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
        synchronize(device)
        return time.perf_counter() - t

    for prompt_len in args.decode_prompts:
        row = decode_rounds(hf_decode_seconds, prompt_len, args.max_new_tokens, args.runs, device, bandwidth,
                            weight_bytes, impl, vocab, generator)
        rows.append(row)
        print(f"transformers decode {row.tokens}: {row.median_tps:.2f} tokens/s", flush=True)
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


def fmt(value: float) -> str:
    """Three significant figures or more: tiny test shapes give tiny numbers that must not print as 0."""
    return f"{value:.1f}" if value >= 100 else f"{value:.2f}" if value >= 1 else f"{value:.3g}"


def transformers_version() -> str:
    import transformers
    return transformers.__version__


def print_table(args, name, kind, rows, weight_bytes, total_bytes, bw_probes, bw_read, bw_copy, bw, compile_s,
                matmul_gflop_per_s=None):
    limit = limit_tokens_per_s(bw, weight_bytes)
    print()
    print(f"### Mixtral benchmark: {name}, {kind}, batch {', '.join(map(str, args.batch_sizes))}")
    print()
    print(f"- machine: {machine_name(args.device)}")
    print(f"- memory bandwidth, same run (median of {len(bw_probes)} probes, each the median of 5 passes): "
          f"read {bw_read / 1e9:.1f} GB/s (copy {bw_copy / 1e9:.1f} GB/s); limit = read {bw / 1e9:.1f} GB/s / "
          f"{weight_bytes / 1e9:.3g} GB per token = {fmt(limit)} tokens/s")
    compiled = ("decode" if args.compile else "none") + (" + prefill" if args.compile_prefill else "")
    warm = f"{compile_s:.1f} s" if compile_s is not None else "-"
    print(f"- weights {total_bytes / 1e9:.2f} GB; compiled: {compiled}; decode warm-up (incl. compile) {warm}")
    if matmul_gflop_per_s is not None:
        print(f"- float32 matmul of one expert over 512 tokens ([512, D] @ [D, I]), same run: "
              f"{matmul_gflop_per_s:.1f} GFLOP/s, to compare prefill's GFLOP/s with")
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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Benchmark Mixtral decode and prefill against the memory-bandwidth limit.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint_path", type=Path, default=None, help="a converted model.pth (config.json beside it)")
    src.add_argument("--model", type=str, default="cpu-bench",
                     help=f"a named shape with random weights: {', '.join([*BENCH_SHAPES, *transformer_configs])}")
    p.add_argument("--n_layer", type=int, default=None, help="build only this many layers (named shapes)")
    p.add_argument("--precision", choices=list(PRECISIONS), default="bfloat16")
    quantized = p.add_mutually_exclusive_group()
    quantized.add_argument("--int8", action="store_true", help="quantize the weights to int8 in place (quantize.py)")
    quantized.add_argument("--int4", action="store_true", help="quantize the weights to int4 in place (quantize.py)")
    p.add_argument("--groupsize", type=int, choices=Int4.GROUP_SIZES, default=32, help="int4's group size")
    p.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu")
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
    p.add_argument("--prefill_lengths", type=int, nargs="*", default=[128, 512, 2048])
    p.add_argument("--runs", type=int, default=5, help="measured runs per row (the median is reported)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--probe_mb", type=int, default=None,
                   help="bandwidth probe buffer in MiB (default 1024 on CPU, 4096 on GPU: far beyond any cache)")
    p.add_argument("--compare-hf", dest="compare_hf", action="store_true",
                   help="also run the checkpoint through transformers (hub-layout folder)")
    p.add_argument("--verify", action="store_true",
                   help="first check the compiled decode step on --device against eager float32 on the CPU "
                        "(tiny shape; quantized with --int8 or --int4); stop if they disagree")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--write_checkpoint", type=Path, default=None, metavar="DIR",
                   help="only write --model's shape with random weights to DIR in the hub's layout (for "
                        "--compare-hf) and convert it to DIR/model.pth, then exit")
    return p.parse_args(argv)


def check_args(args):
    if args.compare_hf:
        if args.checkpoint_path is None:
            raise UserError("--compare-hf needs --checkpoint_path of a hub-layout folder (config.json + safetensors)")
        folder = Path(args.checkpoint_path).parent
        if not any(folder.glob("model*.safetensors")):
            raise UserError(f"--compare-hf: no model*.safetensors in {folder} for transformers to load")
        if args.int8 or args.int4:
            raise UserError("--compare-hf compares full-precision weights; drop --int8 and --int4")
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
    check_device(args.device)


def main(argv=None):
    args = parse_args(argv)
    try:
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
        if args.verify:
            from scripts import verify_decode  # it builds its models with this file's random_model
            verify_decode.check(args.device, chosen_format(args))
        run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
