# Generating text with Mixtral, as a library: sampling, prefill (of a batch, or into one row of the cache, as
# server.py admits a request) and the one-token decode step, generate()
# and generate_batch() over the static KV cache, the settings a run generates with, the chat format and a
# conversation's state, and the text streamer. generate.py is the command line over it; scripts/benchmark.py
# uses it too. Loading a checkpoint is checkpoint.py's; the measuring (timer, bytes read, expert counts,
# memory) is measuring.py's.
import contextlib
import sys
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from errors import UserError
from model import Transformer
from reading import continued


# ----------------------------------------------------------------------------- sampling
# The controls are transformers' logits processors, in the order its generate() applies them: the repetition
# penalty on the model's logits, then temperature, top-k, top-p and min-p; greedy decoding takes the penalty
# only. Each works on one row per sequence, so that every sequence of a batch may have its own values; the
# neutral value of a control (top_k 0, top_p 1, min_p 0, repetition_penalty 1) turns it off for its row.

class Sampling(NamedTuple):
    """How each of B sequences draws its next token: [B, 1] tensors of the controls' values, a control that is
    off for every row None (then it costs nothing). A compiled step is given the same shapes and the same
    Nones at every step, so it stays one graph whatever the values."""
    temperature: Optional[Tensor] = None  # [B, 1], above 0; None: greedy for every row
    greedy: Optional[Tensor] = None  # [B, 1] bool: the rows of temperature 0, which take the likeliest token
    top_k: Optional[Tensor] = None  # [B, 1] int; None too when every row has the same k: candidates is the filter
    top_p: Optional[Tensor] = None  # [B, 1]
    min_p: Optional[Tensor] = None  # [B, 1]
    repetition_penalty: Optional[Tensor] = None  # [B, 1]
    seen: Optional[Tensor] = None  # [B, V] bool: the tokens of each sequence so far, which the penalty lowers
    candidates: Optional[int] = None  # the draw is among this many likeliest tokens (the largest top_k); None: all
    noise: Optional[Tensor] = None  # [B, N] the Exp(1) draws of the race below, one per token drawn among (N: the
    # vocabulary, or candidates), when the caller draws them itself (a server, from each request's own seed);
    # None: drawn here from torch's global generator


def sampling(batch: int, device, temperature=0.0, top_k=None, top_p=None, min_p=None,
             repetition_penalty=None) -> Sampling:
    """The Sampling of `batch` rows; each control is one value for every row or a list of one per row, and
    None (or its neutral value in every row) is off. seen is left to the generation (it knows the prompts)."""
    def values(given, neutral) -> Optional[list]:  # one per row; None when every row is neutral
        given = list(given) if isinstance(given, (list, tuple)) else [given] * batch
        given = [neutral if v is None else v for v in given]
        return None if all(v == neutral for v in given) else given

    def rows(given, neutral, dtype=torch.float32) -> Optional[Tensor]:  # [B, 1]
        given = values(given, neutral)
        return None if given is None else torch.tensor(given, dtype=dtype, device=device)[:, None]

    t = values(temperature, 0.0)
    if t is None:  # greedy everywhere: the penalty is the one control that applies
        return Sampling(repetition_penalty=rows(repetition_penalty, 1.0))
    k = values(top_k, 0)
    one_k = k is not None and 0 not in k and len(set(k)) == 1
    return Sampling(rows([max(v, 1e-5) for v in t], 0.0), rows([v == 0 for v in t], False, torch.bool),
                    None if one_k else rows(top_k, 0, torch.long), rows(top_p, 1.0), rows(min_p, 0.0),
                    rows(repetition_penalty, 1.0), candidates=None if k is None or 0 in k else max(k))


def penalize_repetition(logits: Tensor, seen: Tensor, penalty: Tensor) -> Tensor:
    """transformers' RepetitionPenaltyLogitsProcessor: the logit of every token already in the sequence is
    divided by the penalty when positive and multiplied by it when negative (a penalty above 1 lowers both).
    logits [B, V], seen [B, V] bool, penalty [B, 1] -> [B, V]."""
    return torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)


def keep_top_k(ranked: Tensor, k: Tensor) -> Tensor:
    """transformers' TopKLogitsWarper on logits ranked likeliest first ([B, N], as torch.topk returns them):
    every logit below the row's k-th is removed (-inf); ties with the k-th stay. k [B, 1], 0: off."""
    N = ranked.size(-1)
    kth = ranked.gather(-1, torch.where(k > 0, k - 1, N - 1).clamp(max=N - 1))  # [B, 1]
    return ranked.masked_fill(ranked < kth, float("-inf"))


def keep_top_p(ranked: Tensor, p: Tensor) -> Tensor:
    """transformers' TopPLogitsWarper on logits ranked likeliest first ([B, N]): the smallest set of likeliest
    tokens whose probabilities reach p is kept; a token goes once the likelier ones before it hold p or more.
    The likeliest token always stays. p [B, 1], 1: off."""
    probs = torch.softmax(ranked, dim=-1)
    before = probs.cumsum(dim=-1) - probs  # [B, N]: the probability of the tokens ranked above each
    return ranked.masked_fill((before >= p) & (before > 0) & (p < 1), float("-inf"))


def keep_min_p(logits: Tensor, min_p: Tensor) -> Tensor:
    """transformers' MinPLogitsWarper: tokens less likely than min_p times the likeliest token are removed.
    logits [B, N] (in any order), min_p [B, 1], 0: off."""
    probs = torch.softmax(logits, dim=-1)
    return logits.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), float("-inf"))


def filtered(logits: Tensor, s: Sampling) -> tuple:
    """s's temperature, top-k, top-p and min-p on logits [B, V] (the penalty already applied): (the tempered
    logits of the tokens each sequence may draw, -inf for those the controls removed, [B, N]; their token ids
    [B, N], or None when the N are the whole vocabulary in order)."""
    ids = None
    if s.candidates is not None or s.top_p is not None:  # ranked; when only the k best can be drawn, k values, not V
        logits, ids = torch.topk(logits, min(s.candidates or logits.size(-1), logits.size(-1)))  # [B, N] each
    logits = logits / s.temperature
    if s.top_k is not None:
        logits = keep_top_k(logits, s.top_k)
    if s.top_p is not None:
        logits = keep_top_p(logits, s.top_p)
    if s.min_p is not None:
        logits = keep_min_p(logits, s.min_p)
    return logits, ids


NOT_FINITE = -1  # the token "drawn" from logits with a NaN or inf in them: no token, for the host to refuse


def sample(logits: Tensor, s: Sampling) -> Tensor:
    # logits: [B, V] (each sequence's last position) -> next token ids [B, 1]
    logits = logits.float()
    # A weight that is not finite (or activations past float16's range) makes NaN or inf logits, from which
    # argmax and the race would still pick a token. Marked here, inside the step, refused by generate_batch.
    finite = torch.isfinite(logits).all(dim=-1, keepdim=True)  # [B, 1]
    if s.repetition_penalty is not None:
        logits = penalize_repetition(logits, s.seen, s.repetition_penalty)
    if s.temperature is None:
        return torch.where(finite, logits.argmax(dim=-1, keepdim=True), NOT_FINITE)  # [B, 1]
    kept, ids = filtered(logits, s)
    probs = torch.softmax(kept, dim=-1)
    # Exponential race instead of torch.multinomial: same distribution, no host sync (CUDA graphs).
    q = torch.empty_like(probs).exponential_(1) if s.noise is None else s.noise
    choice = torch.argmax(probs / q, dim=-1, keepdim=True)  # [B, 1]
    drawn = choice if ids is None else ids.gather(-1, choice)
    drawn = drawn if s.greedy is None else torch.where(s.greedy, logits.argmax(dim=-1, keepdim=True), drawn)
    return torch.where(finite, drawn, NOT_FINITE)


def prefill(model: Transformer, x: Tensor, input_pos: Tensor, s: Sampling, last: Optional[Tensor] = None) -> Tensor:
    # x: [B, T] prompts, input_pos: [T] -> first new token [B, 1]. last: [B] each prompt's last position in
    # x, for right-padded prompts of different lengths (default: T - 1 for all).
    logits = model(x, input_pos)  # [B, T, V]
    logits = logits[:, -1] if last is None else logits[torch.arange(x.size(0), device=x.device), last]  # [B, V]
    return sample(logits, s)


def decode_one_token(model: Transformer, x: Tensor, input_pos: Tensor, s: Sampling) -> Tensor:
    # x: [B, 1], input_pos: [1], or [B, 1] when the sequences stand at different positions -> next token [B, 1]
    logits = model(x, input_pos)  # [B, 1, V]
    return sample(logits[:, -1], s)


@contextlib.contextmanager
def cache_row(model: Transformer, row: int):
    """Within, the KV cache is its row `row` alone (views of it, so writes land there): a batch of one runs
    in that row while the other rows keep their sequences. The cache's own tensors are put back after, so
    that a compiled step over all the rows still finds the tensors it was compiled with."""
    caches = [layer.attention.kv_cache for layer in model.layers]
    whole = [(kv.k_cache, kv.v_cache) for kv in caches]
    try:
        for kv, (k, v) in zip(caches, whole):
            kv.k_cache, kv.v_cache = k[row:row + 1], v[row:row + 1]
        yield
    finally:
        for kv, (k, v) in zip(caches, whole):
            kv.k_cache, kv.v_cache = k, v


def prefill_row(model: Transformer, prompt: Tensor, row: int, s: Sampling, prefill_fn: Callable = prefill) -> Tensor:
    """prompt [T] prefilled into row `row` of the cache at positions 0..T-1 -> its first new token [1, 1].
    s: that row's Sampling (a batch of one). Continuous batching admits a sequence so, between decode steps."""
    with cache_row(model, row):
        return prefill_fn(model, prompt[None], torch.arange(prompt.size(0), device=prompt.device), s)


class StopStrings:
    """Whether a sequence's new tokens, decoded, hold one of the strings; a string may span tokens. Only the
    tail that can hold a string ending at the newest token is decoded: a character takes at most 4 byte
    tokens, and a few more keep a tail cut mid-character or before a space from hiding it."""

    def __init__(self, tokenizer, strings):
        self.tokenizer, self.strings = tokenizer, [s for s in strings if s]
        self.tail = 4 * max(map(len, self.strings), default=0) + 4

    def __call__(self, new_ids: list) -> bool:
        text = self.tokenizer.decode(new_ids[-self.tail:])
        return any(s in text for s in self.strings)


# ----------------------------------------------------------------------------- generating

@torch.no_grad()
def generate(model: Transformer, prompt: Tensor, max_new_tokens: int, **kwargs) -> Tensor:
    """Returns prompt + continuation, [T + new]: generate_batch() for one prompt (same keywords).
    on_token(seq) is called with the sequence so far after every new token (for streaming)."""
    on_token = kwargs.pop("on_token", None)
    stream = None if on_token is None else (lambda seqs: on_token(seqs[0]))
    return generate_batch(model, [prompt], max_new_tokens, on_token=stream, **kwargs)[0]


@torch.no_grad()
def generate_batch(model: Transformer, prompts: list, max_new_tokens: int, *, temperature=0.0, top_k=None,
                   top_p=None, min_p=None, repetition_penalty=None, stop=None, prefill_fn: Callable = prefill,
                   decode_fn: Callable = decode_one_token, eos_id: Optional[int] = None,
                   on_token: Optional[Callable] = None, start_pos: int = 0, earlier: Optional[list] = None) -> list:
    """Generates for B prompts [T_b] at once: each decode step runs the B sequences together, and each
    sequence ends at its own eos_id (unless None) or stop; returns each prompt + its continuation, up to and
    including the token that ended it.

    The sampling controls (see sampling()) are one value for all sequences or a list of one per sequence.
    stop(new token ids) -> bool, or a list of one per sequence: ends a sequence when true (StopStrings).
    prefill_fn and decode_fn are passed in so that callers choose compiled or eager versions.
    on_token([B, T + n]) is called with the sequences so far after every new token (for streaming).
    start_pos: where the prompts go in the cache, after the tokens already there (a conversation);
    earlier: those tokens ([start_pos] per sequence), which the repetition penalty counts too.

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
    s = sampling(B, device, temperature, top_k, top_p, min_p, repetition_penalty)
    if s.repetition_penalty is not None:
        seen = torch.zeros(B, model.config.vocab_size, dtype=torch.bool, device=device)
        for b, p in enumerate(prompts):
            seen[b, p.long()] = True
            if earlier is not None:
                seen[b, torch.as_tensor(earlier[b], dtype=torch.long, device=device)] = True
        s = s._replace(seen=seen)
    stops = stop if isinstance(stop, (list, tuple)) else [stop] * B
    ends = torch.tensor(lengths, device=device)  # [B] where each sequence's next token goes
    prompt_pos = torch.arange(start_pos, start_pos + T, device=device)
    if min(lengths) == T:
        next_token = prefill_fn(model, seq[:, :T], prompt_pos, s)
        input_pos = torch.tensor([start_pos + T], device=device, dtype=torch.int)  # [1]
    else:
        next_token = prefill_fn(model, seq[:, :T], prompt_pos, s, ends - 1)
        input_pos = (ends + start_pos).to(torch.int)[:, None]  # [B, 1]
    ended = [None] * B  # how many new tokens each sequence that has ended has
    new_ids = [[] for _ in range(B)]  # each sequence's new tokens, on the host where something reads them
    # One host sync per step, outside the compiled step, and only when something reads the tokens as they come.
    syncing = on_token is not None or eos_id is not None or any(stops)
    n = 0
    while True:
        # The compiled step may reuse its output buffer (CUDA graphs): copy the token out at once.
        next_token = next_token.clone()  # [B, 1]
        tokens = next_token[:, 0].tolist() if syncing else None
        if syncing and NOT_FINITE in tokens:
            refuse_not_finite(f"at new token {n + 1}" + (f" of sequence {tokens.index(NOT_FINITE) + 1}" if B > 1 else ""))
        seq[rows, ends + n] = next_token[:, 0].to(torch.int)
        if s.seen is not None:
            s.seen[rows, next_token[:, 0].long()] = True
        n += 1
        if on_token is not None:
            on_token(seq[:, :T + n])
        if eos_id is not None or any(stops):
            for b, token in enumerate(tokens):
                new_ids[b].append(token)
                if ended[b] is None and (token == eos_id or (stops[b] is not None and stops[b](new_ids[b]))):
                    ended[b] = n
            if None not in ended:
                break
        if n == max_new_tokens:
            break
        next_token = decode_fn(model, next_token.view(B, 1).clamp(min=0), input_pos, s)  # NOT_FINITE: any token will do
        input_pos += 1
    if not syncing and seq.min().item() == NOT_FINITE:
        refuse_not_finite("during the generation")
    return [seq[b, :lengths[b] + (n if ended[b] is None else ended[b])] for b in range(B)]


def refuse_not_finite(where: str):
    """Text decoded from NaN logits would be garbage shown as an answer: a UserError instead."""
    raise UserError(f"the model's logits are not finite (NaN or infinite) {where}: its checkpoint holds a weight "
                    f"that is not finite, or its activations overflow (float16's range is small; try --precision "
                    f"bfloat16)")


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
    top_p: Optional[float] = None
    min_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    stop: Optional[Callable] = None  # StopStrings, or None

    def sampling(self, batch: int) -> Sampling:
        """The Sampling of a batch of this run (what a step is given), without the penalty's seen tokens."""
        return sampling(batch, self.device, self.temperature, self.top_k, self.top_p, self.min_p,
                        self.repetition_penalty)

    def generate_batch(self, model: Transformer, prompts: list, on_token: Optional[Callable] = None,
                       start_pos: int = 0, earlier: Optional[list] = None) -> list:
        return generate_batch(model, prompts, self.max_new_tokens, temperature=self.temperature, top_k=self.top_k,
                              top_p=self.top_p, min_p=self.min_p, repetition_penalty=self.repetition_penalty,
                              stop=self.stop, prefill_fn=self.prefill_fn, decode_fn=self.decode_fn,
                              eos_id=self.eos_id, on_token=on_token, start_pos=start_pos, earlier=earlier)


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

def user_turn(tokenizer, text: str, instruct: bool, first: bool = True, system: Optional[str] = None) -> list:
    """The tokens a user's text adds to a conversation. With an Instruct checkpoint, Mixtral's chat format as
    mistral-common's v1 tokenizer writes it: <s> once, at the start; each user turn encoded on its own as
    '[INST] {text} [/INST]' (and each assistant turn is the tokens it generated, then </s>); the format has no
    system role, so a system prompt opens the first user turn: '[INST] {system}\n\n{text} [/INST]'.
    Otherwise (plain) the text as it is, each later turn starting a new line of the same text."""
    if instruct:
        if first and system:
            text = f"{system}\n\n{text}"
        return ([tokenizer.bos_id()] if first else []) + tokenizer.encode(f"[INST] {text} [/INST]")
    if system:
        raise UserError("a system prompt needs the Instruct chat format: plain text has no place for one")
    return [tokenizer.bos_id()] + tokenizer.encode(text) if first else continued(tokenizer, "\n" + text)


@dataclass
class Conversation:
    """What a conversation has put in the KV cache, so that each turn feeds the model only its new tokens."""
    tokenizer: object
    instruct: bool
    system: Optional[str] = None  # opens the first user turn (Instruct only)
    tokens: list = field(default_factory=list)  # the conversation's tokens in the cache, in order
    unfed: list = field(default_factory=list)  # the last answer's last token (never an input yet), with Instruct its </s>

    @property
    def position(self) -> int:
        return len(self.tokens)

    def turn(self, text: str) -> list:
        """The tokens the model is fed for the user's text after the conversation so far."""
        return self.unfed + user_turn(self.tokenizer, text, self.instruct, first=self.position == 0, system=self.system)

    def restart(self):
        self.tokens, self.unfed = [], []

    def answered(self, fed: list, answer: Tensor):
        """The model was fed `fed` and answered `answer` (its last token not yet fed; an answer cut short by
        Ctrl-C is the tokens it had)."""
        answer = answer.tolist()
        self.tokens += fed + answer[:-1]
        self.unfed = answer[-1:]
        eos = self.tokenizer.eos_id()
        if self.instruct and self.unfed != [eos]:  # an answer cut short still ends its turn
            self.unfed.append(eos)
        if not self.instruct and self.unfed == [eos]:  # plain text goes on after the end the model chose
            self.unfed = []


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
            # Counted as printed first: Ctrl-C during the write (a chat's answer stopped) then loses some of
            # it from the screen rather than printing it twice.
            new, self.printed = text[len(self.printed):], text
            self.out.write(new)
            self.out.flush()

    def finish(self, seq: Tensor):
        self.emit(self.tokenizer.decode(seq.tolist()))
        self.out.write("\n")
        self.out.flush()
