# Trains a small model of exactly Mixtral's architecture (8 experts, top-2 routing, grouped-query
# attention, rotary embeddings) on the one text every machine with Python has: the Python standard
# library's source. It writes the hub's layout (config.json, safetensors, tokenizer.model), which the
# real converter reads like any Mixtral checkpoint: the repo ships the result in assets/tiny-stdlib/.
#
#   python scripts/train_tiny.py --threads 1   # the shipped model's run (assets/tiny-stdlib/README.md), into checkpoints/tiny-stdlib
#
# The output folder is written whole and then takes its place (scripts/make_tiny_checkpoint.py's
# new_checkpoint_folder): an old folder there is replaced as a whole, and one in the repo's assets/
# (the shipped model, with its README.md) only with --force. The folder is made before training, so a
# place that cannot be written is found first.
#
# With the same thread count, torch and CPython version the run is bit-identical (the seed fixes the
# initialisation and the windows drawn). It is never run in CI; the tests run it on a tiny budget.
#
# Steps, in order:
#   1. the files: every *.py under sysconfig's stdlib folder, sorted, tests and site-packages left out;
#      a file is held out for validation when crc32 of its path (relative, '/'-separated) % 40 == 0;
#   2. a SentencePiece BPE tokenizer trained on the training files (byte fallback: any text encodes;
#      ids 0/1/2 are <unk>/<s>/</s> as in Mixtral's; whitespace and newlines kept as they are, since
#      indentation is Python's syntax);
#   3. model.py's Transformer, trained on random windows of the training files' tokens, each after <s>
#      (as eval.py scores a text: chunks after <s>), with AdamW, cross-entropy plus Mixtral's router
#      load-balancing loss, for a fixed number of steps;
#   4. the validation loss on fixed windows of the held-out files as it goes, and each layer's expert
#      usage at the end; the weights written in bfloat16 under the hub's tensor names.
#
# Shapes in comments: B batch, T tokens per window, N = B * T, E experts, K experts per token.
import argparse
import io
import json
import math
import re
import sys
import time
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from checkpoint import hub_config  # noqa: E402
from errors import UserError  # noqa: E402
from model import ModelArgs, Transformer  # noqa: E402
from names import to_hub  # noqa: E402
from scripts.make_tiny_checkpoint import new_checkpoint_folder, write_hub_files  # noqa: E402
from writing import atomic_file, check_room, stop_cleanly_on_signals  # noqa: E402

SKIPPED_FOLDERS = {"site-packages", "test", "tests", "idle_test"}
HOLD_OUT = 40  # one file in about 40 is validation


# ----------------------------------------------------------------------------- data

def stdlib_files(root: Path, max_files: int = 0) -> tuple[list, list]:
    """(training, validation) lists of (relative path, text) of the standard library's *.py files,
    sorted by path; files that are not UTF-8 are skipped. max_files > 0: about that many files in all,
    evenly spaced in each list, at least one of each (the test's small subset)."""
    paths = sorted(p for p in root.rglob("*.py") if not SKIPPED_FOLDERS & set(p.relative_to(root).parts))
    split = {True: [], False: []}
    for p in paths:
        rel = p.relative_to(root).as_posix()
        split[zlib.crc32(rel.encode()) % HOLD_OUT == 0].append((rel, p))
    if max_files:
        every = max(1, len(paths) // max_files)
        split = {held: files[::every] if len(files) > every else files[:1] for held, files in split.items()}

    def read(files):
        texts = []
        for rel, p in files:
            try:
                texts.append((rel, p.read_text(encoding="utf-8")))
            except UnicodeDecodeError:
                continue
            except OSError as e:
                raise UserError(f"cannot read {p}: {e.strerror or e}") from None
        return texts
    return read(split[False]), read(split[True])


def pieces(texts: list, size: int = 2000):
    """The texts cut at line ends into pieces of at most about `size` characters: SentencePiece's trainer
    takes 'sentences' of bounded length, and newlines inside them are kept as characters."""
    for text in texts:
        piece = ""
        for line in text.splitlines(keepends=True):
            if piece and len(piece) + len(line) > size:
                yield piece
                piece = ""
            piece += line
        if piece:
            yield piece


def train_tokenizer(texts: list, vocab_size: int) -> bytes:
    """A SentencePiece BPE model (its serialized bytes) of the texts. Identity normalisation, no dummy
    prefix and no whitespace folding: decode(encode(code)) == code, indentation included; '\\n' is a piece
    of its own, runs of spaces (indentation) are pieces too."""
    import sentencepiece as spm
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=pieces(texts), model_writer=model, vocab_size=vocab_size, model_type="bpe",
            byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, normalization_rule_name="identity",
            add_dummy_prefix=False, remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
            split_digits=True, user_defined_symbols=["\n"], max_sentence_length=4096, num_threads=2,
            hard_vocab_limit=False, minloglevel=2)
    except RuntimeError as e:  # the one limit the texts set: a piece for each character they use, and more
        needed = re.search(r"Vocabulary size is smaller than required_chars\. \d+ vs (\d+)", str(e))
        if needed is None:
            raise
        raise UserError(f"--vocab_size {vocab_size} is too small for these files: their tokenizer needs at least "
                        f"{needed[1]} pieces (the characters they use, the 256 bytes, <unk> <s> </s>)") from None
    return model.getvalue()


def encode(tokenizer, texts: list) -> torch.Tensor:
    """The texts' tokens one after another (no separator: as eval.py reads the files joined), [L] int64."""
    return torch.tensor([t for ids in tokenizer.encode(texts) for t in ids], dtype=torch.int64)


def windows(tokens: torch.Tensor, starts: torch.Tensor, T: int, bos: int) -> tuple:
    """(inputs, targets) [B, T] of the windows tokens[s:s + T]: each input is <s> then the window's first
    T - 1 tokens, so that every token of the window is predicted, the first from <s> alone."""
    targets = torch.stack([tokens[s:s + T] for s in starts.tolist()])
    inputs = torch.cat([torch.full_like(targets[:, :1], bos), targets[:, :-1]], dim=1)
    return inputs, targets


# ----------------------------------------------------------------------------- model

def init_weights(model: Transformer, config: ModelArgs, generator: torch.Generator):
    """GPT-2's initialisation: normal(0, 0.02), the projections into the residual stream (attention's
    wo, each expert's w2) scaled by 1/sqrt(2 n_layer); norms at 1."""
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            torch.nn.init.ones_(p)
        else:
            std = 0.02 / math.sqrt(2 * config.n_layer) if name.endswith(("wo.weight", ".w2")) else 0.02
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=generator) * std)


class RouterLogits:
    """Forward hooks on every layer's router (block_sparse_moe.gate, an nn.Linear) that keep its logits
    [N, E] of the last forward; remove() takes them off."""

    def __init__(self, model: Transformer):
        self.logits = []
        self.handles = [layer.block_sparse_moe.gate.register_forward_hook(self.keep) for layer in model.layers]

    def keep(self, module, inputs, output):
        self.logits.append(output)

    def take(self) -> list:
        logits, self.logits = self.logits, []
        return logits

    def remove(self):
        for handle in self.handles:
            handle.remove()


def load_balancing_loss(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Mixtral's (Switch Transformer's) auxiliary loss for one layer's router logits [N, E]:
    E * sum_e f_e P_e, f_e the fraction of the N * K choices that went to expert e, P_e its mean router
    probability. It is 1 when the routing is uniform and grows as it concentrates."""
    E = logits.size(-1)
    probs = F.softmax(logits.float(), dim=-1)  # [N, E]
    chosen = probs.topk(k, dim=-1).indices  # [N, K]
    fraction = torch.zeros(E).index_add_(0, chosen.flatten(), torch.ones(chosen.numel())) / chosen.numel()
    return E * (fraction * probs.mean(dim=0)).sum()


def expert_usage(logits: list, k: int) -> torch.Tensor:
    """[layers, E]: the fraction of each layer's N * K choices that went to each expert."""
    rows = []
    for layer_logits in logits:
        chosen = layer_logits.topk(k, dim=-1).indices.flatten()
        rows.append(torch.bincount(chosen, minlength=layer_logits.size(-1)).float() / chosen.numel())
    return torch.stack(rows)


@torch.no_grad()
def validate(model: Transformer, inputs: torch.Tensor, targets: torch.Tensor, router: RouterLogits,
             batch_size: int) -> tuple:
    """(mean cross-entropy in nats, expert usage [layers, E]) over the fixed validation windows."""
    model.eval()
    nll, usage = 0.0, 0
    for i in range(0, inputs.size(0), batch_size):
        logits = model(inputs[i:i + batch_size])
        nll += F.cross_entropy(logits.flatten(0, 1), targets[i:i + batch_size].flatten(), reduction="sum").item()
        usage = usage + expert_usage(router.take(), model.config.num_activated_experts) * inputs[i:i + batch_size].size(0)
    model.train()
    return nll / targets.numel(), usage / inputs.size(0)


# ----------------------------------------------------------------------------- training

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Train a small Mixtral on the Python standard library's source.")
    parser.add_argument("--out_dir", type=Path, default=Path("checkpoints/tiny-stdlib"),
                        help="replaced as a whole; the shipped assets/tiny-stdlib only with --force")
    parser.add_argument("--stdlib", type=Path, default=None, help="default: sysconfig's stdlib folder")
    parser.add_argument("--max_files", type=int, default=0, help="about this many files only (0: all)")
    parser.add_argument("--vocab_size", type=int, default=2048)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--n_layer", type=int, default=4)
    parser.add_argument("--n_head", type=int, default=8)
    parser.add_argument("--n_kv_head", type=int, default=2)
    parser.add_argument("--intermediate_size", type=int, default=256, help="each expert's hidden width")
    parser.add_argument("--num_experts", type=int, default=8)
    parser.add_argument("--experts_per_token", type=int, default=2)
    parser.add_argument("--seq_len", type=int, default=256, help="tokens per window; also the model's context")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--weight_decay", type=float, default=0.1)
    parser.add_argument("--aux_loss_coef", type=float, default=0.02, help="Mixtral's router_aux_loss_coef")
    parser.add_argument("--val_windows", type=int, default=64, help="validation windows scored as it goes")
    parser.add_argument("--eval_every", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--val_text", type=Path, default=None,
                        help="also write the held-out files, joined, to this file (eval.py --text)")
    parser.add_argument("--force", action="store_true", help="replace a folder in the repo's assets/ (the shipped model)")
    return parser.parse_args(argv)


AT_LEAST_ONE = ("vocab_size", "dim", "n_layer", "n_head", "n_kv_head", "intermediate_size", "num_experts",
                "experts_per_token", "batch_size", "steps", "val_windows", "eval_every", "threads")


def check_args(args):
    for name in AT_LEAST_ONE:
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.seq_len < 2:
        raise UserError(f"--seq_len must be at least 2 (a window predicts each token from those before), got {args.seq_len}")
    if args.max_files < 0 or args.warmup < 0:
        raise UserError(f"--max_files and --warmup must be 0 or more, got {args.max_files} and {args.warmup}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        raise UserError(f"--lr must be a positive number, got {args.lr}")
    if args.dim % args.n_head or args.n_head % args.n_kv_head or args.experts_per_token > args.num_experts:
        raise UserError(f"--dim {args.dim} must be a multiple of --n_head {args.n_head}, which must be a multiple of "
                        f"--n_kv_head {args.n_kv_head}; --experts_per_token {args.experts_per_token} at most "
                        f"--num_experts {args.num_experts}")
    if args.stdlib is not None and not args.stdlib.is_dir():
        raise UserError(f"--stdlib {args.stdlib} is not a folder: give the folder of the standard library's source")


def main(argv=None):
    args = parse_args(argv)
    try:
        # Ctrl-C (or SIGTERM, SIGHUP) anywhere: one line, the signal's status, and no folder written.
        with stop_cleanly_on_signals(f"{args.out_dir} was not written"):
            check_args(args)
            with new_checkpoint_folder(args.out_dir, args.force) as folder:
                summary = train(args, folder)
    except UserError as e:
        sys.exit(f"error: {e}")
    print(f"wrote {args.out_dir} in {summary['total_seconds']} s (training {summary['train_seconds']} s): "
          f"train loss {summary['final_train_loss']:.4f}, val loss {summary['final_val_loss']:.4f}")


def train(args, folder: Path) -> dict:
    """Trains as the steps at the top say and writes the checkpoint into folder; returns the summary
    (training.json)."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    import sentencepiece as spm
    import sysconfig
    root = args.stdlib or Path(sysconfig.get_paths()["stdlib"])
    train_files, val_files = stdlib_files(root, args.max_files)
    if not train_files:
        raise UserError(f"--stdlib {root} has no .py files (outside test and site-packages folders) to train on")
    if not val_files:
        raise UserError(f"--stdlib {root}: none of its {len(train_files)} .py files is held out for validation (about "
                        f"one in {HOLD_OUT}, by a hash of its path): give a folder with more files")
    train_texts, val_texts = [t for _, t in train_files], [t for _, t in val_files]
    print(f"{len(train_files)} training files ({sum(map(len, train_texts)) / 1e6:.2f} MB), {len(val_files)} held out "
          f"({sum(map(len, val_texts)) / 1e6:.2f} MB) from {root} (Python {sys.version.split()[0]})")
    if args.val_text is not None:
        text = "".join(val_texts).encode()
        with atomic_file(args.val_text, len(text)) as f:
            f.write(text)

    tokenizer_bytes = train_tokenizer(train_texts, args.vocab_size)
    tokenizer = spm.SentencePieceProcessor(model_proto=tokenizer_bytes)
    train_tokens, val_tokens = encode(tokenizer, train_texts), encode(tokenizer, val_texts)
    print(f"tokenizer: {tokenizer.vocab_size()} pieces; {train_tokens.numel()} training tokens, "
          f"{val_tokens.numel()} validation tokens ({sum(map(len, train_texts)) / train_tokens.numel():.2f} "
          f"characters a token)")

    T, B = args.seq_len, args.batch_size
    if train_tokens.numel() <= T or val_tokens.numel() <= T:
        raise UserError(f"--seq_len {T} is longer than the text: {train_tokens.numel()} training and "
                        f"{val_tokens.numel()} validation tokens; give more files or a shorter --seq_len")
    config = ModelArgs(block_size=T, vocab_size=tokenizer.vocab_size(), n_layer=args.n_layer, n_head=args.n_head,
                       dim=args.dim, intermediate_size=args.intermediate_size, n_local_heads=args.n_kv_head,
                       head_dim=args.dim // args.n_head, rope_base=1e4, num_experts=args.num_experts,
                       num_activated_experts=args.experts_per_token)
    generator = torch.Generator().manual_seed(args.seed)
    model = Transformer(config)
    init_weights(model, config, generator)
    total = sum(p.numel() for p in model.parameters())
    expert = 3 * config.dim * config.intermediate_size * config.n_layer
    active = total - (config.num_experts - config.num_activated_experts) * expert - config.vocab_size * config.dim
    # Before training: the weights' file (bfloat16) and the tokenizer's must fit where they go.
    check_room(args.out_dir, [2 * total, len(tokenizer_bytes)])
    print(f"model: {total / 1e6:.2f} M parameters, {active / 1e6:.2f} M active per token (embedding excluded); {config}")

    # Fixed validation windows, evenly spaced over the held-out tokens.
    n_val = min(args.val_windows, (val_tokens.numel() - 1) // T)
    val_starts = torch.linspace(0, val_tokens.numel() - T, n_val).long()
    val_inputs, val_targets = windows(val_tokens, val_starts, T, tokenizer.bos_id())

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "tok_embeddings" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "tok_embeddings" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": rest, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))

    def lr_at(step):  # linear warm-up, then cosine down to a tenth
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        progress = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    router = RouterLogits(model)
    model.train()
    curve = []
    train_started, cpu_started = time.perf_counter(), time.process_time()
    bar = tqdm(range(args.steps), desc="training", unit="step", mininterval=5)
    for step in bar:
        starts = torch.randint(0, train_tokens.numel() - T, (B,), generator=generator)
        inputs, targets = windows(train_tokens, starts, T, tokenizer.bos_id())
        logits = model(inputs)  # [B, T, V]
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        aux = torch.stack([load_balancing_loss(l, config.num_activated_experts) for l in router.take()]).mean()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        optimizer.zero_grad(set_to_none=True)
        (loss + args.aux_loss_coef * aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        curve.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}", aux=f"{aux.item():.3f}")
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            val_loss, usage = validate(model, val_inputs, val_targets, router, B)
            recent = curve[-args.eval_every:]
            tqdm.write(f"step {step + 1}: train loss {sum(recent) / len(recent):.4f} (mean of the last {len(recent)}), "
                       f"val loss {val_loss:.4f} (perplexity {math.exp(val_loss):.2f}), "
                       f"{time.perf_counter() - train_started:.0f} s ({time.process_time() - cpu_started:.0f} s of CPU)")
    router.remove()
    train_seconds, cpu_seconds = time.perf_counter() - train_started, time.process_time() - cpu_started

    print("expert usage on the validation windows (% of each layer's choices; 12.5 % is uniform):")
    for i, row in enumerate(usage):
        print(f"  layer {i}: " + " ".join(f"{100 * u:5.1f}" for u in row.tolist()))

    cfg = {**hub_config(config), "router_aux_loss_coef": args.aux_loss_coef}
    write_hub_files(folder, cfg, tokenizer_bytes, dtype=torch.bfloat16, n_shards=1,
                    tensors=to_hub({n: t.detach() for n, t in model.state_dict().items()}, config))
    summary = {"python": sys.version.split()[0], "torch": torch.__version__, "args": {k: str(v) for k, v in vars(args).items()},
               "train_files": len(train_files), "val_files": len(val_files), "train_tokens": train_tokens.numel(),
               "val_tokens": val_tokens.numel(), "parameters": total, "active_parameters": active,
               "final_train_loss": sum(curve[-50:]) / len(curve[-50:]), "final_val_loss": val_loss,
               "train_seconds": round(train_seconds), "train_cpu_seconds": round(cpu_seconds), "total_seconds": round(time.perf_counter() - started),
               "expert_usage": [[round(u, 4) for u in row.tolist()] for row in usage],
               "loss_curve": [round(sum(curve[i:i + 50]) / len(curve[i:i + 50]), 4) for i in range(0, len(curve), 50)]}
    (folder / "training.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


if __name__ == "__main__":
    main()
