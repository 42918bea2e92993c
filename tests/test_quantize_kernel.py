"""kernels/cpu_quantize.cpp's quantize_blocks against its reference, quants.py's PyTorch quantizers: the same
bytes but where a value lands within float32 rounding of a decision's boundary, errors no larger beyond those
few blocks, q8_0 and q4_0 byte for byte the gguf package's, and the same bytes from every instruction set's
build. Every block is read back by the gguf package, independently of quants.dequantize."""
import pytest
import torch
from gguf import quants as gguf_quants

from conftest import one_torch_thread
from gguf_blocks import TYPES as GGUF_TYPES, outlier_rows

import dispatch
import quants
from errors import UserError
from formats import Blocks
from kernels import cpu as cpu_kernels

NAMES = list(GGUF_TYPES)


def gguf_dequantize(name, blocks):
    return torch.from_numpy(gguf_quants.dequantize(blocks.numpy(), GGUF_TYPES[name]))


@pytest.fixture(scope="module", autouse=True)
def kernels_built():
    assert cpu_kernels.available(), "the CPU kernels must build here (a C++ compiler and ninja are installed)"
    with one_torch_thread():  # the reference's many small ops stall on a second, descheduled thread
        yield


def kernel(isa=None):
    return cpu_kernels.ops(isa).quantize_blocks


def per_block(name, blocks):
    """blocks [rows, bytes] -> [rows, B, bytes per block]."""
    return blocks.view(blocks.shape[0], -1, quants.BLOCKS[name][1])


def block_errors(name, blocks, w, weigh):
    """sum weigh * (w - w_quantized)^2 of each block [rows, B], in float64, read back by the gguf package."""
    err = (gguf_dequantize(name, blocks).double() - w.double()) ** 2 * weigh.double()
    return err.view(w.shape[0], -1, quants.BLOCKS[name][0]).sum(-1)


@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "importance"])
@pytest.mark.parametrize("name", NAMES)
def test_the_kernel_writes_the_references_blocks_but_at_rounding_boundaries(name, weighted):
    """Both compute every value in float32 with the same operations, but add up each sum in their own order
    (PyTorch's depends on the CPU), so a sum may differ in its last bits (about 1e-6 relative after the
    searches' few passes). A block then differs only where such a value lies within that of a rounding
    boundary: mostly where the least-squares d or dmin lies within 1e-6 of the midpoint between two fp16
    values (fp16 steps are 2^-11 to 2^-10 relative: about 2 * 1e-6 / 2^-11, 0.4 %, of d's; q4_k and q5_k
    round two per block, with an importance that skews their sums: up to about 1 % of blocks), rarely
    where a 6-bit scale or a code sits at a half. Asserted: at least 98 % of blocks identical.
    Identical blocks err the same. A differing block is the reference's search with one decision at such a
    boundary taken the other way, its d one fp16 step apart or a 6-bit scale one apart: it may err more or
    less, not more by design. Asserted: the kernel's total error exceeds the reference's by at most what
    the differing blocks would add if each erred twice as much as the reference's."""
    w, importance = outlier_rows(8, rows=64, n=4096)
    importance[:3] = 0  # inputs that count for nothing
    given = importance if weighted else None
    ref = quants.quantize(name, w, given)
    got = quants.quantize(name, w, given, kernel())
    assert got.shape == ref.shape and got.dtype == torch.uint8
    differ = (per_block(name, got) != per_block(name, ref)).any(-1)  # [rows, B]
    assert differ.float().mean() <= 0.02
    weigh = importance if weighted else torch.ones(w.shape[-1])
    err_got, err_ref = block_errors(name, got, w, weigh), block_errors(name, ref, w, weigh)
    assert torch.equal(err_got[~differ], err_ref[~differ])
    assert err_got.sum() <= err_ref.sum() + err_ref[differ].sum()


@pytest.mark.parametrize("name", ["q8_0", "q4_0"])
def test_round_to_nearest_types_are_gguf_byte_for_byte(name):
    """Without an importance, q8_0 and q4_0 round to nearest as llama.cpp's reference quantizers do: no sum,
    no search, so every byte is the gguf package's (test_quants' rows: magnitudes from 1e-4 to 1e3, an
    all-zero block, the extreme at both signs, halves of the step, values of bf16)."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(8, 4096, generator=g) * torch.logspace(-4, 3, 8)[:, None]
    w[0, :32] = 0
    w[1, :32] = torch.arange(32) - 16.0
    w[1, 32:64] = (torch.arange(32) - 16) * 0.5
    w[2] = w[2].bfloat16().float()
    want = gguf_quants.quantize(w.numpy(), GGUF_TYPES[name])
    assert torch.equal(quants.quantize(name, w, None, kernel()), torch.from_numpy(want))


@pytest.mark.parametrize("name", NAMES)
def test_rows_whose_sums_are_exact_give_the_references_bytes(name):
    """Where every sum is exact in float32, in any order, no value can differ and every byte must be the
    reference's: all-zero rows, rows with a single nonzero value (each weighted sum has one nonzero term),
    importances of small integers (their sums are exact) with zeros among them, and blocks whose every
    input has importance 0 (every weighted sum is 0: the searches fall back to the grid that spans the
    values)."""
    qk = quants.BLOCKS[name][0]
    g = torch.Generator().manual_seed(9)
    w = torch.zeros(6, 4 * qk)
    w[1, 5] = 3.0
    w[2, qk + 17] = -0.02
    w[3, 2 * qk - 1] = 1e-3
    w[4, 0], w[4, 3 * qk] = 7.0, -7.0
    importance = torch.randint(0, 9, (4 * qk,), generator=g).float()
    for given in (None, importance):
        assert torch.equal(quants.quantize(name, w, given, kernel()), quants.quantize(name, w, given))
    assert (gguf_dequantize(name, quants.quantize(name, w[:1], importance, kernel())) == 0).all()
    x = torch.randn(4, 4 * qk, generator=g)
    importance = torch.rand(4 * qk, generator=g)
    importance[qk:2 * qk] = 0  # block 1 of each row: inputs that count for nothing
    got, ref = (per_block(name, quants.quantize(name, x, importance, k)) for k in (kernel(), None))
    assert torch.equal(got[:, 1], ref[:, 1])


@pytest.mark.parametrize("name", NAMES)
def test_every_instruction_sets_build_writes_the_same_bytes(name):
    """The lanes of each search hold separate groups and every operation is IEEE float32, rounded apart (no
    fused multiply-add): the vector width each set compiles to cannot change a bit."""
    w, importance = outlier_rows(10, rows=8, n=1024)
    for given in (None, importance):
        want = quants.quantize(name, w, given, kernel())
        for isa in cpu_kernels.supported():
            with cpu_kernels.using(isa):
                assert torch.equal(quants.quantize(name, w, given, kernel(isa)), want), isa


def test_blocks_quantize_through_the_kernel_where_it_is_loaded():
    w, importance = outlier_rows(11, rows=4, n=512)
    assert dispatch.quantize_path(w) == "cpu kernel"
    stored = Blocks("q4_k").quantize(w, importance)[""]
    assert torch.equal(stored.flatten(-2), quants.quantize("q4_k", w, importance, kernel()))
    with cpu_kernels.turned_off():
        assert dispatch.quantize_path(w) == "pytorch"
        assert torch.equal(Blocks("q4_k").quantize(w, importance)[""].flatten(-2), quants.quantize("q4_k", w, importance))
    assert dispatch.quantize_path(w.to("meta")) == "pytorch"


@pytest.mark.parametrize("name", NAMES)
def test_scales_too_large_for_fp16_are_one_clear_error(name):
    with pytest.raises(UserError, match="fp16 scales would overflow"):
        quants.quantize(name, torch.randn(2, 256) * 1e30, None, kernel())
