# Weight formats: how the model's big matrices are stored, quantized, sliced across ranks and multiplied.
#
# model.py is the readable reference, in full precision. At run time the same Transformer holds its
# linear layers (attention wqkv and wo, the output head) and its experts in weight formats (a Scheme
# says which part is in which: a checkpoint may mix them, as int4 experts with int8 attention do):
#   FullPrecision  the checkpoint's tensors as they are (bfloat16, float16 or float32)
#   Int8           symmetric int8, one scale per output row (per expert and row for the experts)
#   Int4           symmetric 4-bit, one scale per group of 32, 64 or 128 inputs of a row, two values a byte
# A format is one class: the tensors that store a weight matrix [..., out, in] (its layout in a
# checkpoint), how a full-precision matrix is quantized into them and read back, which of them a
# tensor-parallel rank slices along which axis, and which kernel multiplies them on which device.
# Routing (model.route) and the choice of kernel (linear, run_experts) are written once, below, for all.
#
# The kernels: on CPU, for the few tokens of a decode step, kernels/cpu.cpp (each weight read once, at
# memory speed); on CUDA, for those few tokens, kernels/triton_moe.py's Triton kernels when
# MIXTRAL_TRITON asks for them (until a GPU measures them against today's compiled path), otherwise
# PyTorch's, as for prompts everywhere (compute-bound).
#
# Shapes in comments: N tokens, D model width, E experts, K experts per token, I expert width.
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

import model as reference
from kernels import cpu as cpu_kernels
from model import ModelArgs, Transformer, UserError

# Up to this many tokens a step is memory-bound and the CPU kernels win; beyond it (prompts) the
# arithmetic dominates and PyTorch's matrix multiplications are faster.
CPU_KERNEL_MAX_TOKENS = 8
# The Triton kernels hold the tokens of a step in one tile of at most this many rows.
TRITON_MAX_TOKENS = 16
# MIXTRAL_TRITON=1: the Triton kernels for the experts and the linear layers on CUDA; =experts: for the
# experts only (to tell the two apart when measuring); unset or 0: today's compiled PyTorch path.
TRITON_VARIABLE = "MIXTRAL_TRITON"


def stored_name(weight: str, key: str) -> str:
    """The module attribute (and checkpoint name) of a weight's tensor: key '' is the weight itself;
    'weight' + 'scales' -> 'scales', 'w1' + 'scales' -> 'w1_scales'."""
    if not key:
        return weight
    return key if weight == "weight" else f"{weight}_{key}"


class FullPrecision:
    """The weights as they are."""
    name = "full precision"
    quantized = False

    def layout(self, shape: tuple, dtype: torch.dtype) -> dict:
        """{key: (shape, dtype)} of the tensors that store one weight of this shape and dtype."""
        return {"": (shape, dtype)}

    def quantize(self, w: Tensor) -> dict:
        return {"": w}

    def dequantize(self, t: dict, dtype: torch.dtype) -> Tensor:
        """The weight in full precision, computed in dtype."""
        return t[""].to(dtype)

    def companion_axis(self, key: str, axis: int) -> Optional[int]:
        """The axis of companion tensor `key` that follows the weight's `axis` (-2 out, -1 in), or None
        when the companion is whole on every rank."""
        raise KeyError(key)

    def row_problem(self, inputs: int) -> Optional[str]:
        """Why this format cannot store `inputs` consecutive inputs of a row on their own (a whole row, or
        a tensor-parallel rank's slice of one), or None."""
        return None

    # PyTorch: the reference computations of model.py.
    def linear(self, x: Tensor, t: dict) -> Tensor:
        return F.linear(x, t[""])

    def decode_experts(self, x, experts, weights, w1: dict, w3: dict, w2: dict) -> Tensor:
        return reference.decode_experts(x, experts, weights, w1[""], w3[""], w2[""])

    def grouped_experts(self, x, experts, weights, w1: dict, w3: dict, w2: dict) -> Tensor:
        return reference.grouped_experts(x, experts, weights, w1[""], w3[""], w2[""])

    # kernels/cpu.cpp
    def cpu_linear(self, x: Tensor, t: dict) -> Tensor:
        return cpu_kernels.ops().linear(x, t[""], None)

    def cpu_experts(self, x, experts, weights, w1: dict, w3: dict, w2: dict) -> Tensor:
        return cpu_kernels.ops().moe(x, experts, weights, w1[""], w3[""], w2[""], None, None, None)

    # kernels/triton_moe.py: one pair of kernels for every format, told apart by the stored dtypes; the
    # scales are whatever the format stores beside its weights (None for full precision).
    def cuda_linear(self, x: Tensor, t: dict) -> Tensor:
        return torch.ops.mixtral_triton.linear(x, t[""], t.get("scales"))

    def cuda_experts(self, x, experts, weights, w1: dict, w3: dict, w2: dict) -> Tensor:
        return torch.ops.mixtral_triton.moe(x, experts, weights, w1[""], w3[""], w2[""], w1.get("scales"),
                                            w3.get("scales"), w2.get("scales"))


class Int8(FullPrecision):
    """Symmetric int8 with one scale per output row: w ~= q * scales[..., None], |q| <= 127. Scales are
    stored in the full-precision dtype (loading casts them to --precision like any weight)."""
    name = "int8"
    quantized = True

    def layout(self, shape, dtype):
        return {"": (shape, torch.int8), "scales": (shape[:-1], dtype)}

    def quantize(self, w):
        w32 = w.float()
        # Round the scales to the dtype they are stored in first, and quantize with the rounded
        # values: then q * stored scale is within half a step of w, whatever that dtype.
        scales = (w32.abs().amax(dim=-1) / 127).to(w.dtype)
        s = scales.float()[..., None]
        q = torch.where(s > 0, w32 / s, 0.0).round().clamp(-127, 127).to(torch.int8)  # all-zero rows stay 0
        return {"": q, "scales": scales}

    def dequantize(self, t, dtype):
        if use_cpu_dequantize(t[""], dtype):
            return cpu_kernels.ops().dequantize_int8(t[""], t["scales"], dtype)  # one pass, not three
        return t[""].to(dtype) * t["scales"].to(dtype)[..., None]

    def companion_axis(self, key, axis):
        return -1 if axis == -2 else None  # one scale per output row: sliced with the rows, whole otherwise

    def linear(self, x, t):
        """On a GPU, gpt-fast's (x @ w.to(dtype).T) * s, which torch.compile fuses into one kernel reading
        int8. On a CPU, a prompt's tokens share a full-precision copy of the weights (compute-bound);
        the few tokens of a decode step without the CPU kernels take torch's int8 kernel, except where
        the input width is not a multiple of 16: there torch 2.13's bf16 path returned inf and nan."""
        weight, scales = t[""], t["scales"]
        if x.device.type != "cpu":
            return F.linear(x, weight.to(x.dtype)) * scales
        if not few_tokens(x) or x.shape[-1] % 16:
            return dequantized_linear(self, x, t)
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), weight, scales)
        return y.view(*x.shape[:-1], weight.shape[0])

    def decode_experts(self, x, experts, weights, w1, w3, w2):
        """model.decode_experts with int8 weights: (indexed, converted weights) @ (column vector), which
        torch.compile lowers to reductions that load the chosen int8 rows and convert them as they
        multiply, with no host sync and no gathered copy."""
        xe = x[:, None, :, None]  # [N, 1, D, 1]
        x1 = (w1[""][experts].to(x.dtype) @ xe).squeeze(-1) * w1["scales"][experts]  # [N, K, I]
        x3 = (w3[""][experts].to(x.dtype) @ xe).squeeze(-1) * w3["scales"][experts]
        h = (F.silu(x1) * x3)[..., None]  # [N, K, I, 1]
        y = (w2[""][experts].to(x.dtype) @ h).squeeze(-1) * w2["scales"][experts]  # [N, K, D]
        return (y * weights[..., None]).sum(dim=1)  # [N, D]

    def grouped_experts(self, x, experts, weights, w1, w3, w2):
        return dequantized_experts(x, experts, weights, self.name, *(list(w.values()) for w in (w1, w3, w2)))

    def cpu_linear(self, x, t):
        return cpu_kernels.ops().linear(x, t[""], t["scales"])

    def cpu_experts(self, x, experts, weights, w1, w3, w2):
        return cpu_kernels.ops().moe(x, experts, weights, w1[""], w3[""], w2[""], w1["scales"], w3["scales"],
                                         w2["scales"])


class Int4(Int8):
    """Symmetric 4-bit, one scale per group of `groupsize` consecutive inputs of a row (llama.cpp's Q4_0):
    the group's value of largest magnitude m becomes -8 exactly, scale = m / -8, and the others round to
    the nearest of the 16 steps -8..7 (so the side opposite m reaches only 7 steps: a value of -m clamps
    to 7 * |scale|, one step short). Measured on Gaussian and Laplace weights, it errs less than a
    symmetric -7..7 grid, and about as much as a grid with a zero point at twice the group size, which
    costs the same bytes and would give every kernel a second term (README, int4).
    Stored: uint8 [..., out, in/2], value 2j in the low nibble of byte j and 2j+1 in the high one, each
    as q + 8; scales [..., out, in/groupsize] in the full-precision dtype. Only quantizing needs
    `groupsize`: reading back and the kernels take it from the shapes."""
    name = "int4"
    GROUP_SIZES = (32, 64, 128)

    def __init__(self, groupsize: int = 32):
        self.groupsize = groupsize

    def layout(self, shape, dtype):
        *rows, inputs = shape
        return {"": ((*rows, inputs // 2), torch.uint8), "scales": ((*rows, inputs // self.groupsize), dtype)}

    def quantize(self, w):
        *rows, inputs = w.shape
        problem = self.row_problem(inputs)
        if problem:
            raise UserError(f"a row of {inputs} inputs {problem}; choose a group size that divides it")
        groups = w.float().reshape(*rows, inputs // self.groupsize, self.groupsize)  # [..., G, g]
        extreme = groups.gather(-1, groups.abs().argmax(dim=-1, keepdim=True))  # signed, [..., G, 1]
        scales = (extreme / -8).to(w.dtype)  # rounded first, as for int8: quantize with the stored value
        s = scales.float()
        q = (torch.where(s != 0, groups / s, 0.0).round().clamp(-8, 7) + 8).to(torch.uint8).reshape(*rows, inputs)
        return {"": q[..., 0::2] | (q[..., 1::2] << 4), "scales": scales.squeeze(-1)}

    def dequantize(self, t, dtype):
        packed, scales = t[""], t["scales"]
        if use_cpu_dequantize(packed, dtype):
            return cpu_kernels.ops().dequantize_int4(packed, scales, dtype)
        q = torch.stack((packed & 15, packed >> 4), dim=-1).flatten(-2)  # [..., out, in], 0..15
        groups = q.unflatten(-1, (scales.shape[-1], -1)).to(dtype) - 8  # [..., out, G, g]
        return (groups * scales.to(dtype)[..., None]).flatten(-2)

    def companion_axis(self, key, axis):
        return axis  # scales [..., out, G] split with the rows, and with the inputs by whole groups

    def row_problem(self, inputs):
        if inputs % self.groupsize:
            return f"is not a whole number of int4 groups of {self.groupsize}"
        return None

    def linear(self, x, t):
        """PyTorch's path (GPU, and CPU without the kernels): a copy of the weights in the matmul dtype."""
        return dequantized_linear(self, x, t)

    def decode_experts(self, x, experts, weights, w1, w3, w2):
        """model.decode_experts with the chosen experts' weights dequantized first (no host sync)."""
        w1, w3, w2 = (self.dequantize({key: t[experts] for key, t in w.items()}, x.dtype) for w in (w1, w3, w2))
        xe = x[:, None, :, None]  # [N, 1, D, 1]
        h = F.silu(w1 @ xe) * (w3 @ xe)  # [N, K, I, 1]
        y = (w2 @ h).squeeze(-1)  # [N, K, D]
        return (y * weights[..., None]).sum(dim=1)  # [N, D]


FORMATS = {"full precision": FullPrecision(), "int8": Int8(), "int4": Int4()}


@dataclass(frozen=True)
class Scheme:
    """The format of each part of the model that a checkpoint may quantize. The router, the norms and the
    embedding table always stay in full precision."""
    attention: FullPrecision  # wqkv and wo of every layer
    experts: FullPrecision  # w1, w3 and w2 of every layer
    output: FullPrecision  # the output head

    @classmethod
    def of(cls, fmt) -> "Scheme":
        """fmt as it is if a Scheme, else one format for every part."""
        return fmt if isinstance(fmt, Scheme) else cls(fmt, fmt, fmt)

    def parts(self) -> dict:
        return {"attention": self.attention, "experts": self.experts, "output": self.output}

    @property
    def name(self) -> str:
        """'int8' for one format everywhere, else each part's: 'int4 experts, int8 attention, int8 output head'."""
        labelled = (("experts", self.experts), ("attention", self.attention), ("output head", self.output))
        if len({fmt.name for _, fmt in labelled}) == 1:
            return self.experts.name
        return ", ".join(f"{fmt.name} {label}" for label, fmt in labelled)

    @property
    def quantized(self) -> bool:
        return any(fmt.quantized for fmt in self.parts().values())


# The checkpoint name of one weight of each part: its dtype (and int4's scales) tell the part's format.
PART_WEIGHTS = {"attention": "layers.0.attention.wqkv.weight", "experts": "layers.0.block_sparse_moe.w1",
                "output": "output.weight"}


def stored_format(state_dict: dict, name: str) -> FullPrecision:
    """The format weight `name` is stored in, told by its content: uint8 is int4 (with the group size its
    scales imply), int8 is int8, anything else full precision. A weight or scales the checkpoint lacks
    leave it to loading to say what does not fit."""
    t = state_dict.get(name)
    if t is None or t.dtype not in (torch.uint8, torch.int8):
        return FORMATS["full precision"]
    prefix, weight = name.rsplit(".", 1)
    scales = state_dict.get(f"{prefix}.{stored_name(weight, 'scales')}")
    if t.dtype == torch.int8 or scales is None:
        return FORMATS["int8" if t.dtype == torch.int8 else "int4"]
    return Int4(2 * t.shape[-1] // scales.shape[-1])


def detect_format(state_dict: dict) -> Scheme:
    """The formats a checkpoint is stored in, part by part, told by its content, not its file name."""
    return Scheme(**{part: stored_format(state_dict, name) for part, name in PART_WEIGHTS.items()})


# ----------------------------------------------------------------------------- the choice of kernel

def few_tokens(x: Tensor, most: int = CPU_KERNEL_MAX_TOKENS) -> bool:
    """x [..., D] holds at most `most` tokens: a memory-bound step."""
    return x.numel() <= most * x.shape[-1]


def use_cpu_kernels(x: Tensor) -> bool:
    return x.device.type == "cpu" and few_tokens(x) and cpu_kernels.available()


def use_cpu_dequantize(q: Tensor, dtype: torch.dtype) -> bool:
    return q.device.type == "cpu" and dtype in (torch.float32, torch.bfloat16, torch.float16) and cpu_kernels.available()


# The answer does not change within a process: torch.compile keeps it as a constant, as it does
# kernels.cpu.available()'s.
@torch.compiler.assume_constant_result
def triton_kernels_requested(layers: str) -> bool:
    """Whether MIXTRAL_TRITON asks for the Triton kernels for `layers` ('experts' or 'linear'); if it
    does, imports them (and so triton, which only CUDA users need) and registers their ops."""
    value = os.environ.get(TRITON_VARIABLE, "")
    if value in ("", "0") or (value == "experts" and layers != "experts"):
        return False
    from kernels import triton_moe  # noqa: F401  registers torch.ops.mixtral_triton
    return True


def use_triton_kernels(x: Tensor, layers: str) -> bool:
    return x.device.type == "cuda" and few_tokens(x, TRITON_MAX_TOKENS) and triton_kernels_requested(layers)


def linear(fmt: FullPrecision, x: Tensor, t: dict) -> Tensor:
    """x [..., in] times the weight stored in t: [..., out]."""
    if use_cpu_kernels(x):
        return fmt.cpu_linear(x.reshape(-1, x.shape[-1]), t).view(*x.shape[:-1], -1)
    if use_triton_kernels(x, "linear"):
        return fmt.cuda_linear(x.reshape(-1, x.shape[-1]), t).view(*x.shape[:-1], -1)
    return fmt.linear(x, t)


def run_experts(fmt: FullPrecision, x: Tensor, experts: Tensor, weights: Tensor, w1: dict, w3: dict, w2: dict) -> Tensor:
    """Each token's chosen experts: x [N, D], experts/weights [N, K] -> [N, D]."""
    if use_cpu_kernels(x):
        return fmt.cpu_experts(x, experts, weights, w1, w3, w2)
    if use_triton_kernels(x, "experts"):
        return fmt.cuda_experts(x, experts, weights, w1, w3, w2)
    # No host sync: a GPU step stays one CUDA graph. A compiled batch's decode step (up to
    # CPU_KERNEL_MAX_TOKENS tokens) takes this path too, where the compiler reads the chosen experts in
    # place: int8's grouped pass reads its group sizes on the host, which a CUDA graph cannot.
    if reference.few_enough_to_decode(experts, w1[""].size(0)) or (few_tokens(x) and torch.compiler.is_compiling()):
        return fmt.decode_experts(x, experts, weights, w1, w3, w2)
    return fmt.grouped_experts(x, experts, weights, w1, w3, w2)


# ----------------------------------------------------------------------------- modules

class FormattedWeights(nn.Module):
    """A module whose weights are stored in a format: each weight's tensors are buffers named by
    stored_name (buffers, not parameters: int8 cannot require grad, and nothing trains here)."""

    def add_weight(self, name: str, fmt: FullPrecision, shape: tuple, dtype: torch.dtype):
        self.format = fmt
        layout = fmt.layout(shape, dtype)
        self.keys = tuple(layout)
        self.weight_names = getattr(self, "weight_names", ()) + (name,)
        for key, (shape_, dtype_) in layout.items():
            self.register_buffer(stored_name(name, key), torch.empty(shape_, dtype=dtype_))

    def weight_tensors(self, name: str) -> dict:
        return {key: getattr(self, stored_name(name, key)) for key in self.keys}


class Linear(FormattedWeights):
    """nn.Linear without bias, its weight [out, in] stored in a format."""

    def __init__(self, fmt: FullPrecision, in_features: int, out_features: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.add_weight("weight", fmt, (out_features, in_features), dtype)

    def forward(self, x: Tensor) -> Tensor:
        return linear(self.format, x, self.weight_tensors("weight"))


class MOEFeedForward(reference.MOEFeedForward, FormattedWeights):
    """model.MOEFeedForward (its router and routing) with the experts stored in a format."""

    def __init__(self, fmt: FullPrecision, config: ModelArgs, dtype: torch.dtype = torch.float32):
        nn.Module.__init__(self)  # not model.MOEFeedForward's: it would make full-precision parameters
        E, I, D = config.num_experts, config.intermediate_size, config.dim
        # The router stays in full precision in every format: its few weights decide which experts run.
        self.gate = Linear(FORMATS["full precision"], D, E, dtype)
        for name, shape in (("w1", (E, I, D)), ("w3", (E, I, D)), ("w2", (E, D, I))):
            self.add_weight(name, fmt, shape, dtype)
        self.num_activated_experts = config.num_activated_experts

    def run_experts(self, x: Tensor, experts: Tensor, weights: Tensor) -> Tensor:
        w1, w3, w2 = (self.weight_tensors(name) for name in ("w1", "w3", "w2"))
        return run_experts(self.format, x, experts, weights, w1, w3, w2)


def formatted_model(config: ModelArgs, fmt, dtype: torch.dtype = torch.float32) -> Transformer:
    """A Transformer with its linear layers and experts in `fmt`, a format or a Scheme (a format per part).
    Tensors are made on the current default device: inside `with torch.device("meta")` they cost nothing
    until loaded with load_state_dict(assign=True)."""
    scheme = Scheme.of(fmt)
    model = Transformer(config)
    for layer in model.layers:
        attention = layer.attention
        attention.wqkv = Linear(scheme.attention, attention.wqkv.in_features, attention.wqkv.out_features, dtype)
        attention.wo = Linear(scheme.attention, attention.wo.in_features, attention.wo.out_features, dtype)
        layer.block_sparse_moe = MOEFeedForward(scheme.experts, config, dtype)
    model.output = Linear(scheme.output, config.dim, config.vocab_size, dtype)
    return model


def stored_weights(config: ModelArgs, fmt) -> dict:
    """Each weight that `fmt` (a format or a Scheme) quantizes: its full-precision checkpoint name ->
    (its format, {key: name of the tensor that stores that part}), e.g.
    'output.weight' -> (Int8, {'': 'output.weight', 'scales': 'output.scales'})."""
    with torch.device("meta"):
        model = formatted_model(config, fmt)
    modules = [(prefix, module) for prefix, module in model.named_modules()
               if isinstance(module, FormattedWeights) and module.format.quantized]
    return {f"{prefix}.{weight}": (module.format, {key: f"{prefix}.{stored_name(weight, key)}" for key in module.keys})
            for prefix, module in modules for weight in module.weight_names}


@torch.no_grad()
def quantize_module(module: nn.Module, config: ModelArgs, fmt) -> nn.Module:
    """What quantize.py does to a checkpoint, done to a model in memory (scripts/benchmark.py --int8):
    the TransformerBlock or whole Transformer `module`, in full precision (model.py's own modules or
    FullPrecision ones), gets its linear layers and experts stored in `fmt` (a format or a Scheme), in place."""
    scheme = Scheme.of(fmt)
    def converted(old: nn.Module, names: tuple, new: FormattedWeights, fmt: FullPrecision) -> FormattedWeights:
        for name in names:
            w = getattr(old, name).detach()
            for key, t in fmt.quantize(w).items():
                setattr(new, stored_name(name, key), t)
        return new

    def linear_in(old, fmt):
        if isinstance(old, Linear) and old.format is fmt:
            return old
        with torch.device("meta"):
            new = Linear(fmt, old.in_features, old.out_features, old.weight.dtype)
        return converted(old, ("weight",), new, fmt)

    def experts_in(old, fmt):
        if isinstance(old, MOEFeedForward) and old.format is fmt:
            return old
        with torch.device("meta"):
            new = MOEFeedForward(fmt, config, old.w1.dtype)
        new.gate = linear_in(old.gate, FORMATS["full precision"])
        return converted(old, ("w1", "w3", "w2"), new, fmt)

    blocks = list(module.layers) if isinstance(module, Transformer) else [module]
    for block in blocks:
        block.attention.wqkv = linear_in(block.attention.wqkv, scheme.attention)
        block.attention.wo = linear_in(block.attention.wo, scheme.attention)
        block.block_sparse_moe = experts_in(block.block_sparse_moe, scheme.experts)
    if isinstance(module, Transformer):
        module.output = linear_in(module.output, scheme.output)
    return module


# ----------------------------------------------------------------------------- prompts, quantized

def matmul_dtype(x: Tensor) -> torch.dtype:
    """The dtype a prompt's matmuls run in: x's, but float32 on CPUs that multiply half precision slowly."""
    return torch.float32 if x.device.type == "cpu" and reference.half_matmul_is_slow(x.dtype) else x.dtype


def dequantized_linear(fmt: FullPrecision, x: Tensor, t: dict) -> Tensor:
    """x [..., in] times a full-precision copy, in the matmul dtype, of the weight `fmt` stores in t."""
    dtype = matmul_dtype(x)
    return F.linear(x.to(dtype), fmt.dequantize(t, dtype)).to(x.dtype)


# A custom op is opaque to torch.compile: its body runs as ordinary eager code inside a compiled graph
# (also under --compile_prefill), so it may read the group sizes on the host and take each expert's
# weights as a view. That costs nothing on CPU and one sync per layer on a GPU (fine for prefill).
@torch.library.custom_op("mixtral::dequantized_experts", mutates_args=())
def dequantized_experts(x: Tensor, experts: Tensor, weights: Tensor, format_name: str, w1: list[Tensor],
                        w3: list[Tensor], w2: list[Tensor]) -> Tensor:
    """model.grouped_experts for quantized formats: each expert that some token chose runs once over its
    tokens, its weights dequantized one matrix at a time (a prompt's matmuls are compute-bound: one
    pass of conversion is cheap next to them). w1/w3/w2: the format's tensors in its layout's order."""
    fmt = FORMATS[format_name]
    keys = list(fmt.layout((1, 1), x.dtype))
    order, token_of_pair, counts = reference.sort_by_expert(experts, w1[0].shape[0])
    counts = counts.tolist()  # host sync
    dtype = matmul_dtype(x)
    xs = x[token_of_pair].to(dtype)  # [N*K, D]

    def weight(w: list, e: int) -> Tensor:
        return fmt.dequantize({key: t[e] for key, t in zip(keys, w)}, dtype)

    ys = []
    for e, xs_e in enumerate(xs.split(counts)):  # xs_e [count_e, D]
        if counts[e]:  # each dequantized matrix is freed as soon as its matmul returns
            h = F.silu(F.linear(xs_e, weight(w1, e))) * F.linear(xs_e, weight(w3, e))  # [count_e, I]
            ys.append(F.linear(h, weight(w2, e)))  # [count_e, D]
    ys = torch.cat(ys).to(x.dtype) * weights.flatten()[order, None]  # [N*K, D]
    return torch.zeros_like(x).index_add_(0, token_of_pair, ys)  # [N, D]


@dequantized_experts.register_fake
def _(x, experts, weights, format_name, w1, w3, w2):
    return torch.empty_like(x)
