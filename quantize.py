# int8 weight-only quantization: writes model_int8.pth beside model.pth, and holds the int8 modules
# that generate.py swaps in when a checkpoint holds int8 weights.
#
# Symmetric, per output channel: every row of a weight matrix gets one scale, max|row| / 127, and
# the row is stored as round(row / scale) in int8. Quantized: attention wqkv and wo, the output head,
# and each expert's w1, w2, w3 (one scale per expert and output channel). Kept as they are: the
# embedding table (one row is read per token), the norms, and the router (gate), whose few
# weights decide which experts run.
#
# Layout in the checkpoint (other scripts rely on these names):
#   int8 linear:  X.weight int8 [out, in]    X.scales [out]
#   int8 experts: X.w1 int8 [E, I, D]  X.w1_scales [E, I]
#                 X.w3 int8 [E, I, D]  X.w3_scales [E, I]
#                 X.w2 int8 [E, D, I]  X.w2_scales [E, D]
# Scales are in the source checkpoint's dtype; loading casts them to --precision like any weight.
#
# Shapes in comments: N tokens, D model width, E experts, K experts per token, I expert width.
import argparse
import mmap
import os
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from model import ModelArgs, Transformer, TransformerBlock, load_checkpoint, route, sort_by_expert


class QuantizeError(Exception):
    """Bad input: reported as one line and a non-zero exit, never a traceback."""


# ----------------------------------------------------------------------------- int8 arithmetic

def quantize_rows(w: Tensor) -> tuple[Tensor, Tensor]:
    """w [out, in] -> (int8 [out, in], scales [out] in w's dtype), with w ~= q * scales[:, None]."""
    w32 = w.float()
    # Round the scales to the dtype they are stored in first, and quantize with the rounded
    # values: then q * stored scale is within half a step of w, whatever that dtype.
    scales = (w32.abs().amax(dim=-1) / 127).to(w.dtype)
    s = scales.float()[:, None]
    q = torch.where(s > 0, w32 / s, 0.0).round().clamp(-127, 127).to(torch.int8)  # all-zero rows stay 0
    return q, scales


def int8_linear(x: Tensor, weight: Tensor, scales: Tensor) -> Tensor:
    """x [..., in] @ (weight int8 [out, in] * scales [out]).T -> [..., out], reading the int8 weights.

    On CPU, torch's int8 kernel converts the weights as it multiplies (x and scales share the
    model's dtype; x must be 2-D). It is vectorized for bfloat16 on x86, scalar for float32/16.
    Elsewhere, gpt-fast's (x @ w.to(dtype).T) * s, which torch.compile can fuse into one kernel
    reading int8; eager mode converts one matrix at a time."""
    if x.device.type == "cpu":
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), weight, scales)
        return y.view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight.to(x.dtype)) * scales


# ----------------------------------------------------------------------------- int8 modules

class WeightOnlyInt8Linear(nn.Module):
    """nn.Linear (no bias) with int8 weights and one scale per output channel."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        # Buffers, not parameters: int8 tensors cannot require grad, and nothing trains here.
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.empty(out_features))

    def forward(self, x: Tensor) -> Tensor:
        return int8_linear(x, self.weight, self.scales)


class MOEFeedForwardInt8(nn.Module):
    """model.MOEFeedForward with int8 experts; the router (gate) stays in full precision."""

    def __init__(self, config: ModelArgs):
        super().__init__()
        E, I, D = config.num_experts, config.intermediate_size, config.dim
        self.gate = nn.Linear(D, E, bias=False)
        self.register_buffer("w1", torch.empty(E, I, D, dtype=torch.int8))
        self.register_buffer("w1_scales", torch.empty(E, I))
        self.register_buffer("w3", torch.empty(E, I, D, dtype=torch.int8))
        self.register_buffer("w3_scales", torch.empty(E, I))
        self.register_buffer("w2", torch.empty(E, D, I, dtype=torch.int8))
        self.register_buffer("w2_scales", torch.empty(E, D))
        self.num_activated_experts = config.num_activated_experts

    def forward(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        x = x.reshape(-1, D)  # [N, D]
        weights, experts = route(self.gate, x, self.num_activated_experts)  # as model.MOEFeedForward
        if T == 1 and x.device.type != "cpu":
            # Decoding on a GPU: no host sync, so that the step can be captured in a CUDA graph.
            y = self.chosen_experts(x, experts, weights)
        else:
            # Prefill, and decoding on CPU: there torch's int8 kernel run on the chosen experts'
            # weights in place measured 3x faster than chosen_experts compiled (inductor's CPU
            # code loads int8 vectors through a slow partial-load path on AVX2).
            y = int8_grouped_experts(x, experts, weights, self.w1, self.w1_scales, self.w3, self.w3_scales,
                                     self.w2, self.w2_scales)
        return y.view(B, T, D)

    def chosen_experts(self, x: Tensor, experts: Tensor, weights: Tensor) -> Tensor:
        """Reads the int8 weights of the K experts each token chose, with no host sync.

        model.decode_experts with int8 weights: (indexed, converted weights) @ (column vector), which
        torch.compile lowers to reductions that load the chosen int8 rows and convert them as they
        multiply: no gathered or converted copy is ever written. (An einsum over the same operands
        permutes the weights into a bmm first; on an H200 it ran at a third of the bandwidth.)"""
        dtype = x.dtype
        xe = x[:, None, :, None]  # [N, 1, D, 1]
        x1 = (self.w1[experts].to(dtype) @ xe).squeeze(-1) * self.w1_scales[experts]  # [N, K, I]
        x3 = (self.w3[experts].to(dtype) @ xe).squeeze(-1) * self.w3_scales[experts]
        h = (F.silu(x1) * x3)[..., None]  # [N, K, I, 1]
        y = (self.w2[experts].to(dtype) @ h).squeeze(-1) * self.w2_scales[experts]  # [N, K, D]
        return (y * weights[..., None]).sum(dim=1)  # [N, D]


# A custom op is opaque to torch.compile: its body runs as ordinary eager code inside a compiled
# graph (also under --compile_prefill), so it may read the group sizes on the host and take each
# expert's weights as a view. That costs nothing on CPU and one sync per layer on a GPU (fine for
# prefill, not for CUDA-graph decoding).
@torch.library.custom_op("mixtral::int8_grouped_experts", mutates_args=())
def int8_grouped_experts(x: Tensor, experts: Tensor, weights: Tensor, w1: Tensor, w1_scales: Tensor,
                         w3: Tensor, w3_scales: Tensor, w2: Tensor, w2_scales: Tensor) -> Tensor:
    """Runs each expert once over the tokens routed to it, reading its int8 weights in place.

    model.sort_by_expert, then a loop over experts (a grouped matmul wants
    full-precision weights). Experts no token chose get zero rows: their weights are not read,
    so a decoded token reads only its K experts."""
    order, token_of_pair, counts = sort_by_expert(experts, w1.shape[0])
    counts = counts.tolist()  # host sync
    xs = x[token_of_pair]  # [N*K, D]
    ys = []
    for e, xs_e in enumerate(xs.split(counts)):  # xs_e [count_e, D]
        if counts[e] == 0:
            continue
        h = F.silu(int8_linear(xs_e, w1[e], w1_scales[e])) * int8_linear(xs_e, w3[e], w3_scales[e])  # [count_e, I]
        ys.append(int8_linear(h, w2[e], w2_scales[e]))  # [count_e, D]
    ys = torch.cat(ys) * weights.flatten()[order, None]  # [N*K, D]
    return torch.zeros_like(x).index_add_(0, token_of_pair, ys)  # [N, D]


@int8_grouped_experts.register_fake
def _(x, experts, weights, w1, w1_scales, w3, w3_scales, w2, w2_scales):
    return torch.empty_like(x)  # what torch.compile needs to know: the output's shape and dtype


def replace_with_int8_modules(model: Transformer) -> Transformer:
    """Swaps, in place, the modules that quantize_checkpoint quantizes for their int8 versions.
    New modules are made on the current default device: call it inside `with torch.device("meta")`
    on a model about to be loaded with load_state_dict(assign=True)."""
    def int8_like(linear: nn.Linear) -> WeightOnlyInt8Linear:
        return WeightOnlyInt8Linear(linear.in_features, linear.out_features)

    for layer in model.layers:
        layer.attention.wqkv = int8_like(layer.attention.wqkv)
        layer.attention.wo = int8_like(layer.attention.wo)
        layer.block_sparse_moe = MOEFeedForwardInt8(model.config)
    model.output = int8_like(model.output)
    return model


def quantize_in_place(module: nn.Module, config: ModelArgs) -> nn.Module:
    """What quantize_checkpoint does to a file, done to a model in memory (scripts/benchmark.py --int8):
    quantizes a TransformerBlock (attention and experts) or a whole Transformer (every block not yet
    done, and the output head) in place, with the same rounding and int8 modules."""
    def quantized_linear(linear: nn.Linear) -> WeightOnlyInt8Linear:
        with torch.device("meta"):
            new = WeightOnlyInt8Linear(linear.in_features, linear.out_features)
        new.weight, new.scales = quantize_rows(linear.weight.detach())
        return new

    def quantized_experts(moe) -> MOEFeedForwardInt8:
        with torch.device("meta"):
            new = MOEFeedForwardInt8(config)
        new.gate = moe.gate  # the router stays in full precision
        for name in ("w1", "w3", "w2"):
            w = getattr(moe, name).detach()  # [E, out, in]: one scale per expert and output row
            q, scales = quantize_rows(w.reshape(-1, w.shape[-1]))
            setattr(new, name, q.view(w.shape))
            setattr(new, f"{name}_scales", scales.view(w.shape[:2]))
        return new

    blocks = [module] if isinstance(module, TransformerBlock) else list(module.layers)
    for block in blocks:
        if isinstance(block.attention.wqkv, WeightOnlyInt8Linear):
            continue
        block.attention.wqkv = quantized_linear(block.attention.wqkv)
        block.attention.wo = quantized_linear(block.attention.wo)
        block.block_sparse_moe = quantized_experts(block.block_sparse_moe)
    if isinstance(module, Transformer) and not isinstance(module.output, WeightOnlyInt8Linear):
        module.output = quantized_linear(module.output)
    return module


def is_quantized(state_dict: dict) -> bool:
    """True for a checkpoint written by this script: it holds int8 tensors."""
    return any(t.dtype == torch.int8 for t in state_dict.values())


def scales_name(weight_name: str) -> str:
    """'layers.0.attention.wo.weight' -> '...wo.scales'; 'layers.0.block_sparse_moe.w1' -> '...w1_scales'."""
    module, _, leaf = weight_name.rpartition(".")
    return f"{module}.scales" if leaf == "weight" else f"{weight_name}_scales"


# ----------------------------------------------------------------------------- checkpoint

def load_source(checkpoint_path: Path) -> tuple[ModelArgs, dict]:
    """The config and the mmapped state dict of an unquantized checkpoint, checked against each other."""
    try:
        config, source = load_checkpoint(checkpoint_path)
    except ValueError as e:
        raise QuantizeError(str(e))
    if is_quantized(source):
        raise QuantizeError(f"{checkpoint_path} is already quantized (it holds int8 weights); "
                            f"quantize the original model.pth instead")
    with torch.device("meta"):
        expected = Transformer(config).state_dict()
    unexpected = [name for name in source if name not in expected]
    if unexpected:
        raise QuantizeError(f"{checkpoint_path} does not fit {checkpoint_path.parent / 'config.json'}: "
                            f"{unexpected[0]} is not part of the model")
    for name, t in expected.items():
        if name not in source or source[name].shape != t.shape:
            found = tuple(source[name].shape) if name in source else "nothing"
            raise QuantizeError(f"{checkpoint_path} does not fit {checkpoint_path.parent / 'config.json'}: "
                                f"{name} should be {tuple(t.shape)}, found {found}")
    return config, source


def int8_layout(config: ModelArgs, source: dict) -> dict:
    """Name -> empty tensor (shape and dtype) of every tensor the int8 checkpoint holds, in the
    source's order. torch.empty touches no memory until written: these cost no RAM."""
    with torch.device("meta"):
        int8_state = replace_with_int8_modules(Transformer(config)).state_dict()
    layout = {}
    for name, t in source.items():
        if int8_state[name].dtype == torch.int8:
            layout[name] = torch.empty(t.shape, dtype=torch.int8)
            layout[scales_name(name)] = torch.empty(int8_state[scales_name(name)].shape, dtype=t.dtype)
        else:
            layout[name] = torch.empty(t.shape, dtype=t.dtype)
    assert layout.keys() == int8_state.keys(), "replace_with_int8_modules and int8_layout disagree"
    return layout


def quantize_into(src: Tensor, q_out: Tensor, scales_out: Tensor, rows_per_chunk: int = 256):
    """Quantizes src [..., out, in] into q_out and scales_out a few rows at a time: rows are
    independent, and small chunks keep the float32 temporaries a few MB whatever the matrix."""
    in_features = src.shape[-1]
    for w, q, s in zip(src.reshape(-1, in_features).split(rows_per_chunk),
                       q_out.view(-1, in_features).split(rows_per_chunk),
                       scales_out.view(-1).split(rows_per_chunk)):
        q[:], s[:] = quantize_rows(w)


def quantize_checkpoint(checkpoint_path: Path, mode: str = "int8") -> Path:
    """Writes <name>_int8.pth beside checkpoint_path and returns its path.

    Streaming, so that memory use stays a few MB above the interpreter's whatever the model:
    the source is mmapped and read a few rows at a time; the output file is first written with
    its final layout but no data (torch.serialization.skip_data), then mmapped writable and
    filled in place. Neither checkpoint is ever held in memory. The file is written under a
    temporary name and renamed when complete, so an interrupted run leaves nothing behind."""
    if mode != "int8":
        raise QuantizeError(f"unknown mode {mode!r}: only int8 is supported")
    checkpoint_path = Path(checkpoint_path)
    config, source = load_source(checkpoint_path)
    layout = int8_layout(config, source)
    output = checkpoint_path.with_name(f"{checkpoint_path.stem}_int8.pth")
    tmp = output.with_name(output.name + ".tmp")
    try:
        with torch.serialization.skip_data():
            torch.save(layout, tmp)
        del layout
        with torch.serialization.set_default_mmap_options(mmap.MAP_SHARED):
            out = torch.load(tmp, mmap=True, weights_only=True)  # writes go to the file
        for name, src in tqdm(source.items(), desc="quantizing", unit="tensor"):
            if out[name].dtype == torch.int8:
                quantize_into(src, out[name], out[scales_name(name)])
            else:
                out[name].copy_(src)  # embedding, norms, router: as they are
        del out  # unmaps: the kernel has every written page
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)
    return output


def main(argv=None):
    parser = argparse.ArgumentParser(description="Quantize a converted Mixtral checkpoint.")
    parser.add_argument("--checkpoint_path", type=Path,
                        default=Path("checkpoints/mistralai/Mixtral-8x7B-v0.1/model.pth"),
                        help="the model.pth written by scripts/convert_hf_checkpoint.py")
    parser.add_argument("--mode", choices=["int8"], default="int8",
                        help="int8: weight-only, symmetric, one scale per output channel")
    args = parser.parse_args(argv)
    try:
        output = quantize_checkpoint(args.checkpoint_path, args.mode)
    except QuantizeError as e:
        sys.exit(f"error: {e}")
    except OSError as e:  # disk full, permissions
        sys.exit(f"error: could not write beside {args.checkpoint_path}: {e.strerror or e}")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
