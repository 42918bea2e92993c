# Weight formats: how the model's big matrices are stored, quantized, read back and sliced across ranks.
#
# model.py is the readable reference, in full precision. The served model (layers.py) holds its linear
# layers (attention wqkv and wo, the output head) and its experts in weight formats; a Scheme says which
# part is in which (a checkpoint may mix them, as int4 experts with int8 attention do). Each format has one
# name, its spec, which parse_format reads and every tool, file name and table uses:
#   full       the checkpoint's tensors as they are (bfloat16, float16 or float32)
#   int8       symmetric int8, one scale per output row (per expert and row for experts)
#   int4:g32   symmetric 4-bit, one scale per group of 32 (g64, g128) inputs of a row
#   q4_k ...   llama.cpp's block types, as GGUF stores them: q8_0, q4_0, q4_k, q5_k, q6_k (quants.py)
# A format is one class (WeightFormat): the tensors that store a weight matrix [..., out, in] (its layout
# in a checkpoint), how a full-precision matrix is quantized into them and read back, which of them a
# tensor-parallel rank slices along which axis, and its own PyTorch expressions for the paths dispatch.py
# names. Everything else has a default that reads the weights back in full precision (dequantize): a new
# format is its layout, quantize and dequantize, plus any faster expression it cares to write and the
# kernels it names in `kernels` (layers.py calls them). Formats are values: Int4(64) == Int4(64).
#
# Shapes in comments: N tokens, D model width, E experts, K experts per token, I expert width.
import re
from dataclasses import dataclass, field, replace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

import dispatch
import quants
from errors import UserError
from kernels import cpu as cpu_kernels


def stored_name(weight: str, key: str) -> str:
    """The module attribute (and checkpoint name) of a weight's tensor: key '' is the weight itself;
    'weight' + 'scales' -> 'scales', 'w1' + 'scales' -> 'w1_scales'."""
    if not key:
        return weight
    return key if weight == "weight" else f"{weight}_{key}"


class WeightFormat:
    """What a format must say (layout, quantize, dequantize), and PyTorch defaults for everything else
    that read the weights back in full precision. Subclasses are frozen dataclasses: equal by value."""
    name: str = ""  # the registry's key: 'int4'; spec adds the options: 'int4:g32'
    quantized: bool = True
    # The hand-written kernels that take this format's tensors: 'cpu' (kernels/cpu.cpp's decode ops),
    # 'cpu dequantize' (its one-pass copy in full precision, for prompts), 'cpu prompt' (kernels/cpu_prompt.cpp:
    # prompts multiplied with the stored weights in place), 'triton' (kernels/triton_moe.py).
    # layers.py calls them with the format's name, which they check the tensors against.
    kernels: tuple = ()
    # Whether the prompt path runs one grouped matmul over all experts (else one expert at a time).
    grouped_matmul: bool = False

    @property
    def spec(self) -> str:
        """The format as parse_format reads it and every tool shows it: 'full', 'int8', 'int4:g64'."""
        return self.name

    def layout(self, shape: tuple, dtype: torch.dtype) -> dict:
        """{key: (shape, dtype)} of the tensors that store one weight of this shape and dtype; key '' is
        the weight itself (stored_name)."""
        raise NotImplementedError

    def quantize(self, w: Tensor, importance: Optional[Tensor] = None) -> dict:
        """The tensors {key: tensor} that store the full-precision weight w [..., out, in]. importance [in]
        (or [..., 1, in], one per expert): how much each input's error weighs, the mean square of its
        activations on calibration text; the formats that search their scales minimize the error weighted
        by it."""
        raise NotImplementedError

    def dequantize(self, t: dict, dtype: torch.dtype) -> Tensor:
        """The weight in full precision, computed in dtype, from its tensors t."""
        raise NotImplementedError

    def kernel_weight(self, t: dict) -> Tensor:
        """The stored weight as the kernels read it: a row of values (or of bytes) per output row."""
        return t[""]

    def stored_axis(self, key: str, axis: int) -> Optional[int]:
        """The axis of stored tensor `key` that follows the weight's `axis` (-2 out, -1 in), or None when
        that tensor is whole on every tensor-parallel rank."""
        if not key:
            return axis
        raise KeyError(key)

    def row_problem(self, inputs: int) -> Optional[str]:
        """Why this format cannot store `inputs` consecutive inputs of a row on their own (a whole row, or
        a tensor-parallel rank's slice of one), or None."""
        return None

    # The format's own PyTorch expressions, for the paths dispatch.linear_path and experts_path name.
    def linear(self, x: Tensor, t: dict) -> Tensor:
        """Off the CPU (GPUs): the expression torch.compile fuses."""
        return dequantized_linear(self, x, t)

    def decode_linear(self, x: Tensor, t: dict) -> Tensor:
        """A few tokens on a CPU without the kernels."""
        return dequantized_linear(self, x, t)

    def decode_experts(self, x, experts, weights, w1: dict, w3: dict, w2: dict) -> Tensor:
        """The chosen experts' weights dequantized (no host sync), then their matrix-vector products."""
        w1, w3, w2 = (self.dequantize({key: t[experts] for key, t in w.items()}, x.dtype) for w in (w1, w3, w2))
        return chosen_experts(x, weights, w1, w3, w2)


@dataclass(frozen=True)
class FullPrecision(WeightFormat):
    """The weights as they are."""
    name = "full"
    quantized = False
    kernels = ("cpu", "triton")
    grouped_matmul = True

    def layout(self, shape, dtype):
        return {"": (shape, dtype)}

    def quantize(self, w, importance=None):
        return {"": w}

    def dequantize(self, t, dtype):
        return t[""].to(dtype)

    def linear(self, x, t):
        return F.linear(x, t[""])

    decode_linear = linear


@dataclass(frozen=True)
class Int8(WeightFormat):
    """Symmetric int8 with one scale per output row: w ~= q * scales[..., None], |q| <= 127. Scales are
    stored in the full-precision dtype (loading casts them to --precision like any weight)."""
    name = "int8"
    kernels = ("cpu", "cpu dequantize", "cpu prompt", "triton")

    def layout(self, shape, dtype):
        return {"": (shape, torch.int8), "scales": (shape[:-1], dtype)}

    def quantize(self, w, importance=None):
        w32 = w.float()
        # Round the scales to the dtype they are stored in first, and quantize with the rounded
        # values: then q * stored scale is within half a step of w, whatever that dtype.
        scales = (w32.abs().amax(dim=-1) / 127).to(w.dtype)
        s = scales.float()[..., None]
        q = torch.where(s > 0, w32 / s, 0.0).round().clamp(-127, 127).to(torch.int8)  # all-zero rows stay 0
        return {"": q, "scales": scales}

    def dequantize(self, t, dtype):
        return t[""].to(dtype) * t["scales"].to(dtype)[..., None]

    def stored_axis(self, key, axis):
        if key == "scales":  # one scale per output row: sliced with the rows, whole otherwise
            return -1 if axis == -2 else None
        return super().stored_axis(key, axis)

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
        """(indexed, converted weights) @ (column vector), which torch.compile lowers to reductions that load
        the chosen int8 rows and convert them as they multiply, with no host sync and no gathered copy."""
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
    kernels = ("cpu", "cpu dequantize", "cpu prompt", "triton")  # the kernels take the group size from the scales' shape
    GROUP_SIZES = (32, 64, 128)

    @property
    def spec(self):
        return f"int4:g{self.groupsize}"

    def layout(self, shape, dtype):
        *rows, inputs = shape
        return {"": ((*rows, inputs // 2), torch.uint8), "scales": ((*rows, inputs // self.groupsize), dtype)}

    def quantize(self, w, importance=None):
        """importance [in] (the mean square of each input's activations on calibration text): each group's
        scale is searched for the smallest sum importance * error^2 (quants.search_symmetric)."""
        *rows, inputs = w.shape
        problem = self.row_problem(inputs)
        if problem:
            raise UserError(f"a row of {inputs} inputs {problem}; choose a group size that divides it")
        groups = w.float().reshape(*rows, inputs // self.groupsize, self.groupsize)  # [..., G, g]
        if importance is None:
            extreme = groups.gather(-1, groups.abs().argmax(dim=-1, keepdim=True))  # signed, [..., G, 1]
            scales = extreme / -8
        else:
            if importance.shape != (inputs,):
                raise UserError(f"an importance of shape {tuple(importance.shape)} for rows of {inputs} inputs: "
                                f"give one value per input")
            scales = quants.search_symmetric(groups, importance.reshape(-1, self.groupsize), -8, 7)[..., None]
        scales = scales.to(w.dtype)  # rounded first, as for int8: quantize with the stored value
        s = scales.float()
        q = (torch.where(s != 0, groups / s, 0.0).round().clamp(-8, 7) + 8).to(torch.uint8).reshape(*rows, inputs)
        return {"": q[..., 0::2] | (q[..., 1::2] << 4), "scales": scales.squeeze(-1)}

    def dequantize(self, t, dtype):
        packed, scales = t[""], t["scales"]
        q = torch.stack((packed & 15, packed >> 4), dim=-1).flatten(-2)  # [..., out, in], 0..15
        groups = q.unflatten(-1, (scales.shape[-1], -1)).to(dtype) - 8  # [..., out, G, g]
        return (groups * scales.to(dtype)[..., None]).flatten(-2)

    def stored_axis(self, key, axis):
        return axis  # the weight and its scales [..., out, G] split with the rows, and with the inputs by whole groups

    def row_problem(self, inputs):
        if inputs % self.groupsize:
            return f"is not a whole number of int4 groups of {self.groupsize}"
        return None


@dataclass(frozen=True)
class Blocks(WeightFormat):
    """llama.cpp's block types, stored as GGUF stores them (quants.py): q8_0, q4_0 (32 values a block, an
    fp16 scale), q4_k, q5_k (256 values in 8 sub-blocks, each with its own 6-bit scale and minimum), q6_k
    (256 values in 16 sub-blocks, 8-bit scales). A GGUF file's blocks are taken over as they are and written
    back byte for byte. Stored: uint8 [..., out, in / values per block, bytes per block], one tensor with
    its scales inside; its last axis (the bytes) tells the type apart from int4's [..., out, in/2]."""
    name: str = "q4_k"
    kernels = ("cpu", "cpu prompt", "triton")

    @property
    def spec(self):
        return self.name

    def layout(self, shape, dtype):
        *rows, inputs = shape
        values, size = quants.BLOCKS[self.name]
        return {"": ((*rows, inputs // values, size), torch.uint8)}

    def quantize(self, w, importance=None):
        problem = self.row_problem(w.shape[-1])
        if problem:
            raise UserError(f"a row of {w.shape[-1]} inputs {problem}")
        size = quants.BLOCKS[self.name][1]
        kernel = cpu_kernels.ops().quantize_blocks if dispatch.quantize_path(w) == "cpu kernel" else None
        return {"": quants.quantize(self.name, w, importance, kernel).unflatten(-1, (-1, size))}

    def dequantize(self, t, dtype):
        return quants.dequantize(self.name, t[""].flatten(-2), dtype)

    def kernel_weight(self, t):
        return t[""].flatten(-2)  # the blocks of a row, one after another: GGUF's own order

    def stored_axis(self, key, axis):
        return axis - 1  # [..., out, blocks, bytes]: the rows, and the inputs by whole blocks

    def row_problem(self, inputs):
        values = quants.BLOCKS[self.name][0]
        if inputs % values:
            return f"is not a whole number of {self.name} blocks of {values}"
        return None


# ----------------------------------------------------------------------------- names

FORMATS = {"full": FullPrecision, "int8": Int8, "int4": Int4, **{name: Blocks for name in quants.BLOCKS}}


def parse_format(spec: str) -> WeightFormat:
    """'full', 'int8', 'int4' (groups of 32), 'int4:g<32|64|128>', or a block type (q8_0, q4_0, q4_k, q5_k,
    q6_k) -> the format; a UserError otherwise. FORMATS is its registry: name -> class."""
    name, _, option = spec.partition(":")
    if name in ("full", "int8") and not option:
        return FORMATS[name]()
    if name in quants.BLOCKS and not option:
        return Blocks(name)
    if name == "int4":
        groupsize = option[1:] if option.startswith("g") else ("32" if not option else "")
        if groupsize.isdigit() and int(groupsize) in Int4.GROUP_SIZES:
            return Int4(int(groupsize))
        raise UserError(f"int4 group size {option!r}: choose one of "
                        f"{', '.join(f'g{g}' for g in Int4.GROUP_SIZES)} (e.g. int4:g32)")
    raise UserError(f"unknown weight format {spec!r}: choose full, int8, int4:g32 (g64, g128), one of "
                    f"{', '.join(quants.BLOCKS)}, or a preset: {', '.join(PRESETS)}")


# The weights a scheme stores in formats, by part of the model (our checkpoint names; the embedding table,
# the norms and the router always stay as the checkpoint has them).
PARTS = {"attention": r"layers\.\d+\.attention\.(wqkv\.(weight|q|k|v)|wo\.weight)",  # wqkv (or its q, k, v rows) and wo
         "experts": r"layers\.\d+\.block_sparse_moe\.w[13]",  # each expert's gate and up projections
         "down": r"layers\.\d+\.block_sparse_moe\.w2",  # each expert's down projection
         "output": r"output\.weight"}  # the output head


def part_of(name: str) -> Optional[str]:
    """The part (PARTS) weight `name` belongs to, or None for the weights no format stores."""
    return next((part for part, pattern in PARTS.items() if re.fullmatch(pattern, name)), None)


@dataclass(frozen=True)
class Scheme:
    """The format of each weight a checkpoint may quantize: one per part (down: the experts' w2, as the
    experts' when None), and overrides for single weights ((name, format) pairs: a GGUF file's mix, a preset
    that gives some layers more bits). The router, the norms and the embedding table stay as they are."""
    attention: WeightFormat
    experts: WeightFormat
    output: WeightFormat
    down: Optional[WeightFormat] = None
    overrides: tuple = ()
    preset: str = field(default="", compare=False)  # the PRESETS name it was made from, which names it

    @classmethod
    def of(cls, fmt) -> "Scheme":
        """fmt as it is if a Scheme, else one format for every part."""
        return fmt if isinstance(fmt, Scheme) else cls(fmt, fmt, fmt)

    def format_of(self, name: str) -> WeightFormat:
        """The format of weight `name` (a PARTS name)."""
        for weight, fmt in self.overrides:
            if weight == name:
                return fmt
        part = part_of(name)
        return self.experts if part == "down" and self.down is None else getattr(self, part)

    def formats(self) -> set:
        return {self.attention, self.experts, self.output, self.down or self.experts} | {f for _, f in self.overrides}

    @property
    def spec(self) -> str:
        """The scheme as parse_scheme reads it: 'int8', 'int4:g32' (int8 attention and head),
        'int4:g32:attn4' (int4 everywhere), a preset's name ('q4_k_m'), else each part's
        'experts=...,attention=...,output=...', the down projections' and each override's after them."""
        if self.preset:
            return self.preset
        if not self.overrides and self.down in (None, self.experts):
            plain = Scheme(self.attention, self.experts, self.output)
            if parse_scheme(self.experts.spec) == plain:
                return self.experts.spec
            if isinstance(self.experts, Int4) and plain == Scheme.of(self.experts):
                return f"{self.experts.spec}:{ALL_PARTS}"
        spec = f"experts={self.experts.spec},attention={self.attention.spec},output={self.output.spec}"
        if self.down not in (None, self.experts):
            spec += f",down={self.down.spec}"
        return spec + "".join(f",{name}={fmt.spec}" for name, fmt in self.overrides)

    @property
    def quantized(self) -> bool:
        return any(fmt.quantized for fmt in self.formats())


# The option of a 4-bit scheme that puts attention and the output head in it too.
ALL_PARTS = "attn4"


def more_bits_layers(n_layer: int) -> list:
    """The layers llama.cpp's Q4_K_M gives more bits (its use_more_bits): the first and last eighth, and
    every third layer between."""
    return [i for i in range(n_layer) if i < n_layer // 8 or i >= 7 * n_layer // 8 or (i - n_layer // 8) % 3 == 2]


def down_in(spec: str, layers: list) -> str:
    """The overrides that put the experts' down projections of `layers` in format `spec`."""
    return "".join(f",layers.{i}.block_sparse_moe.w2={spec}" for i in layers)


# Named mixes: preset name -> the scheme spec it stands for, given the model's layer count. What each costs and
# how close it stays: README (Quantization) and BENCHMARKS.md.
PRESETS = {
    # llama.cpp's Q4_K_M as it treats an 8-expert model: q4_k experts, q6_k down projections in its
    # more_bits_layers, q6_k output head; its attention (q4_k q, q8_0 k and v, q5_k output) is q5_k here,
    # what llama.cpp gives a fused qkv.
    "q4_k_m": lambda n_layer: "experts=q4_k,attention=q5_k,output=q6_k" + down_in("q6_k", more_bits_layers(n_layer)),
    # The 4-bit mix to choose: every expert matrix in q4_k, so that a decode step's experts stay on the CPU
    # kernels (they take one format for w1, w2 and w3), and the bits q4_k_m spends on half the down projections
    # spent on attention and the head instead, which a token reads once rather than per expert: closer to the
    # source than q4_k_m, and fewer bytes per token on Mixtral than int4:g32.
    "q4_k_a6": lambda n_layer: "experts=q4_k,attention=q6_k,output=q6_k",
    # The 5-bit mix: about half int4:g32's divergence, for a ninth more bytes per token on Mixtral.
    "q5_k_a5": lambda n_layer: "experts=q5_k,attention=q5_k,output=q6_k",
}


def parse_scheme(spec: str, config=None) -> Scheme:
    """What quantize.py and scripts/benchmark.py write for a spec:
    'full', 'int8'                   one format everywhere;
    'int4:g32' (g64, g128)           int4 experts, with attention and the output head int8: a tenth more bytes
                                     per token, and far closer to the source (BENCHMARKS.md, quality);
    'int4:g32:attn4'                 int4 everywhere;
    a PRESETS name ('q4_k_m')        a named mix; config (anything with n_layer: ModelArgs) says which layers
                                     are which where the preset depends on it;
    'experts=S,attention=S,output=S' each part's format spec, any mix, then optionally down=S (the experts'
                                     down projections) and NAME=S for single weights (layers.3.block_sparse_moe.w2)."""
    if spec in PRESETS:
        if config is None:
            raise UserError(f"the preset {spec} depends on the model's layer count: name it where the model's "
                            f"config is known (quantize.py --format {spec})")
        return replace(parse_scheme(PRESETS[spec](config.n_layer)), preset=spec)
    if "=" in spec:
        pairs = [pair.partition("=")[::2] for pair in spec.split(",")]
        parts = {key: parse_format(value) for key, value in pairs if key in ("experts", "attention", "output", "down")}
        overrides = tuple((key, parse_format(value)) for key, value in pairs if key not in parts)
        bad = [key for key, _ in overrides if part_of(key) is None]
        if len(parts) + len(overrides) != len(pairs) or bad or not {"experts", "attention", "output"} <= parts.keys():
            raise UserError(f"scheme {spec!r}: name each of experts, attention and output once (and optionally down "
                            f"and single weights), e.g. experts=int4:g32,attention=int8,output=int8")
        return Scheme(**parts, overrides=overrides)
    fmt_spec, everywhere = spec, False
    if spec.endswith(f":{ALL_PARTS}"):
        fmt_spec, everywhere = spec[:-len(ALL_PARTS) - 1], True
    fmt = parse_format(fmt_spec)
    if isinstance(fmt, Int4) and not everywhere:
        return Scheme(attention=Int8(), experts=fmt, output=Int8())
    if everywhere and not isinstance(fmt, Int4):
        raise UserError(f"scheme {spec!r}: :{ALL_PARTS} is for int4 (attention and the output head in int4 too)")
    return Scheme.of(fmt)


def file_tag(scheme: Scheme) -> str:
    """The part of a checkpoint's file name that names its scheme: 'int8', 'int4.g32', 'int4.g32.attn4'."""
    return re.sub(r"[:=,]", ".", scheme.spec)


# ----------------------------------------------------------------------------- detection

def stored_format(state_dict: dict, name: str) -> WeightFormat:
    """The format weight `name` is stored in, told by its content: uint8 with scales is int4 (with the group
    size its scales imply), uint8 alone a block type (by its block's size), int8 is int8, anything else full
    precision. A weight or scales the checkpoint lacks leave it to loading to say what does not fit."""
    t = state_dict.get(name)
    if isinstance(t, Tensor) and not t.dtype.is_floating_point and t.dtype not in (torch.uint8, torch.int8):
        raise UserError(f"{name} is {str(t.dtype).removeprefix('torch.')}: weights here are floats, int8 or "
                        f"uint8 (int4, block types); convert or quantize the model again")
    if not isinstance(t, Tensor) or t.dtype not in (torch.uint8, torch.int8):
        return FullPrecision()
    prefix, weight = name.rsplit(".", 1) if "." in name else ("", name)
    scales = state_dict.get(f"{prefix}.{stored_name(weight, 'scales')}".lstrip("."))
    if t.dtype == torch.uint8 and scales is None:  # the blocks hold their scales: their size tells the type
        types = [name for name, (_, size) in quants.BLOCKS.items() if t.dim() and t.shape[-1] == size]
        return Blocks(types[0]) if len(types) == 1 else Int4()
    if t.dtype == torch.int8 or not isinstance(scales, Tensor) or scales.dim() == 0 or not scales.shape[-1]:
        return Int8() if t.dtype == torch.int8 else Int4()
    groupsize = 2 * t.shape[-1] // scales.shape[-1]
    if groupsize not in Int4.GROUP_SIZES:
        raise UserError(f"{name}'s int4 scales imply groups of {groupsize} inputs; int4 here has groups of "
                        f"{', '.join(map(str, Int4.GROUP_SIZES))}: quantize the model again")
    return Int4(groupsize)


def scheme_of(formats: dict) -> Scheme:
    """The Scheme of per-weight formats {name: format}: each part's most common format, and the weights that
    differ from it as overrides."""
    by_part = {}
    for name, fmt in formats.items():
        by_part.setdefault(part_of(name), []).append(fmt)
    common = {part: max(set(fmts), key=fmts.count) for part, fmts in by_part.items()}
    scheme = Scheme(attention=common.get("attention", FullPrecision()), experts=common.get("experts", FullPrecision()),
                    output=common.get("output", FullPrecision()), down=common.get("down"))
    if scheme.down == scheme.experts:
        scheme = replace(scheme, down=None)
    return preset_of(formats) or replace(
        scheme, overrides=tuple((name, fmt) for name, fmt in formats.items() if scheme.format_of(name) != fmt))


def preset_of(formats: dict) -> Optional[Scheme]:
    """The preset that puts every weight of {name: format} where it is, or None."""
    if not formats:
        return None
    layers = {int(m.group(1)) for m in map(re.compile(r"layers\.(\d+)\.").match, formats) if m}
    config = type("Layers", (), {"n_layer": max(layers) + 1 if layers else 0})
    for name in PRESETS:
        preset = parse_scheme(name, config)
        if all(preset.format_of(weight) == fmt for weight, fmt in formats.items()):
            return preset
    return None


def detect_format(state_dict: dict) -> Scheme:
    """The formats a checkpoint is stored in, weight by weight, told by its content, not its file name."""
    return scheme_of({name: stored_format(state_dict, name) for name in state_dict
                      if isinstance(name, str) and part_of(name)})


# ----------------------------------------------------------------------------- PyTorch's arithmetic

def dequantized_linear(fmt: WeightFormat, x: Tensor, t: dict) -> Tensor:
    """x [..., in] times a full-precision copy, in the matmul dtype, of the weight `fmt` stores in t."""
    dtype = dispatch.matmul_dtype(x)
    return F.linear(x.to(dtype), fmt.dequantize(t, dtype)).to(x.dtype)


def chosen_experts(x: Tensor, weights: Tensor, w1: Tensor, w3: Tensor, w2: Tensor) -> Tensor:
    """SwiGLU of each token's K chosen experts, weighted: x [N, D], weights [N, K], the chosen experts'
    w1, w3 [N, K, I, D] and w2 [N, K, D, I] -> [N, D]. Matrix-vector products: the decode path.

    Written as (indexed weights) @ (column vector) so that torch.compile turns each product into one
    reduction that reads the chosen experts' rows in place: inductor lowers a batched matmul with a
    single output column to multiply-and-sum on CPU and fuses the indexing w1[experts] into it, so the
    weights are read once, with no gathered copy (w1 and w3 even share one loop). Eager mode gathers
    copies of the N*K chosen experts first, which is why dispatch.py keeps this path to a few tokens."""
    xe = x[:, None, :, None]  # [N, 1, D, 1]
    h = F.silu(w1 @ xe) * (w3 @ xe)  # [N, K, I, 1]
    y = (w2 @ h).squeeze(-1)  # [N, K, D]
    return (y * weights[..., None]).sum(dim=1)  # [N, D]
