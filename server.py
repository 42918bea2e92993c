# An OpenAI-compatible HTTP server with continuous batching: POST /v1/completions and /v1/chat/completions
# (streamed as server-sent events or whole), GET /v1/models and /health, on FastAPI and uvicorn.
#
#   python server.py --checkpoint_path checkpoints/$MODEL_REPO/model.pth --port 8000
#
# One engine thread owns the model and --max_batch_size slots: the rows of one KV cache. Between decode
# steps it admits waiting requests into free slots (each prompt prefilled into its own row, at its own
# positions), then runs one decode step for every slot at once, hands each new token to its client, and
# frees a slot at end-of-sequence, a stop string, max_tokens or a client that went away. The step always
# sees every slot (an idle one decodes token 0 at position 0, its output unused), so a compiled step keeps
# its graph whatever comes and goes (two graphs: with the sampling controls, and greedy alone). The HTTP side (asyncio, the main thread) only checks requests, queues them
# and forwards each token's text. Under torchrun rank 0 serves HTTP and broadcasts each step's plan; the
# other ranks follow it with their shards.
import argparse
import asyncio
import collections
import json
import math
import random
import signal
import socket
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Optional

import torch

from checkpoint import is_instruct, load_model, load_tokenizer, open_checkpoint
from cli import HelpFormatter, PRECISIONS, add_model_flags, check_model_flags, one_line_errors, prepare_cpu_kernels
from errors import UserError
from generation import Conversation, Sampling, compile_steps, prefill_row, user_turn
from measuring import available_memory
from model import kv_cache_bytes
from tp import broadcast_from_rank0, maybe_init_dist, rank_device
from writing import readable_size

try:  # the server's own dependencies: said in one line when missing, not a traceback
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
except ImportError:
    uvicorn = None

IDLE_BEAT = 30.0  # seconds: an idle rank 0 still sends a plan this often, well inside the followers' collective timeout


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Serve Mixtral over OpenAI's HTTP API (completions and chat, "
                                                 "streamed or not), decoding concurrent requests together.",
                                     formatter_class=HelpFormatter)
    add_model_flags(parser, compile_help="Compile the decode step, at loading: no mix of requests compiles again.")
    parser.add_argument("--host", default="127.0.0.1", help="Address to listen on (0.0.0.0: every interface).")
    parser.add_argument("--port", type=int, default=8000, help="Port to listen on.")
    parser.add_argument("--model_name", default=None,
                        help="The model's name in the API (requests name it); default: the checkpoint folder's name.")
    parser.add_argument("--max_batch_size", type=int, default=8, help="Requests decoded together (KV cache rows).")
    parser.add_argument("--max_queue", type=int, default=64,
                        help="Requests that may wait for a free slot; beyond them the server answers 429.")
    parser.add_argument("--max_seq_length", type=int, default=None,
                        help="Positions of each slot's cache: the longest prompt plus max_tokens a request may ask "
                             "for; default: the model's context, at most 4096.")
    parser.add_argument("--chat_format", choices=["auto", "instruct", "plain"], default="auto",
                        help="How /v1/chat/completions writes messages: instruct: Mixtral's [INST] turns; plain: "
                             "the texts one per line; auto: instruct when the checkpoint is an Instruct one.")
    return parser.parse_args(argv)


def check_args(args):
    if uvicorn is None:
        raise UserError("server.py needs fastapi and uvicorn: pip install -r requirements.txt")
    check_model_flags(args)
    if args.max_batch_size < 1:
        raise UserError(f"--max_batch_size must be at least 1, got {args.max_batch_size}")
    if args.max_queue < 0:
        raise UserError(f"--max_queue must be 0 or more, got {args.max_queue}")
    if args.max_seq_length is not None and args.max_seq_length < 2:
        raise UserError(f"--max_seq_length must be at least 2 (a token and one new), got {args.max_seq_length}")
    if not 0 <= args.port < 65536:
        raise UserError(f"--port must be from 0 to 65535, got {args.port}")


# ----------------------------------------------------------------------------- requests

class BadRequest(Exception):
    """A request the server refuses: OpenAI's error JSON, with the HTTP status."""

    def __init__(self, message: str, param: Optional[str] = None, code: Optional[str] = None, status: int = 400,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.kind = message, param, code, status, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Job:
    """One request: what it asks (checked), then its progress, which the engine thread writes."""
    chat: bool
    prompt: list  # token ids
    max_tokens: int
    temperature: float
    top_k: int
    top_p: float
    stop: list  # strings
    seed: int
    ignore_eos: bool
    stream: bool
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))
    new: list = field(default_factory=list)  # the tokens generated so far
    sent: str = ""  # the text handed to the client so far
    reason: Optional[str] = None  # why it ended: OpenAI's finish_reason, stop or length
    cancelled: bool = False  # the client went away
    loop: object = None  # the event loop of the request's handler, and its queue of events from the engine
    events: object = None


def field_of(body: dict, name: str, kinds: tuple, default, check=None, what: str = ""):
    """body[name] if it is one of kinds (bool is never a number) and passes check; default when absent or null."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds) or \
            (check is not None and not check(value)):
        raise BadRequest(f"'{name}' must be {what}, got {json.dumps(value)[:80]}", name)
    return value


def text_field(value, name: str) -> str:
    """A string the tokenizer can take: JSON may carry lone surrogates (\\udc80), which are not text."""
    if not isinstance(value, str):
        raise BadRequest(f"'{name}' must be a string", name)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(f"'{name}' holds a lone surrogate (\\ud800-\\udfff), which is not text", name) from None
    return value


def chat_prompt(messages, tokenizer, instruct: bool) -> list:
    """The prompt tokens of OpenAI messages in the checkpoint's chat format, as --interactive feeds a
    conversation: an optional system message, then user and assistant turns alternating, ending with a user's."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list of {role, content} objects", "messages")
    turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise BadRequest(f"messages[{i}] must be an object with a role of system, user or assistant", "messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: the text ones, joined
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise BadRequest(f"messages[{i}].content: only text parts can be read", "messages")
            content = "".join(str(p.get("text", "")) for p in content)
        turns.append((m["role"], text_field(content, "messages")))
    system = turns.pop(0)[1] if turns[0][0] == "system" else None
    if len(turns) % 2 == 0 or [role for role, _ in turns] != (["user", "assistant"] * len(turns))[:len(turns)]:
        raise BadRequest("'messages' must alternate user and assistant turns (after an optional first system "
                         "message) and end with a user's", "messages")
    if system is not None and not instruct:
        raise BadRequest("a system message needs the instruct chat format; this server's checkpoint writes plain "
                         "text, which has no place for one", "messages")
    conversation = Conversation(tokenizer, instruct, system)
    for (_, user), (_, answer) in zip(turns[0::2], turns[1::2]):
        fed = conversation.turn(user)
        conversation.answered(fed, torch.tensor(tokenizer.encode(answer), dtype=torch.int))
    return conversation.tokens + conversation.turn(turns[-1][1])


def parse_job(body, chat: bool, tokenizer, instruct: bool, model_name: str, context: int) -> Job:
    """The Job a request body asks for, or BadRequest naming the first field that is wrong."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != model_name:
        raise BadRequest(f"the model '{model}' does not exist; this server serves '{model_name}'", "model",
                         "model_not_found")
    field_of(body, "n", (int,), 1, lambda n: n == 1, "1 (one choice per request)")
    if chat:
        prompt = chat_prompt(body.get("messages"), tokenizer, instruct)
    else:
        text = body.get("prompt")
        if isinstance(text, list) and len(text) == 1:
            text = text[0]
        if not isinstance(text, str):
            raise BadRequest("'prompt' must be a string (or a list of one)", "prompt")
        prompt = user_turn(tokenizer, text_field(text, "prompt"), instruct=False)
    if len(prompt) >= context:
        raise BadRequest(f"the prompt is {len(prompt)} tokens, and this server's context is {context}: shorten it",
                         "messages" if chat else "prompt", "context_length_exceeded")
    room = context - len(prompt)
    max_tokens = field_of(body, "max_completion_tokens", (int,), None, lambda n: n >= 1, "a positive integer")
    max_tokens = field_of(body, "max_tokens", (int,), max_tokens, lambda n: n >= 1, "a positive integer")
    if max_tokens is None:
        max_tokens = room if chat else min(16, room)  # OpenAI's defaults: chat to the end, completions 16 tokens
    if max_tokens > room:
        raise BadRequest(f"the prompt ({len(prompt)} tokens) plus max_tokens {max_tokens} exceeds this server's "
                         f"context of {context} tokens; lower max_tokens to {room} or less", "max_tokens",
                         "context_length_exceeded")
    stop = field_of(body, "stop", (str, list), [], what="a string or a list of up to 4 strings")
    stop = [stop] if isinstance(stop, str) else stop
    if len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise BadRequest("'stop' must be a non-empty string or a list of up to 4 of them", "stop")
    for s in stop:
        text_field(s, "stop")
    return Job(
        chat=chat, prompt=prompt, max_tokens=max_tokens,
        temperature=float(field_of(body, "temperature", (int, float), 1.0, lambda t: 0 <= t <= 2, "from 0 to 2")),
        top_k=field_of(body, "top_k", (int,), 0, lambda k: k >= 0, "0 (off) or a positive integer"),
        top_p=float(field_of(body, "top_p", (int, float), 1.0, lambda p: 0 < p <= 1, "above 0 and at most 1")),
        stop=stop,
        seed=field_of(body, "seed", (int,), None, lambda s: -2 ** 63 <= s < 2 ** 64, "a 64-bit integer"),
        ignore_eos=field_of(body, "ignore_eos", (bool,), False, what="true or false"),
        stream=field_of(body, "stream", (bool,), False, what="true or false"))


# ----------------------------------------------------------------------------- the engine

class Admit(NamedTuple):
    slot: int
    prompt: list
    temperature: float
    top_k: int
    top_p: float
    seed: int


class Plan(NamedTuple):
    """What one iteration of the engine does, the same on every tensor-parallel rank."""
    free: list  # slots whose sequences ended
    admit: list  # Admit: requests prefilled into free slots
    stop: bool = False


class Slots:
    """The model and its slots' state: the tokens each slot feeds next, at which positions, and each slot's
    sampling controls, as fixed [B, 1] tensors updated in place (a compiled step sees the same tensors). Every
    rank holds one and applies the same plans, so every rank computes the same tokens."""

    def __init__(self, model, slots: int, device: str, decode_fn):
        self.model, self.decode_fn, self.device = model, decode_fn, device
        B, V = slots, model.config.vocab_size
        self.tokens = torch.zeros(B, 1, dtype=torch.int, device=device)  # [B, 1] the token each slot feeds next
        self.positions = torch.zeros(B, 1, dtype=torch.int, device=device)  # [B, 1] where it goes
        # Every control present, so the step's graph never changes: temperature 1 where greedy (unused there),
        # top_k 0 and top_p 1 where off. The noise is drawn from each request's own seeded generator.
        self.s = Sampling(temperature=torch.ones(B, 1, device=device),
                          greedy=torch.ones(B, 1, dtype=torch.bool, device=device),
                          top_k=torch.zeros(B, 1, dtype=torch.long, device=device),
                          top_p=torch.ones(B, 1, device=device),
                          noise=torch.ones(B, V, device=device))
        # While every decoding slot is greedy the step takes the argmax alone: the controls' sort of the whole
        # vocabulary costs a small model's step several times over. Two graphs, both compiled at loading.
        self.greedy = Sampling()
        self.active = [False] * B
        self.generators = [None] * B  # a sampling slot's torch.Generator

    def sampling(self, slots) -> Sampling:
        """The Sampling of a step whose outputs are kept for these slots."""
        return self.s if any(self.generators[b] is not None for b in slots) else self.greedy

    def row(self, b: int) -> Sampling:
        """Slot b's controls alone, as a batch of one (views: what the slot holds)."""
        if self.generators[b] is None:
            return self.greedy
        return self.s._replace(**{name: t[b:b + 1] for name, t in self.s._asdict().items() if torch.is_tensor(t)})

    def draw_noise(self, slots):
        for b in slots:
            if self.generators[b] is not None:
                self.s.noise[b].exponential_(1, generator=self.generators[b])

    def step(self, plan: Plan) -> dict:
        """Applies a plan: frees slots, prefills admitted requests, then one decode step for the slots that
        were decoding already. Returns {slot: its new token}."""
        for b in plan.free:
            self.active[b], self.generators[b] = False, None
            self.tokens[b], self.positions[b] = 0, 0
        decoding = [b for b, on in enumerate(self.active) if on]
        new = {}
        for a in plan.admit:
            b = a.slot
            self.s.temperature[b], self.s.greedy[b] = max(a.temperature, 1e-5), a.temperature == 0
            self.s.top_k[b], self.s.top_p[b] = a.top_k, a.top_p
            self.generators[b] = None if a.temperature == 0 else \
                torch.Generator(self.device).manual_seed(a.seed % 2 ** 64)
            self.draw_noise([b])
            prompt = torch.tensor(a.prompt, dtype=torch.int, device=self.device)
            token = prefill_row(self.model, prompt, b, self.row(b))  # [1, 1]
            self.tokens[b], self.positions[b], self.active[b] = token[0], len(a.prompt), True
            new[b] = int(token)
        if decoding:
            # Every slot runs (one graph); only the decoding ones' tokens are kept. The others write their
            # cache at a position their own sequence overwrites before it reads it.
            self.draw_noise(decoding)
            out = self.decode_fn(self.model, self.tokens, self.positions, self.sampling(decoding))
            out = out.to(torch.int)  # [B, 1], a copy (a compiled step may reuse its output)
            rows = torch.tensor(decoding, device=self.device)
            self.tokens[rows], self.positions[rows] = out[rows], self.positions[rows] + 1
            for b, token in zip(decoding, out[rows, 0].tolist()):
                new[b] = token
        return new


class QueueFull(Exception):
    pass


class Engine:
    """Rank 0's side of the slots: the queue of waiting requests, each slot's request, and the text each
    request's client is handed. run() is the engine thread's loop."""

    def __init__(self, slots: int, max_queue: int, tokenizer, distributed: bool):
        self.tokenizer, self.max_queue, self.distributed = tokenizer, max_queue, distributed
        self.jobs = [None] * slots  # each slot's Job
        self.waiting = collections.deque()
        self.wake = threading.Condition()
        self.stopping = False  # set by SIGTERM: cancel what is left and end
        self.slots = None  # Slots, once the model is loaded
        self.failed = None  # the UserError loading ended with

    def submit(self, job: Job):
        if self.stopping:
            raise BadRequest("the server is shutting down", status=503, kind="server_error")
        with self.wake:
            # Free slots take waiting requests at the next iteration: those are not queued beyond them.
            if len(self.waiting) >= self.max_queue + self.jobs.count(None):
                raise QueueFull()
            self.waiting.append(job)
            self.wake.notify()

    def counts(self) -> dict:
        return {"slots": len(self.jobs), "active": sum(j is not None for j in self.jobs),
                "waiting": len(self.waiting)}

    def plan(self) -> Plan:
        """The next iteration: slots to free, requests to admit (in arrival order), or stop. Waits while there
        is nothing to do (an idle beat after IDLE_BEAT seconds, for the followers)."""
        with self.wake:
            beat = time.monotonic() + IDLE_BEAT
            while not (self.stopping or self.waiting or any(self.jobs)) and time.monotonic() < beat:
                self.wake.wait(0.5)  # the stopping flag (set without the lock) is read at least this often
            if self.stopping:
                return Plan([], [], stop=True)
            free = [b for b, j in enumerate(self.jobs) if j is not None and (j.reason or j.cancelled)]
            for b in free:
                job, self.jobs[b] = self.jobs[b], None
                if job.reason is None:
                    print(f"request {job.id}: the client went away after {len(job.new)} new tokens; its slot is "
                          f"free", file=sys.stderr, flush=True)
            admit = []
            while self.waiting and None in self.jobs:
                job = self.waiting.popleft()
                if job.cancelled:
                    continue
                b = self.jobs.index(None)
                self.jobs[b] = job
                admit.append(Admit(b, job.prompt, job.temperature, job.top_k, job.top_p,
                                   random.randrange(2 ** 63) if job.seed is None else job.seed))
            return Plan(free, admit)

    def run(self):
        while True:
            plan = self.plan()
            if self.distributed:
                broadcast_from_rank0(plan)
            if plan.stop:
                break
            try:
                for b, token in self.slots.step(plan).items():
                    self.deliver(self.jobs[b], token)
            except Exception as e:  # a fault of ours: logged whole; the requests in the slots end with one line
                traceback.print_exception(e, file=sys.stderr)
                for job in self.jobs:
                    if job is not None and job.reason is None:
                        job.reason = "error"
                        self.send(job, ("error", f"internal error ({type(e).__name__}); the server's log has "
                                                 f"the details"))
        self.cancel_all("the server is shutting down")

    def deliver(self, job: Job, token: int):
        """Hands the text a new token adds to its client; sets job.reason when the request has ended."""
        job.new.append(token)
        eos = token == self.tokenizer.eos_id() and not job.ignore_eos
        ids = job.new[:-1] if eos else job.new
        # Decoded after the prompt's last tokens, so that the first new word keeps its leading space.
        tail = job.prompt[-8:]
        text = self.tokenizer.decode(tail + ids)[len(self.tokenizer.decode(tail)):]
        reason = "stop" if eos else "length" if len(job.new) >= job.max_tokens else None
        cut = min((i for i in (text.find(s) for s in job.stop) if i >= 0), default=None)
        if cut is not None:  # OpenAI's stop: the text ends before the stop string
            text, reason = text[:cut], "stop"
        elif reason is None:  # held back: an unfinished character, and what may be the start of a stop string
            text = text.rstrip("\ufffd")
            text = text[:len(text) - max((n for s in job.stop for n in range(1, len(s)) if text.endswith(s[:n])),
                                         default=0)]
        if text.startswith(job.sent) and len(text) > len(job.sent):
            self.send(job, ("text", text[len(job.sent):]))
            job.sent = text
        if reason is not None:
            job.reason = reason
            self.send(job, ("end", reason))
            print(f"request {job.id}: {len(job.prompt)} prompt + {len(job.new)} new tokens, {reason}",
                  file=sys.stderr, flush=True)

    def send(self, job: Job, event: tuple):
        try:
            job.loop.call_soon_threadsafe(job.events.put_nowait, event)
        except RuntimeError:  # the event loop has closed: nobody is listening
            pass

    def cancel_all(self, message: str):
        with self.wake:
            jobs = [j for j in self.jobs if j is not None] + list(self.waiting)
            self.waiting.clear()
        for job in jobs:
            self.send(job, ("error", message))

    def stop(self):
        """From a signal handler: only a flag (a lock could be held by the code the signal interrupted)."""
        self.stopping = True


# ----------------------------------------------------------------------------- loading

def load_slots(args, checkpoint, context: int, rank: Optional[int], world_size: int) -> Slots:
    device = rank_device(args.device) if rank is not None else args.device
    torch.set_num_threads(args.threads)  # this thread's own setting: torch's thread count is per thread
    prepare_cpu_kernels(device)
    model = load_model(checkpoint, device, PRECISIONS[args.precision], rank, world_size)
    with torch.device(device):
        model.setup_caches(max_batch_size=args.max_batch_size, max_seq_length=context)
    _, decode_fn = compile_steps(device, args.compile, compile_prefill=False)
    slots = Slots(model, args.max_batch_size, device, decode_fn)
    if args.compile:  # compiled now, while /health says loading, rather than in the first request
        print("compiling the decode step with torch.compile…", file=sys.stderr, flush=True)
        for s in (slots.s, slots.greedy):
            for _ in range(2):
                decode_fn(model, slots.tokens, slots.positions, s)
    return slots


def engine_thread(engine: Engine, args, checkpoint, context: int, server, rank, world_size):
    """Loads the model (the server answers 503 meanwhile), then runs the engine until SIGTERM."""
    with torch.inference_mode():
        try:
            engine.slots = load_slots(args, checkpoint, context, rank, world_size)
        except UserError as e:
            engine.failed = e
            server.should_exit = True
            return
        print(f"serving {args.model_name} on http://{args.host}:{server.config.port} ({args.max_batch_size} slots "
              f"of {context} positions)", file=sys.stderr, flush=True)
        engine.run()


def follow(args, checkpoint, context: int, rank: int, world_size: int):
    """A tensor-parallel rank other than 0: the same steps as rank 0's engine, on its shard, until it stops."""
    for sig in (signal.SIGTERM, signal.SIGINT):  # rank 0 ends the run, and tells the others
        signal.signal(sig, signal.SIG_IGN)
    with torch.inference_mode():
        slots = load_slots(args, checkpoint, context, rank, world_size)
        while True:
            plan = broadcast_from_rank0(None)
            if plan.stop:
                break
            slots.step(plan)


# ----------------------------------------------------------------------------- HTTP

def error_response(e: BadRequest):
    return JSONResponse(e.body(), status_code=e.status)


def make_app(engine: Engine, tokenizer, instruct: bool, model_name: str, context: int):
    app = FastAPI(title="Mixtral", docs_url=None, redoc_url=None)

    @app.exception_handler(Exception)
    async def internal_error(request, e):  # logged whole on the server, one line to the client
        traceback.print_exception(e, file=sys.stderr)
        return error_response(BadRequest(f"internal error ({type(e).__name__}); the server's log has the details",
                                         status=500, kind="server_error"))

    @app.get("/health")
    async def health():
        if engine.slots is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        return {"status": "ok", **engine.counts()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "mixtral-server"}]}

    async def complete(request: Request, chat: bool):
        if engine.slots is None:
            return error_response(BadRequest("the model is still loading; try again shortly", status=503,
                                             kind="server_error", code="model_loading"))
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            return error_response(BadRequest("the request body is not JSON"))
        try:
            job = parse_job(body, chat, tokenizer, instruct, model_name, context)
            job.loop, job.events = asyncio.get_running_loop(), asyncio.Queue()
            engine.submit(job)
        except BadRequest as e:
            return error_response(e)
        except QueueFull:
            return error_response(BadRequest(f"the server is busy: {engine.max_queue} requests already wait for "
                                             f"a slot; retry later", status=429, kind="rate_limit_error",
                                             code="rate_limit_exceeded"))
        if job.stream:
            return StreamingResponse(stream(job, chat), media_type="text/event-stream")
        return await whole(job, chat, request)

    def usage(job: Job) -> dict:
        return {"prompt_tokens": len(job.prompt), "completion_tokens": len(job.new),
                "total_tokens": len(job.prompt) + len(job.new)}

    def chunk(job: Job, chat: bool, text: Optional[str], reason: Optional[str] = None, first: bool = False) -> str:
        if chat:
            delta = {"role": "assistant", "content": ""} if first else {} if text is None else {"content": text}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
        body = {"id": job.id, "object": "chat.completion.chunk" if chat else "text_completion", "created": job.created,
                "model": model_name, "choices": [choice]}
        if reason is not None:
            body["usage"] = usage(job)
        return f"data: {json.dumps(body)}\n\n"

    async def stream(job: Job, chat: bool):
        try:
            if chat:
                yield chunk(job, chat, None, first=True)
            while True:
                kind, value = await job.events.get()
                if kind == "text":
                    yield chunk(job, chat, value)
                elif kind == "end":
                    yield chunk(job, chat, None, value)
                    yield "data: [DONE]\n\n"
                    return
                else:
                    yield f"data: {json.dumps(BadRequest(value, status=503, kind='server_error').body())}\n\n"
                    return
        finally:  # the client went away (the generator is closed early) or the stream ended
            cancel(job)

    def cancel(job: Job):
        if not job.cancelled:
            job.cancelled = True
            with engine.wake:
                engine.wake.notify()

    async def whole(job: Job, chat: bool, request: Request):
        text, reason = "", None
        try:
            while reason is None:
                try:
                    kind, value = await asyncio.wait_for(job.events.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return None
                    continue
                if kind == "text":
                    text += value
                elif kind == "end":
                    reason = value
                else:
                    return error_response(BadRequest(value, status=503, kind="server_error"))
        finally:
            cancel(job)
        choice = {"index": 0, "message": {"role": "assistant", "content": text}} if chat else \
            {"index": 0, "text": text, "logprobs": None}
        return {"id": job.id, "object": "chat.completion" if chat else "text_completion", "created": job.created,
                "model": model_name, "choices": [{**choice, "finish_reason": reason}], "usage": usage(job)}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, chat=True)

    return app


class Server(uvicorn.Server if uvicorn is not None else object):
    """uvicorn's server, whose SIGTERM (or Ctrl-C) first ends the engine: its streams get an error event and
    close, so that uvicorn's wait for open connections ends at once."""
    engine: Engine = None

    def handle_exit(self, sig, frame):
        self.engine.stop()
        super().handle_exit(sig, frame)


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads: a port in use is said at once, in one line."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except (OSError, UnicodeError) as e:
        raise UserError(f"cannot listen on {host}:{port} ({getattr(e, 'strerror', None) or e}); give another "
                        f"--host or --port") from None
    return sock


def main(argv=None):
    args = parse_args(argv)
    with one_line_errors():
        check_args(args)
        torch.set_num_threads(args.threads)
        rank = maybe_init_dist(args.device)
        world_size = torch.distributed.get_world_size() if rank is not None else 1
        checkpoint = open_checkpoint(args.checkpoint_path)
        tokenizer = load_tokenizer(checkpoint)
        config = checkpoint.config
        context = min(config.block_size, args.max_seq_length or 4096)
        needed = kv_cache_bytes(config, args.max_batch_size, context, PRECISIONS[args.precision], world_size)
        available = available_memory(args.device)
        if available is not None and needed > available:
            raise UserError(f"{args.max_batch_size} slots of {context} positions ask for a KV cache of "
                            f"{readable_size(needed)}, more than the {readable_size(available)} available on "
                            f"{args.device}; lower --max_batch_size or --max_seq_length")
        args.model_name = args.model_name or (checkpoint.path.stem if checkpoint.gguf is not None else
                                              checkpoint.folder.name)
        if rank not in (None, 0):
            follow(args, checkpoint, context, rank, world_size)
        else:
            serve(args, checkpoint, tokenizer, context, rank, world_size)
    if rank is not None:
        torch.distributed.destroy_process_group()


def serve(args, checkpoint, tokenizer, context: int, rank: Optional[int], world_size: int):
    sock = bind(args.host, args.port)
    instruct = args.chat_format == "instruct" or (args.chat_format == "auto" and is_instruct(checkpoint))
    engine = Engine(args.max_batch_size, args.max_queue, tokenizer, distributed=rank is not None)
    app = make_app(engine, tokenizer, instruct, args.model_name, context)
    server = Server(uvicorn.Config(app, log_level="warning", access_log=False, port=sock.getsockname()[1]))
    server.engine = engine
    thread = threading.Thread(target=engine_thread, name="engine", daemon=True,
                              args=(engine, args, checkpoint, context, server, rank, world_size))
    thread.start()
    # uvicorn raises the signal it handled again once it has shut down, for the handler that was there
    # before: this one, since the shutdown is all that SIGTERM asks for.
    signal.signal(signal.SIGTERM, lambda sig, frame: None)
    server.run(sockets=[sock])
    engine.stop()
    if engine.slots is not None:  # still loading: the thread ends with the process
        thread.join()
    if engine.failed is not None:
        raise engine.failed


if __name__ == "__main__":
    main()
