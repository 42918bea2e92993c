# Weight formats: how the model's big matrices are stored, quantized, sliced across ranks and multiplied.
#
# model.py is the readable reference, in full precision. At run time the same Transformer holds its
# linear layers (attention wqkv and wo, the output head) and its experts in weight formats (a Scheme
# says which part is in which: a checkpoint may mix them, as int4 experts with int8 attention do):
#   FullPrecision  the checkpoint's tensors as they are (bfloat16, float16 or float32)      spec 'full'
#   Int8           symmetric int8, one scale per output row (per expert and row for experts) spec 'int8'
#   Int4           symmetric 4-bit, one scale per group of 32, 64 or 128 inputs of a row     spec 'int4:g32'
# A format is one class (WeightFormat): the tensors that store a weight matrix [..., out, in] (its layout
# in a checkpoint), how a full-precision matrix is quantized into them and read back, and which of them a
# tensor-parallel rank slices along which axis. Everything else has a default that reads the weights back
# in full precision (dequantize) and multiplies them with PyTorch: a new format is its layout, quantize
# and dequantize, plus any faster method it cares to write and the kernels it names in `kernels`.
# Formats are values: Int4(64) == Int4(64), and parse_format('int4:g64') makes one.
#
# Which method or kernel runs for a given step is decided in one place, dispatch.py; routing
# (model.route) is model.py's, for every format.
#
# Shapes in comments: N tokens, D model width, E experts, K experts per token, I expert width.
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

import dispatch
import model as reference
from kernels import cpu as cpu_kernels
from model import ModelArgs, Transformer, UserError


def stored_name(weight: str, key: str) -> str:
    """The module attribute (and checkpoint name) of a weight's tensor: key '' is the weight itself;
    'weight' + 'scales' -> 'scales', 'w1' + 'scales' -> 'w1_scales'."""
    if not key:
        return weight
    return key if weight == "weight" else f"{weight}_{key}"


class WeightFormat:
    """What a format must say (layout, quantize, dequantize), and PyTorch defaults for everything else
    that read the weights back in full precision. Subclasses are frozen dataclasses: equal by value."""
    name: str = ""  # shown to users: 'int8'
    quantized: bool = True
    # The hand-written kernels that take this format's tensors: 'cpu' (kernels/cpu.cpp), 'triton'
    # (kernels/triton_moe.py), both a few tokens, told apart by the stored dtypes; 'cpu prompt'
    # (kernels/cpu_prompt.cpp), many tokens, told the format by name.
    kernels: tuple = ()
    # Whether grouped_experts runs one grouped matmul over all experts (else one expert at a time).
    grouped_matmul: bool = False

    @property
    def spec(self) -> str:
        """The format as parse_format reads it: 'full', 'int8', 'int4:g64'."""
        return self.name

    def layout(self, shape: tuple, dtype: torch.dtype) -> dict:
        """{key: (shape, dtype)} of the tensors that store one weight of this shape and dtype; key '' is
        the weight itself (stored_name)."""
        raise NotImplementedError

    def quantize(self, w: Tensor) -> dict:
        """The tensors {key: tensor} that store the full-precision weight w [..., out, in]."""
        raise NotImplementedError

    def dequantize(self, t: dict, dtype: torch.dtype) -> Tensor:
        """The weight in full precision, computed in dtype, from its tensors t."""
        raise NotImplementedError

    def companion_axis(self, key: str, axis: int) -> Optional[int]:
        """The axis of companion tensor `key` that follows the weight's `axis` (-2 out, -1 in), or None
        when the companion is whole on every rank."""
        raise KeyError(key)

    def row_problem(self, inputs: int) -> Optional[str]:
        """Why this format cannot store `inputs` consecutive inputs of a row on their own (a whole row, or
        a tensor-parallel rank's slice of one), or None."""
        return None

    # PyTorch's paths (dispatch.linear_path, dispatch.experts_path say when each runs).
    def linear(self, x: Tensor, t: dict) -> Tensor:
        """Off the CPU (GPUs): the expression torch.compile fuses."""
        return dequantized_linear(self, x, t)

    def decode_linear(self, x: Tensor, t: dict) -> Tensor:
        """A few tokens on a CPU without the kernels."""
        return dequantized_linear(self, x, t)

    def prompt_linear(self, x: Tensor, t: dict) -> Tensor:
        """Many tokens on a CPU: compute-bound, so a full-precision copy in the matmul dtype."""
        return dequantized_linear(self, x, t)

    def decode_experts(self, x, experts, weights, w1: dict, w3: dict, w2: dict) -> Tensor:
        """The chosen experts' weights dequantized (no host sync), then decode_experts."""
        w1, w3, w2 = (self.dequantize({key: t[experts] for key, t in w.items()}, x.dtype) for w in (w1, w3, w2))
        return chosen_experts(x, weights, w1, w3, w2)

    def grouped_experts(self, x, experts, weights, w1: dict, w3: dict, w2: dict) -> Tensor:
        """One grouped matmul over all the chosen experts, for formats with grouped_matmul."""
        raise NotImplementedError

    def experts_one_by_one(self, x, experts, weights, w1: dict, w3: dict, w2: dict) -> Tensor:
        return dequantized_experts(x, experts, weights, self.spec, *(list(w.values()) for w in (w1, w3, w2)))

    # The hand-written kernels, for the formats that list them in `kernels`.
    def cpu_linear(self, x: Tensor, t: dict) -> Tensor:
        return cpu_kernels.ops().linear(x, t[""], t.get("scales"))

    def cpu_experts(self, x, experts, weights, w1: dict, w3: dict, w2: dict) -> Tensor:
        return cpu_kernels.ops().moe(x, experts, weights, w1[""], w3[""], w2[""], w1.get("scales"),
                                     w3.get("scales"), w2.get("scales"))

    def cpu_prompt_linear(self, x: Tensor, t: dict) -> Tensor:
        return cpu_kernels.ops().prompt_linear(x, t[""], t["scales"], self.name)

    def cpu_prompt_experts(self, x, experts, weights, w1: dict, w3: dict, w2: dict) -> Tensor:
        return cpu_kernels.ops().prompt_moe(x, experts, weights, w1[""], w3[""], w2[""], w1["scales"], w3["scales"],
                                            w2["scales"], self.name)

    def cuda_linear(self, x: Tensor, t: dict) -> Tensor:
        return torch.ops.mixtral_triton.linear(x, t[""], t.get("scales"))

    def cuda_experts(self, x, experts, weights, w1: dict, w3: dict, w2: dict) -> Tensor:
        return torch.ops.mixtral_triton.moe(x, experts, weights, w1[""], w3[""], w2[""], w1.get("scales"),
                                            w3.get("scales"), w2.get("scales"))


@dataclass(frozen=True)
class FullPrecision(WeightFormat):
    """The weights as they are."""
    name = "full precision"
    quantized = False
    kernels = ("cpu", "triton")
    grouped_matmul = True

    @property
    def spec(self):
        return "full"

    def layout(self, shape, dtype):
        return {"": (shape, dtype)}

    def quantize(self, w):
        return {"": w}

    def dequantize(self, t, dtype):
        return t[""].to(dtype)

    def linear(self, x, t):
        return F.linear(x, t[""])

    decode_linear = prompt_linear = linear

    def decode_experts(self, x, experts, weights, w1, w3, w2):
        return decode_experts(x, experts, weights, w1[""], w3[""], w2[""])

    def grouped_experts(self, x, experts, weights, w1, w3, w2):
        return grouped_experts(x, experts, weights, w1[""], w3[""], w2[""])


@dataclass(frozen=True)
class Int8(WeightFormat):
    """Symmetric int8 with one scale per output row: w ~= q * scales[..., None], |q| <= 127. Scales are
    stored in the full-precision dtype (loading casts them to --precision like any weight)."""
    name = "int8"
    kernels = ("cpu", "triton", "cpu prompt")

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
        if dispatch.use_cpu_dequantize(t[""], dtype):
            return cpu_kernels.ops().dequantize_int8(t[""], t["scales"], dtype)  # one pass, not three
        return t[""].to(dtype) * t["scales"].to(dtype)[..., None]

    def companion_axis(self, key, axis):
        return -1 if axis == -2 else None  # one scale per output row: sliced with the rows, whole otherwise

    def linear(self, x, t):
        """gpt-fast's (x @ w.to(dtype).T) * s, which torch.compile fuses into one kernel reading int8."""
        return F.linear(x, t[""].to(x.dtype)) * t["scales"]

    def decode_linear(self, x, t):
        """torch's int8 kernel, except where the input width is not a multiple of 16: there its bf16 path
        returned inf and nan (tests/test_batch.py)."""
        weight, scales = t[""], t["scales"]
        if x.shape[-1] % 16:
            return dequantized_linear(self, x, t)
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), weight, scales)
        return y.view(*x.shape[:-1], weight.shape[0])

    def decode_experts(self, x, experts, weights, w1, w3, w2):
        """decode_experts with int8 weights: (indexed, converted weights) @ (column vector), which
        torch.compile lowers to reductions that load the chosen int8 rows and convert them as they
        multiply, with no host sync and no gathered copy."""
        xe = x[:, None, :, None]  # [N, 1, D, 1]
        x1 = (w1[""][experts].to(x.dtype) @ xe).squeeze(-1) * w1["scales"][experts]  # [N, K, I]
        x3 = (w3[""][experts].to(x.dtype) @ xe).squeeze(-1) * w3["scales"][experts]
        h = (F.silu(x1) * x3)[..., None]  # [N, K, I, 1]
        y = (w2[""][experts].to(x.dtype) @ h).squeeze(-1) * w2["scales"][experts]  # [N, K, D]
        return (y * weights[..., None]).sum(dim=1)  # [N, D]


@dataclass(frozen=True)
class Int4(WeightFormat):
    """Symmetric 4-bit, one scale per group of `groupsize` consecutive inputs of a row (llama.cpp's Q4_0):
    the group's value of largest magnitude m becomes -8 exactly, scale = m / -8, and the others round to
    the nearest of the 16 steps -8..7 (so the side opposite m reaches only 7 steps: a value of -m clamps
    to 7 * |scale|, one step short). It errs less than a symmetric -7..7 grid, and about as much as a
    grid with a zero point at twice the group size, which costs the same bytes and would give every
    kernel a second term (kernels/README.md).
    Stored: uint8 [..., out, in/2], value 2j in the low nibble of byte j and 2j+1 in the high one, each
    as q + 8; scales [..., out, in/groupsize] in the full-precision dtype. Only quantizing needs
    `groupsize`: reading back and the kernels take it from the shapes."""
    groupsize: int = 32
    name = "int4"
    kernels = ("cpu", "triton", "cpu prompt")
    GROUP_SIZES = (32, 64, 128)

    @property
    def spec(self):
        return f"int4:g{self.groupsize}"

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
        if dispatch.use_cpu_dequantize(packed, dtype):
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


FORMATS = {"full precision": FullPrecision(), "int8": Int8(), "int4": Int4()}


def parse_format(spec: str) -> WeightFormat:
    """'full', 'int8', 'int4' (groups of 32) or 'int4:g<32|64|128>' -> the format; a UserError otherwise.
    Every tool turns its flags into a format through this."""
    name, _, option = spec.partition(":")
    if name == "full" and not option:
        return FullPrecision()
    if name == "int8" and not option:
        return Int8()
    if name == "int4":
        groupsize = option[1:] if option.startswith("g") else ("32" if not option else "")
        if groupsize.isdigit() and int(groupsize) in Int4.GROUP_SIZES:
            return Int4(int(groupsize))
        raise UserError(f"int4 group size {option!r}: choose one of "
                        f"{', '.join(f'g{g}' for g in Int4.GROUP_SIZES)} (e.g. int4:g32)")
    raise UserError(f"unknown weight format {spec!r}: choose full, int8 or int4:g32 (g64, g128)")


@dataclass(frozen=True)
class Scheme:
    """The format of each part of the model that a checkpoint may quantize. The router, the norms and the
    embedding table always stay in full precision."""
    attention: WeightFormat  # wqkv and wo of every layer
    experts: WeightFormat  # w1, w3 and w2 of every layer
    output: WeightFormat  # the output head

    @classmethod
    def of(cls, fmt) -> "Scheme":
        """fmt as it is if a Scheme, else one format for every part."""
        return fmt if isinstance(fmt, Scheme) else cls(fmt, fmt, fmt)

    @classmethod
    def quantizing(cls, fmt: WeightFormat, int4_attention: bool = False) -> "Scheme":
        """What quantize.py writes for a format: int8 everywhere; int4 in the experts, with attention and
        the output head in int8 unless int4_attention (what each costs: BENCHMARKS.md, quality)."""
        if not isinstance(fmt, Int4) or int4_attention:
            return cls.of(fmt)
        return cls(attention=Int8(), experts=fmt, output=Int8())

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


def stored_format(state_dict: dict, name: str) -> WeightFormat:
    """The format weight `name` is stored in, told by its content: uint8 is int4 (with the group size its
    scales imply), int8 is int8, anything else full precision. A weight or scales the checkpoint lacks
    leave it to loading to say what does not fit."""
    t = state_dict.get(name)
    if t is None or t.dtype not in (torch.uint8, torch.int8):
        return FullPrecision()
    prefix, weight = name.rsplit(".", 1)
    scales = state_dict.get(f"{prefix}.{stored_name(weight, 'scales')}")
    if t.dtype == torch.int8 or scales is None:
        return Int8() if t.dtype == torch.int8 else Int4()
    return Int4(2 * t.shape[-1] // scales.shape[-1])


def model_scheme(model: Transformer) -> Scheme:
    """The formats a built model holds its parts in (its first layer's, as every layer's)."""
    layer = model.layers[0]
    return Scheme(layer.attention.wqkv.format, layer.block_sparse_moe.format, model.output.format)


def detect_format(state_dict: dict) -> Scheme:
    """The formats a checkpoint is stored in, part by part, told by its content, not its file name."""
    return Scheme(**{part: stored_format(state_dict, name) for part, name in PART_WEIGHTS.items()})


# ----------------------------------------------------------------------------- modules

class FormattedWeights(nn.Module):
    """A module whose weights are stored in a format: each weight's tensors are buffers named by
    stored_name (buffers, not parameters: int8 cannot require grad, and nothing trains here)."""

    def add_weight(self, name: str, fmt: WeightFormat, shape: tuple, dtype: torch.dtype):
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

    def __init__(self, fmt: WeightFormat, in_features: int, out_features: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.add_weight("weight", fmt, (out_features, in_features), dtype)

    def forward(self, x: Tensor) -> Tensor:
        return dispatch.linear(self.format, x, self.weight_tensors("weight"))


class MOEFeedForward(reference.MOEFeedForward, FormattedWeights):
    """model.MOEFeedForward (its router and routing) with the experts stored in a format."""

    def __init__(self, fmt: WeightFormat, config: ModelArgs, dtype: torch.dtype = torch.float32):
        nn.Module.__init__(self)  # not model.MOEFeedForward's: it would make full-precision parameters
        E, I, D = config.num_experts, config.intermediate_size, config.dim
        # The router stays in full precision in every format: its few weights decide which experts run.
        self.gate = Linear(FullPrecision(), D, E, dtype)
        for name, shape in (("w1", (E, I, D)), ("w3", (E, I, D)), ("w2", (E, D, I))):
            self.add_weight(name, fmt, shape, dtype)
        self.num_activated_experts = config.num_activated_experts

    def run_experts(self, x: Tensor, experts: Tensor, weights: Tensor) -> Tensor:
        w1, w3, w2 = (self.weight_tensors(name) for name in ("w1", "w3", "w2"))
        return dispatch.run_experts(self.format, x, experts, weights, w1, w3, w2)


class Attention(reference.Attention):
    """model.Attention with wqkv and wo stored in a format, attending on dispatch.py's path."""

    def __init__(self, fmt: WeightFormat, config: ModelArgs, dtype: torch.dtype = torch.float32):
        with torch.device("meta"):  # model.Attention's full-precision layers, replaced below: no memory
            super().__init__(config)
        self.wqkv = Linear(fmt, self.wqkv.in_features, self.wqkv.out_features, dtype)
        self.wo = Linear(fmt, self.wo.in_features, self.wo.out_features, dtype)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        return dispatch.attend(q, k, v, mask)


def formatted_model(config: ModelArgs, fmt, dtype: torch.dtype = torch.float32) -> Transformer:
    """A Transformer with its linear layers and experts in `fmt`, a format or a Scheme (a format per part).
    Tensors are made on the current default device: inside `with torch.device("meta")` they cost nothing
    until loaded with load_state_dict(assign=True)."""
    scheme = Scheme.of(fmt)
    model = Transformer(config)
    for layer in model.layers:
        layer.attention = Attention(scheme.attention, config, dtype)
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
    def converted(old: nn.Module, names: tuple, new: FormattedWeights, fmt: WeightFormat) -> FormattedWeights:
        stored = getattr(old, "format", FullPrecision())
        if stored.quantized:  # its tensors are codes, not weights: quantizing them again would be nonsense
            raise UserError(f"the model is already quantized ({stored.name}); quantize a full-precision "
                            f"checkpoint (model.pth) instead")
        for name in names:
            w = getattr(old, name).detach()
            for key, t in fmt.quantize(w).items():
                setattr(new, stored_name(name, key), t)
        return new

    def linear_in(old, fmt):
        if isinstance(old, Linear) and old.format == fmt:
            return old
        with torch.device("meta"):
            new = Linear(fmt, old.in_features, old.out_features, old.weight.dtype)
        return converted(old, ("weight",), new, fmt)

    def experts_in(old, fmt):
        if isinstance(old, MOEFeedForward) and old.format == fmt:
            return old
        with torch.device("meta"):
            new = MOEFeedForward(fmt, config, old.w1.dtype)
        new.gate = linear_in(old.gate, FullPrecision())
        return converted(old, ("w1", "w3", "w2"), new, fmt)

    def attention_in(old, fmt):
        new = old
        if not isinstance(old, Attention):  # model.Attention: formats.Attention attends on dispatch's path
            with torch.device("meta"):
                new = Attention(fmt, config)
            new.n_head, new.n_local_heads, new.kv_cache = old.n_head, old.n_local_heads, old.kv_cache
        new.wqkv, new.wo = linear_in(old.wqkv, fmt), linear_in(old.wo, fmt)
        return new

    blocks = list(module.layers) if isinstance(module, Transformer) else [module]
    for block in blocks:
        block.attention = attention_in(block.attention, scheme.attention)
        block.block_sparse_moe = experts_in(block.block_sparse_moe, scheme.experts)
    if isinstance(module, Transformer):
        module.output = linear_in(module.output, scheme.output)
    return module


# ----------------------------------------------------------------------------- PyTorch's paths

def chosen_experts(x: Tensor, weights: Tensor, w1: Tensor, w3: Tensor, w2: Tensor) -> Tensor:
    """SwiGLU of each token's K chosen experts, weighted: x [N, D], weights [N, K], the chosen experts'
    w1, w3 [N, K, I, D] and w2 [N, K, D, I] -> [N, D]. Matrix-vector products: the decode path."""
    xe = x[:, None, :, None]  # [N, 1, D, 1]
    h = F.silu(w1 @ xe) * (w3 @ xe)  # [N, K, I, 1]
    y = (w2 @ h).squeeze(-1)  # [N, K, D]
    return (y * weights[..., None]).sum(dim=1)  # [N, D]


def decode_experts(x: Tensor, experts: Tensor, weights: Tensor, w1: Tensor, w3: Tensor, w2: Tensor) -> Tensor:
    """Each token's K experts as matrix-vector products: the decode path, where memory bandwidth rules.

    Written as (indexed weights) @ (column vector) so that torch.compile turns each product into one
    reduction that reads the chosen experts' rows in place: inductor lowers a batched matmul with a
    single output column to multiply-and-sum on CPU and fuses the indexing w1[experts] into it, so the
    weights are read once, with no gathered copy (w1 and w3 even share one loop). Eager mode gathers
    copies of the N*K chosen experts first, which is why dispatch.py keeps this path to a few tokens.
    """
    return chosen_experts(x, weights, w1[experts], w3[experts], w2[experts])


def sort_by_expert(experts: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """The (token, expert) pairs of experts [N, K] sorted by expert: order [N*K] (positions in
    experts.flatten()), the token of each sorted pair [N*K], and each expert's count of pairs [E].
    All stay on the device: no host sync."""
    flat_experts = experts.flatten()  # [N*K]
    order = flat_experts.argsort(stable=True)  # pairs sorted by expert
    counts = torch.zeros(num_experts, dtype=torch.int32, device=experts.device).scatter_add_(
        0, flat_experts, torch.ones_like(flat_experts, dtype=torch.int32))
    return order, order // experts.size(1), counts


@torch.library.custom_op("mixtral::grouped_experts", mutates_args=())
def grouped_experts(x: Tensor, experts: Tensor, weights: Tensor, w1: Tensor, w3: Tensor, w2: Tensor) -> Tensor:
    """Runs each expert once over the tokens routed to it, in one grouped matmul per weight.
    x: [N, D], experts/weights: [N, K] -> [N, D].

    Gathering w1[experts] per token would copy N*K expert matrices (gigabytes for a long prompt);
    sorting the (token, expert) pairs by expert instead lets one grouped matmul read every expert's
    weights in place. The group sizes stay on the device: no host sync.
    A custom op, so torch.compile treats it as one opaque kernel: torch._grouped_mm runs any float
    dtype eagerly, but its tracing rule accepts bf16 only.
    """
    order, token_of_pair, counts = sort_by_expert(experts, w1.shape[0])
    xs = x[token_of_pair]  # [N*K, D]
    offsets = counts.cumsum(0, dtype=torch.int32)  # [E] end of each expert's group
    h = F.silu(torch._grouped_mm(xs, w1.transpose(1, 2), offs=offsets)) \
        * torch._grouped_mm(xs, w3.transpose(1, 2), offs=offsets)  # [N*K, I]
    ys = torch._grouped_mm(h, w2.transpose(1, 2), offs=offsets)  # [N*K, D]
    ys = ys * weights.flatten()[order, None]
    return torch.zeros_like(x).index_add_(0, token_of_pair, ys)  # [N, D]


@grouped_experts.register_fake
def _(x, experts, weights, w1, w3, w2):
    return torch.empty_like(x)


def dequantized_linear(fmt: WeightFormat, x: Tensor, t: dict) -> Tensor:
    """x [..., in] times a full-precision copy, in the matmul dtype, of the weight `fmt` stores in t."""
    dtype = dispatch.matmul_dtype(x)
    return F.linear(x.to(dtype), fmt.dequantize(t, dtype)).to(x.dtype)


# A custom op is opaque to torch.compile: its body runs as ordinary eager code inside a compiled graph
# (also under --compile_prefill), so it may read the group sizes on the host and take each expert's
# weights as a view. That costs nothing on CPU and one sync per layer on a GPU (fine for prefill).
@torch.library.custom_op("mixtral::dequantized_experts", mutates_args=())
def dequantized_experts(x: Tensor, experts: Tensor, weights: Tensor, spec: str, w1: list[Tensor],
                        w3: list[Tensor], w2: list[Tensor]) -> Tensor:
    """Each expert that some token chose runs once over its tokens, its weights read back in the matmul
    dtype (dispatch.matmul_dtype) one matrix at a time: a prompt's matmuls are compute-bound, so one pass
    of conversion is cheap next to them. Serves the formats without a grouped matmul (quantized ones),
    and full precision where half-precision matmuls are slow. spec: the format (parse_format);
    w1/w3/w2: its tensors in its layout's order. x [N, D], experts/weights [N, K] -> [N, D]."""
    fmt = parse_format(spec)
    keys = list(fmt.layout((1, 1), x.dtype))
    order, token_of_pair, counts = sort_by_expert(experts, w1[0].shape[0])
    counts = counts.tolist()  # host sync
    xs = x[token_of_pair]  # [N*K, D]

    def weight(w: list, e: int, dtype: torch.dtype) -> Tensor:
        return fmt.dequantize({key: t[e] for key, t in zip(keys, w)}, dtype)

    ys = []
    for e, xs_e in enumerate(xs.split(counts)):  # xs_e [count_e, D]
        if not counts[e]:
            continue
        # A full-precision expert with few tokens keeps its dtype: converting would cost more than it saves.
        keep = not fmt.quantized and counts[e] < dispatch.MIN_ROWS_TO_CONVERT
        dtype = x.dtype if keep else dispatch.matmul_dtype(x)
        xd = xs_e.to(dtype)  # each converted matrix is freed as soon as its matmul returns
        h = F.silu(F.linear(xd, weight(w1, e, dtype))) * F.linear(xd, weight(w3, e, dtype))  # [count_e, I]
        ys.append(F.linear(h, weight(w2, e, dtype)).to(x.dtype))  # [count_e, D]
    ys = torch.cat(ys) * weights.flatten()[order, None]  # [N*K, D]
    return torch.zeros_like(x).index_add_(0, token_of_pair, ys)  # [N, D]


@dequantized_experts.register_fake
def _(x, experts, weights, spec, w1, w3, w2):
    return torch.empty_like(x)
