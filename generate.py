# Command-line text generation with Mixtral: load model.pth (bf16, int8 or int4) and its config.json,
# prefill the prompt, then decode one token at a time from the static KV cache, streaming the text.
# Under torchrun the same script runs tensor-parallel, one process per GPU (see tp.py).
import argparse
import contextlib
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from formats import detect_format, formatted_model
from kernels import cpu as cpu_kernels
from model import ModelArgs, Transformer, UserError, load_checkpoint
from tp import apply_tp, broadcast_from_rank0, maybe_init_dist, rank_device

PRECISIONS = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


# ----------------------------------------------------------------------------- sampling

def logits_to_probs(logits: Tensor, temperature: float, top_k: Optional[int]) -> Tensor:
    logits = logits / max(temperature, 1e-5)
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits = torch.where(logits < v[..., -1:], -float("inf"), logits)
    return torch.softmax(logits, dim=-1)


def sample(logits: Tensor, temperature: float, top_k: Optional[int]) -> Tensor:
    # logits: [B, V] (last position) -> next token ids [B, 1]
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    probs = logits_to_probs(logits, temperature, top_k)
    # Exponential race instead of torch.multinomial: same distribution, no host sync (CUDA graphs).
    q = torch.empty_like(probs).exponential_(1)
    return torch.argmax(probs / q, dim=-1, keepdim=True)


def prefill(model: Transformer, x: Tensor, input_pos: Tensor, temperature: float, top_k: Optional[int]) -> Tensor:
    # x: [B, T] prompt, input_pos: [T] -> first new token [B, 1]
    logits = model(x, input_pos)  # [B, T, V]
    return sample(logits[:, -1], temperature, top_k)


def decode_one_token(model: Transformer, x: Tensor, input_pos: Tensor, temperature: float,
                     top_k: Optional[int]) -> Tensor:
    # x: [B, 1], input_pos: [1] -> next token [B, 1]
    logits = model(x, input_pos)  # [B, 1, V]
    return sample(logits[:, -1], temperature, top_k)


@torch.no_grad()
def generate(model: Transformer, prompt: Tensor, max_new_tokens: int, *, temperature: float,
             top_k: Optional[int], prefill_fn: Callable = prefill, decode_fn: Callable = decode_one_token,
             eos_id: Optional[int] = None, on_token: Optional[Callable] = None) -> Tensor:
    """Returns prompt + continuation, [T + new]. Stops early at eos_id unless it is None.

    prefill_fn and decode_fn are passed in so that callers choose compiled or eager versions.
    on_token(seq) is called with the sequence so far after every new token (for streaming)."""
    device = prompt.device
    T = prompt.size(0)
    seq = torch.empty(T + max_new_tokens, dtype=torch.int, device=device)
    seq[:T] = prompt
    input_pos = torch.arange(0, T, device=device)
    next_token = prefill_fn(model, prompt.view(1, -1), input_pos, temperature, top_k).clone()  # [1, 1]
    seq[T] = next_token[0, 0]
    n = 1
    if on_token is not None:
        on_token(seq[:T + 1])
    input_pos = torch.tensor([T], device=device, dtype=torch.int)
    while n < max_new_tokens and not (eos_id is not None and int(next_token) == eos_id):
        # The compiled step may reuse its output buffer (CUDA graphs): copy the token out at once.
        next_token = decode_fn(model, next_token.view(1, 1), input_pos, temperature, top_k).clone()
        input_pos += 1
        seq[T + n] = next_token[0, 0]
        n += 1
        if on_token is not None:
            on_token(seq[:T + n])
    return seq[:T + n]


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


def active_weight_bytes(model: Transformer) -> int:
    """Bytes of weights one decoded token reads: everything but the embedding table (one row is
    read) and the experts (only K of E are read)."""
    config = model.config
    total = 0
    for name, t in model.state_dict().items():
        nbytes = t.numel() * t.element_size()
        if name.startswith("tok_embeddings."):
            nbytes //= config.vocab_size
        elif ".block_sparse_moe.w" in name:  # expert weights and their scales
            nbytes = nbytes * config.num_activated_experts // config.num_experts
        total += nbytes
    return total


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
    parser.add_argument("--interactive", action="store_true", help="Read prompts from stdin until end of input.")
    parser.add_argument("--num_samples", type=int, default=5, help="Number of samples.")
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
    if args.max_new_tokens < 1:
        raise UserError(f"--max_new_tokens must be at least 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise UserError(f"--temperature must be 0 (greedy) or positive, got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise UserError(f"--top_k must be at least 1, got {args.top_k}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but CUDA is not available; use --device cpu")
    try:
        torch.device(args.device)
    except RuntimeError:
        raise UserError(f"--device {args.device!r} is not a device torch knows (try cpu or cuda)")


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
        decode_fn = torch.compile(decode_one_token, fullgraph=True, options=decode_compile_options(device))
    if args.compile_prefill:
        prefill_fn = torch.compile(prefill, fullgraph=True, dynamic=True)
    return prefill_fn, decode_fn


def main(argv=None):
    args = parse_args(argv)
    try:
        check_args(args)
        rank = maybe_init_dist(args.device)  # None unless under torchrun
        world_size = dist.get_world_size() if rank is not None else 1
        with output_of_rank0_only(rank):
            run(args, rank, world_size)
    except UserError as e:  # on every rank: each one stops
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    if rank is not None:
        dist.destroy_process_group()


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
    tokenizer = load_tokenizer(args.checkpoint_path)
    block_size = read_config(args.checkpoint_path).block_size
    instruct = is_instruct(args.checkpoint_path)

    def encode(text: str) -> Tensor:
        if instruct:
            text = f"[INST] {text.strip()} [/INST]"
        ids = [tokenizer.bos_id()] + tokenizer.encode(text)
        if len(ids) + args.max_new_tokens > block_size:
            raise UserError(f"the prompt ({len(ids)} tokens) plus --max_new_tokens {args.max_new_tokens} exceeds "
                            f"the model's context of {block_size} tokens; shorten one of them")
        return torch.tensor(ids, dtype=torch.int, device=device)

    prompt_ids = None if args.interactive else encode(args.prompt)  # checked before any work
    t0 = time.perf_counter()
    model = load_model(args.checkpoint_path, device, precision, rank, world_size)
    synchronize(device)
    print(f"Time to load model: {time.perf_counter() - t0:.02f} seconds", file=sys.stderr)
    prefill_fn, decode_fn = compile_steps(args, device)
    eos_id = None if args.ignore_eos else tokenizer.eos_id()
    torch.manual_seed(args.seed)

    def run_one(prompt_ids: Tensor) -> tuple:
        # The cache only grows; rounding its length up lets compiled steps keep their shapes.
        needed = prompt_ids.size(0) + args.max_new_tokens
        with torch.device(device):
            model.setup_caches(max_batch_size=1, max_seq_length=min(block_size, round_up(needed)))
        streamer = TextStreamer(tokenizer)
        synchronize(device)
        t = time.perf_counter()
        seq = generate(model, prompt_ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                       prefill_fn=prefill_fn, decode_fn=decode_fn, eos_id=eos_id, on_token=streamer)
        synchronize(device)
        t = time.perf_counter() - t
        streamer.finish(seq)
        return t, seq.size(0) - prompt_ids.size(0)

    # Under tensor parallelism each rank reads its own shard (and the replicated parts) per token:
    # the bytes all ranks together read, so the bandwidth line is the sum over the GPUs.
    model_bytes = active_weight_bytes(model) * world_size
    tokens_per_sec = []
    if args.interactive:
        for text in read_prompts(rank):
            t, n = run_one(encode(text))
            report(len(tokens_per_sec), t, n, model_bytes, tokens_per_sec)
    else:
        # With compilation, sample -1 is a warm-up that pays for it and is not counted.
        start = -1 if (args.compile or args.compile_prefill) else 0
        for i in range(start, args.num_samples):
            profiling = args.profile is not None and i == args.num_samples - 1
            with (torch.profiler.profile() if profiling else contextlib.nullcontext()) as prof:
                t, n = run_one(prompt_ids)
            if profiling:
                prof.export_chrome_trace(f"{args.profile}.json" if rank is None else f"{args.profile}_rank_{rank}.json")
            if i == -1:
                print(f"Compilation time: {t:.2f} seconds", file=sys.stderr)
                continue
            report(i, t, n, model_bytes, tokens_per_sec)
    if world_size > 1:
        print(f"Bandwidth is summed over the {world_size} ranks; memory is rank 0's.")
    print("==========")
    print(f"Average tokens/sec: {sum(tokens_per_sec) / max(len(tokens_per_sec), 1):.2f}")
    print(f"Memory used: {peak_memory_gb(device):.02f} GB")


def report(i: int, seconds: float, new_tokens: int, model_bytes: int, tokens_per_sec: list):
    tps = new_tokens / seconds
    tokens_per_sec.append(tps)
    print(f"Time for inference {i + 1}: {seconds:.02f} sec total, {tps:.02f} tokens/sec")
    print(f"Bandwidth achieved: {model_bytes * tps / 1e9:.02f} GB/s")


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
