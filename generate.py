# Command-line text generation with Mixtral: load model.pth (bf16, int8 or int4) and its config.json,
# prefill the prompt, then decode one token at a time from the static KV cache, streaming the text.
# Several sequences decode together as a batch (--batch_size, --prompts_file); --interactive is one
# conversation that keeps its cache between turns. Under torchrun the same script runs tensor-parallel,
# one process per GPU (see tp.py). The generation itself is generation.py; the timings, measuring.py.
import argparse
import contextlib
import math
import sys
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch

from checkpoint import is_instruct, load_model, load_tokenizer, open_checkpoint
from cli import PRECISIONS, add_model_flags, check_device, check_writable, run_on_ranks
from errors import UserError
from generation import (Conversation, Settings, TextStreamer, cache_length, compile_steps, conversation_cache_length,
                        user_turn)
from measuring import Timer, active_weight_bytes, available_memory, counting_expert_reads, peak_memory_gb
from model import ModelArgs, kv_cache_bytes
from tp import broadcast_from_rank0, rank_device
from writing import readable_size


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Generate text with Mixtral.")
    parser.add_argument("--prompt", type=str, default="Hello, my name is", help="Input prompt.")
    parser.add_argument("--interactive", action="store_true",
                        help="A conversation: read turns from stdin until end of input, keeping the earlier ones.")
    parser.add_argument("--prompts_file", type=Path, default=None,
                        help="Generate for every line of this file (one prompt per line), as batches.")
    parser.add_argument("--batch_size", type=int, default=None,
                        help="Sequences generated together: samples of --prompt (default 1), or prompts of "
                             "--prompts_file per batch (default: all of them).")
    parser.add_argument("--chat_format", choices=["auto", "instruct", "plain"], default="auto",
                        help="instruct: each prompt is a user turn in [INST] ... [/INST]; plain: the text as it is; "
                             "auto: instruct when the checkpoint's tokenizer_config.json has such a chat template "
                             "(without that file, when the checkpoint folder's name says Instruct).")
    parser.add_argument("--num_samples", type=int, default=5, help="Number of samples (of --prompt).")
    parser.add_argument("--max_new_tokens", type=int, default=200, help="Maximum number of new tokens.")
    parser.add_argument("--top_k", type=int, default=200, help="Top-k for sampling.")
    parser.add_argument("--temperature", type=float, default=0.8, help="Temperature for sampling; 0 is greedy.")
    add_model_flags(parser, compile_help="Compile the one-token decode step.")
    parser.add_argument("--compile_prefill", action="store_true",
                        help="Also compile prefill (dynamic shapes; longer compile time).")
    parser.add_argument("--profile", type=Path, default=None, help="Write a profiler trace to PROFILE.json.")
    parser.add_argument("--seed", type=int, default=1234, help="Random seed for sampling.")
    parser.add_argument("--ignore_eos", action="store_true", help="Do not stop at the end-of-sequence token.")
    return parser.parse_args(argv)


def check_args(args):
    if args.num_samples < 1:
        raise UserError(f"--num_samples must be at least 1, got {args.num_samples}")
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch_size must be at least 1, got {args.batch_size}")
    if args.interactive and (args.prompts_file is not None or (args.batch_size or 1) > 1):
        raise UserError("--interactive is one conversation: drop --prompts_file and --batch_size")
    if args.max_new_tokens < 1:
        raise UserError(f"--max_new_tokens must be at least 1, got {args.max_new_tokens}")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise UserError(f"--temperature must be 0 (greedy) or a positive number, got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise UserError(f"--top_k must be at least 1, got {args.top_k}")
    check_device(args.device)
    if args.profile is not None:
        check_writable(Path(f"{args.profile}.json"), "--profile")


def main(argv=None):
    run_on_ranks(parse_args(argv), check_args, run)


def run(args, rank: Optional[int] = None, world_size: int = 1):
    device = rank_device(args.device) if rank is not None else args.device
    precision = PRECISIONS[args.precision]
    checkpoint = open_checkpoint(args.checkpoint_path)
    tokenizer = load_tokenizer(checkpoint)
    config = checkpoint.config
    block_size = config.block_size
    if args.max_new_tokens >= block_size:  # in every mode: no prompt, not even <s>, would fit beside them
        raise UserError(f"--max_new_tokens {args.max_new_tokens} leaves no room for a prompt in the model's context "
                        f"of {block_size} tokens; lower it")
    instruct = args.chat_format == "instruct" or (args.chat_format == "auto" and is_instruct(checkpoint))

    def encode(text: str, what: str = "the prompt") -> torch.Tensor:
        ids = user_turn(tokenizer, text, instruct)
        if len(ids) + args.max_new_tokens > block_size:
            raise UserError(f"{what} ({len(ids)} tokens) plus --max_new_tokens {args.max_new_tokens} exceeds "
                            f"the model's context of {block_size} tokens; shorten one of them")
        return torch.tensor(ids, dtype=torch.int, device=device)

    # Every prompt is read and checked before any work. A batch is a list of (label, prompt ids).
    if args.prompts_file is not None:
        prompts = [(f"line {n}", encode(text, f"line {n} of {args.prompts_file}"))
                   for n, text in read_prompts_file(args.prompts_file)]
        size = args.batch_size or len(prompts)
        check_cache_fits(args, config, min(size, len(prompts)), max(ids.size(0) for _, ids in prompts), device,
                         precision, world_size)
        batches = [prompts[i:i + size] for i in range(0, len(prompts), size)]
    elif not args.interactive:
        prompt_ids = encode(args.prompt)
        check_cache_fits(args, config, args.batch_size or 1, prompt_ids.size(0), device, precision, world_size)
        batches = [[(f"sequence {b + 1}", prompt_ids) for b in range(args.batch_size or 1)]] * args.num_samples

    with Timer(device) as loading:
        model = load_model(checkpoint, device, precision, rank, world_size)
    print(f"Time to load model: {loading.seconds:.02f} seconds", file=sys.stderr)
    prefill_fn, decode_fn = compile_steps(device, args.compile, args.compile_prefill)
    settings = Settings(device, args.max_new_tokens, args.temperature, args.top_k,
                        eos_id=None if args.ignore_eos else tokenizer.eos_id(), prefill_fn=prefill_fn,
                        decode_fn=decode_fn, world_size=world_size)
    torch.manual_seed(args.seed)
    if args.interactive:
        tokens_per_sec = chat(model, tokenizer, instruct, settings, rank)
    else:
        trace = None
        if args.profile is not None:  # under torchrun, a trace per rank
            trace = f"{args.profile}.json" if rank is None else f"{args.profile}_rank_{rank}.json"
        tokens_per_sec = run_batches(model, tokenizer, batches, settings, warm_up=args.compile or args.compile_prefill,
                                     stream=args.prompts_file is None, trace=trace)
    if world_size > 1:
        print(f"Bandwidth is summed over the {world_size} ranks; memory is rank 0's.")
    print("==========")
    print(f"Average tokens/sec: {sum(tokens_per_sec) / max(len(tokens_per_sec), 1):.2f}")
    print(f"Memory used: {peak_memory_gb(device):.02f} GB")


def read_prompts_file(path: Path) -> list:
    """(line number, text) of each line of a prompts file that is not blank."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UserError(f"--prompts_file {path} not found; give a text file with one prompt per line") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--prompts_file {path} cannot be read as UTF-8 text ({type(e).__name__}); "
                        f"give a text file with one prompt per line") from None
    prompts = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
    if not prompts:
        raise UserError(f"--prompts_file {path} holds no prompt; write one prompt per line")
    return prompts


def check_cache_fits(args, config: ModelArgs, batch_size: int, longest_prompt: int, device: str,
                     precision: torch.dtype, world_size: int):
    """Refuses, before any allocation, a KV cache larger than the memory the device has available: the
    allocator's own failure is a traceback, and on a CPU that overcommits, a cache that is zeroed page
    by page is ended by the kernel's out-of-memory killer instead."""
    positions = cache_length(longest_prompt, args.max_new_tokens, config.block_size)
    needed = kv_cache_bytes(config, batch_size, positions, precision, world_size)
    available = available_memory(device)
    if available is not None and needed > available:
        raise UserError(f"--batch_size {batch_size} and --max_new_tokens {args.max_new_tokens} ask for a KV cache of "
                        f"{readable_size(needed)} ({batch_size} sequences of {positions} positions in {args.precision}), "
                        f"more than the {readable_size(available)} of memory available on {device}; lower them")


def run_batches(model, tokenizer, batches: list, settings: Settings, warm_up: bool, stream: bool,
                trace: Optional[str]) -> list:
    """Generates each batch of (label, prompt ids) and reports it; returns the tokens/s of each. With stream,
    one sequence streams its text; otherwise each sequence is printed whole, labelled, in input order.
    warm_up: untimed runs pay for compilation first. trace: the last batch's profiler trace goes there."""
    B = max(len(batch) for batch in batches)
    longest = max(ids.size(0) for batch in batches for _, ids in batch)
    # One cache for every batch, so that a compiled step keeps its shapes; rounded up for the same reason.
    with torch.device(settings.device):
        model.setup_caches(max_batch_size=B, max_seq_length=cache_length(longest, settings.max_new_tokens,
                                                                         model.config.block_size))
    # Under tensor parallelism each rank reads its own shard (and the replicated parts) per token:
    # the bytes all ranks together read, so the bandwidth line is the sum over the GPUs.
    model_bytes = active_weight_bytes(model) * settings.world_size
    # The experts a step of a batch reads depend on the batch's choices: counted during the decode steps.
    with counting_expert_reads(model) if B > 1 else contextlib.nullcontext() as counts:
        if counts is not None:
            settings = replace(settings, prefill_fn=then_reset(settings.prefill_fn, counts.reset))
        if warm_up:
            print(f"Compilation time: {compile_warm_up(model, tokenizer, batches, settings, stream):.2f} seconds",
                  file=sys.stderr)
        tokens_per_sec = []
        for i, batch in enumerate(batches):
            labels, prompts = zip(*batch)
            seqs, seconds = timed_batch(model, tokenizer, list(prompts), settings, stream,
                                        trace if i == len(batches) - 1 else None)
            if not (stream and len(prompts) == 1):
                for label, seq in zip(labels, seqs):
                    print(f"== {label} ==\n{tokenizer.decode(seq.tolist())}")
            new_tokens = [seq.size(0) - p.size(0) for seq, p in zip(seqs, prompts)]
            steps, step_bytes, counted = max(new_tokens), model_bytes, ""
            if counts is not None and steps > 1:
                step_bytes, experts = counts.step_bytes(model, len(prompts), steps - 1)
                step_bytes *= settings.world_size
                counted = (f" ({step_bytes / 1e9:.3g} GB read per step: {experts:.2f} of {model.config.num_experts} "
                           f"experts per layer, the distinct ones the batch chose, counted on the device)")
            tokens_per_sec.append(report(i, seconds, sum(new_tokens), step_bytes, steps=steps, sequences=len(prompts),
                                         counted=counted))
    return tokens_per_sec


def then_reset(prefill_fn, reset):
    """prefill_fn, then reset(): what is counted after it is the decode steps' only."""
    def prefill_then_reset(*args):
        token = prefill_fn(*args)
        reset()
        return token
    return prefill_then_reset


def compile_warm_up(model, tokenizer, batches: list, settings: Settings, stream: bool) -> float:
    """Untimed runs that pay for compilation before the timed ones: one of each kind of batch, since each
    batch size, with shared or per-sequence positions, is a graph of its own. Returns their seconds."""
    kinds = {}
    for batch in batches:
        kinds.setdefault((len(batch), len({ids.size(0) for _, ids in batch}) == 1), batch)
    return sum(timed_batch(model, tokenizer, [ids for _, ids in batch], settings, stream)[1] for batch in kinds.values())


def timed_batch(model, tokenizer, prompts: list, settings: Settings, stream: bool, trace: Optional[str] = None):
    """(the sequences, the seconds they took) of one batch; with stream, one sequence streams its text as it
    grows. trace: a profiler trace of the generation is written there."""
    streamer = TextStreamer(tokenizer) if stream and len(prompts) == 1 else None
    on_token = None if streamer is None else (lambda seqs: streamer(seqs[0]))
    with torch.profiler.profile() if trace else contextlib.nullcontext() as prof, Timer(settings.device) as timer:
        seqs = settings.generate_batch(model, prompts, on_token)
    if streamer is not None:
        streamer.finish(seqs[0])
    if trace:
        prof.export_chrome_trace(trace)
    return seqs, timer.seconds


def chat(model, tokenizer, instruct: bool, settings: Settings, rank: Optional[int]) -> list:
    """--interactive: one conversation, a turn per line of stdin, until end of input; returns each turn's
    tokens/s. The KV cache keeps the conversation between turns, so a turn feeds the model only its new
    tokens. When one would pass the model's context, the conversation starts again from that turn."""
    model_bytes = active_weight_bytes(model) * settings.world_size
    block_size, max_new_tokens = model.config.block_size, settings.max_new_tokens
    conversation = Conversation(tokenizer, instruct)
    tokens_per_sec = []
    for text in read_prompts(rank):
        fed = conversation.turn(text)
        if conversation.position + len(fed) + max_new_tokens > block_size:
            fresh = Conversation(tokenizer, instruct)
            fed = fresh.turn(text)
            if len(fed) + max_new_tokens > block_size:
                print(f"note: this prompt ({len(fed)} tokens) plus --max_new_tokens {max_new_tokens} exceeds the "
                      f"model's context of {block_size} tokens even alone; skipped it, shorten it", file=sys.stderr)
                continue
            print(f"note: the conversation would pass the model's context of {block_size} tokens; "
                  f"starting a new one with this prompt", file=sys.stderr)
            conversation = fresh
        length = conversation_cache_length(conversation.position + len(fed) + max_new_tokens, block_size)
        with torch.device(settings.device):
            model.setup_caches(max_batch_size=1, max_seq_length=length)
        streamer = TextStreamer(tokenizer)
        prompt = torch.tensor(fed, dtype=torch.int, device=settings.device)
        with Timer(settings.device) as timer:
            seq, = settings.generate_batch(model, [prompt], on_token=lambda seqs: streamer(seqs[0][len(fed):]),
                                           start_pos=conversation.position)
        answer = seq[len(fed):]
        streamer.finish(answer)
        tokens_per_sec.append(report(len(tokens_per_sec), timer.seconds, answer.size(0), model_bytes))
        conversation.answered(fed, answer)
    return tokens_per_sec


def report(i: int, seconds: float, new_tokens: int, step_bytes: int, steps: Optional[int] = None, sequences: int = 1,
           counted: str = "") -> float:
    """Prints the timing lines of one run and returns its tokens/s, summed over its sequences. The bandwidth
    is the bytes a step reads times the steps (one per new token of a sequence) over the time."""
    tps = new_tokens / seconds
    summed = f", summed over {sequences} sequences" if sequences > 1 else ""
    print(f"Time for inference {i + 1}: {seconds:.02f} sec total, {tps:.02f} tokens/sec{summed}")
    print(f"Bandwidth achieved: {step_bytes * (new_tokens if steps is None else steps) / seconds / 1e9:.02f} GB/s{counted}")
    return tps


def read_prompts(rank: Optional[int] = None):
    """Prompts from stdin, one per line, until end of input. Under torchrun every rank shares stdin:
    rank 0 reads each line and hands it to the others."""
    while True:
        print("What is your prompt? ", end="", flush=True)
        line = sys.stdin.readline() if rank in (None, 0) else None
        if rank is not None:
            line = broadcast_from_rank0(line)
        if not line:
            print()
            return
        if line.strip():
            yield line.rstrip("\n")


if __name__ == "__main__":
    main()
