# eval.py's figures scored as llama.cpp's `llama-perplexity --kl-divergence` scores them, so that our formats and
# llama.cpp's quantization types can sit in one table (BENCHMARKS.md, quality). llama-perplexity tokenizes the
# whole text after one BOS, cuts it into chunks of --context tokens (dropping the last, partial one), replaces each
# chunk's first token by BOS, and scores only the predictions of the second half of each chunk: positions
# context/2 .. context-2, each predicting the next token. eval.py scores every token of every chunk instead.
#
#   python scripts/eval_like_llama_cpp.py --reference_path DIR/model.pth --text val.txt --context 256 \
#       DIR/model_int4.g32.pth DIR/model_q4_k_m.pth
#
# The reference's log-probabilities are computed once and held (float64: 8 bytes x vocabulary per scored token).
# One JSON line per checkpoint: its path, format, weight bytes a decoded token reads, and eval.py's summary
# (perplexity, KL mean/median/p99/max against the reference, top-1 agreement) over the scored tokens.
import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from checkpoint import load_model, load_tokenizer, open_checkpoint  # noqa: E402
from cli import PRECISIONS, one_line_errors  # noqa: E402
from eval import Scores, check_same_config, next_token_log_probs, text_ids  # noqa: E402
from layers import model_scheme  # noqa: E402
from measuring import active_weight_bytes  # noqa: E402


def llama_cpp_chunks(ids: list, bos: int, context: int) -> list:
    """The chunks llama-perplexity evaluates: [BOS] + ids cut into whole chunks of `context`, each starting
    with BOS in place of its first token."""
    tokens = [bos] + ids
    return [[bos] + tokens[start + 1:start + context] for start in range(0, len(tokens) - context + 1, context)]


@torch.no_grad()
def scored_log_probs(model, chunks: list, bos: int) -> list:
    """Per chunk, the model's log-probabilities [context/2 - 1, V] of the second half's tokens, and those tokens."""
    scored = []
    for chunk in tqdm(chunks, desc="chunks", unit="chunk"):
        # next_token_log_probs feeds BOS and all but the last of what it is given: the chunk minus its last token.
        # Its row p predicts chunk[p + 1] from chunk[:p + 1], llama-perplexity's position p; it scores from the
        # middle position on.
        fed, first = chunk[1:], len(chunk) // 2
        scored.append((torch.tensor(fed[first:]), next_token_log_probs(model, fed, bos)[first:]))
    return scored


def score(model, reference: list, chunks: list, bos: int) -> dict:
    """Scores.summary() of model against the reference's scored_log_probs over the second half of each chunk."""
    scores = Scores()
    for (targets, ref), (_, ours) in zip(reference, scored_log_probs(model, chunks, bos)):
        scores.add(targets, ours, ref)
    return scores.summary()


def main(argv=None):
    parser = argparse.ArgumentParser(description="KL divergence and perplexity, scored as llama-perplexity scores them.")
    parser.add_argument("checkpoints", type=Path, nargs="+", help="the checkpoints to score against the reference")
    parser.add_argument("--reference_path", type=Path, required=True)
    parser.add_argument("--text", type=Path, required=True)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--precision", choices=list(PRECISIONS), default="bfloat16")
    args = parser.parse_args(argv)
    with one_line_errors():
        reference_checkpoint = open_checkpoint(args.reference_path)
        tokenizer = load_tokenizer(reference_checkpoint)
        bos = tokenizer.bos_id()
        ids = [i for block in text_ids(args.text, tokenizer, reference_checkpoint.config.block_size) for i in block]
        chunks = llama_cpp_chunks(ids, bos, args.context)
        dtype = PRECISIONS[args.precision]
        reference = load_model(reference_checkpoint, "cpu", dtype)
        reference.setup_caches(max_batch_size=1, max_seq_length=args.context)
        reference = scored_log_probs(reference, chunks, bos)  # computed once, for every checkpoint
        for path in args.checkpoints:
            checkpoint = open_checkpoint(path)
            check_same_config(checkpoint, reference_checkpoint)
            model = load_model(checkpoint, "cpu", dtype)
            model.setup_caches(max_batch_size=1, max_seq_length=args.context)
            summary = score(model, reference, chunks, bos)
            print(json.dumps({"checkpoint": str(path), "format": model_scheme(model).spec,
                              "bytes_per_token": active_weight_bytes(model), **summary}), flush=True)


if __name__ == "__main__":
    main()
