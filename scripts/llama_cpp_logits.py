# Our model's next-token log-probabilities on a text, written as llama.cpp's llama-perplexity writes its own
# (--kl-divergence-base), so that llama.cpp compares its run of a GGUF file with ours on the same tokens:
#
#   python scripts/llama_cpp_logits.py --checkpoint_path model.gguf --text val.txt --context 256 --output ours.bin
#   llama-perplexity -m model.gguf --kl-divergence-base ours.bin --kl-divergence -c 256 -b 256
#
# llama-perplexity then prints both perplexities (ours as the base's), the KL divergence of its distributions
# from ours and how often both put the same token first. Its convention, followed here: the text's tokens
# after a BOS, cut into whole chunks of --context tokens, each chunk's first token replaced by BOS, and only
# the predictions of each chunk's second half scored (the 127 tokens after position 128 of 256).
import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from checkpoint import load_model, load_tokenizer, open_checkpoint  # noqa: E402
from cli import PRECISIONS, one_line_errors  # noqa: E402
from errors import UserError  # noqa: E402


def compressed(logits: torch.Tensor) -> np.ndarray:
    """Each row of logits [N, V] as llama-perplexity stores a distribution (its log_softmax): two float32s,
    the step and the smallest log-probability kept (16 below the largest), then each token's log-probability
    as a uint16 count of steps above it; [N, 2 * ((V + 1) // 2) + 4] uint16."""
    logits = logits.float()
    top = logits.max(dim=-1, keepdim=True).values
    low = torch.maximum(logits.min(dim=-1, keepdim=True).values, top - 16)
    log_sum_exp = torch.log((logits - top).exp().double().sum(dim=-1, keepdim=True)).float()
    step = (top - low) / 65535
    codes = torch.where(logits > low, ((logits - low) / step).round(), 0.0).to(torch.int32).to(torch.uint16)
    head = torch.cat((step, low - top - log_sum_exp), dim=-1).numpy().view(np.uint16)  # [N, 4]
    out = np.zeros((logits.shape[0], 2 * ((logits.shape[1] + 1) // 2) + 4), dtype=np.uint16)
    out[:, :4], out[:, 4:4 + logits.shape[1]] = head, codes.numpy()
    return out


@torch.no_grad()
def write_logits(checkpoint_path: Path, text_path: Path, context: int, output: Path, precision: torch.dtype):
    checkpoint = open_checkpoint(checkpoint_path)
    tokenizer = load_tokenizer(checkpoint)
    try:
        text = text_path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--text {text_path} cannot be read as text ({e})") from None
    tokens = [tokenizer.bos_id()] + tokenizer.encode(text)
    n_chunk = len(tokens) // context
    if n_chunk < 1 or context < 4:
        raise UserError(f"--text {text_path} has {len(tokens)} tokens: fewer than one chunk of --context {context}")
    model = load_model(checkpoint, "cpu", precision)
    model.setup_caches(1, context)
    first, nll, count = context // 2, 0.0, 0
    with open(output, "wb") as f:
        f.write(b"_logits_")
        f.write(np.array([context, model.config.vocab_size, n_chunk], dtype=np.int32).tobytes())
        f.write(np.array(tokens[:n_chunk * context], dtype=np.int32).tobytes())
        for i in range(n_chunk):
            chunk = torch.tensor([[tokenizer.bos_id()] + tokens[i * context + 1:(i + 1) * context]])
            logits = model(chunk, torch.arange(context))[0, first:context - 1].float()  # [context - 1 - first, V]
            targets = chunk[0, first + 1:]
            nll -= torch.log_softmax(logits.double(), dim=-1).gather(-1, targets[:, None]).sum().item()
            count += targets.numel()
            f.write(compressed(logits).tobytes())
    print(f"{n_chunk} chunks of {context}: perplexity {math.exp(nll / count):.4f} over {count} tokens; wrote {output}")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Our log-probabilities on a text, as llama-perplexity's "
                                                 "--kl-divergence-base file.")
    parser.add_argument("--checkpoint_path", type=Path, required=True, help="a GGUF file (or any checkpoint)")
    parser.add_argument("--text", type=Path, required=True)
    parser.add_argument("--context", type=int, default=256, help="llama-perplexity's -c")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--precision", choices=list(PRECISIONS), default="float32")
    args = parser.parse_args(argv)
    with one_line_errors():
        write_logits(args.checkpoint_path, args.text, args.context, args.output, PRECISIONS[args.precision])


if __name__ == "__main__":
    main()
