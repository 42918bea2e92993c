"""quants.py, GGUF's block types: read back bit for bit as the gguf package (and a float64 decoder written
here from the layout table) reads them, q8_0 and q4_0 written byte for byte as gguf writes them, every
code the nearest to its weight given what the block stores, and the weighted search doing what it is for."""
import struct

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants as gguf_quants

import quants
from errors import UserError
from formats import Int4
from gguf_blocks import outlier_rows
from rounding import exact

GGUF_TYPES = {"q8_0": GGMLQuantizationType.Q8_0, "q4_0": GGMLQuantizationType.Q4_0,
              "q4_k": GGMLQuantizationType.Q4_K, "q5_k": GGMLQuantizationType.Q5_K,
              "q6_k": GGMLQuantizationType.Q6_K}
# Where each type keeps its fp16 fields (d, and dmin for q4_k and q5_k), in bytes of a block.
HALF_FIELDS = {"q8_0": [0], "q4_0": [0], "q4_k": [0, 2], "q5_k": [0, 2], "q6_k": [208]}
NAMES = list(GGUF_TYPES)


def random_blocks(name, rows, blocks, generator):
    """Random bytes with every fp16 field finite: any such block is valid."""
    qk, size = quants.BLOCKS[name]
    b = torch.randint(0, 256, (rows, blocks, size), dtype=torch.uint8, generator=generator)
    for at in HALF_FIELDS[name]:
        bits = torch.randint(0, 1 << 16, (rows, blocks), generator=generator, dtype=torch.int32)
        bits = torch.where(bits & 0x7C00 == 0x7C00, bits & ~0x4000, bits)  # exponent all ones: inf or nan
        b[..., at], b[..., at + 1] = (bits & 255).to(torch.uint8), (bits >> 8).to(torch.uint8)
    return b.flatten(-2)


def gguf_dequantize(name, blocks):
    return torch.from_numpy(gguf_quants.dequantize(blocks.numpy(), GGUF_TYPES[name]))


@pytest.mark.parametrize("name", NAMES)
def test_dequantize_is_gguf_bit_for_bit(name):
    g = torch.Generator().manual_seed(1)
    blocks = random_blocks(name, 5, 8, g)
    assert torch.equal(quants.dequantize(name, blocks), gguf_dequantize(name, blocks))
    w = torch.randn(6, 1024, generator=g) * torch.logspace(-3, 2, 6)[:, None]
    for importance in (None, torch.rand(1024, generator=g)):
        blocks = quants.quantize(name, w, importance)
        assert blocks.shape == (6, 1024 // quants.BLOCKS[name][0] * quants.BLOCKS[name][1])
        assert torch.equal(quants.dequantize(name, blocks), gguf_dequantize(name, blocks))
    assert quants.dequantize(name, blocks, torch.bfloat16).dtype == torch.bfloat16


def block_codes(name, block: bytes) -> list:
    """(step, code, offset) of each value of one block, w = step * code - offset, in float64, byte by
    byte from the layout table at the top of quants.py."""
    def f16(at):
        return struct.unpack_from("<e", block, at)[0]

    if name == "q8_0":
        return [(f16(0), q, 0.0) for q in struct.unpack_from("32b", block, 2)]
    if name == "q4_0":
        qs = block[2:18]
        return [(f16(0), (qs[j] & 15) - 8, 0.0) for j in range(16)] + [(f16(0), (qs[j] >> 4) - 8, 0.0) for j in range(16)]
    if name in ("q4_k", "q5_k"):
        d, dmin, scales = f16(0), f16(2), block[4:16]
        qh, qs = (block[16:48], block[48:176]) if name == "q5_k" else (None, block[16:144])
        out = []
        for i in range(256):
            sub, chunk, l = i // 32, i // 64, i % 32
            if sub < 4:
                sc, m = scales[sub] & 63, scales[sub + 4] & 63
            else:
                sc = (scales[sub + 4] & 15) | ((scales[sub - 4] >> 6) << 4)
                m = (scales[sub + 4] >> 4) | ((scales[sub] >> 6) << 4)
            byte = qs[32 * chunk + l]
            q = byte & 15 if i % 64 < 32 else byte >> 4
            if qh is not None:
                q += 16 * ((qh[l] >> sub) & 1)
            out.append((d * sc, q, dmin * m))
        return out
    assert name == "q6_k"
    ql, qh, scales, d = block[0:128], block[128:192], struct.unpack_from("16b", block, 192), f16(208)
    out = []
    for i in range(256):
        half, k, l = i // 128, (i % 128) // 32, i % 32
        low = ql[64 * half + 32 * (k % 2) + l]
        low = low & 15 if k < 2 else low >> 4
        q = low | (((qh[32 * half + l] >> (2 * k)) & 3) << 4)
        out.append((d * scales[i // 16], q - 32, 0.0))
    return out


def decoded(name, blocks, fn=lambda step, code, offset: step * code - offset):
    """fn of each value's (step, code, offset), float64 [rows, n], from blocks [rows, bytes]."""
    size = quants.BLOCKS[name][1]
    return torch.tensor([[fn(*v) for at in range(0, row.numel(), size)
                          for v in block_codes(name, bytes(row[at:at + size].tolist()))] for row in blocks],
                        dtype=torch.float64)


@pytest.mark.parametrize("name", NAMES)
def test_a_float64_decoder_written_from_the_layout_agrees(name):
    """Every product of a block's decoding is exact in float32 (an fp16 d of 11 bits, a scale of at most 7,
    a code of at most 6: 24 bits at most), and the subtraction of the min rounds once: so the float32
    result is the float64 value rounded to float32, exactly."""
    g = torch.Generator().manual_seed(2)
    qk = quants.BLOCKS[name][0]
    blocks = torch.cat((random_blocks(name, 3, 2, g), quants.quantize(name, torch.randn(3, 2 * qk, generator=g))))
    assert torch.equal(quants.dequantize(name, blocks), decoded(name, blocks).float())


@pytest.mark.parametrize("name", ["q8_0", "q4_0"])
def test_round_to_nearest_types_are_gguf_byte_for_byte(name):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(8, 4096, generator=g) * torch.logspace(-4, 3, 8)[:, None]
    w[0, :32] = 0  # an all-zero block
    w[1, :32] = torch.arange(32) - 16.0  # the extreme at both signs: -16 comes first
    w[1, 32:64] = (torch.arange(32) - 16) * 0.5  # halves of the steps: rounding ties
    w[2] = w[2].bfloat16().float()
    for x in (w, w.bfloat16()):
        want = gguf_quants.quantize(x.float().numpy(), GGUF_TYPES[name])
        assert torch.equal(quants.quantize(name, x), torch.from_numpy(want))


RANGES = {"q8_0": (-127, 127), "q4_0": (-8, 7), "q4_k": (0, 15), "q5_k": (0, 31), "q6_k": (-32, 31)}


@pytest.mark.parametrize("name, weighted", [(name, True) for name in NAMES] +
                         [(name, False) for name in ("q4_k", "q5_k", "q6_k")])
def test_every_code_is_the_nearest_in_range_given_what_is_stored(name, weighted):
    """After the search, each code is rounded again with the block's stored (fp16, 6-bit or int8) scales
    and mins, as llama.cpp does: so, read back from the bytes, it is the nearest code in the type's
    range to its weight (q8_0 within -127..127, as llama.cpp's kernels need). A code out of range, or
    spilled into its neighbour's bits, would fail. q8_0 and q4_0 without an importance round with the
    unrounded d, as gguf does: their bytes are gguf's (test_round_to_nearest_types_are_gguf_byte_for_byte)."""
    w, importance = outlier_rows(4, rows=4, n=1024)
    w[0, :256] = 0
    blocks = quants.quantize(name, w, importance if weighted else None)
    step, code, offset = (decoded(name, blocks, lambda *v, i=i: v[i]) for i in range(3))
    lo, hi = RANGES[name]
    nearest = ((w.double() + offset) / torch.where(step != 0, step, 1)).clamp(lo, hi)
    # The quantizer divides in float32: within a hair of a half, it may round either way.
    tie = (nearest - nearest.floor() - 0.5).abs() < 1e-4
    assert code.min() >= lo and code.max() <= hi
    assert ((step == 0) | ((code - nearest).abs() <= 0.5) | tie).all()
    assert (step != 0).float().mean() > 0.9  # few codes without a step: the zero block's, and few others


def test_the_6_bit_scales_pack_as_gguf_reads_them():
    g = torch.Generator().manual_seed(5)
    sc, m = (torch.randint(0, 64, (100, 8), dtype=torch.uint8, generator=g) for _ in range(2))
    packed = quants.pack_scales(sc, m)
    assert packed.shape == (100, 12)
    got_sc, got_m = quants.unpack_scales(packed)
    assert torch.equal(got_sc, sc) and torch.equal(got_m, m)
    gguf_sc, gguf_m = gguf_quants.Q4_K.get_scale_min(packed.numpy())
    assert np.array_equal(gguf_sc, sc.numpy()) and np.array_equal(gguf_m, m.numpy())


@pytest.mark.parametrize("name", NAMES)
def test_all_zero_rows_read_back_as_exact_zeros(name):
    w = torch.zeros(3, 512)
    for importance in (None, torch.rand(512)):
        assert (quants.dequantize(name, quants.quantize(name, w, importance)) == 0).all()


@pytest.mark.parametrize("name", NAMES)
def test_bad_input_is_one_clear_error(name):
    qk, size = quants.BLOCKS[name]
    with pytest.raises(UserError, match=f"not a whole number of {name} blocks of {qk}"):
        quants.quantize(name, torch.randn(2, qk + 16))
    with pytest.raises(UserError, match="one value per input"):
        quants.quantize(name, torch.randn(2, 2 * qk), torch.rand(qk))
    with pytest.raises(UserError, match="negative"):
        quants.quantize(name, torch.randn(2, qk), -torch.rand(qk))
    with pytest.raises(UserError, match="inf or nan"):
        quants.quantize(name, torch.full((2, qk), float("nan")))
    with pytest.raises(UserError, match="fp16 scales would overflow"):
        quants.quantize(name, torch.randn(2, qk) * 1e30)
    with pytest.raises(UserError, match=f"multiple of {size} bytes"):
        quants.dequantize(name, torch.zeros(2, size + 1, dtype=torch.uint8))
    with pytest.raises(UserError, match="multiple of"):
        quants.dequantize(name, torch.zeros(2, size, dtype=torch.int8))
    with pytest.raises(UserError, match="unknown block type 'q3_k'"):
        quants.quantize("q3_k", torch.randn(2, 256))


def test_stacked_experts_take_one_importance_each():
    g = torch.Generator().manual_seed(6)
    w, importance = torch.randn(3, 4, 256, generator=g), torch.rand(3, 1, 256, generator=g)
    stacked = quants.quantize("q4_k", w, importance)
    assert torch.equal(stacked, torch.stack([quants.quantize("q4_k", w[e], importance[e, 0]) for e in range(3)]))
    assert torch.equal(quants.dequantize("q4_k", stacked), quants.dequantize("q4_k", stacked.flatten(0, 1)).view(3, 4, 256))


def errors(name, w, importance, weigh):
    """sum (w - w_quantized)^2, each input weighed by weigh."""
    err = (quants.dequantize(name, quants.quantize(name, w, importance)).double() - w.double()) ** 2
    return (err * weigh.double()).sum().item()


@pytest.mark.parametrize("seed", [0, 1])
def test_the_weighted_search_errs_less_where_it_counts(seed):
    """With a few outlier channels that weigh 100 times more, the importance-weighted error of q4_k
    quantized with the importance is about a third of q4_k's without (asserted: below 0.6), and of
    q4_0's (same 4.5 bits a weight). Unweighted, the formats' sizes order their errors: q4_k (4.5 bits)
    below q4_0 (4.5 bits, one symmetric grid per 32 that spans twice the extreme: 0.55 here, asserted
    0.8); q5_k (5.5 bits) below half of q4_k (one bit more quarters the squared error); q6_k (6.5625)
    below an eighth of q4_k (a sixteenth for 2 bits), q8_0 (8.5) below a quarter of q6_k."""
    w, importance = outlier_rows(seed)
    ones = torch.ones(w.shape[-1])
    weighted = {name: errors(name, w, None, importance) for name in ("q4_k", "q4_0")}  # quantized without it
    assert errors("q4_k", w, importance, importance) < 0.6 * min(weighted.values())
    assert errors("q4_0", w, importance, importance) < weighted["q4_0"]
    plain = {name: errors(name, w, None, ones) for name in NAMES}
    assert plain["q4_k"] < 0.8 * plain["q4_0"]
    assert plain["q5_k"] < plain["q4_k"] / 2
    assert plain["q6_k"] < plain["q4_k"] / 8
    assert plain["q8_0"] < plain["q6_k"] / 4
    # q6_k's search too: by the importance, it errs less with it than without.
    assert errors("q6_k", w, importance, importance) < errors("q6_k", w, None, importance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_with_importance_errs_less_by_its_measure(dtype):
    """Int4's search tries the grid of rounding to nearest (the extreme at -8) among others and keeps the
    best by sum importance * error^2: with float32 scales, no group errs more than rounding to nearest
    (but for float32 sums of 32 terms: 1e-5 relative); with bfloat16 scales, which round the searched
    scale, the whole matrix still errs much less. Without an importance, Int4 is unchanged (its own tests)."""
    w, importance = outlier_rows(7, rows=32, n=1024)
    w = w.to(dtype)
    plain, searched = Int4(32).quantize(w), Int4(32).quantize(w, importance)
    assert searched[""].shape == plain[""].shape and searched["scales"].dtype == dtype
    err = {k: ((exact("int4", t) - w.double()) ** 2 * importance.double()).unflatten(-1, (-1, 32)).sum(-1)
           for k, t in (("plain", plain), ("searched", searched))}
    if dtype == torch.float32:
        assert (err["searched"] <= err["plain"] * (1 + 1e-5) + 1e-12).all()
    assert err["searched"].sum() < 0.8 * err["plain"].sum()
    with pytest.raises(UserError, match="one value per input"):
        Int4(32).quantize(w, importance[:32])
