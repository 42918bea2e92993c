"""kernels/cpu.cpp against independent float64 computations (every weight dtype, shapes that are not
multiples of the kernels' tiles, one and several tokens); inside the compiled decode step (one graph,
no recompiles, the eager tokens); and generation without them."""
import re

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, load_ours, run_script
from formats import FORMATS, Int4, formatted_model
from generate import decode_compile_options
from kernels import cpu as cpu_kernels

# Half a unit in the last place, relative: the rounding of one result to the output dtype.
HALF_ULP = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
# D, I and the row counts are odd, below and above the kernels' tiles (4 rows, 8 columns, 64 rows a task).
D, I, E, VOCAB = 37, 77, 4, 131
# int4 rows hold whole groups. Groups of 32 (a scale per block of the activations) and 96 (groups that
# straddle the kernel's 64-value chunks) on widths that are not multiples of those chunks; 64 and 128
# (the scales of whole chunks) on widths that are not multiples of the kernel's 128-block segments.
INT4_WIDTHS = {"int4": (96, 160), "int4/96": (96, 288), "int4/64": (192, 320), "int4/128": (384, 4224)}
FORMAT_NAMES = ["full precision", "int8", "int4", "int4/96", "int4/64", "int4/128"]


def format_of(name: str):
    """'int4/N': int4 with groups of N; 'int4': groups of 32."""
    return Int4(int(name.split("/")[1])) if "/" in name else FORMATS[name]


def widths(fmt: str) -> tuple:
    """D and I for format fmt."""
    return INT4_WIDTHS.get(fmt, (D, I))


@pytest.fixture(scope="module", autouse=True)
def kernels_built():
    assert cpu_kernels.available(), "the CPU kernels must build here (a C++ compiler and ninja are installed)"


def stored(fmt: str, w: torch.Tensor, dtype) -> dict:
    """w in format fmt, its full precision (and the scales) in dtype."""
    return format_of(fmt).quantize(w.to(dtype))


def exact(fmt: str, t: dict) -> torch.Tensor:
    """The weights the kernel must multiply, in float64, computed here from the stored tensors: int4
    unpacked from two values a byte (low nibble first), less 8, times the scale of its group."""
    if fmt == "int8":
        return t[""].double() * t["scales"].double()[..., None]
    if fmt.startswith("int4"):
        q = torch.stack((t[""] & 15, t[""] >> 4), dim=-1).flatten(-2).double() - 8  # [..., out, in]
        group = q.shape[-1] // t["scales"].shape[-1]
        return q * t["scales"].double().repeat_interleave(group, dim=-1)
    return t[""].double()


def activations(fmt: str, x: torch.Tensor) -> torch.Tensor:
    """x [..., K] in float64 as the quantized kernels take it (written here from the kernels'
    description, not from their code), each block scaled by its largest magnitude and rounded to nearest:
    int8 weights, int16 in blocks of 64 values (largest / 32767); int4 weights, int8 in blocks of 32
    (largest / 127). Full precision takes x as it is."""
    if fmt == "full precision":
        return x.double()
    block, top = (64, 32767) if fmt == "int8" else (32, 127)
    K = x.shape[-1]
    blocks = F.pad(x.float(), (0, -K % block)).unflatten(-1, (-1, block))  # [..., K/block, block]
    largest = blocks.abs().amax(dim=-1, keepdim=True)
    # Rounded as the kernels do it, in float32: x * (top / largest). Where that lands within float32
    # rounding of a tie (values a simple fraction of the largest, common in bf16), a float64 quotient
    # could round the other way: a whole step, visible at int8's 1/127.
    inverse = torch.full_like(largest, top) / largest  # a division (top / tensor would multiply by a reciprocal)
    q = torch.where(largest > 0, blocks * inverse, 0.0).round()
    return (q.double() * (largest.double() / top)).flatten(-2)[..., :K]


def assert_within_rounding(got: torch.Tensor, want: torch.Tensor, dtype, slack=0.0):
    """Each value within half a unit of the output dtype of the float64 value, plus float32 summation
    error (a few units of 2^-24 of the largest value), plus any slack the caller can account for."""
    err = (got.double() - want).abs()
    bound = HALF_ULP[dtype] * want.abs() + 1e-5 * want.abs().max() + slack
    assert (err <= bound).all(), (err - bound).max()


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [1, 3, 8])
def test_linear_matches_float64(fmt, dtype, tokens):
    g = torch.Generator().manual_seed(tokens)
    D, _ = widths(fmt)
    x = torch.randn(tokens, D, generator=g).to(dtype)
    t = stored(fmt, torch.randn(VOCAB, D, generator=g) / D ** 0.5, dtype)
    got = format_of(fmt).cpu_linear(x, t)
    assert got.dtype == dtype and got.shape == (tokens, VOCAB)
    assert_within_rounding(got, activations(fmt, x) @ exact(fmt, t).T, dtype)


def experts_float64(fmt, x, experts, weights, w1, w3, w2):
    """Each token's chosen experts, one at a time, in float64 (the activations as the kernel takes them).
    Also returns the slack due to h = silu(w1 x) * (w3 x), which the kernel computes in float32: where
    its int8 rounding (int4 weights) nears a tie, float32's last bits may round it a step (1/127 of
    its block's largest value) the other way; each such h may move y by that step times its w2 column."""
    y, slack = torch.zeros(x.shape, dtype=torch.float64), torch.zeros(x.shape, dtype=torch.float64)
    for n in range(x.size(0)):
        for e, weight in zip(experts[n].tolist(), weights[n].double()):
            xn = activations(fmt, x[n])
            h = F.silu(w1[e] @ xn) * (w3[e] @ xn)
            y[n] += weight * (w2[e] @ activations(fmt, h.float()))  # the kernel holds h in float32
            if fmt.startswith("int4"):
                blocks = h.unflatten(-1, (-1, 32))
                step = blocks.abs().amax(dim=-1, keepdim=True) / 127
                scaled = blocks / step
                near_tie = ((scaled - scaled.floor() - 0.5).abs() < 1e-3).flatten()
                slack[n] += weight.abs() * (w2[e].abs() @ (near_tie * step.expand_as(blocks).flatten()))
    return y, slack


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("experts", [[[2, 0]], [[0, 2], [2, 1], [3, 2]], [[0, 2], [2, 1], [3, 2], [2, 0], [1, 2]]])
def test_moe_matches_float64(fmt, dtype, experts):
    """One token; three tokens, all of which chose expert 2 (read once for all); five, all with expert 2
    (float rows take 4 tokens a pass, then the fifth)."""
    g = torch.Generator().manual_seed(len(experts))
    D, I = widths(fmt)
    experts = torch.tensor(experts)
    x = torch.randn(experts.size(0), D, generator=g).to(dtype)
    weights = torch.softmax(torch.randn(experts.shape, generator=g), dim=-1).to(dtype)
    w1, w3 = (stored(fmt, torch.randn(E, I, D, generator=g) / D ** 0.5, dtype) for _ in range(2))
    w2 = stored(fmt, torch.randn(E, D, I, generator=g) / I ** 0.5, dtype)
    got = format_of(fmt).cpu_experts(x, experts, weights, w1, w3, w2)
    assert got.dtype == dtype and got.shape == x.shape
    want, slack = experts_float64(fmt, x, experts, weights, exact(fmt, w1), exact(fmt, w3), exact(fmt, w2))
    assert_within_rounding(got, want, dtype, slack)


def test_bad_arguments_are_refused_not_misread():
    x = torch.randn(1, D)
    with pytest.raises(RuntimeError, match="need scales"):
        torch.ops.mixtral_cpu.linear(x, torch.zeros(VOCAB, D, dtype=torch.int8), None)
    with pytest.raises(RuntimeError, match="out of range"):
        t = stored("full precision", torch.randn(E, I, D), torch.float32)
        t2 = stored("full precision", torch.randn(E, D, I), torch.float32)
        FORMATS["full precision"].cpu_experts(x, torch.tensor([[0, E]]), torch.ones(1, 2), t, t, t2)


@pytest.mark.parametrize("fmt", ["full precision", "int8", "int4"])
def test_compiled_decode_calls_the_kernels_in_one_graph(checkpoint, fmt):
    """generate.py's compiled decode step: one graph whose code calls the kernels for every linear layer
    and MoE, the eager step's logits, and no recompilation from one position to the next."""
    from torch._inductor.utils import run_and_get_code
    from formats import quantize_module
    model = load_ours(checkpoint)
    quantize_module(model, model.config, FORMATS[fmt])
    model.setup_caches(max_batch_size=1, max_seq_length=64)
    idx = torch.randint(0, 32000, (1, 8), generator=torch.Generator().manual_seed(3))
    torch._dynamo.reset()
    step = torch.compile(lambda x, pos: model(x, pos), fullgraph=True, options=decode_compile_options("cpu"))
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        eager = [model(idx[:, i:i + 1], torch.tensor([i])) for i in range(4)]  # fills the cache, and the reference
        model.setup_caches(max_batch_size=1, max_seq_length=64)
        for layer in model.layers:
            layer.attention.kv_cache.k_cache.zero_(), layer.attention.kv_cache.v_cache.zero_()
        compiled, (code, *_) = run_and_get_code(step, idx[:, :1], torch.tensor([0]))
        compiled = [compiled] + [step(idx[:, i:i + 1], torch.tensor([i])) for i in range(1, 4)]
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    n_layer = model.config.n_layer
    calls = re.findall(r'aoti_torch_call_dispatcher\("mixtral_cpu::(\w+)"', code)  # the C++ wrapper's op calls
    assert calls.count("moe") == n_layer, code
    assert calls.count("linear") == 3 * n_layer + 1  # wqkv, wo and the router of each layer; the head


def test_generation_without_the_kernels_says_so_in_one_line(checkpoint):
    """MIXTRAL_NO_CPU_KERNELS stands in for a machine without a compiler: the same greedy text, on
    PyTorch's kernels, and one line on stderr saying so."""
    args = ("--checkpoint_path", checkpoint / "model.pth", "--prompt", "Hello, my name is", "--max_new_tokens", "6",
            "--num_samples", "1", "--temperature", "0", "--precision", "float32", "--device", "cpu")
    without = run_script(REPO / "generate.py", *args, env={"MIXTRAL_NO_CPU_KERNELS": "1", "OMP_NUM_THREADS": "1"})
    assert without.returncode == 0, without.stderr
    notes = [line for line in without.stderr.splitlines() if "kernel" in line]
    assert notes == ["note: CPU kernels turned off by MIXTRAL_NO_CPU_KERNELS; using PyTorch's kernels instead "
                     "(slower decoding)"], without.stderr
    with_kernels = run_script(REPO / "generate.py", *args, env={"OMP_NUM_THREADS": "1"})
    assert "kernel" not in with_kernels.stderr
    text = without.stdout.split("\nTime for inference 1:")[0]
    assert text == with_kernels.stdout.split("\nTime for inference 1:")[0] and text.startswith("Hello, my name is")


def test_formatted_model_stores_each_format_in_its_layout():
    """The checkpoint names and dtypes each format stores, written out here rather than taken from
    formats.py: the weight itself, and for int8 the int8 weight and one scale per output row."""
    from model import ModelArgs
    config = ModelArgs(n_layer=1, dim=8, n_head=2, n_local_heads=1, head_dim=4, intermediate_size=12,
                       num_experts=2, vocab_size=16, block_size=16)
    with torch.device("meta"):
        full = formatted_model(config, FORMATS["full precision"], torch.bfloat16).state_dict()
        int8 = formatted_model(config, FORMATS["int8"], torch.bfloat16).state_dict()
        int4 = formatted_model(config, Int4(4), torch.bfloat16).state_dict()
    prefix = "layers.0.block_sparse_moe."
    assert full[prefix + "w2"].dtype == torch.bfloat16 and prefix + "w2_scales" not in full
    assert int8[prefix + "w2"].dtype == torch.int8 and int8[prefix + "w2_scales"].shape == (2, 8)
    assert int8["output.weight"].dtype == torch.int8 and int8["output.scales"].shape == (16,)
    assert set(int8) - set(full) == {prefix + f"w{i}_scales" for i in (1, 2, 3)} | {
        "layers.0.attention.wqkv.scales", "layers.0.attention.wo.scales", "output.scales"}
    # int4, groups of 4 here: two values a byte, one scale per group of a row's inputs.
    assert set(int4) == set(int8)
    assert int4[prefix + "w1"].dtype == torch.uint8 and int4[prefix + "w1"].shape == (2, 12, 4)
    assert int4[prefix + "w2"].shape == (2, 8, 6) and int4[prefix + "w2_scales"].shape == (2, 8, 3)
    assert int4["output.weight"].shape == (16, 4) and int4["output.scales"].shape == (16, 2)
    assert int4["output.scales"].dtype == torch.bfloat16 and int4[prefix + "gate.weight"].dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantize_int4_rounds_each_weight_once(dtype):
    """A prompt's full-precision copy of int4 weights, groups of 32 and 64: (q - 8) * scale computed
    exactly (float64), then rounded once to dtype."""
    g = torch.Generator().manual_seed(1)
    packed = torch.randint(0, 256, (3, 37, 96), dtype=torch.uint8, generator=g)
    for groups in (6, 3):
        scales = torch.rand(3, 37, groups, generator=g).to(dtype)
        got = torch.ops.mixtral_cpu.dequantize_int4(packed, scales, dtype)
        assert torch.equal(got, exact("int4", {"": packed, "scales": scales}).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantize_int8_rounds_each_weight_once(dtype):
    """A prompt's full-precision copy of int8 weights: q * scale computed exactly, then rounded once to
    dtype (float64 here, where q * scale is exact), for rows of a length that is not a multiple of 8."""
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-127, 128, (3, 37, 53), dtype=torch.int8, generator=g)
    scales = torch.rand(3, 37, generator=g).to(dtype)
    got = torch.ops.mixtral_cpu.dequantize_int8(q, scales, dtype)
    assert torch.equal(got, (q.double() * scales.double()[..., None]).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", [40, 64])
def test_int8_linear_without_the_kernels_matches_float64(dtype, width):
    """The path a machine without the CPU kernels decodes on (Int8.linear: torch's int8 kernel where it is
    right, a dequantized copy where torch 2.13 returned inf and nan: widths that are not multiples of 16)."""
    g = torch.Generator().manual_seed(width)
    x = torch.randn(2, width, generator=g).to(dtype)
    t = stored("int8", torch.randn(VOCAB, width, generator=g) / width ** 0.5, dtype)
    got = FORMATS["int8"].linear(x, t)
    want = x.double() @ exact("int8", t).T
    assert torch.isfinite(got).all()
    # torch's kernel rounds to dtype along the way: a few units of dtype's rounding, not float32's.
    assert ((got.double() - want).norm() / want.norm()).item() < 8 * HALF_ULP[dtype] + 1e-6
