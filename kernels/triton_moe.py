# Triton kernels for the few tokens of a decode step on a GPU, for every weight format: layers.py's
# 'triton' paths (triton_experts, triton_linear) call their ops, and import this file only for CUDA tensors,
# when MIXTRAL_TRITON asks for it (dispatch.triton_kernels_requested); tests/test_triton.py imports
# it under Triton's interpreter (TRITON_INTERPRET=1), which runs the same kernels on CPU tensors. A
# CPU-only user never imports triton.
#
# The MoE of N tokens (one decode step: batch B, a few tokens), K experts each, runs as two kernels
# that read the chosen expert ids on the device (no host sync: the step stays one CUDA graph):
#   1. gate_up, grid (expert e, block of I rows): a program returns at once when no token chose e, so
#      an unchosen expert costs no weight reads; otherwise it reads its tile of w1[e] and w3[e] once,
#      for all the tokens that chose e, and writes h[n, k, rows] = silu(w1[e] x_n) * w3[e] x_n for
#      the slot k where experts[n, k] == e.
#   2. down, grid (expert e, block of D rows, part s of I): y[s, n, k, rows] = weights[n, k] *
#      (w2[e][rows, part s of I] @ h[n, k, part s]); the output is y summed over parts and slots (one
#      small op, which torch.compile fuses with the residual add after it).
# A dense layer (wqkv, wo, the output head) is kernel 2 with one expert that every token chose, weight 1.
#
# Weight formats (QUANT, from the name the ops are given: 'full', 'int8', 'int4', or one of GGUF's 'q8_0',
# 'q4_0', 'q4_k', 'q5_k', 'q6_k'): 16/32-bit floats as stored; int8 with one scale per output row
# (applied once to each program's sums); int4 packed two to a byte with one scale per group of GROUP
# inputs along a row (applied to the weights as they are unpacked: a tile holds several groups); GGUF's
# blocks read in place from a GGUF file's bytes, each tile decoded in registers with the scales its
# blocks hold (a tile is whole blocks of 32, or half a K-quant block of 256). The products run on
# tensor cores (tl.dot) in DOT_DTYPE, the activations' dtype on a GPU, with float32 sums; the token
# dimension is padded to 16, tl.dot's smallest, which costs tensor-core work only: memory rules here.
# The interpreter has no bf16 arithmetic, so there DOT_DTYPE is float32, which holds bf16 and the
# integer weights exactly.
#
# Shapes in comments: N tokens, D model width, E experts, K experts per token, I expert width.
import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

# The formats (QUANT); constexpr, so that the kernels may read them.
FLOAT, INT8, INT4 = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
Q8_0, Q4_0, Q4_K, Q5_K, Q6_K = tl.constexpr(3), tl.constexpr(4), tl.constexpr(5), tl.constexpr(6), tl.constexpr(7)
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def int8_to_float(q):
    """int8 -> float32, exactly, with one integer add and one float subtraction per element: 128 + q
    (0..255) fits the low mantissa bits of the float 2^23, so q plus the bits of 2^23 + 128
    (0x4B000080) are the bits of the float 2^23 + 128 + q, and subtracting 2^23 + 128 leaves q. GPUs
    issue the int-to-float conversion instruction at a fraction of the rate of integer and float
    adds, and decode must convert every weight it reads."""
    return (q.to(tl.int32) + 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0


@triton.jit
def code_to_float(code, OFFSET: tl.constexpr):
    """An unsigned code (int32, 0..2^23 - 1: a nibble, a 6-bit scale) -> code - OFFSET as float32, by the
    same trick as int8_to_float: its bits or'ed into 2^23's, then 2^23 + OFFSET subtracted."""
    return (code | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + OFFSET)


@triton.jit
def nibble_to_float(nibble):
    """An int4 weight q in 0..15 (int32) -> q - 8 as float32."""
    return code_to_float(nibble, 8)


@triton.jit
def fp16_at(ptr, mask):
    """The little-endian fp16 at byte pointers ptr, as float32 (0 where masked): two byte loads, since a
    GGUF block may put it at any even address."""
    low = tl.load(ptr, mask=mask, other=0).to(tl.uint16)
    high = tl.load(ptr + 1, mask=mask, other=0).to(tl.uint16)
    return (low | (high << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def in_column_order(low, high):
    """A tile's values from its bytes' low nibbles and from their high nibbles, [BLOCK_ROWS, A, B] each,
    where a byte's high nibble holds the value B columns after its low nibble's -> [BLOCK_ROWS, A * 2B]
    in column order: A runs of B low values, then B high ones. (Permuted here, in registers, the tile
    meets the activations as they lie: gathering them in the nibbles' order instead made the compiled
    kernels larger, their activations' loads 4 bytes wide instead of 16.)"""
    w = tl.permute(tl.join(low, high), (0, 1, 3, 2))  # [BLOCK_ROWS, A, 2, B]
    return tl.reshape(w, (w.shape[0], w.shape[1] * 2 * w.shape[3]))


# GGUF's blocks (quants.py's header has their layout), read in place from a row of blocks: each tile
# function returns w[rows, col0:col0 + BLOCK_COLS] in float32. The values are exact where the format's
# products are: d's 11 bits times a 6- or 8-bit scale times a code of at most 6 bits fit float32's 24, and
# the K-quants' d sc q - dmin m rounds once. fp16 d and dmin are bitcast from their two bytes, codes and
# scales become floats by code_to_float, so no weight needs a conversion instruction.

@triton.jit
def q8_0_tile(w_ptr, rows, row_mask, col0, n_cols, row_stride, BLOCK_COLS: tl.constexpr):
    """q8_0: blocks of 32 int8 q after an fp16 d: w = d q. The tile is BLOCK_COLS / 32 whole blocks."""
    blocks = col0 // 32 + tl.arange(0, BLOCK_COLS // 32)
    mask = row_mask[:, None] & (blocks < n_cols // 32)[None, :]  # [BLOCK_ROWS, blocks]
    block = w_ptr + rows[:, None] * row_stride + blocks[None, :] * 34  # [BLOCK_ROWS, blocks]
    d = fp16_at(block, mask)
    q = tl.load(block[:, :, None] + 2 + tl.arange(0, 32)[None, None, :], mask=mask[:, :, None], other=0)
    w = int8_to_float(q.to(tl.int8, bitcast=True)) * d[:, :, None]  # [BLOCK_ROWS, blocks, 32]
    return tl.reshape(w, (rows.shape[0], BLOCK_COLS))


@triton.jit
def q4_0_tile(w_ptr, rows, row_mask, col0, n_cols, row_stride, BLOCK_COLS: tl.constexpr):
    """q4_0: blocks of an fp16 d and 16 bytes, value j in the low nibble of byte j and value j + 16 in the
    high one: w = d (q - 8). The tile is BLOCK_COLS / 32 whole blocks."""
    blocks = col0 // 32 + tl.arange(0, BLOCK_COLS // 32)
    mask = row_mask[:, None] & (blocks < n_cols // 32)[None, :]
    block = w_ptr + rows[:, None] * row_stride + blocks[None, :] * 18
    d = fp16_at(block, mask)[:, :, None]
    qs = tl.load(block[:, :, None] + 2 + tl.arange(0, 16)[None, None, :], mask=mask[:, :, None],
                 other=0).to(tl.int32)  # [BLOCK_ROWS, blocks, 16]
    return in_column_order(code_to_float(qs & 15, 8) * d, code_to_float(qs >> 4, 8) * d)


@triton.jit
def k_quant_scales(scales_ptr, half, mask):
    """q4_k's and q5_k's 6-bit scales and mins of the sub-blocks 4 half + 2 chunk + nibble of a block
    (chunk and nibble 0 or 1), from its 12 bytes of scales at scales_ptr [BLOCK_ROWS]: bytes 0..3 hold the
    first four scales in their low 6 bits, bytes 4..7 the first four mins; the last four take their low 4
    bits from bytes 8..11 (scales the low nibble, mins the high) and their top 2 from the top bits of bytes
    0..3 (scales) and 4..7 (mins). -> (scales, mins) float32 [BLOCK_ROWS, 2 chunk, 2 nibble] each."""
    i = 2 * tl.arange(0, 2)[None, :, None] + tl.arange(0, 2)[None, None, :]  # [1, 2, 2]: sub-block within the half
    at = scales_ptr[:, None, None] + i
    mask = mask[:, None, None]
    first = tl.load(at, mask=mask, other=0).to(tl.int32)
    second = tl.load(at + 4, mask=mask, other=0).to(tl.int32)
    low = tl.load(at + 8, mask=mask, other=0).to(tl.int32)
    sc = tl.where(half == 0, first & 63, (low & 15) | ((first >> 6) << 4))
    m = tl.where(half == 0, second & 63, (low >> 4) | ((second >> 6) << 4))
    return code_to_float(sc, 0), code_to_float(m, 0)


@triton.jit
def k_quant_tile(w_ptr, rows, row_mask, col0, row_stride, QUANT: tl.constexpr):
    """q4_k and q5_k: blocks of 256 values in 8 sub-blocks of 32, w = d sc q - dmin m. A tile is half a
    block (BLOCK_COLS 128): 2 chunks of 64 values, whose 32 bytes of nibbles hold value l of the chunk
    in the low nibble of byte l and value 32 + l in the high one; q5_k's fifth bit of value l of
    sub-block u is bit u of qh[l]."""
    BYTES: tl.constexpr = 144 if QUANT == Q4_K else 176
    QS: tl.constexpr = 16 if QUANT == Q4_K else 48  # where the nibbles start
    half = (col0 // 128) % 2
    block = w_ptr + rows * row_stride + (col0 // 256) * BYTES  # [BLOCK_ROWS]
    d = fp16_at(block, row_mask)[:, None]
    dmin = fp16_at(block + 2, row_mask)[:, None]
    sc, m = k_quant_scales(block + 4, half, row_mask)  # [BLOCK_ROWS, 2, 2] each
    sc_low, sc_high = tl.split(sc * d[:, :, None])  # [BLOCK_ROWS, 2]: d sc of each chunk's low, high nibbles
    min_low, min_high = tl.split(m * dmin[:, :, None])
    chunk, l = tl.arange(0, 2)[None, :, None], tl.arange(0, 32)[None, None, :]
    qs = tl.load(block[:, None, None] + QS + 64 * half + 32 * chunk + l, mask=row_mask[:, None, None],
                 other=0).to(tl.int32)  # [BLOCK_ROWS, 2, 32]
    low, high = qs & 15, qs >> 4
    if QUANT == Q5_K:
        qh = tl.load(block[:, None, None] + 16 + l, mask=row_mask[:, None, None], other=0).to(tl.int32)
        u = 4 * half + 2 * chunk  # [1, 2, 1]: the sub-block of each chunk's low nibbles
        low |= ((qh >> u) & 1) << 4
        high |= ((qh >> (u + 1)) & 1) << 4
    return in_column_order(code_to_float(low, 0) * sc_low[:, :, None] - min_low[:, :, None],
                           code_to_float(high, 0) * sc_high[:, :, None] - min_high[:, :, None])


@triton.jit
def q6_k_tile(w_ptr, rows, row_mask, col0, row_stride):
    """q6_k: blocks of 256 values in 16 sub-blocks of 16, w = d sc (q - 32), q 6 bits. A tile is half a
    block (BLOCK_COLS 128) with 64 bytes of ql and 32 of qh: value 32 k + l of the half (k 0..3, l 0..31)
    keeps its low 4 bits in ql[32 (k % 2) + l], the low nibble for k < 2 and the high one for k >= 2,
    and its top 2 bits in bits 2k, 2k + 1 of qh[l]."""
    half = (col0 // 128) % 2
    block = w_ptr + rows * row_stride + (col0 // 256) * 210  # [BLOCK_ROWS]
    mask = row_mask[:, None, None]
    d = fp16_at(block + 208, row_mask)[:, None, None]
    k, l = tl.arange(0, 2)[None, :, None], tl.arange(0, 32)[None, None, :]  # k: of the low nibbles (k + 2: high)
    ql = tl.load(block[:, None, None] + 64 * half + 32 * k + l, mask=mask, other=0).to(tl.int32)  # [BLOCK_ROWS, 2, 32]
    qh = tl.load(block[:, None, None] + 128 + 32 * half + l, mask=mask, other=0).to(tl.int32)  # [BLOCK_ROWS, 1, 32]
    low = (ql & 15) | (((qh >> (2 * k)) & 3) << 4)
    high = (ql >> 4) | (((qh >> (2 * k + 4)) & 3) << 4)
    # the scales of 16 values each: sub-block 2 k + s of the half (s: the first or second 16 of l) for the
    # low nibbles, 4 + 2 k + s for the high ones
    s = tl.arange(0, 2)[None, None, :]
    at = block[:, None, None] + 192 + 8 * half + 2 * k + s  # [BLOCK_ROWS, 2, 2]
    sc_low = int8_to_float(tl.load(at, mask=mask, other=0).to(tl.int8, bitcast=True)) * d
    sc_high = int8_to_float(tl.load(at + 4, mask=mask, other=0).to(tl.int8, bitcast=True)) * d
    shape: tl.constexpr = (rows.shape[0], 2, 2, 16)
    halves: tl.constexpr = (rows.shape[0], 1, 64)  # the low nibbles hold values 0..63 of the half, the high 64..127
    w_low = tl.reshape(tl.reshape(code_to_float(low, 32), shape) * sc_low[:, :, :, None], halves)
    w_high = tl.reshape(tl.reshape(code_to_float(high, 32), shape) * sc_high[:, :, :, None], halves)
    return in_column_order(w_low, w_high)


@triton.jit
def weight_tile(w_ptr, s_ptr, rows, row_mask, col0, n_cols, row_stride, scale_row_stride, QUANT: tl.constexpr,
                GROUP: tl.constexpr, BLOCK_COLS: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """w[rows, col0:col0 + BLOCK_COLS] -> [BLOCK_ROWS, BLOCK_COLS] in DOT_DTYPE, with int4's group scales
    and GGUF's block scales (int8's row scales are applied to the sums instead); 0 outside the matrix.
    Each row's columns (or blocks) are contiguous: wide loads (up to 16 bytes a thread) whenever the row
    stride and the format's blocks allow, which Triton checks when it specializes the kernel for its
    arguments."""
    if QUANT == INT4:  # byte j of a row holds q[2j] (low nibble) and q[2j + 1] (high)
        byte_cols = col0 // 2 + tl.arange(0, BLOCK_COLS // 2)
        mask = row_mask[:, None] & (byte_cols < n_cols // 2)[None, :]
        packed = tl.load(w_ptr + rows[:, None] * row_stride + byte_cols[None, :], mask=mask, other=0x88).to(tl.int32)
        low, high = nibble_to_float(packed & 15), nibble_to_float(packed >> 4)  # [BLOCK_ROWS, BLOCK_COLS / 2] each
        w = tl.reshape(tl.join(low, high), (rows.shape[0], BLOCK_COLS))  # interleaved back into column order
        groups = col0 // GROUP + tl.arange(0, BLOCK_COLS // GROUP)
        scale = tl.load(s_ptr + rows[:, None] * scale_row_stride + groups[None, :],
                        mask=row_mask[:, None] & (groups < n_cols // GROUP)[None, :], other=0).to(tl.float32)
        w = tl.reshape(tl.reshape(w, (rows.shape[0], BLOCK_COLS // GROUP, GROUP)) * scale[:, :, None],
                       (rows.shape[0], BLOCK_COLS))  # [BLOCK_ROWS, BLOCK_COLS]
    elif QUANT == Q8_0:
        w = q8_0_tile(w_ptr, rows, row_mask, col0, n_cols, row_stride, BLOCK_COLS)
    elif QUANT == Q4_0:
        w = q4_0_tile(w_ptr, rows, row_mask, col0, n_cols, row_stride, BLOCK_COLS)
    elif QUANT == Q4_K or QUANT == Q5_K:
        tl.static_assert(BLOCK_COLS == 128, "a K-quant tile is half a block")
        w = k_quant_tile(w_ptr, rows, row_mask, col0, row_stride, QUANT)
    elif QUANT == Q6_K:
        tl.static_assert(BLOCK_COLS == 128, "a K-quant tile is half a block")
        w = q6_k_tile(w_ptr, rows, row_mask, col0, row_stride)
    else:
        cols = col0 + tl.arange(0, BLOCK_COLS)
        mask = row_mask[:, None] & (cols < n_cols)[None, :]
        w = tl.load(w_ptr + rows[:, None] * row_stride + cols[None, :], mask=mask, other=0)
        if QUANT == INT8:
            w = int8_to_float(w)
    return w.to(DOT_DTYPE)


@triton.jit
def accumulate(acc, xs, w_ptr, s_ptr, rows, row_mask, col0, n_cols, row_stride, scale_row_stride,
               QUANT: tl.constexpr, GROUP: tl.constexpr, BLOCK_COLS: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """acc [BLOCK_N, BLOCK_ROWS] + xs [BLOCK_N, BLOCK_COLS] @ w[rows, col0:col0 + BLOCK_COLS].T"""
    w = weight_tile(w_ptr, s_ptr, rows, row_mask, col0, n_cols, row_stride, scale_row_stride, QUANT, GROUP,
                    BLOCK_COLS, DOT_DTYPE)
    if DOT_DTYPE == tl.float32:  # full float32 products, not TF32's 10-bit mantissas
        return acc + tl.dot(xs, tl.trans(w), input_precision="ieee")
    return acc + tl.dot(xs, tl.trans(w))


@triton.jit
def row_scales(s_ptr, rows, row_mask, QUANT: tl.constexpr):
    """int8's scale of each output row [BLOCK_ROWS]; 1 for the other formats."""
    if QUANT == INT8:
        return tl.load(s_ptr + rows, mask=row_mask, other=0).to(tl.float32)
    return tl.full(rows.shape, 1.0, tl.float32)


@triton.jit
def tokens_of_expert(experts_ptr, e, N, K, BLOCK_N: tl.constexpr, BLOCK_SLOTS: tl.constexpr):
    """Which of the N tokens chose expert e, and in which of their K slots: ([BLOCK_N] bool, [BLOCK_N]).
    A token chooses an expert at most once (top-k)."""
    tokens = tl.arange(0, BLOCK_N)
    slots = tl.arange(0, BLOCK_SLOTS)
    mask = (tokens[:, None] < N) & (slots[None, :] < K)
    ids = tl.load(experts_ptr + tokens[:, None] * K + slots[None, :], mask=mask, other=-1)  # [BLOCK_N, BLOCK_SLOTS]
    chosen = (ids == e).to(tl.int32)
    return tl.max(chosen, axis=1) > 0, tl.sum(chosen * slots[None, :], axis=1)


@triton.jit
def gate_up_kernel(x_ptr, experts_ptr, w1_ptr, w3_ptr, s1_ptr, s3_ptr, h_ptr, N, K, D, I,
                   w_expert_stride, w_row_stride, s_expert_stride, s_row_stride,
                   QUANT: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SLOTS: tl.constexpr,
                   BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """h [N, K, I] float32, the rows of one program: silu(w1[e] x) * (w3[e] x) for the tokens that chose e."""
    e = tl.program_id(0)
    chose, slot = tokens_of_expert(experts_ptr, e, N, K, BLOCK_N, BLOCK_SLOTS)
    if tl.max(chose.to(tl.int32), axis=0) == 0:
        return  # no token chose e: its weights are not read
    tokens = tl.arange(0, BLOCK_N)
    rows = tl.program_id(1) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = rows < I
    w1_e = w1_ptr + e.to(tl.int64) * w_expert_stride
    w3_e = w3_ptr + e.to(tl.int64) * w_expert_stride
    s1_e = s1_ptr + e.to(tl.int64) * s_expert_stride
    s3_e = s3_ptr + e.to(tl.int64) * s_expert_stride
    acc1 = tl.zeros((BLOCK_N, BLOCK_ROWS), tl.float32)
    acc3 = tl.zeros((BLOCK_N, BLOCK_ROWS), tl.float32)
    for col0 in range(0, D, BLOCK_COLS):
        cols = col0 + tl.arange(0, BLOCK_COLS)
        xs = tl.load(x_ptr + tokens[:, None] * D + cols[None, :], mask=chose[:, None] & (cols < D)[None, :],
                     other=0.0).to(DOT_DTYPE)  # [BLOCK_N, BLOCK_COLS]: the tokens that chose e
        acc1 = accumulate(acc1, xs, w1_e, s1_e, rows, row_mask, col0, D, w_row_stride, s_row_stride, QUANT, GROUP,
                          BLOCK_COLS, DOT_DTYPE)
        acc3 = accumulate(acc3, xs, w3_e, s3_e, rows, row_mask, col0, D, w_row_stride, s_row_stride, QUANT, GROUP,
                          BLOCK_COLS, DOT_DTYPE)
    x1 = acc1 * row_scales(s1_e, rows, row_mask, QUANT)[None, :]  # [BLOCK_N, BLOCK_ROWS]
    x3 = acc3 * row_scales(s3_e, rows, row_mask, QUANT)[None, :]
    h = x1 * tl.sigmoid(x1) * x3
    pair = tokens * K + slot  # [BLOCK_N]: row of h
    tl.store(h_ptr + pair[:, None] * I + rows[None, :], h, mask=chose[:, None] & row_mask[None, :])


@triton.jit
def down_kernel(h_ptr, experts_ptr, weights_ptr, w2_ptr, s2_ptr, y_ptr, N, K, D, I, part_len,
                w_expert_stride, w_row_stride, s_expert_stride, s_row_stride,
                QUANT: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SLOTS: tl.constexpr,
                BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """y [parts, N, K, D] float32, the rows of one program over its part of I: weights[n, k] *
    (w2[e][rows, part] @ h[n, k, part]) for the tokens that chose e."""
    e = tl.program_id(0)
    chose, slot = tokens_of_expert(experts_ptr, e, N, K, BLOCK_N, BLOCK_SLOTS)
    if tl.max(chose.to(tl.int32), axis=0) == 0:
        return
    pair = tl.arange(0, BLOCK_N) * K + slot  # [BLOCK_N]: row of h and y
    rows = tl.program_id(1) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = rows < D
    part = tl.program_id(2)
    w2_e = w2_ptr + e.to(tl.int64) * w_expert_stride
    s2_e = s2_ptr + e.to(tl.int64) * s_expert_stride
    acc = tl.zeros((BLOCK_N, BLOCK_ROWS), tl.float32)
    for col0 in range(part * part_len, tl.minimum(part * part_len + part_len, I), BLOCK_COLS):
        cols = col0 + tl.arange(0, BLOCK_COLS)
        hs = tl.load(h_ptr + pair[:, None] * I + cols[None, :], mask=chose[:, None] & (cols < I)[None, :],
                     other=0.0).to(DOT_DTYPE)  # [BLOCK_N, BLOCK_COLS]
        acc = accumulate(acc, hs, w2_e, s2_e, rows, row_mask, col0, I, w_row_stride, s_row_stride, QUANT, GROUP,
                         BLOCK_COLS, DOT_DTYPE)
    routing = tl.load(weights_ptr + pair, mask=chose, other=0.0).to(tl.float32)  # [BLOCK_N]
    y = acc * row_scales(s2_e, rows, row_mask, QUANT)[None, :] * routing[:, None]
    tl.store(y_ptr + (part * N * K + pair)[:, None] * D + rows[None, :], y, mask=chose[:, None] & row_mask[None, :])


# ----------------------------------------------------------------------------- launching

def multiprocessor_count(device: torch.device) -> int:
    """SMs to fill. The interpreter runs one program after another: a small count there makes the
    tests' tiny shapes take the split-I path too."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def block_rows(active_experts: int, rows: int, sms: int) -> int:
    """Rows per program: the largest tile that still gives every SM four programs of the chosen experts
    (rows of all of them: the grid's programs for unchosen experts return at once). Larger tiles reload
    the activations less often; more programs per SM keep more weight loads in flight, which is what
    a memory-bound kernel needs. 16 is tl.dot's smallest."""
    for size in (64, 32):
        if active_experts * triton.cdiv(rows, size) >= 4 * sms:
            return size
    return 16


def parts(active_experts: int, rows: int, size: int, reduction: int, block_cols: int, sms: int) -> int:
    """Parts to split the reduction into (split-K) when the chosen experts' row tiles alone are too few
    programs to keep every SM busy twice over: each part is a program of its own, and the partial sums
    are added by the op that adds the K experts anyway."""
    programs = active_experts * triton.cdiv(rows, size)
    return max(1, min(triton.cdiv(2 * sms, programs), triton.cdiv(reduction, block_cols)))


# What each format stores: (the weights' dtypes, whether scales come with them). GGUF's block types hold
# their scales in their blocks: (QUANT, values, bytes) of a block.
GGUF = {"q8_0": (Q8_0, 32, 34), "q4_0": (Q4_0, 32, 18), "q4_k": (Q4_K, 256, 144), "q5_k": (Q5_K, 256, 176),
        "q6_k": (Q6_K, 256, 210)}
STORED = {"full": ((torch.float32, torch.bfloat16, torch.float16), False), "int8": ((torch.int8,), True),
          "int4": ((torch.uint8,), True), **{name: ((torch.uint8,), False) for name in GGUF}}


def row_width(format: str, inputs: int) -> Optional[int]:
    """The elements a row of `inputs` values takes in format `format`, or None where no row can hold
    exactly them."""
    if format in GGUF:
        _, values, size = GGUF[format]
        return inputs // values * size if inputs % values == 0 else None
    if format == "int4":
        return inputs // 2 if inputs % 2 == 0 else None
    return inputs


def quantization(format: str, w: Tensor, scales: Optional[Tensor], inputs: int) -> tuple:
    """(QUANT, GROUP) of a weight [..., out, in'] of `inputs` values a row stored in format `format`
    (formats.py's name): 'int8' with per-row scales [..., out], 'int4' packed [..., out, in/2] (uint8)
    with group scales [..., out, in/GROUP], GGUF's block types [..., out, in / values * bytes] (uint8,
    the scales inside), or 'full'. The tensors are checked against it, not read as a format: every
    packed format is uint8; and the kernels read as many elements a row as the format says."""
    if format not in STORED:
        raise ValueError(f"mixtral_triton: unknown weight format {format!r}; one of {', '.join(STORED)} expected")
    dtypes, scaled = STORED[format]
    if w.dtype not in dtypes or (scales is not None) != scaled:
        *others, last = [str(d).removeprefix("torch.") for d in dtypes]
        takes = f"{', '.join(others)} or {last}" if others else last
        raise ValueError(f"mixtral_triton: format {format!r} takes {takes} weights {'and' if scaled else 'and no'} "
                         f"scales; got {str(w.dtype).removeprefix('torch.')} weights and "
                         f"{'no ' if scales is None else ''}scales")
    width = row_width(format, inputs)
    if width != w.shape[-1]:
        wanted = "no whole row" if width is None else f"rows of {width}"
        raise ValueError(f"mixtral_triton: {inputs} inputs in format {format!r} take {wanted}; got rows of "
                         f"{w.shape[-1]}")
    if format == "int8":
        return INT8, 1
    if format == "int4":
        return INT4, 2 * w.shape[-1] // scales.shape[-1]
    if format in GGUF:
        return GGUF[format][0], 1
    return FLOAT, 1


def dot_dtype(dtype: torch.dtype):
    """The products' dtype: the activations' (h, held in float32 between the kernels, is rounded to it
    as the reference rounds it)."""
    if INTERPRETED:
        return tl.float32
    return {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}.get(dtype, tl.float32)


def block_cols(quant: int, group: int) -> int:
    """Columns of a tile: 128, so that the smallest int8 tile (16 rows) is 16 bytes for each of 128
    threads, an int4 or K-quant one 8; whole int4 groups (of 32, 64 or 128); 4 whole q8_0 or q4_0 blocks,
    or half a K-quant block of 256, which keeps the decoded tile as small as int4's (a whole block would
    double the registers its floats take)."""
    return max(128, group) if quant == INT4 else 128


def launch_options() -> dict:
    """GPU-only launch settings (the interpreter takes none): 4 warps, and 4 stages of software
    pipelining so that the loads of the next tiles are in flight while one is multiplied."""
    return {} if INTERPRETED else {"num_warps": 4, "num_stages": 4}


def strides(w: Tensor, scales: Optional[Tensor]) -> tuple:
    """(expert stride, row stride) of a weight [E, out, in'] and of its scales; the kernels need each row
    contiguous."""
    if w.stride(-1) != 1:
        raise ValueError(f"the Triton kernels need contiguous rows; got strides {w.stride()}")
    if scales is None:
        return w.stride(0), w.stride(1), 0, 0
    scale_row_stride = scales.stride(1) if scales.dim() == 3 else 1
    return w.stride(0), w.stride(1), scales.stride(0), scale_row_stride


def down(h: Tensor, experts: Tensor, weights: Tensor, w2: Tensor, w2_scales: Optional[Tensor], format: str,
         dtype) -> Tensor:
    """h [N, K, I] through the chosen experts' w2 [E, D, I'] (I' = I, I/2 packed, or I's blocks' bytes) in
    format `format`, weighted: [N, D] in dtype."""
    N, K, I = h.shape
    E, D = w2.shape[:2]
    quant, group = quantization(format, w2, w2_scales, I)
    cols = block_cols(quant, group)
    active, sms = min(N * K, E), multiprocessor_count(h.device)
    rows = block_rows(active, D, sms)
    num_parts = parts(active, D, rows, I, cols, sms)
    part_len = triton.cdiv(triton.cdiv(I, num_parts), cols) * cols
    y = torch.empty(num_parts, N, K, D, dtype=torch.float32, device=h.device)  # every element written once
    scales = w2_scales if w2_scales is not None else w2  # a pointer the kernel never reads (FLOAT)
    down_kernel[(E, triton.cdiv(D, rows), num_parts)](
        h, experts, weights, w2, scales, y, N, K, D, I, part_len, *strides(w2, w2_scales),
        QUANT=quant, GROUP=group, BLOCK_N=max(16, triton.next_power_of_2(N)),
        BLOCK_SLOTS=triton.next_power_of_2(K), BLOCK_ROWS=rows, BLOCK_COLS=cols, DOT_DTYPE=dot_dtype(dtype),
        **launch_options())
    return y.sum(dim=(0, 2)).to(dtype)  # [N, D]


# custom ops: opaque to torch.compile, which keeps the decode step one graph around them (and one CUDA
# graph: they allocate from the graph's pool and never sync with the host).
@torch.library.custom_op("mixtral_triton::moe", mutates_args=())
def moe(x: Tensor, experts: Tensor, weights: Tensor, w1: Tensor, w3: Tensor, w2: Tensor, w1_scales: Optional[Tensor],
        w3_scales: Optional[Tensor], w2_scales: Optional[Tensor], format: str) -> Tensor:
    """Each token's K chosen experts, weighted: x [N, D], experts/weights [N, K] -> [N, D] in x's dtype.
    w1/w3 [E, I, D'], w2 [E, D, I'] in format `format` (see `quantization`), with their scales (None
    for 'full' and GGUF's blocks)."""
    x, experts, weights = x.contiguous(), experts.contiguous(), weights.contiguous()
    N, D = x.shape
    K = experts.shape[1]
    E, I = w1.shape[:2]
    quant, group = quantization(format, w1, w1_scales, D)
    quantization(format, w3, w3_scales, D)
    if w3.stride() != w1.stride() or (w1_scales is not None and w3_scales.stride() != w1_scales.stride()):
        raise ValueError("the Triton kernels read w1 and w3 with the same strides")
    rows = block_rows(min(N * K, E), I, multiprocessor_count(x.device))
    h = torch.empty(N, K, I, dtype=torch.float32, device=x.device)  # every element written once
    s1 = w1_scales if w1_scales is not None else w1
    s3 = w3_scales if w3_scales is not None else w3
    gate_up_kernel[(E, triton.cdiv(I, rows))](
        x, experts, w1, w3, s1, s3, h, N, K, D, I, *strides(w1, w1_scales),
        QUANT=quant, GROUP=group, BLOCK_N=max(16, triton.next_power_of_2(N)),
        BLOCK_SLOTS=triton.next_power_of_2(K), BLOCK_ROWS=rows, BLOCK_COLS=block_cols(quant, group),
        DOT_DTYPE=dot_dtype(x.dtype), **launch_options())
    return down(h, experts, weights, w2, w2_scales, format, x.dtype)


@moe.register_fake
def _(x, experts, weights, w1, w3, w2, w1_scales, w3_scales, w2_scales, format):
    return torch.empty_like(x)


@torch.library.custom_op("mixtral_triton::linear", mutates_args=())
def linear(x: Tensor, weight: Tensor, scales: Optional[Tensor], format: str) -> Tensor:
    """x [N, in] @ weight [out, in'].T in format `format` (see `quantization`) -> [N, out] in x's dtype:
    the down kernel with one expert that every token chose, weight 1."""
    N = x.shape[0]
    h = x.contiguous().view(N, 1, -1)  # [N, 1, in]
    chosen = torch.zeros(N, 1, dtype=torch.int64, device=x.device)
    ones = torch.ones(N, 1, dtype=torch.float32, device=x.device)
    return down(h, chosen, ones, weight[None], None if scales is None else scales[None], format, x.dtype)


@linear.register_fake
def _(x, weight, scales, format):
    return x.new_empty(x.shape[0], weight.shape[0])
