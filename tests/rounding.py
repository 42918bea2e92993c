"""Each weight format's rounding, written here in float64 from the formats' descriptions (not taken from
formats.py, quantize.py or the kernels): what the kernel, quantizer and eval tests compare with."""
import copy

import torch

# Half a unit in the last place, relative: the rounding of one result to the output dtype.
HALF_ULP = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
# transformers' names of the weights the formats quantize besides the experts (everything else stays as it is).
QUANTIZED_HF = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight", "lm_head.weight")


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., in/2] -> q [..., in] in -8..7: value 2j in the low nibble of byte j, 2j+1 in the high one."""
    low, high = (packed & 15).long() - 8, (packed >> 4).long() - 8
    return torch.stack((low, high), dim=-1).flatten(-2)


def exact(fmt: str, t: dict) -> torch.Tensor:
    """The weights a kernel must multiply, in float64, computed here from the stored tensors t of format fmt
    ('full', 'int8', or 'int4' with any group size): int8 times its row's scale; int4 unpacked,
    times the scale of its group."""
    if fmt == "int8":
        return t[""].double() * t["scales"].double()[..., None]
    if fmt.startswith("int4"):
        q = torch.stack((t[""] & 15, t[""] >> 4), dim=-1).flatten(-2).double() - 8  # unpacked: [..., out, in]
        group = q.shape[-1] // t["scales"].shape[-1]
        return q * t["scales"].double().repeat_interleave(group, dim=-1)
    return t[""].double()


def assert_within_rounding(got: torch.Tensor, want: torch.Tensor, dtype, slack=0.0):
    """Each value within half a unit of the output dtype of the float64 value, plus float32 summation
    error (a few units of 2^-24 of the largest value), plus any slack the caller can account for."""
    err = (got.double() - want).abs()
    bound = HALF_ULP[dtype] * want.abs() + 1e-5 * want.abs().max() + slack
    assert (err <= bound).all(), (err - bound).max()


def round_to_nearest(w: torch.Tensor, groupsize: int, dtype=None) -> tuple:
    """The int4 rounding, written here from quantize.py's description in float64: per group of
    `groupsize` inputs, scale = (the value of largest magnitude) / -8, rounded to the scales' dtype;
    q = round(w / scale) clamped to [-8, 7]. Returns q [..., in] and the scales [..., in/groupsize]."""
    dtype = dtype or w.dtype
    groups = w.double().unflatten(-1, (-1, groupsize))
    extreme = groups.gather(-1, groups.abs().argmax(dim=-1, keepdim=True))
    scale = (extreme / -8).to(dtype).double()
    q = torch.where(scale != 0, groups / scale, 0.0).round().clamp(-8, 7)
    return q.flatten(-2), scale.squeeze(-1)


def reference_with_int4_weights(reference, groupsize: int):
    """transformers' model with every weight int4 rounds replaced by its round-to-nearest (done here)."""
    rounded = copy.deepcopy(reference)
    with torch.no_grad():
        for name, p in rounded.named_parameters():
            if name.endswith(QUANTIZED_HF) or ".experts." in name:
                q, scale = round_to_nearest(p, groupsize)
                p.copy_((q * scale.repeat_interleave(groupsize, dim=-1)).float())
    return rounded
