# Command-line text generation with Mixtral: load model.pth (bf16, int8 or int4) and its config.json,
# prefill the prompt, then decode one token at a time from the static KV cache, streaming the text.
# Several sequences decode together as a batch (--batch_size, --prompts_file); --interactive is one
# conversation that keeps its cache between turns. Under torchrun the same script runs tensor-parallel,
# one process per GPU (see tp.py). The generation itself is generation.py; the timings, measuring.py.
#
# stdout carries the generated text alone (`generate.py ... > out.txt` keeps just that); timings, notes and
# the chat's prompts go to stderr.
import argparse
import contextlib
import math
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch

from checkpoint import is_instruct, load_model, load_tokenizer, open_checkpoint
from cli import (PRECISIONS, HelpFormatter, add_model_flags, check_memory, check_model_flags, check_text,
                 check_writable, prepare_cpu_kernels, run_on_ranks)
from errors import UserError
from generation import (Conversation, Settings, StopStrings, TextStreamer, cache_length, compile_steps,
                        conversation_cache_length, user_turn)
from measuring import Timer, active_weight_bytes, counting_expert_reads, peak_memory_gb, weight_bytes
from model import ModelArgs, kv_cache_bytes
from reading import max_characters, open_text, text_lines
from tp import broadcast_from_rank0, rank_device
from writing import readable_size

CHAT_KEYS = "Ctrl-C stops an answer, /reset starts a new conversation, /exit or Ctrl-D quits"
EXIT_COMMANDS = ("/exit", "/quit", "exit", "quit")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Generate text with Mixtral. The generated text goes to stdout "
                                                 "alone; timings and notes go to stderr.",
                                     formatter_class=HelpFormatter)
    prompt = parser.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", type=str, default="Hello, my name is", help="Input prompt.")
    prompt.add_argument("--prompt_file", type=Path, default=None,
                        help="Read the prompt from this UTF-8 file: all of it, newlines included.")
    parser.add_argument("--prompts_file", type=Path, default=None,
                        help="Generate for every line of this file (one prompt per line), as batches.")
    parser.add_argument("--interactive", action="store_true",
                        help=f"A conversation: a turn per line of stdin, each keeping the earlier ones. {CHAT_KEYS}.")
    parser.add_argument("--system", type=str, default=None,
                        help="A system prompt, for the instruct chat format: Mixtral's has no system role, so it "
                             "opens the first user turn, as mistral-common writes it.")
    parser.add_argument("--batch_size", type=int, default=None,
                        help="Sequences generated together: samples of --prompt (default 1), or prompts of "
                             "--prompts_file per batch (default: all of them).")
    parser.add_argument("--chat_format", choices=["auto", "instruct", "plain"], default="auto",
                        help="instruct: each prompt is a user turn in [INST] ... [/INST]; plain: the text as it is; "
                             "auto: instruct when the checkpoint's tokenizer_config.json has such a chat template "
                             "(without that file, when the checkpoint folder's name says Instruct).")
    parser.add_argument("--num_samples", type=int, default=5, help="Number of samples (of --prompt).")
    parser.add_argument("--max_new_tokens", type=int, default=200, help="Maximum number of new tokens.")
    parser.add_argument("--temperature", type=float, default=0.8, help="Temperature for sampling; 0 is greedy.")
    parser.add_argument("--top_k", type=int, default=200, help="Draw among the k likeliest tokens only; 0: off.")
    parser.add_argument("--top_p", type=float, default=1.0,
                        help="Draw among the likeliest tokens whose probabilities reach p together; 1: off.")
    parser.add_argument("--min_p", type=float, default=0.0,
                        help="Draw among the tokens at least min_p times as likely as the likeliest; 0: off.")
    parser.add_argument("--repetition_penalty", type=float, default=1.0,
                        help="Lower the logits of tokens already in the text (prompt included) by this factor, as "
                             "transformers does; 1: off.")
    parser.add_argument("--stop", type=str, action="append", default=None, metavar="TEXT",
                        help="End a sequence once its new text holds TEXT (repeat the flag for several; a newline "
                             "in bash: --stop $'\\n').")
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
    if args.prompt_file is not None and (args.interactive or args.prompts_file is not None):
        raise UserError("--prompt_file is one prompt: drop it, or --interactive and --prompts_file")
    if args.interactive and sys.stdin is None:
        raise UserError("--interactive reads the turns from stdin, which is closed; give it a terminal or a file")
    if args.max_new_tokens < 1:
        raise UserError(f"--max_new_tokens must be at least 1, got {args.max_new_tokens}")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise UserError(f"--temperature must be 0 (greedy) or a positive number, got {args.temperature}")
    if args.top_k < 0:
        raise UserError(f"--top_k must be a number of tokens, or 0 for no limit; got {args.top_k}")
    if not 0 < args.top_p <= 1:
        raise UserError(f"--top_p must be above 0 and at most 1 (off), got {args.top_p}")
    if not 0 <= args.min_p <= 1:
        raise UserError(f"--min_p must be between 0 (off) and 1, got {args.min_p}")
    if not math.isfinite(args.repetition_penalty) or args.repetition_penalty <= 0:
        raise UserError(f"--repetition_penalty must be a positive number (1: off), got {args.repetition_penalty}")
    if not -2 ** 63 <= args.seed < 2 ** 64:
        raise UserError(f"--seed must fit in 64 bits (from -2**63 to 2**64 - 1), got {args.seed}")
    for flag, text in [("--prompt", args.prompt), ("--system", args.system)] + [("--stop", s) for s in args.stop or []]:
        if text is not None:
            check_text(text, flag)
    if any(s == "" for s in args.stop or []):
        raise UserError("--stop '' would end every sequence at once; give the text to stop at")
    check_model_flags(args)
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
    if args.system is not None and not instruct:
        raise UserError("--system needs the instruct chat format ([INST] ... [/INST]); this run uses plain text, "
                        "which has no place for one (--chat_format instruct, if the checkpoint is an Instruct one)")

    def encode(text: str, what: str = "the prompt") -> torch.Tensor:
        ids = user_turn(tokenizer, text, instruct, system=args.system)
        if len(ids) + args.max_new_tokens > block_size:
            raise UserError(f"{what} ({len(ids)} tokens) plus --max_new_tokens {args.max_new_tokens} exceeds "
                            f"the model's context of {block_size} tokens; shorten one of them")
        return torch.tensor(ids, dtype=torch.int, device=device)

    # Every prompt is read and checked before any work. A batch is a list of (label, prompt ids). No text
    # longer than the context could spell is read whole.
    longest_text = max_characters(tokenizer, block_size)
    if args.prompts_file is not None:
        prompts = [(f"line {n}", encode(text, f"line {n} of {args.prompts_file}"))
                   for n, text in read_prompts_file(args.prompts_file, longest_text)]
        size = args.batch_size or len(prompts)
        check_cache_fits(args, config, min(size, len(prompts)), max(ids.size(0) for _, ids in prompts), device,
                         precision, world_size)
        batches = [prompts[i:i + size] for i in range(0, len(prompts), size)]
    elif not args.interactive:
        prompt_ids = (encode(args.prompt) if args.prompt_file is None else
                      encode(read_prompt_file(args.prompt_file, longest_text), f"--prompt_file {args.prompt_file}"))
        check_cache_fits(args, config, args.batch_size or 1, prompt_ids.size(0), device, precision, world_size)
        batches = [[(f"sequence {b + 1}", prompt_ids) for b in range(args.batch_size or 1)]] * args.num_samples

    prepare_cpu_kernels(device)
    with Timer(device) as loading:
        model = load_model(checkpoint, device, precision, rank, world_size)
    print(f"Time to load model: {loading.seconds:.02f} seconds", file=sys.stderr)
    prefill_fn, decode_fn = compile_steps(device, args.compile, args.compile_prefill)
    settings = Settings(device, args.max_new_tokens, args.temperature, args.top_k,
                        eos_id=None if args.ignore_eos else tokenizer.eos_id(), prefill_fn=prefill_fn,
                        decode_fn=decode_fn, world_size=world_size, top_p=args.top_p, min_p=args.min_p,
                        repetition_penalty=args.repetition_penalty,
                        stop=StopStrings(tokenizer, args.stop) if args.stop else None)
    torch.manual_seed(args.seed)
    warm_up = args.compile or args.compile_prefill
    if args.interactive:
        tokens_per_sec = chat(model, tokenizer, Conversation(tokenizer, instruct, args.system), settings, rank, warm_up,
                              longest_text)
    else:
        trace = None
        if args.profile is not None:  # under torchrun, a trace per rank
            trace = f"{args.profile}.json" if rank is None else f"{args.profile}_rank_{rank}.json"
        tokens_per_sec = run_batches(model, tokenizer, batches, settings, warm_up=warm_up,
                                     stream=args.prompts_file is None, trace=trace)
    summary(model, device, tokens_per_sec, world_size)


def summary(model, device: str, tokens_per_sec: list, world_size: int):
    """The closing lines (gpt-fast's, on stderr): the mean decode rate over the runs that decoded, and memory."""
    print("==========", file=sys.stderr)
    if world_size > 1:
        print(f"Bandwidth is summed over the {world_size} ranks; memory is rank 0's.", file=sys.stderr)
    rates = [tps for tps in tokens_per_sec if tps is not None]
    average = f"{sum(rates) / len(rates):.2f}" if rates else "none (no decode step ran)"
    print(f"Average tokens/sec: {average}", file=sys.stderr)
    peak = ("CUDA memory reserved at the peak" if torch.device(device).type == "cuda" else
            "the process's peak resident memory")
    print(f"Memory used: {peak_memory_gb(device):.02f} GB ({peak}; the model's weights: "
          f"{readable_size(weight_bytes(model))})", file=sys.stderr)


def read_prompt_file(path: Path, limit: int) -> str:
    """The whole file, newlines included: one prompt, of at most limit characters (read no further)."""
    with open_text(path, "--prompt_file", "a UTF-8 text file holding the prompt") as stream:
        try:
            text = stream.read(limit + 1)
        except UnicodeDecodeError:
            raise UserError(f"--prompt_file {path} is not UTF-8 text; give a UTF-8 text file holding the prompt") from None
    if len(text) > limit:
        raise UserError(f"--prompt_file {path} is longer than {limit} characters: more tokens than the model's "
                        f"context holds; shorten it")
    if not text.strip():
        raise UserError(f"--prompt_file {path} is empty; write the prompt in it")
    return text


def read_prompts_file(path: Path, limit: int = 1 << 20) -> list:
    """(line number, text) of each line of a prompts file that is not blank, each of at most limit characters.
    Lines end at \\n (or \\r\\n) only: a form feed or a Unicode line separator inside a prompt is part of it, as
    every editor shows the file."""
    name = f"--prompts_file {path}"
    with open_text(path, "--prompts_file", "a text file with one prompt per line") as stream:
        prompts = [(n, line.removesuffix("\r")) for n, line in
                   text_lines(stream, name, limit, "more tokens than the model's context holds; shorten it")
                   if line.strip()]
    if not prompts:
        raise UserError(f"{name} holds no prompt; write one prompt per line")
    return prompts


def check_cache_fits(args, config: ModelArgs, batch_size: int, longest_prompt: int, device: str,
                     precision: torch.dtype, world_size: int):
    """Refuses a KV cache larger than the memory the device has available, before allocating it."""
    positions = cache_length(longest_prompt, args.max_new_tokens, config.block_size)
    check_memory(kv_cache_bytes(config, batch_size, positions, precision, world_size), device,
                 f"--batch_size {batch_size} and --max_new_tokens {args.max_new_tokens} ask for a KV cache of {{}} "
                 f"({batch_size} sequences of {positions} positions in {args.precision})", "lower them")


# ----------------------------------------------------------------------------- batches

def run_batches(model, tokenizer, batches: list, settings: Settings, warm_up: bool, stream: bool,
                trace: Optional[str]) -> list:
    """Generates each batch of (label, prompt ids) and reports it; returns the decode tokens/s of each (None
    where no decode step ran). With stream, one sequence streams its text; otherwise each sequence is printed
    whole, labelled, in input order. warm_up: a short untimed run of each kind of batch pays for compilation
    first. trace: the last batch's profiler trace goes there."""
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
            print(f"Compilation time: {compile_warm_up(model, batches, settings):.2f} seconds", file=sys.stderr)
        tokens_per_sec = []
        for i, batch in enumerate(batches):
            labels, prompts = zip(*batch)
            seqs, first, seconds = timed_batch(model, tokenizer, list(prompts), settings, stream,
                                               trace if i == len(batches) - 1 else None)
            if not (stream and len(prompts) == 1):
                for label, seq in zip(labels, seqs):
                    print(f"== {label} ==\n{tokenizer.decode(seq.tolist())}")
            new_tokens = [seq.size(0) - p.size(0) for seq, p in zip(seqs, prompts)]
            steps, step_bytes, counted = max(new_tokens) - 1, model_bytes, ""
            if counts is not None and steps > 0:
                step_bytes, experts = counts.step_bytes(model, len(prompts), steps)
                step_bytes *= settings.world_size
                counted = (f" ({step_bytes / 1e9:.3g} GB read per step: {experts:.2f} of {model.config.num_experts} "
                           f"experts per layer, the distinct ones the batch chose, counted on the device)")
            tokens_per_sec.append(report(i, seconds, first, sum(p.size(0) for p in prompts), new_tokens, step_bytes,
                                         counted, settings.device))
    return tokens_per_sec


def then_reset(prefill_fn, reset):
    """prefill_fn, then reset(): what is counted after it is the decode steps' only."""
    def prefill_then_reset(*args):
        token = prefill_fn(*args)
        reset()
        return token
    return prefill_then_reset


def compile_warm_up(model, batches: list, settings: Settings) -> float:
    """Short untimed runs, printing nothing, that pay for compilation before the timed ones: one of each kind
    of batch, since each batch size, with shared or per-sequence positions, is a graph of its own. Three new
    tokens: the prefill, and two decode steps (the second would show a recompilation). Returns their seconds."""
    print("compiling with torch.compile (the first run of each kind of batch waits for it)…", file=sys.stderr,
          flush=True)
    short = replace(settings, max_new_tokens=min(settings.max_new_tokens, 3), eos_id=None, stop=None)
    kinds = {}
    for batch in batches:
        kinds.setdefault((len(batch), len({ids.size(0) for _, ids in batch}) == 1), batch)
    return sum(timed_batch(model, None, [ids for _, ids in batch], short, stream=False)[2] for batch in kinds.values())


def timed_batch(model, tokenizer, prompts: list, settings: Settings, stream: bool, trace: Optional[str] = None):
    """(the sequences, the seconds to their first tokens (the prefill), the seconds in all) of one batch; with
    stream, one sequence streams its text as it grows. trace: a profiler trace of the generation goes there."""
    streamer = TextStreamer(tokenizer) if stream and len(prompts) == 1 else None
    timer, first = Timer(settings.device), []

    def on_token(seqs):
        if not first:
            first.append(timer.lap())
        if streamer is not None:
            streamer(seqs[0])
    with torch.profiler.profile() if trace else contextlib.nullcontext() as prof, timer:
        seqs = settings.generate_batch(model, prompts, on_token)
    if streamer is not None:
        streamer.finish(seqs[0])
    if trace:
        write_trace(prof, trace)
    return seqs, first[0], timer.seconds


def write_trace(prof, path: str):
    """The profiler's trace at path, whole or not at all: written under a temporary name, renamed when complete.
    Python's exporter writes it, since kineto's own writer drops write errors (a full disk, ulimit -f) and
    leaves a cut-short file."""
    tmp = f"{path}.tmp"
    try:
        prof.export_chrome_trace(tmp, use_python_export=True)
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"could not write the profiler trace {path}: {e.strerror or e}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def report(i: int, seconds: float, first: float, prompt_tokens: int, new_tokens: list, step_bytes: int,
           counted: str, device: str) -> Optional[float]:
    """Prints the timing lines of one run (on stderr) and returns its decode tokens/s, summed over its sequences,
    as llama.cpp counts: the first new token of each sequence comes from the prompt's prefill (time to first
    token), the others from decode steps. The bandwidth is the bytes a decode step reads times the steps over
    their time. None when no decode step ran."""
    threads = torch.get_num_threads()
    threads = f", {threads} CPU thread{'s' if threads > 1 else ''}" if torch.device(device).type == "cpu" else ""
    line = f"Time for inference {i + 1}: {seconds:.02f} sec total, {first:.02f} sec to first token " \
           f"({prompt_tokens} prompt tokens)"
    decoded, steps = sum(new_tokens) - len(new_tokens), max(new_tokens) - 1
    if steps == 0:
        print(f"{line}, no decode step{threads}", file=sys.stderr)
        return None
    tps = decoded / (seconds - first)
    summed = f" summed over {len(new_tokens)} sequences" if len(new_tokens) > 1 else ""
    print(f"{line}, then {decoded} tokens at {tps:.02f} tokens/sec{summed}{threads}", file=sys.stderr)
    print(f"Bandwidth achieved: {step_bytes * steps / (seconds - first) / 1e9:.02f} GB/s{counted}", file=sys.stderr)
    return tps


# ----------------------------------------------------------------------------- the chat

def chat(model, tokenizer, conversation: Conversation, settings: Settings, rank: Optional[int], warm_up: bool,
         longest_line: int) -> list:
    """--interactive: one conversation, a turn per line of stdin, until end of input or /exit; /reset starts
    a new one; Ctrl-C stops an answer (what it had stays in the conversation). Returns each turn's decode
    tokens/s. The KV cache keeps the conversation between turns, so a turn feeds the model only its new
    tokens. When one would pass the model's context, the conversation starts again from that turn."""
    print(f"Chatting: type a message and press Enter; {CHAT_KEYS}.", file=sys.stderr)
    block_size, max_new_tokens = model.config.block_size, settings.max_new_tokens
    if warm_up:
        print(f"Compilation time: {chat_warm_up(model, settings):.2f} seconds", file=sys.stderr)
    tokens_per_sec = []
    for text in read_prompts(rank, longest_line):
        if text.strip() in EXIT_COMMANDS:
            break
        if text.strip() == "/reset":
            conversation.restart()
            print("(a new conversation)", file=sys.stderr)
            continue
        fed = conversation.turn(text)
        if conversation.position + len(fed) + max_new_tokens > block_size:
            fresh = replace(conversation, tokens=[], unfed=[])
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
        answer, first, seconds = answer_turn(model, tokenizer, conversation, fed, settings, rank)
        if answer is None:
            print("(stopped before the first token: this turn is not part of the conversation)", file=sys.stderr)
            continue
        if seconds is None:
            print(f"(stopped after {answer.size(0)} tokens)", file=sys.stderr)
        elif answer.size(0) > 1:
            tokens_per_sec.append((answer.size(0) - 1) / (seconds - first))
            print(f"[{answer.size(0)} tokens, {first:.2f} s to first token, {tokens_per_sec[-1]:.1f} tokens/s]",
                  file=sys.stderr)
        else:
            print(f"[1 token, {first:.2f} s to first token]", file=sys.stderr)
        conversation.answered(fed, answer)
    return tokens_per_sec


def answer_turn(model, tokenizer, conversation: Conversation, fed: list, settings: Settings, rank: Optional[int]):
    """(the answer's tokens, seconds to its first token, seconds in all) of one turn, streamed as it grows.
    Ctrl-C stops it: (the tokens it had, or None before the first, ..., None for the seconds)."""
    streamer, timer, first, latest = TextStreamer(tokenizer), Timer(settings.device), [], []

    def on_token(seqs):  # seqs [1, fed + n]
        if not first:
            first.append(timer.lap())
        latest[:] = [seqs[0, len(fed):]]
        streamer(latest[0])
    prompt = torch.tensor(fed, dtype=torch.int, device=settings.device)
    try:
        with timer:
            seq, = settings.generate_batch(model, [prompt], on_token, start_pos=conversation.position,
                                           earlier=[conversation.tokens])
    except KeyboardInterrupt:
        if rank is not None:  # ranks would stop at different steps of their collectives: end the run
            raise
        if not latest:
            return None, None, None
        streamer.finish(latest[0])
        return latest[0].clone(), first[0], None
    answer = seq[len(fed):]
    streamer.finish(answer)
    return answer, first[0], timer.seconds


def chat_warm_up(model, settings: Settings) -> float:
    """A short untimed answer to <s> alone, printing nothing, in the cache size the conversation starts with:
    compiling the decode step before the first turn rather than in it. Returns its seconds."""
    print("compiling the decode step with torch.compile (before the first turn)…", file=sys.stderr, flush=True)
    with torch.device(settings.device):
        model.setup_caches(max_batch_size=1, max_seq_length=conversation_cache_length(1, model.config.block_size))
    short = replace(settings, max_new_tokens=min(settings.max_new_tokens, 3), eos_id=None, stop=None)
    prompt = torch.ones(1, dtype=torch.int, device=settings.device)  # any token will do
    with Timer(settings.device) as timer:
        short.generate_batch(model, [prompt])
    return timer.seconds


def read_prompts(rank: Optional[int] = None, limit: int = 1 << 20):
    """Prompts from stdin, one per line, until end of input (Ctrl-D). Under torchrun every rank shares stdin:
    rank 0 reads each line and hands it to the others. Ctrl-C at the prompt of a terminal gives a fresh
    prompt, as a shell does; a line that is not UTF-8, or longer than limit characters, is said so and not
    sent (a long line is read past in pieces, never held whole)."""
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="surrogateescape")  # undecodable bytes kept, to be named, not a traceback
    while True:
        print("What is your prompt? ", end="", file=sys.stderr, flush=True)
        try:
            line = read_line(limit) if rank in (None, 0) else None
        except KeyboardInterrupt:
            if rank is not None or not sys.stdin.isatty():
                raise
            print(file=sys.stderr)
            continue
        if rank is not None:
            line = broadcast_from_rank0(line)
        if not line:
            print(file=sys.stderr)
            return
        if not sys.stdin.isatty():  # no terminal echoes it: the log shows each turn's text after its prompt
            print(line.rstrip("\n").encode(errors="surrogateescape").decode(errors="replace"), file=sys.stderr)
        try:
            if len(line) > limit:
                raise UserError(f"that line is longer than {limit} characters, more tokens than the model's "
                                f"context holds")
            check_text(line, "that line")
        except UserError as e:
            print(f"note: {e}; it was not sent", file=sys.stderr)
            continue
        if line.strip():
            yield line.rstrip("\n")


def read_line(limit: int) -> str:
    """A line of stdin, or its first limit + 1 characters when it is longer: the rest is read and dropped, a
    piece at a time."""
    line = sys.stdin.readline(limit + 1)
    if len(line) > limit and not line.endswith("\n"):
        while (rest := sys.stdin.readline(limit)) and not rest.endswith("\n"):
            pass
    return line


if __name__ == "__main__":
    main()
