# Calibration: how large each input channel of every quantized weight is on real text, so that quantizing can
# spend its precision where the activations are (llama.cpp's importance matrix). The full-precision reference
# model (model.py) reads the text once; for every weight a scheme may quantize, the mean square of each of its
# input channels over the tokens it saw is kept:
#   layers.i.attention.wqkv.weight   [D]       the normed hidden state attention reads
#   layers.i.attention.wo.weight     [H * Dh]  the attention output, before wo
#   layers.i.block_sparse_moe.w1/w3  [E, D]    the normed hidden state, over the tokens routed to each expert
#   layers.i.block_sparse_moe.w2     [E, I]    each expert's SwiGLU hidden state h, over its tokens
#   output.weight                    [D]       the final normed state
# For a weight w [out, in] and inputs x whose channels are uncorrelated, the expected squared error of the
# output, E |(w - w_quantized) x|^2, is sum_j mean(x_j^2) * sum_rows (w - w_quantized)_j^2: the error each
# format's search (quants.py) makes small, weighted by these means. An expert no token chose gets ones: no
# information, every input counts the same (the scale of the weights does not matter to the search).
#
# The statistics are saved beside the checkpoint (model.imatrix.safetensors, our weight names, the text's
# name and token count in its metadata) so that requantizing in another scheme does not run the model again.
# A file is tied to its model by a fingerprint (model_fingerprint) and refused for another.
#
# Shapes in comments: N tokens, D model width, E experts, K experts per token, I expert width.
import hashlib
import itertools
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

import model as reference
from checkpoint import Checkpoint, load_state_dict, load_tokenizer
from errors import UserError
from model import ModelArgs, Transformer
from reading import PIECE_CHARS, max_characters, open_text, text_lines, text_pieces, token_ids
from writing import atomic_file

# Tokens per chunk at most (the model's context if shorter): llama.cpp's imatrix default; attention's
# mask and scores grow with its square, and statistics of per-channel means need no longer context.
CONTEXT = 512
KIND = "mixtral-imatrix"  # the metadata that says what a file is


def imatrix_path(checkpoint_path: Path) -> Path:
    """Where quantize.py keeps the statistics of a checkpoint: model.pth -> model.imatrix.safetensors."""
    return checkpoint_path.with_name(f"{checkpoint_path.stem}.imatrix.safetensors")


def importance_shapes(config: ModelArgs) -> dict:
    """{weight name: shape of its statistics}: one value per input channel (per expert for experts)."""
    D, E, I = config.dim, config.num_experts, config.intermediate_size
    shapes = {}
    for i in range(config.n_layer):
        shapes[f"layers.{i}.attention.wqkv.weight"] = (D,)
        shapes[f"layers.{i}.attention.wo.weight"] = (config.n_head * config.head_dim,)
        for w, inputs in (("w1", D), ("w3", D), ("w2", I)):
            shapes[f"layers.{i}.block_sparse_moe.{w}"] = (E, inputs)
    shapes["output.weight"] = (D,)
    return shapes


def model_fingerprint(config: ModelArgs, state_dict: dict) -> str:
    """A hash of the config and of every router's and norm's weights: tells models (and retrainings of one)
    apart while reading a few MB of even the largest checkpoint."""
    digest = hashlib.sha256(json.dumps(vars(config), sort_keys=True, default=str).encode())
    for name in sorted(state_dict):
        if name.endswith(("gate.weight", "norm.weight")):
            digest.update(name.encode())
            digest.update(state_dict[name].contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------- collecting

class Statistics:
    """Running sums of squares per input channel (float64) and token counts of every quantized weight."""

    def __init__(self, config: ModelArgs):
        self.sums = {name: torch.zeros(shape, dtype=torch.float64) for name, shape in importance_shapes(config).items()}
        # Tokens each sum is over: [1] for a linear layer, [E, 1] for experts (each its own).
        self.counts = {name: torch.zeros(shape[:-1] + (1,), dtype=torch.float64) for name, shape in
                       importance_shapes(config).items()}

    def add(self, name: str, x: Tensor, expert: int = None):
        """x [..., in]: more inputs of weight `name` (of one expert's, for experts)."""
        x = x.reshape(-1, x.shape[-1]).double()
        sums, counts = (self.sums[name], self.counts[name]) if expert is None else \
            (self.sums[name][expert], self.counts[name][expert])
        sums += x.square().sum(dim=0)
        counts += x.shape[0]

    def means(self) -> dict:
        """{name: float32 mean square per input channel}; ones for an expert no token chose."""
        return {name: torch.where(self.counts[name] > 0, s / self.counts[name].clamp_min(1), 1.0).float()
                for name, s in self.sums.items()}


def hooks(model: Transformer, stats: Statistics) -> list:
    """Forward pre-hooks that hand each quantized weight's inputs to stats; returns their handles. The
    experts' hook routes the layer's tokens again (model.route, as the layer does) and recomputes each
    chosen expert's hidden state h with the same operations as model.MOEFeedForward.run_experts."""
    handles = []

    def linear_inputs(name):
        return lambda module, args: stats.add(name, args[0])

    def expert_inputs(i, moe):
        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1])  # [N, D]
            _, experts = reference.route(moe.gate, x, moe.num_activated_experts)  # [N, K]
            for e in range(moe.w1.size(0)):
                token, _ = torch.where(experts == e)
                xe = x[token]  # [n_e, D]
                h = F.silu(xe @ moe.w1[e].T) * (xe @ moe.w3[e].T)  # [n_e, I]
                for w in ("w1", "w3"):
                    stats.add(f"layers.{i}.block_sparse_moe.{w}", xe, e)
                stats.add(f"layers.{i}.block_sparse_moe.w2", h, e)
        return hook

    for i, layer in enumerate(model.layers):
        for w in ("wqkv", "wo"):
            handles.append(getattr(layer.attention, w).register_forward_pre_hook(
                linear_inputs(f"layers.{i}.attention.{w}.weight")))
        handles.append(layer.block_sparse_moe.register_forward_pre_hook(expert_inputs(i, layer.block_sparse_moe)))
    handles.append(model.output.register_forward_pre_hook(linear_inputs("output.weight")))
    return handles


def reference_model(checkpoint: Checkpoint, state_dict: dict) -> Transformer:
    """model.py's Transformer holding the checkpoint's mmapped weights, in their own dtype, on the CPU."""
    with torch.device("meta"):
        model = Transformer(checkpoint.config)
    model.load_state_dict(state_dict, assign=True)
    return model.eval()


@torch.no_grad()
def collect(model: Transformer, id_pieces, bos: int, context: int) -> tuple:
    """(the statistics of model over the tokens of id_pieces (lists of ids, the text's in order), the number of
    tokens), read in chunks of `context` tokens, each after BOS (as eval.py scores a text), with no KV cache and
    each chunk run once whole: memory stays that of one chunk and one piece whatever the text's length."""
    stats, pending, tokens = Statistics(model.config), [], 0
    handles = hooks(model, stats)
    try:
        with tqdm(desc="calibrating", unit="chunk") as progress:
            for ids in itertools.chain(id_pieces, [None]):  # None: the end, where a shorter last chunk counts too
                pending.extend(ids or [])
                while len(pending) >= context - 1 or (ids is None and pending):
                    chunk, pending = pending[:context - 1], pending[context - 1:]
                    model(torch.tensor([[bos] + chunk]))
                    tokens += len(chunk)
                    progress.update()
    finally:
        for handle in handles:
            handle.remove()
    return stats, tokens


def calibrate(checkpoint: Checkpoint, text_path: Path) -> tuple:
    """(importance {name: tensor}, metadata) of the checkpoint's model on the text in text_path, read and
    tokenized a piece at a time (reading.text_pieces); a line longer than the model's context could spell is
    refused before it is held whole."""
    tokenizer = load_tokenizer(checkpoint)
    name, block_size = f"--calibration_text {text_path}", checkpoint.config.block_size
    stream = open_text(text_path, "--calibration_text", "a plain-text file", newline=None)
    lines = text_lines(stream, name, max_characters(tokenizer, block_size),
                       f"more tokens than the model's context of {block_size} holds; break it", keep_ends=True)
    digest = hashlib.sha256()

    def hashed(pieces):  # the text's hash, as the pieces go by
        for piece in pieces:
            digest.update(piece.encode())
            yield piece
    pieces = hashed(text_pieces(lines))
    first = next(pieces)
    if not first.strip() and len(first) < PIECE_CHARS:
        raise UserError(f"{name} is empty; give it text like the model's use")
    state_dict = load_state_dict(checkpoint)
    context = min(CONTEXT, block_size)
    with stream:
        stats, tokens = collect(reference_model(checkpoint, state_dict),
                                token_ids(tokenizer, itertools.chain([first], pieces)), tokenizer.bos_id(), context)
    metadata = {"kind": KIND, "text": Path(text_path).name, "tokens": str(tokens), "context": str(context),
                "text_sha256": digest.hexdigest(), "model": model_fingerprint(checkpoint.config, state_dict)}
    return stats.means(), metadata


# ----------------------------------------------------------------------------- the file

def save_imatrix(path: Path, importance: dict, metadata: dict):
    from safetensors.torch import save
    data = save({name: t.contiguous() for name, t in importance.items()}, metadata=metadata)
    with atomic_file(path, len(data)) as f:
        f.write(data)


def load_imatrix(path: Path, checkpoint: Checkpoint, state_dict: dict) -> tuple:
    """(importance, metadata) from a file save_imatrix wrote for this checkpoint's model; a UserError for a
    file of another kind, of another model's shapes, or of another model (its fingerprint)."""
    from safetensors import safe_open
    redo = f"compute it again with --calibration_text"
    if Path(path).exists() and not Path(path).is_file():  # a FIFO would block the open, and nothing maps a pipe
        raise UserError(f"--imatrix {path} is not a regular file; give the .imatrix.safetensors file a "
                        f"--calibration_text run saved")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            importance = {name: f.get_tensor(name) for name in f.keys()}
    except FileNotFoundError:
        raise UserError(f"--imatrix {path} not found; {redo}") from None
    except Exception as e:  # safetensors' own errors for a foreign or truncated file
        raise UserError(f"--imatrix {path} is not a safetensors file ({type(e).__name__}); {redo}") from None
    if metadata.get("kind") != KIND:
        raise UserError(f"--imatrix {path} is not calibration statistics written by quantize.py; {redo}")
    expected = importance_shapes(checkpoint.config)
    for name, shape in expected.items():
        found = importance.get(name)
        if found is None or tuple(found.shape) != shape:
            raise UserError(f"--imatrix {path} does not fit {checkpoint.path}'s config.json: {name} should be "
                            f"{shape}, found {'nothing' if found is None else tuple(found.shape)}; {redo}")
    if metadata.get("model") != model_fingerprint(checkpoint.config, state_dict):
        raise UserError(f"--imatrix {path} was computed for another model than {checkpoint.path} (or before it "
                        f"changed); {redo}")
    bad = [name for name in expected if not (torch.isfinite(importance[name]).all() and (importance[name] >= 0).all())]
    if bad:
        raise UserError(f"--imatrix {path}: {bad[0]} holds negative, inf or nan values; {redo}")
    return {name: importance[name] for name in expected}, metadata
