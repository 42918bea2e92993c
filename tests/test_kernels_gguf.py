"""kernels/cpu.cpp's GGUF block formats (q8_0, q4_0, q4_k, q5_k, q6_k), read in place from GGUF's own
bytes, against float64 computed here, for every instruction set this CPU runs: the weights are the gguf
package's dequantization of the same bytes, the activations are rounded to int8 blocks of 32 as the
kernels' description says (written here, not taken from their code), and each tolerance is derived from
float32 arithmetic on the terms the kernel adds (float32_error)."""
import functools

import pytest
import torch
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES
from gguf.quants import quantize

from gguf_blocks import TYPES, exact, random_blocks
from kernels import cpu as cpu_kernels
from rounding import HALF_ULP

U = 2.0 ** -24  # float32's unit roundoff
# Row widths: blocks of 32 that do not fill the kernels' steps of 8 (3 of them, and 9: a step and one
# more), and K-quants' blocks of 256, one and three; output rows not a multiple of the 64 a thread takes.
WIDTHS = {"q8_0": (96, 288), "q4_0": (96, 288), "q4_k": (256, 768), "q5_k": (256, 768), "q6_k": (256, 768)}
ROWS = 131
ISAS = cpu_kernels.supported()


@pytest.fixture(scope="module", autouse=True)
def kernels_built():
    assert cpu_kernels.available(), "the CPU kernels must build here (a C++ compiler and ninja are installed)"


@pytest.fixture(params=ISAS)
def isa(request):
    with cpu_kernels.using(request.param):
        yield request.param


EACH_ISA = pytest.mark.parametrize("isa", ISAS, indirect=True)


def quantized_blocks(fmt: str, shape: tuple, g: torch.Generator) -> torch.Tensor:
    """Gaussian weights quantized by the gguf package (it quantizes q8_0 and q4_0)."""
    w = torch.randn(shape, generator=g) / shape[-1] ** 0.5
    return torch.from_numpy(quantize(w.numpy(), TYPES[fmt]))


def activations(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] as the kernels take it, in float64: int8 in blocks of 32, q = x * (127 / largest |x|)
    in float32 rounded to nearest even, times the block's scale largest / 127 in float32."""
    blocks = x.float().unflatten(-1, (-1, 32))
    largest = blocks.abs().amax(dim=-1, keepdim=True)
    inverse = torch.full_like(largest, 127) / largest
    q = torch.where(largest > 0, blocks * inverse, 0.0).round()
    return (q.double() * (largest / 127).double()).flatten(-2)


def float32_error(terms: torch.Tensor, K: int) -> torch.Tensor:
    """A bound on the error of the kernel's float32 sum of products whose magnitudes add up to `terms`:
    each product of an exact integer (a lane's sum of 8 products of q) and a rounded product of two
    scales (one rounding), added by fused multiply-adds into one of a vector's lanes (fewer than K / 32
    additions each), the lanes then added (at most 4 more), the mins' sum likewise and subtracted (1):
    (K / 32 + 8) roundings of u, relative to the sum of the terms' magnitudes; 1 % for second order."""
    return 1.01 * (K / 32 + 8) * U * terms


def assert_within(got: torch.Tensor, want: torch.Tensor, bound: torch.Tensor, dtype):
    """Each value within its bound plus half a unit of the output dtype."""
    err = (got.double() - want).abs()
    limit = bound + HALF_ULP[dtype] * (want.abs() + bound)
    assert (err <= limit).all(), ((err - limit).max(), (err / limit.clamp_min(1e-300)).max())


@functools.lru_cache(maxsize=1)
def linear_case(fmt: str, source: str, K: int, dtype, tokens: int) -> tuple:
    g = torch.Generator().manual_seed(K + tokens)
    x = torch.randn(tokens, K, generator=g).to(dtype)
    blocks = (random_blocks if source == "random" else quantized_blocks)(fmt, (ROWS, K), g)
    w, parts = exact(fmt, blocks)
    xq = activations(x)
    return x, blocks, xq @ w.T, float32_error(xq.abs() @ parts.T, K)


@EACH_ISA
@pytest.mark.parametrize("fmt, source", [(f, "random") for f in TYPES] + [("q8_0", "quantized"), ("q4_0", "quantized")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [1, 3, 8])
def test_linear_matches_float64(isa, fmt, source, dtype, tokens):
    """One, three and eight tokens (the kernels take 4 a pass over a row), rows of one or several steps
    of 256 values, whole or not, random blocks and gguf-quantized ones."""
    for K in WIDTHS[fmt]:
        x, blocks, want, bound = linear_case(fmt, source, K, dtype, tokens)
        got = cpu_kernels.ops().linear(x, blocks, None, fmt)
        assert got.dtype == dtype and got.shape == (tokens, ROWS)
        assert_within(got, want, bound, dtype)


def rounding_of_h(h: torch.Tensor, dh: torch.Tensor) -> tuple:
    """The kernel quantizes its h, which differs from the float64 h by up to dh: its int8 blocks of 32
    values then differ from those of h by (a) each block's scale, whose largest value moves by up to the
    block's largest dh: q * (that / 127) where q stays the same, and (b) a whole step (plus dh) where q
    rounds the other way, which it can only where h / step lies within (dh + |h| * the scale's change)
    / step of a half-integer. Returns h's activations and the bound on the difference of each."""
    blocks, dblocks = h.unflatten(-1, (-1, 32)), dh.unflatten(-1, (-1, 32))
    largest = blocks.abs().amax(dim=-1, keepdim=True)
    step = (largest / 127).float().double()
    moved = dblocks.amax(dim=-1, keepdim=True)
    scaled = blocks / step
    reach = (dblocks + blocks.abs() * moved / largest) / step + 1e-5  # 1e-5: float32's rounding of h * (127 / largest)
    near_tie = (scaled - scaled.floor() - 0.5).abs() <= reach
    q = scaled.round()
    same = q.abs() * (moved / 127 + 2 * U * step)
    flipped = dblocks + 1.01 * step + same
    return activations(h.float()), torch.where(near_tie, flipped, same).flatten(-2)


def experts_float64(fmt, x, experts, weights, w1, w3, w2) -> tuple:
    """y [T, D] in float64 (each token's experts one at a time) and a bound on the kernel's difference from
    it: its float32 w1 x and w3 x (float32_error), h = silu(w1 x) * (w3 x) in float32 from them (silu's
    slope is at most 1.1; its exp, division and the product round a few times), h's int8 blocks
    (rounding_of_h), w2's float32 sum, and the routing weights' products and sums."""
    (w1, p1), (w3, p3), (w2, p2) = w1, w3, w2
    D, I = x.shape[1], w1.shape[1]
    y, bound = torch.zeros(x.shape, dtype=torch.float64), torch.zeros(x.shape, dtype=torch.float64)
    for n in range(x.size(0)):
        xn = activations(x[n])
        for e, weight in zip(experts[n].tolist(), weights[n].double()):
            g, u = w1[e] @ xn, w3[e] @ xn
            dg, du = float32_error(p1[e] @ xn.abs(), D), float32_error(p3[e] @ xn.abs(), D)
            h = F.silu(g) * u
            dh = 1.1 * dg * (u.abs() + du) + (F.silu(g).abs() + 1.1 * dg) * du + 8 * U * h.abs()
            hq, dhq = rounding_of_h(h, dh)
            y[n] += weight * (w2[e] @ hq)
            bound[n] += weight.abs() * (w2[e].abs() @ dhq + float32_error(p2[e] @ (hq.abs() + dhq), I) +
                                        3 * U * (p2[e] @ (hq.abs() + dhq)))
    return y, bound


@functools.lru_cache(maxsize=1)
def moe_case(fmt: str, dtype, experts: tuple) -> tuple:
    g = torch.Generator().manual_seed(len(experts))
    D, I = WIDTHS[fmt]
    E = 4
    experts = torch.tensor(experts)
    x = torch.randn(experts.size(0), D, generator=g).to(dtype)
    weights = torch.softmax(torch.randn(experts.shape, generator=g), dim=-1).to(dtype)
    w1, w3 = (random_blocks(fmt, (E, I, D), g) for _ in range(2))
    w2 = random_blocks(fmt, (E, D, I), g)
    inputs = (x, experts, weights, w1, w3, w2)
    return inputs, experts_float64(fmt, x, experts, weights, exact(fmt, w1), exact(fmt, w3), exact(fmt, w2))


@EACH_ISA
@pytest.mark.parametrize("fmt", list(TYPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("experts", [((2, 0),), ((0, 2), (2, 1), (3, 2)), ((0, 2), (2, 1), (3, 2), (2, 0), (1, 2))])
def test_moe_matches_float64(isa, fmt, dtype, experts):
    """One token; three, all of which chose expert 2 (read once for all); five, all with expert 2 (more
    than one pass over its rows)."""
    inputs, (want, bound) = moe_case(fmt, dtype, experts)
    x, experts, weights, w1, w3, w2 = inputs
    got = cpu_kernels.ops().moe(x, experts, weights, w1, w3, w2, None, None, None, fmt)
    assert got.dtype == dtype and got.shape == x.shape
    assert_within(got, want, bound, dtype)


def test_the_bound_is_tight_enough_to_see_a_wrong_scale(isa):
    """What the tests above can see: one sub-block's scale off by one step of its 6 bits moves a q4_k
    product by far more than the bound allows."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 256, generator=g)
    blocks = random_blocks("q4_k", (ROWS, 256), g)
    w, parts = exact("q4_k", blocks)
    xq = activations(x)
    bound = float32_error(xq.abs() @ parts.T, 256)
    wrong = blocks.clone()
    wrong[:, 4] ^= 1  # the lowest bit of sub-block 0's scale
    got = cpu_kernels.ops().linear(x, wrong, None, "q4_k")
    assert ((got.double() - xq @ w.T).abs() > 100 * bound).float().mean() > 0.5


@pytest.mark.parametrize("fmt", list(TYPES))
def test_wrong_shapes_and_dtypes_are_refused(isa, fmt):
    """Rows that are not whole blocks, a row length that does not fit the format's, float weights, or
    scales: each refused in one line that says what the format takes."""
    values, nbytes = GGML_QUANT_SIZES[TYPES[fmt]]
    K = WIDTHS[fmt][0]
    blocks = random_blocks(fmt, (ROWS, K), torch.Generator().manual_seed(0))
    ops = cpu_kernels.ops()
    with pytest.raises(RuntimeError, match=rf"mixtral_cpu.linear: x \[M, K\] and {fmt} weight \[N, K/{values}\*{nbytes}\] expected"):
        ops.linear(torch.randn(1, K + 1), blocks, None, fmt)
    with pytest.raises(RuntimeError, match=rf"{fmt} weight \[N, K/{values}\*{nbytes}\] expected"):
        ops.linear(torch.randn(1, K), blocks[:, :-1].contiguous(), None, fmt)
    with pytest.raises(RuntimeError, match=rf"format '{fmt}' takes uint8 GGUF blocks \({nbytes} bytes per {values} values\) "
                                           "and no scales; got uint8 weights and scales"):
        ops.linear(torch.randn(1, K), blocks, torch.ones(ROWS), fmt)
    with pytest.raises(RuntimeError, match=f"format '{fmt}' takes uint8 GGUF blocks"):
        ops.linear(torch.randn(1, K), torch.randn(ROWS, K), None, fmt)
    with pytest.raises(RuntimeError, match=rf"mixtral_cpu.moe: x \[T, D\], {fmt} w1, w3 \[E, I, D'\] and w2 \[E, D, I'\] expected"):
        w13 = random_blocks(fmt, (2, K, K), torch.Generator().manual_seed(0))
        ops.moe(torch.randn(1, K), torch.tensor([[0, 1]]), torch.ones(1, 2), w13, w13, w13[:, :-1].contiguous(), None, None,
                None, fmt)
