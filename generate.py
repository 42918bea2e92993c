# Command-line text generation with Mixtral: load model.pth (bf16, int8 or int4) and its config.json,
# prefill the prompt, then decode one token at a time from the static KV cache, streaming the text.
# Several sequences decode together as a batch (--batch_size, --prompts_file); --interactive is one
# conversation that keeps its cache between turns. Under torchrun the same script runs tensor-parallel,
# one process per GPU (see tp.py).
import argparse
import contextlib
import json
import math
import os
import resource
import signal
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from formats import detect_format, formatted_model
from kernels import cpu as cpu_kernels
from model import ModelArgs, Transformer, UserError, check_checkpoint_file, kv_cache_bytes, load_checkpoint
from tp import apply_tp, broadcast_from_rank0, maybe_init_dist, rank_device
from writing import readable_size

PRECISIONS = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


# ----------------------------------------------------------------------------- sampling

def sample(logits: Tensor, temperature: float, top_k: Optional[int]) -> Tensor:
    # logits: [B, V] (last position) -> next token ids [B, 1]
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    ids = None
    if top_k is not None:  # only the k best can be drawn: the draw then runs over k values, not V
        logits, ids = torch.topk(logits, min(top_k, logits.size(-1)))  # [B, k] each
    probs = torch.softmax(logits / max(temperature, 1e-5), dim=-1)
    # Exponential race instead of torch.multinomial: same distribution, no host sync (CUDA graphs).
    q = torch.empty_like(probs).exponential_(1)
    choice = torch.argmax(probs / q, dim=-1, keepdim=True)  # [B, 1]
    return choice if ids is None else ids.gather(-1, choice)


def prefill(model: Transformer, x: Tensor, input_pos: Tensor, temperature: float, top_k: Optional[int],
            last: Optional[Tensor] = None) -> Tensor:
    # x: [B, T] prompts, input_pos: [T] -> first new token [B, 1]. last: [B] each prompt's last position in
    # x, for right-padded prompts of different lengths (default: T - 1 for all).
    logits = model(x, input_pos)  # [B, T, V]
    logits = logits[:, -1] if last is None else logits[torch.arange(x.size(0), device=x.device), last]  # [B, V]
    return sample(logits, temperature, top_k)


def decode_one_token(model: Transformer, x: Tensor, input_pos: Tensor, temperature: float,
                     top_k: Optional[int]) -> Tensor:
    # x: [B, 1], input_pos: [1], or [B, 1] when the sequences stand at different positions -> next token [B, 1]
    logits = model(x, input_pos)  # [B, 1, V]
    return sample(logits[:, -1], temperature, top_k)


@torch.no_grad()
def generate(model: Transformer, prompt: Tensor, max_new_tokens: int, *, temperature: float,
             top_k: Optional[int], prefill_fn: Callable = prefill, decode_fn: Callable = decode_one_token,
             eos_id: Optional[int] = None, on_token: Optional[Callable] = None, start_pos: int = 0) -> Tensor:
    """Returns prompt + continuation, [T + new]. Stops early at eos_id unless it is None.

    prefill_fn and decode_fn are passed in so that callers choose compiled or eager versions.
    on_token(seq) is called with the sequence so far after every new token (for streaming).
    start_pos: where the prompt goes in the cache, after the tokens already there (a conversation)."""
    stream = None if on_token is None else (lambda seqs: on_token(seqs[0]))
    return generate_batch(model, [prompt], max_new_tokens, temperature=temperature, top_k=top_k, prefill_fn=prefill_fn,
                          decode_fn=decode_fn, eos_id=eos_id, on_token=stream, start_pos=start_pos)[0]


@torch.no_grad()
def generate_batch(model: Transformer, prompts: list, max_new_tokens: int, *, temperature: float,
                   top_k: Optional[int], prefill_fn: Callable = prefill, decode_fn: Callable = decode_one_token,
                   eos_id: Optional[int] = None, on_token: Optional[Callable] = None, start_pos: int = 0) -> list:
    """generate() for B prompts [T_b] at once: each decode step runs the B sequences together and each
    sequence ends at its own eos_id; returns each prompt + its continuation. on_token([B, T + n]) as in generate.

    Prompts of different lengths are right-padded for the prefill, where the causal mask keeps each from
    seeing its padding; from then on each sequence decodes at its own positions, so that it has exactly the
    positions (and rotary angles) it would have alone, and each new token overwrites its padding in the cache
    before the mask lets it be seen. Prompts of one length share their positions, as a single one does."""
    device = prompts[0].device
    B, lengths = len(prompts), [p.size(0) for p in prompts]
    T = max(lengths)
    seq = torch.zeros(B, T + max_new_tokens, dtype=torch.int, device=device)  # padded with token 0
    for b, p in enumerate(prompts):
        seq[b, :lengths[b]] = p
    rows = torch.arange(B, device=device)
    ends = torch.tensor(lengths, device=device)  # [B] where each sequence's next token goes
    prompt_pos = torch.arange(start_pos, start_pos + T, device=device)
    if min(lengths) == T:
        next_token = prefill_fn(model, seq[:, :T], prompt_pos, temperature, top_k)
        input_pos = torch.tensor([start_pos + T], device=device, dtype=torch.int)  # [1]
    else:
        next_token = prefill_fn(model, seq[:, :T], prompt_pos, temperature, top_k, ends - 1)
        input_pos = (ends + start_pos).to(torch.int)[:, None]  # [B, 1]
    # The compiled step may reuse its output buffer (CUDA graphs): copy the token out at once.
    next_token = next_token.clone()  # [B, 1]
    seq[rows, ends] = next_token[:, 0].to(torch.int)
    done = next_token[:, 0] == eos_id if eos_id is not None else None
    n = 1
    if on_token is not None:
        on_token(seq[:, :T + 1])
    # One host sync per step, outside the compiled step, and only when an end-of-sequence token can stop it.
    while n < max_new_tokens and not (eos_id is not None and bool(done.all())):
        next_token = decode_fn(model, next_token.view(B, 1), input_pos, temperature, top_k).clone()
        input_pos += 1
        seq[rows, ends + n] = next_token[:, 0].to(torch.int)
        if eos_id is not None:
            done |= next_token[:, 0] == eos_id
        n += 1
        if on_token is not None:
            on_token(seq[:, :T + n])
    out = []
    for b in range(B):  # each sequence up to and including its own end-of-sequence token
        new = seq[b, lengths[b]:lengths[b] + n]
        hits = (new == eos_id).nonzero() if eos_id is not None else new[:0]
        out.append(seq[b, :lengths[b] + (int(hits[0]) + 1 if len(hits) else n)])
    return out


def synchronize(device: str):
    """Waits for the device's queued work, so that a timer around it measures the work."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def round_up(n: int, multiple: int = 256) -> int:
    return (n + multiple - 1) // multiple * multiple


# ----------------------------------------------------------------------------- loading

def read_config(checkpoint_path: Path) -> ModelArgs:
    return ModelArgs.from_json(Path(checkpoint_path).parent / "config.json")


def load_model(checkpoint_path: Path, device: str, precision: torch.dtype,
               rank: Optional[int] = None, world_size: int = 1) -> Transformer:
    """Builds the model from config.json beside the checkpoint and loads its weights (mmapped).
    With a rank, keeps only that rank's tensor-parallel shard of them."""
    checkpoint_path = Path(checkpoint_path)
    config, state_dict = load_checkpoint(checkpoint_path)
    with torch.device("meta"):
        model = formatted_model(config, detect_format(state_dict))  # told by the content, not the file name
    try:
        model.load_state_dict(state_dict, assign=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else first[0]
        raise UserError(f"{checkpoint_path} does not fit {checkpoint_path.parent / 'config.json'}: {detail}")
    if rank is not None:
        apply_tp(model, rank, world_size)  # while the weights are still mmapped: a rank reads only its slices
    if torch.device(device).type == "cpu":
        cpu_kernels.available()  # built now, once, or one line saying why PyTorch's kernels are used
    # Module.to(dtype) casts floating-point tensors only: int8 and int4 (uint8) weights stay as they are.
    return model.to(device=device, dtype=precision).eval()


def load_tokenizer(checkpoint_path: Path):
    import sentencepiece as spm
    path = Path(checkpoint_path).parent / "tokenizer.model"
    if not path.is_file():
        raise UserError(f"tokenizer {path} not found: put the model's tokenizer.model beside the checkpoint")
    try:
        return spm.SentencePieceProcessor(model_file=str(path))
    except Exception as e:
        raise UserError(f"{path} is not a SentencePiece model ({e})")


def is_instruct(checkpoint_path: Path) -> bool:
    """Instruct checkpoints want [INST] ... [/INST] around each turn. The hub's tokenizer_config.json
    carries a chat template for them; without it, the hub's repo name says so."""
    folder = Path(checkpoint_path).parent
    tok_config = folder / "tokenizer_config.json"
    if tok_config.is_file():
        with contextlib.suppress(ValueError, OSError):
            return "[INST]" in str(json.loads(tok_config.read_text()).get("chat_template", ""))
    return "instruct" in folder.name.lower()


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


def count_expert_reads(model: Transformer) -> tuple:
    """Has every MoE layer count, on the device, the distinct experts each of its calls chose: what a
    step of a batch reads, since its kernels read each chosen expert once for all the tokens that chose
    it. Returns reset(), which zeroes the counts, and read(), their sum over the layers (one host sync).
    The count is a buffer of the layer, so a compiled step (CUDA graphs included) updates it in place."""
    layers = [layer.block_sparse_moe for layer in model.layers]
    for moe in layers:
        moe.register_buffer("expert_reads", torch.zeros((), dtype=torch.int64, device=model.norm.weight.device),
                            persistent=False)

        def count(gate, inputs, logits, moe=moe):  # logits [N, E]: the router's choice is their top K
            chosen = logits.topk(moe.num_activated_experts, dim=-1).indices.flatten()
            moe.expert_reads += torch.zeros_like(logits[0], dtype=torch.int64).index_fill_(0, chosen, 1).sum()
        moe.gate.register_forward_hook(count)

    def reset():
        for moe in layers:
            moe.expert_reads.zero_()

    def read() -> int:
        return int(sum(moe.expert_reads for moe in layers))
    return reset, read


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


# ----------------------------------------------------------------------------- streaming

class TextStreamer:
    """Prints the decoded text as it grows. Decoding the whole sequence each time (not token by
    token) keeps SentencePiece's spaces and multi-byte characters right; an incomplete UTF-8
    character (shown as U+FFFD) is held back until its last byte arrives."""

    def __init__(self, tokenizer, out=None):
        # sys.stdout looked up now, not at import: ranks other than 0 redirect it to nothing.
        self.tokenizer, self.out, self.printed = tokenizer, sys.stdout if out is None else out, ""

    def __call__(self, seq: Tensor):
        self.emit(self.tokenizer.decode(seq.tolist()).rstrip("\ufffd"))

    def emit(self, text: str):
        if text.startswith(self.printed):
            self.out.write(text[len(self.printed):])
            self.out.flush()
            self.printed = text

    def finish(self, seq: Tensor):
        self.emit(self.tokenizer.decode(seq.tolist()))
        self.out.write("\n")
        self.out.flush()


# ----------------------------------------------------------------------------- CLI

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
    parser.add_argument("--checkpoint_path", type=Path,
                        default=Path("checkpoints/mistralai/Mixtral-8x7B-v0.1/model.pth"), help="Model checkpoint path.")
    parser.add_argument("--compile", action="store_true", help="Compile the one-token decode step.")
    parser.add_argument("--compile_prefill", action="store_true",
                        help="Also compile prefill (dynamic shapes; longer compile time).")
    parser.add_argument("--profile", type=Path, default=None, help="Write a profiler trace to PROFILE.json.")
    parser.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu",
                        help="Device to use (default: cuda when available, else cpu).")
    parser.add_argument("--precision", choices=list(PRECISIONS), default="bfloat16",
                        help="dtype of activations and unquantized weights.")
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


def check_device(name: str):
    """A UserError unless this torch can run on device `name`: a device type it knows, built in and
    present (cuda, mps, xpu, ...), with that index; meta holds no data, so it cannot generate."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device torch knows (try cpu or cuda)") from None
    if device.type == "cpu":
        return
    if device.type == "meta":
        raise UserError(f"--device {name} holds shapes, not values: it cannot run the model; use --device cpu or cuda")
    backend = getattr(torch, device.type, None)
    if not hasattr(backend, "is_available") or not hasattr(backend, "device_count"):
        raise UserError(f"--device {name}: this torch ({torch.__version__}) has no {device.type} support; "
                        f"use --device cpu or cuda")
    if not backend.is_available():
        raise UserError(f"--device {name} was asked for but {device.type.upper()} is not available to this torch "
                        f"({torch.__version__}); use --device cpu")
    if device.index is not None and device.index >= backend.device_count():
        raise UserError(f"--device {name} was asked for but there are {backend.device_count()} {device.type} devices "
                        f"(numbered from 0)")


def check_writable(path: Path, flag: str):
    """A UserError unless a file can be written at path: said before any work, not after it."""
    folder = path.parent
    if path.is_dir() or not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"{flag} would write {path}, but {folder} is not a folder this user can write into; "
                        f"give a path in one")


def decode_compile_options(device: str) -> dict:
    """Inductor options for the one-token decode step."""
    if device.startswith("cuda"):
        # CUDA graphs remove the per-kernel launch cost that dominates one-token steps on a GPU.
        # Coordinate-descent tuning is what makes inductor lower a matrix-vector product to a fused
        # reduction on a GPU (on a CPU it does so anyway): the decode path's w1[experts] @ x then reads
        # the chosen experts in place instead of gathering a copy of them first.
        return {"triton.cudagraphs": True, "coordinate_descent_tuning": True}
    # On a CPU the step is a few hundred small kernels: calling them from generated C++ rather than
    # Python saves the interpreter's cost per call, and measured no slower to compile.
    return {"cpp_wrapper": True}


def compile_steps(args, device: str):
    """Returns the (prefill, decode) callables to use, compiled as the flags ask."""
    prefill_fn, decode_fn = prefill, decode_one_token
    if args.compile:
        # Static shapes: one graph per batch size (and cache length), rather than one with symbolic sizes.
        decode_fn = torch.compile(decode_one_token, fullgraph=True, dynamic=False, options=decode_compile_options(device))
    if args.compile_prefill:
        prefill_fn = torch.compile(prefill, fullgraph=True, dynamic=True)
    return prefill_fn, decode_fn


def main(argv=None):
    run_on_ranks(parse_args(argv), check_args, run)


def run_on_ranks(args, check: Callable, run: Callable):
    """A script's body (generate.py's, eval.py's): check(args), then run(args, rank, world_size) in each
    process under torchrun (rank None alone). Bad input is one line on stderr and exit status 1."""
    try:
        check(args)
        rank = maybe_init_dist(args.device)  # None unless under torchrun
        world_size = dist.get_world_size() if rank is not None else 1
        with output_of_rank0_only(rank):
            run(args, rank, world_size)
    except UserError as e:  # on every rank: each one stops
        if int(os.environ.get("RANK", 0)) == 0:  # every rank finds the same fault: one line, from rank 0
            print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except BrokenPipeError:
        exit_as_on_sigpipe()
    if rank is not None:
        dist.destroy_process_group()


def exit_as_on_sigpipe():
    """What a Unix tool does when the reader of its output goes away (`generate.py ... | head`): stop,
    quietly, with the status of a process killed by SIGPIPE. stdout is pointed at nothing first, or
    Python's flush of it at exit would report the closed pipe again."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(128 + signal.SIGPIPE)


@contextlib.contextmanager
def output_of_rank0_only(rank: Optional[int]):
    """Every rank computes the same tokens; only rank 0 (or a lone process) shows them and the timings."""
    if rank in (None, 0):
        yield
        return
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull), contextlib.redirect_stderr(devnull):
        yield


def run(args, rank: Optional[int] = None, world_size: int = 1):
    device = rank_device(args.device) if rank is not None else args.device
    precision = PRECISIONS[args.precision]
    check_checkpoint_file(args.checkpoint_path)
    tokenizer = load_tokenizer(args.checkpoint_path)
    config = read_config(args.checkpoint_path)
    block_size = config.block_size
    if args.max_new_tokens >= block_size:  # in every mode: no prompt, not even <s>, would fit beside them
        raise UserError(f"--max_new_tokens {args.max_new_tokens} leaves no room for a prompt in the model's context "
                        f"of {block_size} tokens; lower it")
    instruct = args.chat_format == "instruct" or (args.chat_format == "auto" and is_instruct(args.checkpoint_path))

    def encode(text: str, what: str = "the prompt") -> Tensor:
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
    t0 = time.perf_counter()
    model = load_model(args.checkpoint_path, device, precision, rank, world_size)
    synchronize(device)
    print(f"Time to load model: {time.perf_counter() - t0:.02f} seconds", file=sys.stderr)
    prefill_fn, decode_fn = compile_steps(args, device)
    eos_id = None if args.ignore_eos else tokenizer.eos_id()
    torch.manual_seed(args.seed)
    sampling = dict(temperature=args.temperature, top_k=args.top_k, prefill_fn=prefill_fn, decode_fn=decode_fn,
                    eos_id=eos_id)
    if args.interactive:
        tokens_per_sec = chat(args, model, tokenizer, instruct, sampling, device, block_size, world_size, rank)
    else:
        tokens_per_sec = run_batches(args, model, tokenizer, batches, sampling, device, block_size, world_size, rank)
    if world_size > 1:
        print(f"Bandwidth is summed over the {world_size} ranks; memory is rank 0's.")
    print("==========")
    print(f"Average tokens/sec: {sum(tokens_per_sec) / max(len(tokens_per_sec), 1):.2f}")
    print(f"Memory used: {peak_memory_gb(device):.02f} GB")


def cache_length(longest_prompt: int, max_new_tokens: int, block_size: int) -> int:
    """The positions of the KV cache that batches of prompts up to longest_prompt tokens use. Rounded up,
    so that batches of other lengths share it and a compiled step keeps its shapes."""
    return min(block_size, round_up(longest_prompt + max_new_tokens))


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


def user_turn(tokenizer, text: str, instruct: bool, first: bool = True) -> list:
    """The tokens a user's text adds to a conversation, in Mixtral's chat format as mistral-common writes
    it: <s> once, at the start; with an Instruct checkpoint each user turn encoded on its own as
    '[INST] {text} [/INST]' (and each assistant turn is the tokens it generated, then </s>). Otherwise the
    text as it is: each line continues the same text."""
    if instruct:
        text = f"[INST] {text.strip()} [/INST]"
    return ([tokenizer.bos_id()] if first else []) + tokenizer.encode(text)


def run_batches(args, model: Transformer, tokenizer, batches: list, sampling: dict, device: str, block_size: int,
                world_size: int, rank: Optional[int]) -> list:
    """Generates each batch of (label, prompt ids) and reports it; returns the tokens/s of each. One
    sequence of --prompt streams its text; otherwise each sequence is printed whole, labelled, in input order.
    With compilation, untimed runs pay for it first: one of each kind of batch, since each batch size, with
    shared or per-sequence positions, is a graph of its own."""
    B = max(len(batch) for batch in batches)
    longest = max(ids.size(0) for batch in batches for _, ids in batch)
    # One cache for every batch, so that a compiled step keeps its shapes; rounded up for the same reason.
    with torch.device(device):
        model.setup_caches(max_batch_size=B, max_seq_length=cache_length(longest, args.max_new_tokens, block_size))
    # Under tensor parallelism each rank reads its own shard (and the replicated parts) per token:
    # the bytes all ranks together read, so the bandwidth line is the sum over the GPUs.
    model_bytes = active_weight_bytes(model) * world_size
    if B > 1:  # the experts a step reads depend on the batch's choices: counted during the decode steps
        reset_counts, read_counts = count_expert_reads(model)
        prefill_fn = sampling["prefill_fn"]

        def prefill_then_count(*args_):
            token = prefill_fn(*args_)
            reset_counts()
            return token
        sampling = {**sampling, "prefill_fn": prefill_then_count}
    kinds = {}
    if args.compile or args.compile_prefill:
        for batch in batches:
            kinds.setdefault((len(batch), len({ids.size(0) for _, ids in batch}) == 1), batch)
    tokens_per_sec, compile_seconds = [], 0.0
    for i, batch in [(-1, batch) for batch in kinds.values()] + list(enumerate(batches)):
        if i == 0 and kinds:
            print(f"Compilation time: {compile_seconds:.2f} seconds", file=sys.stderr)
        labels, prompts = zip(*batch)
        streamer = TextStreamer(tokenizer) if args.prompts_file is None and len(prompts) == 1 else None
        on_token = None if streamer is None else (lambda seqs: streamer(seqs[0]))
        profiling = args.profile is not None and i == len(batches) - 1
        with (torch.profiler.profile() if profiling else contextlib.nullcontext()) as prof:
            synchronize(device)
            t = time.perf_counter()
            seqs = generate_batch(model, list(prompts), args.max_new_tokens, **sampling, on_token=on_token)
            synchronize(device)
            t = time.perf_counter() - t
        if streamer is not None:
            streamer.finish(seqs[0])
        elif i >= 0:
            for label, seq in zip(labels, seqs):
                print(f"== {label} ==\n{tokenizer.decode(seq.tolist())}")
        if profiling:
            prof.export_chrome_trace(f"{args.profile}.json" if rank is None else f"{args.profile}_rank_{rank}.json")
        if i == -1:
            compile_seconds += t
            continue
        new_tokens = [seq.size(0) - p.size(0) for seq, p in zip(seqs, prompts)]
        steps, counted = max(new_tokens), ""
        step_bytes = model_bytes
        if B > 1 and steps > 1:
            experts = read_counts() / (model.config.n_layer * (steps - 1))  # per layer and decode step
            step_bytes = active_weight_bytes(model, len(prompts), experts) * world_size
            counted = (f" ({step_bytes / 1e9:.3g} GB read per step: {experts:.2f} of {model.config.num_experts} "
                       f"experts per layer, the distinct ones the batch chose, counted on the device)")
        report(i, t, sum(new_tokens), step_bytes, tokens_per_sec, steps=steps, sequences=len(prompts), counted=counted)
    return tokens_per_sec


def chat(args, model: Transformer, tokenizer, instruct: bool, sampling: dict, device: str, block_size: int,
         world_size: int, rank: Optional[int]) -> list:
    """--interactive: one conversation, a turn per line of stdin, until end of input; returns each turn's
    tokens/s. The KV cache keeps the conversation between turns, so a turn feeds the model only its new
    tokens. When one would pass the model's context, the conversation starts again from that turn."""
    model_bytes = active_weight_bytes(model) * world_size
    end_of_turn = tokenizer.eos_id()
    position = 0  # tokens of the conversation in the cache
    unfed = []  # the last answer's last token (generated, never an input yet) and, with Instruct, its </s>
    tokens_per_sec = []
    for text in read_prompts(rank):
        fed = unfed + user_turn(tokenizer, text, instruct, first=position == 0)
        if position + len(fed) + args.max_new_tokens > block_size:
            fed = user_turn(tokenizer, text, instruct)
            if len(fed) + args.max_new_tokens > block_size:
                print(f"note: this prompt ({len(fed)} tokens) plus --max_new_tokens {args.max_new_tokens} exceeds the "
                      f"model's context of {block_size} tokens even alone; skipped it, shorten it", file=sys.stderr)
                continue
            print(f"note: the conversation would pass the model's context of {block_size} tokens; "
                  f"starting a new one with this prompt", file=sys.stderr)
            position = 0
        # Grown by doublings, which keep what the cache holds: few sizes, so few compilations of the step.
        length = 256
        while length < position + len(fed) + args.max_new_tokens:
            length *= 2
        with torch.device(device):
            model.setup_caches(max_batch_size=1, max_seq_length=min(block_size, length))
        streamer = TextStreamer(tokenizer)
        synchronize(device)
        t = time.perf_counter()
        seq = generate(model, torch.tensor(fed, dtype=torch.int, device=device), args.max_new_tokens, **sampling,
                       on_token=lambda seq: streamer(seq[len(fed):]), start_pos=position)
        synchronize(device)
        t = time.perf_counter() - t
        answer = seq[len(fed):]
        streamer.finish(answer)
        report(len(tokens_per_sec), t, answer.size(0), model_bytes, tokens_per_sec)
        position += len(fed) + answer.size(0) - 1
        unfed = answer[-1:].tolist()
        if instruct and unfed != [end_of_turn]:  # an answer cut short by --max_new_tokens still ends its turn
            unfed.append(end_of_turn)
    return tokens_per_sec


def report(i: int, seconds: float, new_tokens: int, step_bytes: int, tokens_per_sec: list, steps: Optional[int] = None,
           sequences: int = 1, counted: str = ""):
    """The timing lines of one run: tokens/s summed over its sequences, and the bytes a step reads times
    the steps (one per new token of a sequence) over the time."""
    tps = new_tokens / seconds
    tokens_per_sec.append(tps)
    summed = f", summed over {sequences} sequences" if sequences > 1 else ""
    print(f"Time for inference {i + 1}: {seconds:.02f} sec total, {tps:.02f} tokens/sec{summed}")
    print(f"Bandwidth achieved: {step_bytes * (new_tokens if steps is None else steps) / seconds / 1e9:.02f} GB/s{counted}")


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
