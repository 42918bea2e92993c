# GGUF's block quantization in plain PyTorch: llama.cpp's block types, read and written as their raw bytes,
# so that a GGUF file's blocks are taken over without rounding again and written back byte for byte.
#
# A row of n weights is n / QK blocks, one after another: uint8 [..., rows, (n / QK) * bytes]. fp16 values
# are little-endian. Each block, field by field (sizes in bytes):
#
#   type  QK   bytes  fields                                          weight
#   q8_0   32    34   d fp16 | 32 int8 q                              d * q
#   q4_0   32    18   d fp16 | 16 qs                                  d * (q - 8), q in 0..15
#   q4_k  256   144   d fp16 | dmin fp16 | 12 scales | 128 qs         d * sc * q - dmin * m, q in 0..15
#   q5_k  256   176   d fp16 | dmin fp16 | 12 scales | 32 qh | 128 qs d * sc * q - dmin * m, q in 0..31
#   q6_k  256   210   128 ql | 64 qh | 16 int8 scales | d fp16        d * sc * (q - 32), q in 0..63
#
# q4_0   value j of the block is the low nibble of qs[j], value j + 16 the high nibble.
# q4_k   8 sub-blocks of 32 values, each with a 6-bit scale sc and a 6-bit min m. qs: 4 chunks of 64 values,
#        32 bytes each: value l of a chunk in the low nibble of its byte l, value 32 + l in the high nibble.
# q5_k   as q4_k, with q's 5th bit apart: the 5th bit of value 32 i + l (sub-block i) is bit i of qh[l].
# q6_k   16 sub-blocks of 16 values, each with an int8 scale sc. Each half of 128 values has 64 bytes of ql
#        and 32 of qh; its value 32 k + l (k 0..3, l 0..31) keeps its low 4 bits in ql[32 (k % 2) + l]
#        (the low nibble for k < 2, the high for k >= 2) and its top 2 bits in bits 2k, 2k + 1 of qh[l].
# The 12 bytes of q4_k's and q5_k's scales (llama.cpp's get_scale_min_k4): sub-blocks 0..3 keep sc in the
# low 6 bits of bytes 0..3 and m in those of bytes 4..7; sub-blocks 4..7 keep their low 4 bits in bytes
# 8..11 (sc in the low nibble, m in the high) and their top 2 bits in the top 2 bits of bytes 0..3 (sc)
# and 4..7 (m).
#
# Quantizing searches, per block or sub-block, for the scales (and mins) that minimize the squared error
# weighted by `importance`: the mean square of each input channel's activations on calibration text
# (llama.cpp's importance matrix). For activations uncorrelated across inputs, sum importance *
# (w - w_quantized)^2 is the expected squared error of the layer's output, so that is what the search
# makes small; without an importance every input counts the same. (llama.cpp also multiplies the
# importance by sqrt(mean w^2 + w^2), a tuning of its own that this leaves out.) The candidates follow
# llama.cpp's (make_qx_quants, make_qkx3_quants, make_qp_quants): grids stretched a little either way
# from the one that spans the values, each refit by least squares on the codes it rounds to; the search
# for q4_k's and q5_k's scales and mins tries fewer, coarser stretches than llama.cpp's, which fit as
# well on test matrices in a third of the time. q4_0 and q8_0 without an importance round to nearest
# exactly as llama.cpp's reference quantizers do: their bytes are llama.cpp's and the gguf package's.
# The code below is the reference, and the fallback: kernels/cpu_quantize.cpp is the same quantizers
# compiled, op for op, which formats.Blocks hands to quantize() wherever the CPU kernels are loaded.
#
# Shapes in comments: B blocks of QK values; N rows of G groups of g values (for search_symmetric).
import math
from typing import Optional

import torch
from torch import Tensor

from errors import UserError

BLOCKS = {"q8_0": (32, 34), "q4_0": (32, 18), "q4_k": (256, 144), "q5_k": (256, 176), "q6_k": (256, 210)}

# About this many values are quantized at once: the search's temporaries then stay in the CPU's caches,
# where each pass over them is several times faster than through memory.
CHUNK = 1 << 17
KERNEL_CHUNK = 1 << 22

# The candidate grids, as steps added to the number of steps of the grid that spans the values: of
# q4_k's and q5_k's scales and mins (fit_scale_min), of the symmetric scales (search_symmetric) and of
# the 6-bit scales of q4_k's and q5_k's scales and mins (fit_scale_of_scales).
MIN_SCALE_STEPS = [-1 + 0.2 * i for i in range(11)]
SYMMETRIC_STEPS = [0.0] + [0.1 * i for i in range(-9, 10) if i]
SCALE_STEPS = [0.1 * i for i in range(-4, 5) if i]


def block_shape(name: str) -> tuple:
    """(values per block, bytes per block) of a block type; a UserError for an unknown name."""
    if name not in BLOCKS:
        raise UserError(f"unknown block type {name!r}: choose one of {', '.join(BLOCKS)}")
    return BLOCKS[name]


# ----------------------------------------------------------------------------- reading blocks back

def dequantize(name: str, blocks: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """The weights [..., n] stored in the raw blocks of a row, uint8 [..., (n / QK) * bytes], computed in
    float32 as llama.cpp does (so bit for bit its values), then converted to dtype."""
    qk, size = block_shape(name)
    if blocks.dtype != torch.uint8 or blocks.dim() == 0 or blocks.shape[-1] % size:
        raise UserError(f"{name} blocks are uint8 rows of a multiple of {size} bytes, not "
                        f"{blocks.dtype} {tuple(blocks.shape)}")
    b = blocks.reshape(*blocks.shape[:-1], -1, size)  # [..., B, bytes]
    return DEQUANTIZE[name](b).flatten(-2).to(dtype)


def half(b: Tensor) -> Tensor:
    """uint8 [..., 2], little-endian fp16 -> float32 [..., 1]."""
    return b.contiguous().view(torch.float16).float()


def dequantize_q8_0(b):
    return b[..., 2:].view(torch.int8).float() * half(b[..., :2])


def dequantize_q4_0(b):
    qs = b[..., 2:]
    return half(b[..., :2]) * (torch.cat((qs & 15, qs >> 4), dim=-1).float() - 8)


def dequantize_k(b, q):
    """q4_k and q5_k: w = d * sc * q - dmin * m, from the codes q [..., B, 8, 32] of the blocks b."""
    sc, m = unpack_scales(b[..., 4:16])  # [..., B, 8] each
    d = half(b[..., 0:2]) * sc.float()
    dm = half(b[..., 2:4]) * m.float()
    return (d[..., None] * q.float() - dm[..., None]).flatten(-2)


def low_nibbles_k(qs):
    """qs [..., B, 128] of q4_k and q5_k -> the low 4 bits of each value [..., B, 8, 32]."""
    qs = qs.unflatten(-1, (4, 32))  # [..., B, chunk, l]
    return torch.stack((qs & 15, qs >> 4), dim=-2).flatten(-3, -2)


def dequantize_q4_k(b):
    return dequantize_k(b, low_nibbles_k(b[..., 16:144]))


def dequantize_q5_k(b):
    bit = torch.arange(8, dtype=torch.uint8, device=b.device)[:, None]  # sub-block i -> bit i of qh[l]
    high = (b[..., None, 16:48] >> bit) & 1  # [..., B, 8, 32]
    return dequantize_k(b, low_nibbles_k(b[..., 48:176]) | (high << 4))


def dequantize_q6_k(b):
    ql = b[..., 0:128].unflatten(-1, (2, 2, 32))  # [..., B, half, k % 2, l]
    qh = b[..., 128:192].unflatten(-1, (2, 1, 32))  # [..., B, half, 1, l]
    low = torch.cat((ql & 15, ql >> 4), dim=-2)  # [..., B, half, k, l]
    high = (qh >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=b.device)[:, None]) & 3
    q = (low | (high << 4)).flatten(-3).unflatten(-1, (16, 16)).float() - 32  # [..., B, 16, 16]
    sc = b[..., 192:208].view(torch.int8).float()  # [..., B, 16]
    return ((half(b[..., 208:210]) * sc)[..., None] * q).flatten(-2)


DEQUANTIZE = {"q8_0": dequantize_q8_0, "q4_0": dequantize_q4_0, "q4_k": dequantize_q4_k,
              "q5_k": dequantize_q5_k, "q6_k": dequantize_q6_k}


def unpack_scales(b: Tensor) -> tuple:
    """The 12 bytes [..., 12] of q4_k's and q5_k's scales -> sc, m uint8 [..., 8] in 0..63."""
    first, second, low = b[..., 0:4], b[..., 4:8], b[..., 8:12]
    sc = torch.cat((first & 63, (low & 15) | ((first >> 6) << 4)), dim=-1)
    m = torch.cat((second & 63, (low >> 4) | ((second >> 6) << 4)), dim=-1)
    return sc, m


def pack_scales(sc: Tensor, m: Tensor) -> Tensor:
    """unpack_scales' inverse: sc, m uint8 [..., 8] in 0..63 -> [..., 12]."""
    first = sc[..., :4] | ((sc[..., 4:] >> 4) << 6)
    second = m[..., :4] | ((m[..., 4:] >> 4) << 6)
    return torch.cat((first, second, (sc[..., 4:] & 15) | ((m[..., 4:] & 15) << 4)), dim=-1)


# ----------------------------------------------------------------------------- quantizing

def quantize(name: str, w: Tensor, importance: Optional[Tensor] = None, kernel=None) -> Tensor:
    """The raw blocks, uint8 [..., (n / QK) * bytes], of the weights w [..., n]. importance [n] (or any
    shape that broadcasts against w, as [E, 1, n] for stacked experts) weighs each input's squared error;
    None counts every input the same. kernel: the same quantizers compiled (kernels/cpu_quantize.cpp's
    quantize_blocks, which formats.Blocks passes where the CPU kernels are loaded), called as
    kernel(rows float32 [R, n], importance float32 [R, n] or None, name); None: PyTorch's, below."""
    qk, size = block_shape(name)
    n = w.shape[-1] if w.dim() else 0
    if w.dim() == 0 or n % qk:
        raise UserError(f"a row of {n} values is not a whole number of {name} blocks of {qk}; store such "
                        f"tensors in a type whose blocks divide their rows, or in full precision")
    if not torch.isfinite(w).all():
        raise UserError(f"the weights to quantize to {name} hold inf or nan; check the checkpoint")
    rows = w.reshape(-1, n)
    weights = None if importance is None else checked_importance(importance, w.shape).reshape(-1, n)
    out = torch.empty(rows.shape[0], n // qk * size, dtype=torch.uint8, device=w.device)
    # The kernel keeps each block in its caches whatever the chunk: its chunks only bound the float32
    # copy of the weights, and are large, so that every thread has rows.
    step = max(1, (KERNEL_CHUNK if kernel else CHUNK) // n)
    for start in range(0, rows.shape[0], step):
        x = rows[start:start + step].float()  # [rows, n]
        wx = None if weights is None else weights[start:start + step]  # [rows, n], often one row repeated
        if kernel is not None:
            if wx is not None and wx.stride(-1) != 1:
                wx = wx.contiguous()
            out[start:start + step] = kernel(x.contiguous(), wx, name)
        else:
            blocks = None if wx is None else wx.unflatten(-1, (-1, qk))
            out[start:start + step] = QUANTIZE[name](x.unflatten(-1, (-1, qk)), blocks).flatten(-2)
    if kernel is not None:
        check_scales(name, out)
    return out.reshape(*w.shape[:-1], -1)


def check_scales(name: str, blocks: Tensor):
    """A UserError if any fp16 field (d, dmin) of the blocks [rows, bytes] is inf: PyTorch's quantizers
    refuse such scales as they write them (half_bytes), the kernel leaves them to this."""
    b = blocks.view(blocks.shape[0], -1, BLOCKS[name][1])
    fields = [0, 2] if name in ("q4_k", "q5_k") else [208] if name == "q6_k" else [0]
    if not all(torch.isfinite(half(b[..., at:at + 2])).all() for at in fields):
        raise UserError("weights too large for GGUF's blocks: their fp16 scales would overflow")


def checked_importance(importance: Tensor, shape: torch.Size) -> Tensor:
    """importance as float32, broadcast to the weights' shape; a UserError if it cannot be."""
    try:
        weights = importance.float().broadcast_to(shape)
    except RuntimeError:
        raise UserError(f"an importance of shape {tuple(importance.shape)} does not fit weights of shape "
                        f"{tuple(shape)}: give one value per input ({shape[-1]})") from None
    if not (torch.isfinite(importance).all() and (importance >= 0).all()):
        raise UserError("the importance holds negative, inf or nan values; it is a mean of squares")
    return weights


def half_bytes(x: Tensor) -> Tensor:
    """float32 [...] -> its fp16 as little-endian bytes, uint8 [..., 2]."""
    h = x.to(torch.float16)
    if not torch.isfinite(h).all():
        raise UserError("weights too large for GGUF's blocks: their fp16 scales would overflow")
    return h.unsqueeze(-1).view(torch.uint8)


def round_half_away(x: Tensor) -> Tensor:
    """C's roundf: halves away from zero (torch.round takes them to even)."""
    whole = x.trunc()
    return whole + torch.sign(x) * ((x - whole).abs() >= 0.5)


def nearest(x: Tensor, scale: Tensor, lo: int, hi: int) -> Tensor:
    """x / scale rounded to the nearest code in lo..hi; 0 where the scale is 0."""
    return torch.where(scale != 0, x / scale, 0.0).round().clamp(lo, hi)


def quantize_q8_0(x, w):
    if w is None:  # llama.cpp's quantize_row_q8_0_ref
        d = x.abs().amax(dim=-1, keepdim=True) / 127
        q = round_half_away(x * torch.where(d == 0, 0.0, 1 / d))
    else:
        d = symmetric_scales(x, w, -127, 127)[..., None].half().float()  # its codes fit its stored scale
        q = nearest(x, d, -127, 127)
    return torch.cat((half_bytes(d.squeeze(-1)), q.to(torch.int8).view(torch.uint8)), dim=-1)


def quantize_q4_0(x, w):
    if w is None:  # llama.cpp's quantize_row_q4_0_ref: the extreme becomes -8, halves round up
        extreme = x.gather(-1, x.abs().argmax(dim=-1, keepdim=True))
        d = extreme / -8
        q = (x * torch.where(d == 0, 0.0, 1 / d) + 8.5).trunc().clamp(0, 15)
    else:
        d = symmetric_scales(x, w, -8, 7)[..., None].half().float()
        q = nearest(x, d, -8, 7) + 8
    q = q.to(torch.uint8)
    return torch.cat((half_bytes(d.squeeze(-1)), q[..., :16] | (q[..., 16:] << 4)), dim=-1)


def quantize_q6_k(x, w):
    sub = x.unflatten(-1, (16, 16))  # [..., B, 16, 16]
    scales = symmetric_scales(sub, None if w is None else w.unflatten(-1, (16, 16)), -32, 31)  # [..., B, 16]
    # The scales to int8 as llama.cpp does: the largest in magnitude becomes -128.
    extreme = scales.gather(-1, scales.abs().argmax(dim=-1, keepdim=True))  # [..., B, 1]
    d = torch.where(extreme == 0, 0.0, extreme / -128).half().float()
    sc = nearest(scales, d, -128, 127)
    q = (nearest(sub, (d * sc)[..., None], -32, 31) + 32).to(torch.uint8)  # [..., B, 16, 16]
    q = q.flatten(-2).unflatten(-1, (2, 4, 32))  # [..., B, half, k, l]
    ql = (q[..., 0:2, :] & 15) | ((q[..., 2:4, :] & 15) << 4)  # [..., B, half, k % 2, l]
    shift = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=q.device)[:, None]  # k -> bits 2k, 2k + 1
    qh = ((q >> 4) << shift).sum(-2, dtype=torch.uint8)  # [..., B, half, l]
    return torch.cat((ql.flatten(-3), qh.flatten(-2), sc.to(torch.int8).view(torch.uint8),
                      half_bytes(d.squeeze(-1))), dim=-1)


def quantize_k(x, w, levels):
    """q4_k (levels 16) and q5_k (32): each sub-block's scale and min found by fit_scale_min, both
    rounded to 6 bits of the block's d and dmin, and the codes rounded again with what is stored.
    Returns d, dmin [..., B, 1], sc, m uint8 [..., B, 8], q uint8 [..., B, 8, 32]."""
    sub = x.unflatten(-1, (8, 32))  # [..., B, 8, 32]
    ws = None if w is None else w.unflatten(-1, (8, 32))
    scale, mn = fit_scale_min(sub, ws, levels - 1)  # [..., B, 8] each
    # How much an error in a sub-block's scale or min counts, as llama.cpp weighs it.
    weight = torch.ones_like(scale) if w is None else ws.sum(-1)
    d, sc = fit_scale_of_scales(scale, weight, 63)
    dmin, m = fit_scale_of_scales(mn, weight, 63)
    d, dmin = d.half().float(), dmin.half().float()
    step, offset = (d * sc)[..., None], (dmin * m)[..., None]  # [..., B, 8, 1]
    q = nearest(sub + offset, step, 0, levels - 1)
    return d, dmin, sc.to(torch.uint8), m.to(torch.uint8), q.to(torch.uint8)


def pack_k(d, dmin, sc, m, low):
    """The fields common to q4_k and q5_k: d, dmin, the 12 bytes of scales; and the 128 bytes of the low
    nibbles of the codes low [..., B, 8, 32]."""
    low = low.unflatten(-2, (4, 2))  # [..., B, chunk, 2, 32]
    qs = (low[..., 0, :] | (low[..., 1, :] << 4)).flatten(-2)
    return half_bytes(d.squeeze(-1)), half_bytes(dmin.squeeze(-1)), pack_scales(sc, m), qs


def quantize_q4_k(x, w):
    d, dmin, sc, m, q = quantize_k(x, w, 16)
    return torch.cat(pack_k(d, dmin, sc, m, q), dim=-1)


def quantize_q5_k(x, w):
    d, dmin, sc, m, q = quantize_k(x, w, 32)
    bit = torch.arange(8, dtype=torch.uint8, device=q.device)[:, None]
    qh = ((q >> 4) << bit).sum(-2, dtype=torch.uint8)  # [..., B, 32]: sub-block i in bit i
    d, dmin, scales, qs = pack_k(d, dmin, sc, m, q & 15)
    return torch.cat((d, dmin, scales, qh, qs), dim=-1)


QUANTIZE = {"q8_0": quantize_q8_0, "q4_0": quantize_q4_0, "q4_k": quantize_q4_k, "q5_k": quantize_q5_k,
            "q6_k": quantize_q6_k}


# ----------------------------------------------------------------------------- the searches

def search_symmetric(groups: Tensor, importance: Optional[Tensor], qmin: int, qmax: int) -> Tensor:
    """The scale [...] of each group [..., g] of a symmetric grid (w ~= scale * q, q in qmin..qmax, qmin < 0
    < qmax) that makes sum importance * (w - scale * q)^2 smallest among llama.cpp's candidates
    (make_qx_quants): the grids that put the group's extreme at qmin (as rounding to nearest does) and
    up to 0.9 of a step further in or out, each with its scale refit by least squares on the codes it
    rounds to. importance broadcasts against groups (None: every value counts the same). The scale has
    the sign that takes the extreme to qmin, and is 0 for an all-zero group. Rounding to nearest with
    it can only err less, by this measure, than rounding to nearest with the extreme at qmin."""
    x = groups.float()
    x3 = x.reshape(-1, *x.shape[-2:]) if x.dim() > 1 else x.reshape(1, 1, -1)  # [N, G, g]
    w3 = None if importance is None else checked_importance(importance, x.shape).reshape(x3.shape)
    out = torch.empty(x3.shape[:-1], device=x.device)
    step = max(1, CHUNK // max(1, math.prod(x3.shape[1:])))  # CHUNK values at a time, for the caches
    for start in range(0, x3.shape[0], step):
        rows = slice(start, start + step)
        out[rows] = symmetric_scales(x3[rows], None if w3 is None else w3[rows], qmin, qmax)
    return out.reshape(x.shape[:-1])


def symmetric_scales(x, w, qmin, qmax):
    """search_symmetric on groups x [..., g] with weights w broadcasting against them (None: all 1)."""
    extreme = x.gather(-1, x.abs().argmax(dim=-1, keepdim=True)).squeeze(-1)  # signed, [...]
    scale = extreme / qmin  # rounding to nearest's grid, kept where no candidate has a code off 0
    extreme = torch.where(extreme == 0, 1.0, extreme)  # all-zero groups: every grid gives codes 0
    best = weighted_squares(x, w)  # the error of scale 0: a candidate must do better
    for step in SYMMETRIC_STEPS:
        q = (x * ((qmin - step) / extreme)[..., None]).round_().clamp_(qmin, qmax)
        qw = q if w is None else q * w
        sxq, sqq = (qw * x).sum(-1), (qw * q).sum(-1)
        candidate = sxq / sqq  # least squares; nan where every code is 0 (or weighs 0): never better
        err = weighted_squares(x - candidate[..., None] * q, w)
        better = err < best
        best = torch.where(better, err, best)
        scale = torch.where(better, candidate, scale)
    return scale


def weighted_squares(r: Tensor, w: Optional[Tensor]) -> Tensor:
    """sum w r^2 over the last axis (w None: all 1). The searches measure each candidate's error so, from
    its residuals r, and not as sum w x^2 minus what the fit explains: that difference of two nearly equal
    sums keeps few of float32's 7 digits (a 6-bit grid errs a few 1e-4 of sum w x^2, an 8-bit one a few
    1e-5), too few to tell candidates apart that differ by a percent of that: rounding, not error, would
    choose among them."""
    squares = r * r
    return (squares if w is None else w * squares).sum(-1)


def fit_scale_min(x: Tensor, w: Optional[Tensor], top: int) -> tuple:
    """For each sub-block x [..., g] (weights w broadcasting against it, None: all 1): scale >= 0 and
    min >= 0 [...] of an asymmetric grid x ~= scale * q - min, q in 0..top, that make sum w (x - scale q
    + min)^2 small. As llama.cpp's make_qkx3_quants: start from the grid that spans the values (and 0),
    then try grids of top - 1 .. top + 1 steps across the span from the best bottom so far, each refit by
    least squares on the codes it rounds to (scale and bottom together; the scale alone, with the bottom
    at 0, where the joint fit has none or wants the bottom above 0)."""
    lo = x.amin(dim=-1, keepdim=True).clamp(max=0)  # the grid's bottom, -min: 0 or below
    hi = x.amax(dim=-1, keepdim=True)
    wx = x if w is None else w * x
    sw = torch.full_like(hi, x.shape[-1]) if w is None else w.expand_as(x).sum(-1, keepdim=True)
    swx = wx.sum(-1, keepdim=True)

    def sums(q):  # [..., 1] each
        qw = q if w is None else q * w
        return qw.sum(-1, keepdim=True), (qw * q).sum(-1, keepdim=True), (wx * q).sum(-1, keepdim=True)

    def error(q, scale, bottom):  # [..., 1]: weighted_squares' reason
        return weighted_squares(x - scale * q - bottom, w).unsqueeze(-1)

    scale = (hi - lo) / top
    q = torch.where(scale > 0, (x - lo) / scale, 0.0).round_().clamp_(0, top)
    best = error(q, scale, lo)
    for step in MIN_SCALE_STEPS:
        iscale = (top + step) / (hi - lo).clamp_min(1e-30)
        q = torch.addcmul(-lo * iscale, x, iscale).round_().clamp_(0, top)
        sq, sqq, sxq = sums(q)
        det = sw * sqq - sq * sq
        s, m = (sw * sxq - swx * sq) / det, (sqq * swx - sq * sxq) / det
        alone = (det <= 0) | (m > 0)
        s, m = torch.where(alone, sxq / sqq, s), torch.where(alone, 0.0, m)
        err = error(q, s, m)  # nan if sqq = 0: never better
        better = err < best
        best = torch.where(better, err, best)
        scale, lo = torch.where(better, s, scale), torch.where(better, m, lo)
    return scale.squeeze(-1).clamp_min(0), -lo.squeeze(-1)


def fit_scale_of_scales(v: Tensor, w: Tensor, top: int) -> tuple:
    """Values v >= 0 [..., k] as d * q with q in 0..top integers: d [..., 1] and q [..., k] (float) making
    sum w (v - d q)^2 small (llama.cpp's make_qp_quants, without its last pass of single-code changes):
    grids of top - 0.4 .. top + 0.4 steps up to the largest value, the best refit by least squares."""
    largest = v.amax(dim=-1, keepdim=True)
    span = torch.where(largest > 0, largest, 1.0)  # all zero: every code 0

    def error(iscale):
        q = (v * iscale).round().clamp(0, top)
        return (w * (v - q / iscale) ** 2).sum(-1, keepdim=True)

    iscale = top / span
    best = error(iscale)
    for step in SCALE_STEPS:
        candidate = (top + step) / span
        err = error(candidate)
        better = err < best
        best, iscale = torch.where(better, err, best), torch.where(better, candidate, iscale)
    q = (v * iscale).round().clamp(0, top)
    sxq, sqq = (w * v * q).sum(-1, keepdim=True), (w * q * q).sum(-1, keepdim=True)
    d = torch.where(sqq > 0, sxq / sqq, 1 / iscale)  # least squares, unless no code weighs anything
    return torch.where(largest > 0, d, 0.0), q
