# Generating text with Mixtral, as a library: sampling, prefill and the one-token decode step, generate()
# and generate_batch() over the static KV cache, the settings a run generates with, the chat format and a
# conversation's state, and the text streamer. generate.py is the command line over it; scripts/benchmark.py
# uses it too. Loading a checkpoint is checkpoint.py's; the measuring (timer, bytes read, expert counts,
# memory) is measuring.py's.
import sys
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor

from model import Transformer


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


# ----------------------------------------------------------------------------- generating

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


@dataclass
class Settings:
    """How every generation of a run goes: the sampling, the steps (compiled or eager), and where it runs.
    world_size: the tensor-parallel ranks the model is split over (the bytes a step reads are theirs together)."""
    device: str
    max_new_tokens: int
    temperature: float
    top_k: Optional[int]
    eos_id: Optional[int] = None
    prefill_fn: Callable = prefill
    decode_fn: Callable = decode_one_token
    world_size: int = 1

    def generate_batch(self, model: Transformer, prompts: list, on_token: Optional[Callable] = None,
                       start_pos: int = 0) -> list:
        return generate_batch(model, prompts, self.max_new_tokens, temperature=self.temperature, top_k=self.top_k,
                              prefill_fn=self.prefill_fn, decode_fn=self.decode_fn, eos_id=self.eos_id,
                              on_token=on_token, start_pos=start_pos)


# ----------------------------------------------------------------------------- compiling

def decode_compile_options(device: str) -> dict:
    """Inductor options for the one-token decode step."""
    if device.startswith("cuda"):
        # CUDA graphs remove the per-kernel launch cost that dominates one-token steps on a GPU.
        # Coordinate-descent tuning is what makes inductor lower a matrix-vector product to a fused
        # reduction on a GPU (on a CPU it does so anyway): the decode path's w1[experts] @ x then reads
        # the chosen experts in place instead of gathering a copy of them first.
        return {"triton.cudagraphs": True, "coordinate_descent_tuning": True}
    # On a CPU the step is a few hundred small kernels: calling them from generated C++ rather than
    # Python saves the interpreter's cost per call, at no cost in compile time.
    return {"cpp_wrapper": True}


def compile_steps(device: str, compile_decode: bool, compile_prefill: bool) -> tuple:
    """Returns the (prefill, decode) callables to use, compiled as asked."""
    prefill_fn, decode_fn = prefill, decode_one_token
    if compile_decode:
        # Static shapes: one graph per batch size (and cache length), rather than one with symbolic sizes.
        decode_fn = torch.compile(decode_one_token, fullgraph=True, dynamic=False, options=decode_compile_options(device))
    if compile_prefill:
        prefill_fn = torch.compile(prefill, fullgraph=True, dynamic=True)
    return prefill_fn, decode_fn


def round_up(n: int, multiple: int = 256) -> int:
    return (n + multiple - 1) // multiple * multiple


def cache_length(longest_prompt: int, max_new_tokens: int, block_size: int) -> int:
    """The positions of the KV cache that batches of prompts up to longest_prompt tokens use. Rounded up,
    so that batches of other lengths share it and a compiled step keeps its shapes."""
    return min(block_size, round_up(longest_prompt + max_new_tokens))


# ----------------------------------------------------------------------------- the chat format

def user_turn(tokenizer, text: str, instruct: bool, first: bool = True) -> list:
    """The tokens a user's text adds to a conversation, in Mixtral's chat format as mistral-common writes
    it: <s> once, at the start; with an Instruct checkpoint each user turn encoded on its own as
    '[INST] {text} [/INST]' (and each assistant turn is the tokens it generated, then </s>). Otherwise the
    text as it is: each line continues the same text."""
    if instruct:
        text = f"[INST] {text.strip()} [/INST]"
    return ([tokenizer.bos_id()] if first else []) + tokenizer.encode(text)


@dataclass
class Conversation:
    """What a conversation has put in the KV cache, so that each turn feeds the model only its new tokens."""
    tokenizer: object
    instruct: bool
    position: int = 0  # tokens of the conversation in the cache
    unfed: list = field(default_factory=list)  # the last answer's last token (never an input yet), with Instruct its </s>

    def turn(self, text: str) -> list:
        """The tokens the model is fed for the user's text after the conversation so far."""
        return self.unfed + user_turn(self.tokenizer, text, self.instruct, first=self.position == 0)

    def restart(self):
        self.position, self.unfed = 0, []

    def answered(self, fed: list, answer: Tensor):
        """The model was fed `fed` and answered `answer` (its last token not yet fed)."""
        self.position += len(fed) + answer.size(0) - 1
        self.unfed = answer[-1:].tolist()
        if self.instruct and self.unfed != [self.tokenizer.eos_id()]:  # an answer cut short still ends its turn
            self.unfed.append(self.tokenizer.eos_id())


def conversation_cache_length(needed: int, block_size: int) -> int:
    """Cache positions for a conversation that needs `needed`: grown by doublings, which keep what the cache
    holds, so that few sizes (few compilations of the step) are seen."""
    length = 256
    while length < needed:
        length *= 2
    return min(block_size, length)


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
