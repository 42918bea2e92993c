"""kernels/triton_moe.py, the CUDA kernels of each weight format, on this CPU machine: under Triton's
interpreter against independent float64 computations (every format, shapes that are not multiples of the
kernels' tiles, one and several tokens, with and without splitting the reduction); inside a compiled
graph; chosen by MIXTRAL_TRITON on CUDA tensors (fake ones: no GPU here); never imported on CPU; and
compiled for the H200 (sm_90) by Triton's own compiler, which checks what the interpreter lets pass."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import dispatch
import layers
from conftest import REPO
from gguf_blocks import block_size, random_blocks
from gguf_blocks import exact as gguf_exact
from formats import parse_format
from layers import EXPERTS_PATHS, LINEAR_PATHS
# The same bound as the CPU kernels': half a unit of the output dtype, plus float32 sums (interpreted,
# the kernels compute in float32 throughout, over at most a few hundred terms).
from rounding import HALF_ULP, assert_within_rounding, exact

# Not multiples of the tiles (16 to 64 rows, 128 columns): I spans two column tiles, so that the down
# kernel's reduction can be split in two; E = 4 experts, K = 2 of them per token.
D, I, E = 40, 200, 4
# int4 stores whole groups along each row: widths that are multiples of the group (160: a tile of 128
# and a tail), rows that are not multiples of 16.
INT4_D, INT4_I, INT4_ROWS = 160, 96, 40


@pytest.fixture(scope="module", autouse=True)
def triton_moe():
    """kernels/triton_moe.py under Triton's interpreter, with TRITON_INTERPRET=1 for this module's tests
    only. Triton reads it when @triton.jit decorates a function: the kernels' when kernels/triton_moe.py
    is imported (the file reads it too, for its launch settings), here; those of triton's own library
    that the kernels call, when triton was first imported (conftest.py sees to it); and as the
    interpreter runs a kernel (modules it imports then, such as triton's gluon, read it). The kernels
    stay the interpreter's for the rest of the process: no other test imports the file (layers.py
    imports it only for CUDA tensors, when MIXTRAL_TRITON asks)."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    assert isinstance(tl.max, InterpretedFunction), "triton was imported before TRITON_INTERPRET=1 was set"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "1")
        from kernels import triton_moe
        assert triton_moe.INTERPRETED, "kernels/triton_moe.py was imported before TRITON_INTERPRET=1 was set"
        yield triton_moe


def stored(fmt: str, w: torch.Tensor, dtype) -> dict:
    """w [..., out, in] in format fmt (int4: groups of 32), in dtype."""
    return parse_format(fmt).quantize(w.to(dtype))


def experts_float64(x, experts, weights, w1, w3, w2):
    """Each token's chosen experts, one at a time, in float64."""
    y = torch.zeros(x.shape, dtype=torch.float64)
    for n in range(x.size(0)):
        for e, weight in zip(experts[n].tolist(), weights[n].double()):
            xn = x[n].double()
            y[n] += weight * (w2[e] @ (F.silu(w1[e] @ xn) * (w3[e] @ xn)))
    return y


@pytest.mark.parametrize("fmt", ["full", "int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("experts", [[[2, 0]], [[0, 2], [2, 1], [3, 2]], [[3], [1]]])
def test_experts_match_float64(fmt, dtype, experts):
    """One token (the down kernel then splits its reduction: too few programs otherwise); three tokens of
    which two share expert 2 (read once for both) and one alone chose expert 3; top-1 routing."""
    g = torch.Generator().manual_seed(len(experts))
    d, i = (INT4_D, INT4_I) if fmt == "int4" else (D, I)
    experts = torch.tensor(experts)
    x = torch.randn(experts.size(0), d, generator=g).to(dtype)
    weights = torch.rand(experts.shape, generator=g).to(dtype)  # any weights: the kernels only multiply by them
    w1, w3 = (stored(fmt, torch.randn(E, i, d, generator=g) / d ** 0.5, dtype) for _ in range(2))
    w2 = stored(fmt, torch.randn(E, d, i, generator=g) / i ** 0.5, dtype)
    got = EXPERTS_PATHS["triton"](parse_format(fmt), x, experts, weights, w1, w3, w2)
    assert got.dtype == dtype and got.shape == x.shape
    assert_within_rounding(got, experts_float64(x, experts, weights, exact(fmt, w1), exact(fmt, w3), exact(fmt, w2)),
                           dtype)


@pytest.mark.parametrize("op", ["linear", "moe"])
def test_a_format_that_does_not_match_the_weights_is_refused(op):
    """The ops are told the format by name and check the tensors against it (the dtypes alone would read
    any uint8 format as int4): weights of another format, a name no one knows, or rows of another width
    (GGUF's blocks of 32 or 256 values: 160 inputs are 5 q8_0 blocks, and no whole q4_k block) are
    refused with what the format takes."""
    x = torch.randn(1, INT4_D)
    int8, int4, floats = (parse_format(f).quantize(torch.randn(E, INT4_D, INT4_D)) for f in ("int8", "int4", "full"))
    wrong = [("int4", int8, "format 'int4' takes uint8 weights and scales; got int8 weights and scales"),
             ("full", {"": int4[""]}, "format 'full' takes float32, bfloat16 or float16 weights and no scales; got uint8"),
             ("int8", floats, "format 'int8' takes int8 weights and scales; got float32 weights and no scales"),
             ("int3", int4, "unknown weight format 'int3'; one of full, int8, int4, q8_0, q4_0, q4_k, q5_k, q6_k "
                            "expected"),
             ("q4_k", int4, "format 'q4_k' takes uint8 weights and no scales; got uint8 weights and scales"),
             ("q8_0", {"": int4[""]}, "160 inputs in format 'q8_0' take rows of 170; got rows of 80"),
             ("q4_k", {"": int4[""]}, "160 inputs in format 'q4_k' take no whole row; got rows of 80")]
    for name, t, message in wrong:
        with pytest.raises(ValueError, match=f"^mixtral_triton: {message}"):
            if op == "linear":
                torch.ops.mixtral_triton.linear(x, t[""][0], None if "scales" not in t else t["scales"][0], name)
            else:
                torch.ops.mixtral_triton.moe(x, torch.tensor([[0, 1]]), torch.ones(1, 2), t[""], t[""], t[""],
                                             t.get("scales"), t.get("scales"), t.get("scales"), name)


def test_the_split_reduction_is_taken_where_the_grid_is_small(triton_moe):
    """What the test above relies on: one token's down kernel splits I in two, three tokens' does not."""
    rows = triton_moe.block_rows(2, D, 4)
    assert triton_moe.parts(2, D, rows, I, 128, 4) == 2
    assert triton_moe.parts(4, D, triton_moe.block_rows(4, D, 4), I, 128, 4) == 1
    # Mixtral 8x7B on an H200 (132 SMs), one token: tiles of 32 of the 14336 rows of w1 and w3, 16 of
    # the 4096 of w2, which are enough programs unsplit.
    assert triton_moe.block_rows(2, 14336, 132) == 32 and triton_moe.block_rows(2, 4096, 132) == 16
    assert triton_moe.parts(2, 4096, 16, 14336, 128, 132) == 1


@pytest.mark.parametrize("fmt", ["full", "int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 3])
def test_linear_matches_float64(fmt, dtype, tokens):
    g = torch.Generator().manual_seed(tokens)
    width = INT4_D if fmt == "int4" else D
    x = torch.randn(tokens, width, generator=g).to(dtype)
    t = stored(fmt, torch.randn(INT4_ROWS, width, generator=g) / width ** 0.5, dtype)
    got = LINEAR_PATHS["triton"](parse_format(fmt), x, t)
    assert got.dtype == dtype and got.shape == (tokens, INT4_ROWS)
    assert_within_rounding(got, x.double() @ exact(fmt, t).T, dtype)


# GGUF's block types, read in place (tiles of 4 blocks of 32, or half a K-quant block of 256). Linear rows
# of 9 blocks of 32 (two tiles and one block) or 2 blocks of 256; MoE widths (D, I) of whole blocks.
GGUF_K = {"q8_0": 288, "q4_0": 288, "q4_k": 512, "q5_k": 512, "q6_k": 512}
GGUF_MOE = {"q8_0": (96, 224), "q4_0": (96, 224), "q4_k": (256, 256), "q5_k": (256, 256), "q6_k": (256, 256)}
U = 2.0 ** -24  # float32's unit roundoff


def gamma(n: int) -> float:
    """The relative bound on a float32 sum of n rounded terms, in any order: n u / (1 - n u)."""
    return n * U / (1 - n * U)


def gguf_linear_case(fmt: str, rows: int, tokens: int, dtype) -> tuple:
    """x [tokens, K], the blocks of a weight [rows, K], the float64 product and the bound on the kernel's
    difference from it: its weights are exact in float32 but for a K-quant's d sc q - dmin m (one
    rounding), and its float32 sum, across tiles and the parts of a split reduction (at most 4: 3 more
    additions), adds K products: gamma(K + 5) of the products' magnitudes."""
    g = torch.Generator().manual_seed(rows + tokens)
    K = GGUF_K[fmt]
    x = torch.randn(tokens, K, generator=g).to(dtype)
    blocks = random_blocks(fmt, (rows, K), g)
    w = gguf_exact(fmt, blocks)[0]
    return x, blocks, x.double() @ w.T, gamma(K + 5) * (x.double().abs() @ w.abs().T)


def assert_within(got: torch.Tensor, want: torch.Tensor, bound: torch.Tensor, dtype):
    """Each value within its bound plus half a unit of the output dtype."""
    err = (got.double() - want).abs()
    limit = bound + HALF_ULP[dtype] * (want.abs() + bound)
    assert (err <= limit).all(), ((err - limit).max(), (err / limit).max())


@pytest.mark.parametrize("fmt", list(GGUF_K))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 3])
def test_gguf_linear_matches_float64(fmt, dtype, tokens):
    """Random valid blocks (every code, sub-block scale and min; d and dmin of either sign) against the gguf
    package's dequantization of the same bytes. One token: 12 rows, one program, whose reduction splits
    into a part per tile (a K-quant's second half starts a part); three: 40 rows (masked past them) in
    parts of two tiles."""
    rows = 12 if tokens == 1 else 40
    x, blocks, want, bound = gguf_linear_case(fmt, rows, tokens, dtype)
    got = LINEAR_PATHS["triton"](parse_format(fmt), x, {"": blocks.unflatten(-1, (-1, block_size(fmt)[1]))})
    assert got.dtype == dtype and got.shape == (tokens, rows)
    assert_within(got, want, bound, dtype)


def test_the_gguf_bound_is_tight_enough_to_see_a_wrong_scale():
    """What the test above can see: q4_k's sub-block 5 (in a block's second half, its 6-bit scale split
    over two bytes) read with the lowest bit of its scale flipped moves most of the products past four
    times the bound."""
    x, blocks, want, bound = gguf_linear_case("q4_k", 40, 3, torch.float32)
    wrong = blocks.unflatten(-1, (-1, 144)).clone()
    wrong[..., 4 + 9] ^= 1  # scale byte 9 (after d and dmin): the low 4 bits of sub-block 5's scale
    got = LINEAR_PATHS["triton"](parse_format("q4_k"), x, {"": wrong})
    assert ((got.double() - want).abs() > 4 * bound).float().mean() > 0.5


def gguf_experts_float64(x, experts, weights, w1, w3, w2) -> tuple:
    """y [N, D] in float64 (each token's experts one at a time) and a bound on the kernels' difference from
    it: their float32 w1 x and w3 x (as in gguf_linear_case), h = silu(w1 x) * (w3 x) in float32 from
    them (silu's slope is at most 1.1; its exp, division and the products round a few times), w2's
    float32 sum over h (I products, the weight's rounding, the routing weight's product, and up to 4
    parts and 2 slots added)."""
    D, I = x.shape[1], w1.shape[1]
    y, bound = torch.zeros(x.shape, dtype=torch.float64), torch.zeros(x.shape, dtype=torch.float64)
    for n in range(x.size(0)):
        xn = x[n].double()
        for e, weight in zip(experts[n].tolist(), weights[n].double()):
            g, u = w1[e] @ xn, w3[e] @ xn
            dg, du = gamma(D + 5) * (w1[e].abs() @ xn.abs()), gamma(D + 5) * (w3[e].abs() @ xn.abs())
            h = F.silu(g) * u
            silu_reach = F.silu(g).abs() + 1.1 * dg
            dh = 1.1 * dg * (u.abs() + du) + silu_reach * du + 8 * U * silu_reach * (u.abs() + du)
            y[n] += weight * (w2[e] @ h)
            bound[n] += weight.abs() * (w2[e].abs() @ dh + gamma(I + 6) * (w2[e].abs() @ (h.abs() + dh)))
    return y, bound


@pytest.mark.parametrize("fmt", list(GGUF_MOE))
def test_gguf_experts_match_float64(fmt):
    """Three tokens in bf16, all of which chose expert 2 (read once for them all), through both kernels:
    the interpreter's programs are slow, and the GGUF tiles meet one and three tokens, float32 and bf16
    in test_gguf_linear_matches_float64 (the down kernel alone), and the MoE's routing meets every case in
    test_experts_match_float64. The weights as formats.Blocks stores them (uint8 [E, rows, blocks,
    bytes]), through layers' Triton path."""
    g = torch.Generator().manual_seed(0)
    D, I = GGUF_MOE[fmt]
    dtype = torch.bfloat16
    experts = torch.tensor([[0, 2], [2, 1], [3, 2]])
    x = torch.randn(experts.size(0), D, generator=g).to(dtype)
    weights = torch.softmax(torch.randn(experts.shape, generator=g), dim=-1).to(dtype)
    w1, w3 = (random_blocks(fmt, (E, I, D), g) for _ in range(2))
    w2 = random_blocks(fmt, (E, D, I), g)
    stored = [{"": w.unflatten(-1, (-1, block_size(fmt)[1]))} for w in (w1, w3, w2)]
    got = EXPERTS_PATHS["triton"](parse_format(fmt), x, experts, weights, *stored)
    assert got.dtype == dtype and got.shape == x.shape
    want, bound = gguf_experts_float64(x, experts, weights, *(gguf_exact(fmt, w)[0] for w in (w1, w3, w2)))
    assert_within(got, want, bound, dtype)


def test_compiled_graph_keeps_the_kernels_as_one_graph():
    """torch.compile(fullgraph=True) of the ops: one graph holding both, no break, the eager result.
    (aot_eager: inductor's own code generation is not what is checked here.)"""
    from torch._dynamo.testing import CompileCounterWithBackend
    g = torch.Generator().manual_seed(0)
    fmt = parse_format("int8")
    x = torch.randn(2, D, generator=g)
    experts, weights = torch.tensor([[1, 3], [3, 0]]), torch.tensor([[0.75, 0.25], [0.5, 0.5]])
    w1, w3 = (fmt.quantize(torch.randn(E, I, D, generator=g)) for _ in range(2))
    w2, head = fmt.quantize(torch.randn(E, D, I, generator=g)), fmt.quantize(torch.randn(INT4_ROWS, D, generator=g))

    def step(x, experts, weights):
        return LINEAR_PATHS["triton"](fmt, x + EXPERTS_PATHS["triton"](fmt, x, experts, weights, w1, w3, w2), head)

    counter = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend=counter)(x, experts, weights)
    assert counter.frame_count == 1
    calls = [str(n.target) for n in counter.graphs[0].graph.nodes if n.op == "call_function"]
    assert sum("mixtral_triton.moe" in c for c in calls) == 1 and sum("mixtral_triton.linear" in c for c in calls) == 1
    torch.testing.assert_close(compiled, step(x, experts, weights), rtol=0, atol=0)


def traced_ops(fn, *shapes) -> list:
    """The ops fn calls on fake CUDA tensors of these (shape, dtype): what it would run on a GPU."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    with FakeTensorMode():
        tensors = [torch.empty(shape, dtype=dtype, device="cuda") for shape, dtype in shapes]
        graph = make_fx(fn)(*tensors)
    return [str(n.target) for n in graph.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("variable", ["1", "experts", None])
def test_mixtral_triton_chooses_the_kernels_on_cuda(monkeypatch, variable):
    """MIXTRAL_TRITON=1: both ops on CUDA tensors of a decode step; =experts: the MoE only; unset:
    today's path (F.linear). A prompt (more tokens than a tile holds) keeps PyTorch's path."""
    if variable is None:
        monkeypatch.delenv(dispatch.TRITON_VARIABLE, raising=False)
    else:
        monkeypatch.setenv(dispatch.TRITON_VARIABLE, variable)
    fmt, bf16 = parse_format("int8"), torch.bfloat16
    weight = {"": ((D, D), torch.int8), "scales": ((D,), bf16)}

    def linear(x, q, scales):
        return layers.linear(fmt, x, {"": q, "scales": scales})

    def experts(x, ids, weights, w1, s1, w3, s3, w2, s2):
        return layers.run_experts(fmt, x, ids, weights, {"": w1, "scales": s1}, {"": w3, "scales": s3},
                                   {"": w2, "scales": s2})

    linear_ops = traced_ops(linear, ((1, 1, D), bf16), *weight.values())
    assert ("mixtral_triton.linear.default" in linear_ops) == (variable == "1"), linear_ops
    prompt_ops = traced_ops(linear, ((1, dispatch.TRITON_MAX_TOKENS + 1, D), bf16), *weight.values())
    assert not any("mixtral_triton" in op for op in prompt_ops)
    if variable is not None:  # (unset, the reference's decode path cannot be traced on fake CUDA tensors)
        w13 = [((E, I, D), torch.int8), ((E, I), bf16)] * 2
        ops = traced_ops(experts, ((1, D), bf16), ((1, 2), torch.int64), ((1, 2), bf16), *w13,
                         ((E, D, I), torch.int8), ((E, D), bf16))
        assert ops == ["mixtral_triton.moe.default"], ops


def test_gguf_blocks_on_cuda_take_the_kernels(monkeypatch):
    """formats.Blocks names the Triton kernels: with MIXTRAL_TRITON=1, a decode step's GGUF weights on CUDA
    tensors (fake ones) go to both ops, the experts' too when w2 is in their format; w2 in another (a
    Q4_K_M file's q6_k down projections) keeps PyTorch's path, the kernels taking one format."""
    monkeypatch.setenv(dispatch.TRITON_VARIABLE, "1")
    q4_k, q6_k, bf16, u8 = parse_format("q4_k"), parse_format("q6_k"), torch.bfloat16, torch.uint8

    def linear(x, blocks):
        return layers.linear(q4_k, x, {"": blocks})

    def experts(x, ids, weights, w1, w3, w2):
        return layers.run_experts(q4_k, x, ids, weights, {"": w1}, {"": w3}, {"": w2}, q4_k)

    assert "mixtral_triton.linear.default" in traced_ops(linear, ((1, 1, 256), bf16), ((64, 1, 144), u8))
    inputs = [((1, 256), bf16), ((1, 2), torch.int64), ((1, 2), bf16), *[((E, 256, 1, 144), u8)] * 2]
    ops = traced_ops(experts, *inputs, ((E, 256, 1, 144), u8))
    # (the views: kernel_weight's rows of blocks)
    assert [op for op in ops if op != "aten.view.default"] == ["mixtral_triton.moe.default"], ops
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():  # (PyTorch's decode path cannot be traced on fake CUDA tensors: asked, not traced)
        x, ids = torch.empty(1, 256, dtype=bf16, device="cuda"), torch.empty(1, 2, dtype=torch.int64, device="cuda")
        assert dispatch.experts_path(q4_k, x, ids, E, 256, q4_k) == "triton"
        assert dispatch.experts_path(q4_k, x, ids, E, 256, q6_k) == "decode"


def test_the_choice_is_a_constant_to_torch_compile(monkeypatch):
    """triton_kernels_requested is read once at tracing time, not traced: one graph, whatever it says."""
    from torch._dynamo.testing import CompileCounterWithBackend
    monkeypatch.setenv(dispatch.TRITON_VARIABLE, "experts")
    counter = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()

    def step(x):
        return x + dispatch.triton_kernels_requested("experts") + 2 * dispatch.triton_kernels_requested("linear")

    assert torch.equal(torch.compile(step, fullgraph=True, backend=counter)(torch.zeros(2)), torch.ones(2))
    assert counter.frame_count == 1


def test_a_cpu_user_never_imports_triton(tmp_path, checkpoint):
    """With MIXTRAL_TRITON=1 and a triton that cannot be imported, a CPU model prefills and decodes:
    this repo imports triton only for CUDA tensors (had it tried, the ImportError would end the run;
    torch's own probes for triton take its absence in their stride)."""
    (tmp_path / "triton").mkdir()
    (tmp_path / "triton" / "__init__.py").write_text("raise ImportError('no triton on this machine')\n")
    # Without the CPU kernels: PyTorch's CPU path, which passes every check of layers.run_experts.
    env = {**os.environ, "MIXTRAL_TRITON": "1", "MIXTRAL_NO_CPU_KERNELS": "1", "PYTHONPATH": str(tmp_path)}
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run([sys.executable, REPO / "tests" / "cpu_without_triton.py", checkpoint], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]


def test_kernels_compile_for_the_h200():
    """Triton's compiler, for sm_90 (no GPU needed to compile): every kernel and format compiles with the
    launch settings and the tiles chosen for Mixtral 8x7B, its activations reach shared memory by 16-byte
    asynchronous copies, it multiplies on tensor cores, and no weight is made a float by a conversion
    instruction (the bitcast trick: int8, int4's nibbles, GGUF's codes and 6-bit and 8-bit scales; fp16
    d and dmin are bitcast, then widened as floats). The weights' bytes reach shared memory by
    asynchronous copies as wide as their layout and the tile allow: int8 16 bytes, int4 8, q4_k and
    q5_k's nibbles at least 8 (their 144- and 176-byte blocks keep them 16-byte aligned; a 16-row tile of
    64 bytes a row is 8 bytes for each of 128 threads), q5_k's 32 bytes of fifth bits at least 4. q8_0,
    q4_0 and q6_k's blocks (34, 18, 210 bytes) leave their codes 2-byte aligned, below the 4 bytes an
    asynchronous copy takes: they are loaded as they are decoded."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # In a process of its own: this one's kernels are the interpreter's.
    result = subprocess.run([sys.executable, REPO / "tests" / "triton_ptx.py"], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.split("\n")[:-1]
    assert [line.split(" ")[:2] for line in lines] == [[kernel, fmt] for fmt in ("full", "int8", "int4", *GGUF_K)
                                                       for kernel in ("gate_up", "down")], result.stdout
    for line in lines:
        _, fmt, _, copies, _, weight_copies, _, conversions, _, mma = line.split(" ")
        widths = [] if weight_copies == "-" else [int(w) for w in weight_copies.split(",")]
        assert "0x10" in copies.split(",") and int(conversions) == 0 and int(mma) > 0, line
        if fmt in ("full", "int8"):
            assert copies == "0x10", line
        if fmt == "int8":
            assert widths == [16], line
        if fmt in ("int4", "q4_k", "q5_k"):
            assert widths and max(widths) >= 8 and min(widths) >= (4 if fmt == "q5_k" else 8), line
