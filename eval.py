# What a checkpoint costs in quality: the perplexity of a text under it and, against a reference (the
# full-precision model.pth it was quantized from), the KL divergence of its next-token distributions
# from the reference's and how often both models' most likely token is the same (as llama.cpp's
# `llama-perplexity --kl-divergence`). Loads any checkpoint generate.py loads (bf16, int8, int4, and
# their mixes), on CPU or CUDA, tensor-parallel under torchrun.
#
# Memory stays bounded whatever the text's length: the two models run chunk by chunk in one process,
# and a chunk's logits are dropped once scored; only each token's KL divergence (8 bytes) is kept, for
# its median and percentiles.
#
# Shapes in comments: T tokens of a chunk, V vocabulary.
import argparse
import itertools
import json
import math
import sys
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor
from tqdm import tqdm

from checkpoint import Checkpoint, load_model, load_tokenizer, open_checkpoint
from cli import (PRECISIONS, HelpFormatter, add_model_flags, check_memory, check_model_flags, prepare_cpu_kernels,
                 run_on_ranks)
from errors import UserError
from layers import model_scheme
from measuring import active_weight_bytes
from model import Transformer, kv_cache_bytes
from reading import PIECE_CHARS, max_characters, open_text, text_lines, text_pieces, token_ids
from tp import rank_device

# Published perplexities use other conventions (llama.cpp scores only the second half of each chunk,
# Hugging Face's guide slides a window), so ours is spelled out in --help and in the README.
CONVENTION = ("The text's tokens (no BOS) are cut into consecutive chunks of --context tokens; the last, shorter "
              "chunk counts too. Each chunk is evaluated on its own with BOS prepended, and every token of it is "
              "scored, the first predicted from BOS alone. Perplexity is exp of the mean negative log-likelihood "
              "over all scored tokens.")
DEFAULT_CONTEXT = 512  # llama.cpp's, for comparable figures; a model with a shorter context gets its own


# ----------------------------------------------------------------------------- scoring

def forward(model: Transformer, inputs: Tensor, input_pos: Tensor) -> Tensor:
    return model(inputs, input_pos)  # [1, T, V]


@torch.no_grad()
def next_token_log_probs(model: Transformer, chunk: list, bos: int, step=forward) -> Tensor:
    """log P(token t | BOS and the chunk's tokens before t) for each token t of the chunk: [T, V], in float64,
    so that differences of log-probabilities (the KL divergence) keep the logits' own precision. The chunk
    starts at position 0: the static cache's entries past it are masked, whatever an earlier chunk left."""
    device = model.norm.weight.device
    inputs = torch.tensor([[bos] + chunk[:-1]], dtype=torch.int, device=device)  # [1, T]: the last token predicts nothing
    logits = step(model, inputs, torch.arange(len(chunk), device=device))  # [1, T, V]
    return torch.log_softmax(logits[0].double(), dim=-1)


def kl_divergence(reference: Tensor, ours: Tensor) -> Tensor:
    """KL(reference || ours) of each token's next-token distributions, from log-probabilities [T, V]: [T]."""
    return (reference.exp() * (reference - ours)).sum(dim=-1)


def percentile(values: Tensor, q: float) -> float:
    """The q-quantile (0..1) of values, interpolated linearly between order statistics (numpy's default);
    sorting, since torch.quantile refuses more than 16M values."""
    ordered = values.sort().values
    position = q * (ordered.numel() - 1)
    low = math.floor(position)
    high = min(low + 1, ordered.numel() - 1)
    return (ordered[low] + (position - low) * (ordered[high] - ordered[low])).item()


def exp(x: float) -> float:
    """e**x, infinite past float64's range (a model that gives its text almost no probability) rather than an
    OverflowError."""
    return math.exp(x) if x < math.log(sys.float_info.max) else math.inf


def json_line(summary: dict) -> str:
    """The summary as one line of strict JSON: a figure that is not finite (an infinite perplexity) is null,
    since JSON has no NaN or Infinity and its readers refuse Python's spelling of them."""
    return json.dumps({k: v if not isinstance(v, float) or math.isfinite(v) else None for k, v in summary.items()},
                      allow_nan=False)


class Scores:
    """Running sums over the scored tokens, chunk by chunk."""

    def __init__(self):
        self.tokens, self.nll, self.reference_nll, self.agreeing = 0, 0.0, 0.0, 0
        self.kl = []  # per chunk, [T] float64

    def add(self, targets: Tensor, ours: Tensor, reference: Optional[Tensor] = None):
        """targets [T]; ours and reference: log-probabilities [T, V] of the chunk's tokens."""
        self.tokens += targets.numel()
        self.nll -= ours.gather(-1, targets[:, None]).sum().item()
        if reference is not None:
            self.reference_nll -= reference.gather(-1, targets[:, None]).sum().item()
            self.kl.append(kl_divergence(reference, ours).cpu())
            self.agreeing += (reference.argmax(dim=-1) == ours.argmax(dim=-1)).sum().item()

    def summary(self) -> dict:
        """The JSON line's figures: perplexity and tokens; with a reference its perplexity, the KL
        divergence's mean, median, 99th percentile and maximum, and the top-1 agreement (a fraction)."""
        result = {"perplexity": exp(self.nll / self.tokens), "tokens": self.tokens}
        if self.kl:
            kl = torch.cat(self.kl)
            result.update(reference_perplexity=exp(self.reference_nll / self.tokens), kl_mean=kl.mean().item(),
                          kl_median=percentile(kl, 0.5), kl_p99=percentile(kl, 0.99), kl_max=kl.max().item(),
                          top1_agreement=self.agreeing / self.tokens)
        return result


def evaluate(models: list, id_blocks, context: int, bos: int, step=forward) -> dict:
    """Scores the text's tokens under models[0], against models[1] if given; returns Scores.summary(). id_blocks:
    the text's token ids in consecutive lists (text_ids' pieces), each chunk scored as soon as it is whole."""
    for model in models:
        with torch.device(model.norm.weight.device):
            model.setup_caches(max_batch_size=1, max_seq_length=context)
    scores, pending = Scores(), []
    with tqdm(desc="chunks", unit="chunk") as progress:
        for ids in itertools.chain(id_blocks, [None]):  # None: the end, where a shorter last chunk counts too
            pending.extend(ids or [])
            while len(pending) >= context or (ids is None and pending):
                chunk, pending = pending[:context], pending[context:]
                targets = torch.tensor(chunk, device=models[0].norm.weight.device)  # [T]
                log_probs = [next_token_log_probs(model, chunk, bos, step) for model in models]
                for role, lp in zip(("model", "reference"), log_probs):
                    if not torch.isfinite(lp).all():  # what a NaN or inf weight gives; scoring it would say nothing
                        raise UserError(f"the {role}'s logits are not finite (NaN or infinite) in chunk "
                                        f"{progress.n + 1}: its checkpoint holds a weight that is not finite, or its "
                                        f"activations overflow (float16's range is small; try --precision bfloat16)")
                scores.add(targets, *log_probs)
                progress.update()
    return scores.summary()


# ----------------------------------------------------------------------------- input

TEXT = "a plain-text (UTF-8) file"


def text_ids(path: Path, tokenizer, block_size: int):
    """The token ids of the text in path (no BOS), in consecutive lists, read and tokenized a piece at a time
    (reading.text_pieces), so that memory stays bounded whatever the text's length; the ids are those of the
    whole text tokenized at once. A line longer than the model's whole context could spell is refused before it
    is held whole; an empty text, before the model is loaded."""
    name = f"--text {path}"
    stream = open_text(path, "--text", TEXT, newline=None)
    lines = text_lines(stream, name, max_characters(tokenizer, block_size),
                       f"more tokens than the model's context of {block_size} holds; break it", keep_ends=True)
    pieces = text_pieces(lines)
    first = next(pieces)
    if not first.strip() and len(first) < PIECE_CHARS:  # all of a short text, and blank
        raise UserError(f"{name} is empty; give it the text to score")
    return token_ids(tokenizer, itertools.chain([first], pieces))


def check_context(context: int, block_size: int):
    if context < 2:
        raise UserError(f"--context must be at least 2 tokens, got {context}")
    if context > block_size:
        raise UserError(f"--context {context} exceeds the model's context of {block_size} tokens")


def check_same_config(checkpoint: Checkpoint, reference: Checkpoint):
    """The reference must be the same model (any format): the same config, field by field."""
    for field, value in vars(checkpoint.config).items():
        if getattr(reference.config, field) != value:
            raise UserError(f"--reference_path {reference.path} is another model: its config.json has {field} "
                            f"{getattr(reference.config, field)}, the checkpoint's has {value}")


def check_scoring_fits(args, checkpoints: list, device: str, world_size: int):
    """Refuses, before loading, a --context whose KV caches and a chunk's scores (each model's logits, and its
    log-probabilities with one float64 temporary) exceed the memory the device has available."""
    config, precision = checkpoints[0].config, PRECISIONS[args.precision]
    per_model = (kv_cache_bytes(config, 1, args.context, precision, world_size) +
                 args.context * config.vocab_size * (precision.itemsize + 2 * 8))
    models = "the model's" if len(checkpoints) == 1 else "each of the 2 models'"
    check_memory(len(checkpoints) * per_model, device,
                 f"--context {args.context} asks for {{}} ({models} KV cache and a chunk's logits and float64 "
                 f"log-probabilities)", "lower --context")


# ----------------------------------------------------------------------------- CLI

def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Perplexity of a text under a Mixtral checkpoint and, with --reference_path, the KL divergence of "
                    "its next-token distributions from the reference's. " + CONVENTION + " The last line printed is "
                    "one JSON object: perplexity, tokens, and with a reference reference_perplexity, kl_mean, "
                    "kl_median, kl_p99, kl_max (KL(reference || model) per scored token, in nats) and top1_agreement "
                    "(the fraction of scored tokens where both models' most likely next token is the same).",
        formatter_class=HelpFormatter)
    parser.add_argument("--text", type=Path, required=True, help="The plain-text (UTF-8) file to score.")
    parser.add_argument("--context", type=int, default=None,
                        help=f"Tokens of the text per chunk, at most the model's block size (BOS takes the place of "
                             f"the last token, which is scored but never fed). Default: {DEFAULT_CONTEXT}, or the "
                             f"model's context where that is shorter.")
    parser.add_argument("--reference_path", type=Path, default=None,
                        help="The full-precision checkpoint to compare with (same config.json), e.g. the model.pth "
                             "the checkpoint was quantized from. Both models are held at once.")
    add_model_flags(parser, compile_help="Compile the forward pass (dynamic shapes).")
    return parser.parse_args(argv)


def main(argv=None):
    run_on_ranks(parse_args(argv), check_model_flags, run)


def run(args, rank: Optional[int] = None, world_size: int = 1):
    """Checks every input before loading anything, then scores the text and prints the table and the JSON line."""
    checkpoints = [open_checkpoint(args.checkpoint_path)]
    if args.context is None:
        args.context = min(DEFAULT_CONTEXT, checkpoints[0].config.block_size)
    check_context(args.context, checkpoints[0].config.block_size)
    if args.reference_path is not None:
        checkpoints.append(open_checkpoint(args.reference_path))
        check_same_config(*checkpoints)
    tokenizer = load_tokenizer(checkpoints[0])
    ids = text_ids(args.text, tokenizer, checkpoints[0].config.block_size)
    device = rank_device(args.device) if rank is not None else args.device
    check_scoring_fits(args, checkpoints, device, world_size)
    prepare_cpu_kernels(device)
    models = [load_model(checkpoint, device, PRECISIONS[args.precision], rank, world_size) for checkpoint in checkpoints]
    step = forward
    if args.compile:
        print("compiling the forward pass with torch.compile (the first chunk waits for it)…", file=sys.stderr,
              flush=True)
        # One graph for the full chunks and, with dynamic shapes, the same one for the last, shorter chunk.
        step = torch.compile(forward, fullgraph=True, dynamic=True)
    summary = evaluate(models, ids, args.context, tokenizer.bos_id(), step)
    print_table(args, summary, [(checkpoint.path, model_scheme(model).spec, active_weight_bytes(model) * world_size)
                                for checkpoint, model in zip(checkpoints, models)])
    print(json_line(summary))


def print_table(args, summary: dict, checkpoints: list):
    """A markdown table of the figures; checkpoints: (path, format name, weight bytes a token reads) of
    the model and the reference."""
    print(f"### {args.text}: {summary['tokens']} tokens in chunks of {args.context}, {args.precision}")
    print("| | checkpoint | format | weights read per token | perplexity |")
    print("|---|---|---|---|---|")
    perplexities = [summary["perplexity"], summary.get("reference_perplexity")]
    for role, (path, name, nbytes), perplexity in zip(("model", "reference"), checkpoints, perplexities):
        print(f"| {role} | {path} | {name} | {nbytes / 1e6:.4g} MB | {perplexity:.4f} |")
    if "kl_mean" in summary:
        print("\n| KL(reference ‖ model) per token, nats: mean | median | 99th percentile | max | top-1 agreement |")
        print("|---|---|---|---|---|")
        print(f"| {summary['kl_mean']:.6f} | {summary['kl_median']:.6f} | {summary['kl_p99']:.6f} | "
              f"{summary['kl_max']:.6f} | {100 * summary['top1_agreement']:.2f} % |")


if __name__ == "__main__":
    main()
