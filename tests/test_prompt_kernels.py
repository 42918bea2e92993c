"""kernels/cpu_prompt.cpp (prompt_linear, prompt_moe) against float64 models of each path's arithmetic
written here from kernels/README.md: int8, int4 and GGUF's five block types (their blocks read back by the gguf
package); every instruction set this CPU runs, AMX on and off where the CPU has it; shapes off the kernels' tiles (tokens 9, 17, 129, not multiples of the 6, 3 or 16 a tile takes;
37 or 70 rows, not multiples of the 32 a block takes; rows of K values that end inside a block of the
integer path's activations or an AMX chunk); every group size; scales in bf16, fp16 and float32;
activations in bf16 and float32. Then whole prompts: dispatch.py sends them to these kernels, and they
match transformers."""
import functools

import pytest
import torch
import torch.nn.functional as F

import numpy as np
from gguf import GGMLQuantizationType, quants as gguf_quants

import dispatch
import layers
from conftest import load_reference, relative_error
from formats import Blocks, Int4, Int8
from kernels import cpu as cpu_kernels
from rounding import HALF_ULP, exact

U = 2.0 ** -24  # float32's unit roundoff

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread: small shapes, a shared machine


@pytest.fixture(scope="module", autouse=True)
def kernels_built():
    assert cpu_kernels.available(), "the CPU kernels must build here (a C++ compiler and ninja are installed)"


def has_amx() -> bool:
    caps = torch.cpu.get_capabilities()
    return bool(caps.get("amx_tile") and caps.get("amx_bf16"))


# (instruction set, AMX): every set this CPU runs, and the best with AMX where the CPU has it. The
# kernels turn AMX on only where the OS allows it too (Linux 5.16 and later): test_amx_is_used_where_offered.
PATHS = [(isa, False) for isa in cpu_kernels.supported()] + [("avx512", True)] * ("avx512" in cpu_kernels.supported() and has_amx())


@pytest.fixture(params=PATHS, ids=lambda p: f"{p[0]}{'-amx' if p[1] else ''}")
def path(request):
    """Within the test, eager code takes the prompt kernels of this instruction set, with AMX or without."""
    isa, amx = request.param
    with cpu_kernels.using(isa), cpu_kernels.amx(amx) as on:
        assert on == amx
        yield isa, amx


def uses_amx(path, x) -> bool:
    """AMX multiplies bf16 activations only; the integer path takes the rest."""
    return path[1] and x.dtype == torch.bfloat16


def stored(fmt, w, scale_dtype):
    """w [..., N, K] quantized, its scales in scale_dtype."""
    return fmt.quantize(w.to(scale_dtype))


BLOCK = 256  # the integer path's activations: int16 in blocks of this many values


def int16_blocks(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] as the integer path rounds it, in float64: blocks of 256 values (the last may be shorter),
    each scaled by 32767 / its largest magnitude and rounded to nearest even, all in float32 as the
    kernel computes it (the division, then the product; a float64 product could round a near-tie the
    other way); the result is q * (largest / 32767), that scale rounded to float32."""
    K = x.shape[-1]
    blocks = F.pad(x.float(), (0, -K % BLOCK)).unflatten(-1, (-1, BLOCK))
    largest = blocks.abs().amax(dim=-1, keepdim=True)
    inverse = torch.full_like(largest, 32767.0) / largest  # a division: not a multiplication by a reciprocal
    q = torch.where(largest > 0, blocks * inverse, 0.0).round()
    step = (largest / 32767.0).double()  # float32 division, as the kernel's scale
    return (q.double() * step).flatten(-2)[..., :K]


GGUF_TYPES = {"q8_0": GGMLQuantizationType.Q8_0, "q4_0": GGMLQuantizationType.Q4_0,
              "q4_k": GGMLQuantizationType.Q4_K, "q5_k": GGMLQuantizationType.Q5_K,
              "q6_k": GGMLQuantizationType.Q6_K}


def gguf_weights(fmt, t: dict) -> torch.Tensor:
    """A block type's weights [..., N, K] as the gguf package reads its blocks back, in float32: llama.cpp's
    own decoding (the exact value rounded once to float32; tests/test_quants.py)."""
    blocks = t[""].flatten(-2)
    return torch.from_numpy(gguf_quants.dequantize(blocks.numpy(), GGUF_TYPES[fmt.name])).reshape(*blocks.shape[:-1], -1)


def gguf_offsets(fmt, t: dict) -> torch.Tensor:
    """q4_k's and q5_k's offset dmin * m of each weight [..., N, K] (float64; zeros for the other types), from
    the bytes by the gguf package's reading of the 6-bit mins."""
    if fmt.name not in ("q4_k", "q5_k"):
        return torch.zeros(gguf_weights(fmt, t).shape, dtype=torch.float64)
    b = t[""]  # [..., N, blocks, bytes]
    dmin = torch.from_numpy(b[..., 2:4].contiguous().numpy().view(np.float16).astype(np.float64))  # [..., N, blocks, 1]
    _, m = gguf_quants.Q4_K.get_scale_min(b[..., 4:16].reshape(-1, 12).numpy())
    m = torch.from_numpy(np.asarray(m, dtype=np.float64)).reshape(*b.shape[:-1], 8)
    return (dmin * m).repeat_interleave(32, dim=-1).flatten(-2)


def weights_as_multiplied(fmt, t: dict, amx: bool) -> torch.Tensor:
    """The weights [..., N, K] a path multiplies, in float64: exactly the stored ones, except on AMX int4's
    (q - 8) * scale and a block type's decoded value (both computed in float32), rounded to bf16 to nearest
    even. The integer path multiplies a block type's exact values, which the float32 ones here miss by
    at most one rounding (term_magnitudes' slack)."""
    if isinstance(fmt, Blocks):
        w = gguf_weights(fmt, t)
        return (w.to(torch.bfloat16) if amx else w).double()
    if amx and isinstance(fmt, Int4):
        q = torch.stack((t[""] & 15, t[""] >> 4), dim=-1).flatten(-2).float() - 8
        group = q.shape[-1] // t["scales"].shape[-1]
        return (q * t["scales"].float().repeat_interleave(group, dim=-1)).to(torch.bfloat16).double()
    return exact(fmt.name, t)


def term_magnitudes(fmt, t: dict, w: torch.Tensor, amx: bool) -> torch.Tensor:
    """What bounds each weight's share of the kernel's float32 rounding: |w|, but on the integer path a
    K-quant's w = step q - offset is summed as its two terms (|step q| + |offset| <= |w| + 2 |offset|), and a
    block type's float32 w above is one rounding off the exact one (one unit more)."""
    if isinstance(fmt, Blocks) and not amx:
        return w.abs() * (1 + 2 * U) + 2 * gguf_offsets(fmt, t)
    return w.abs()


def activations(x: torch.Tensor, amx: bool) -> torch.Tensor:
    """x as a path multiplies it: bf16 as it is on AMX, int16 blocks otherwise."""
    return x.double() if amx else int16_blocks(x)


def summation_slack(xs: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """A bound on float32 summation's error in xs @ w.T (w: the terms' magnitudes): K + 8 roundings (at most
    one per term, and a few for the block and row scales) of 2^-24 of the sum of the terms' magnitudes,
    whatever the order."""
    return (xs.shape[-1] + 8) * U * (xs.abs() @ w.abs().T)


def assert_within(got, want, slack, dtype):
    """Each value within half a unit of dtype's rounding of the float64 value, plus slack."""
    err = (got.double() - want).abs()
    bound = HALF_ULP[dtype] * want.abs() + slack
    assert (err <= bound).all(), (err - bound).max().item()


# (format, K): rows shorter than a block of the activations (96, 160, 192), a whole one (256), and a block
# and a part (288, 384, 544), for int8 and each int4 group size.
LINEAR_CASES = [(Int8(), 96), (Int8(), 256), (Int8(), 544), (Int4(32), 160), (Int4(32), 288), (Int4(64), 192),
                (Int4(128), 384), (Blocks("q8_0"), 96), (Blocks("q4_0"), 288), (Blocks("q4_k"), 256),
                (Blocks("q5_k"), 512), (Blocks("q6_k"), 768)]
SCALES = [torch.bfloat16, torch.float16, torch.float32]


@functools.lru_cache(maxsize=None)
def linear_case(fmt, K: int, scale_dtype, dtype, M: int):
    g = torch.Generator().manual_seed(K * M)
    x = torch.randn(M, K, generator=g).to(dtype)
    t = stored(fmt, torch.randn(37 + 33 * (M % 2), K, generator=g) / K ** 0.5, scale_dtype)  # 70 or 37 rows
    return x, t


@pytest.mark.parametrize("M", [9, 17, 129])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("fmt, K", LINEAR_CASES, ids=[f"{f.spec}-K{k}" for f, k in LINEAR_CASES])
def test_prompt_linear_matches_its_float64_model(path, fmt, K, dtype, M):
    scale_dtype = SCALES[(K // 32 + M) % 3]
    x, t = linear_case(fmt, K, scale_dtype, dtype, M)
    got = layers.cpu_prompt_linear(fmt, x, t)
    amx = uses_amx(path, x)
    xs, w = activations(x, amx), weights_as_multiplied(fmt, t, amx)
    want = xs @ w.T
    assert got.dtype == dtype and got.shape == want.shape
    assert_within(got, want, summation_slack(xs, term_magnitudes(fmt, t, w, amx)), dtype)


def h_slack(h64, a1, a3, bound1, bound3, amx):
    """How far each h = silu(a1) * a3 that the kernel rounds may land from the one rounded here. The
    kernel's a1, a3 are within bound1, bound3 of these (float32 sums), and its silu and product err a
    few units of float32: its h is within `drift` of h64. Rounded for the next matrix:
    - bf16 (AMX): equal, unless h64 is within drift of a rounding boundary (a midpoint between two bf16
      values); then one bf16 unit apart (two where the spacing doubles at a power of two).
    - int16 blocks: q may round one step the other way, and the block's step moves with its
      largest value (relatively by that value's drift), which moves every value of the block."""
    slope = torch.sigmoid(a1) * (1 + a1 * torch.sigmoid(-a1))  # d silu / d a1
    drift = slope.abs() * bound1 * a3.abs() + F.silu(a1).abs() * bound3 + 16 * U * h64.abs()
    if amx:
        unit = 2.0 ** (torch.floor(torch.log2(h64.abs().clamp_min(1e-30))) - 7)  # bf16: 8 significant bits
        to_midpoint = ((h64 / unit).frac().abs() - 0.5).abs() * unit
        return torch.where(to_midpoint <= drift, 2 * unit, 0.0)
    K = h64.shape[-1]
    blocks, drifts = (F.pad(v, (0, -K % BLOCK)).unflatten(-1, (-1, BLOCK)) for v in (h64, drift))
    largest, at = blocks.abs().max(dim=-1, keepdim=True)
    moved = (drifts.gather(-1, at) / largest.clamp_min(1e-30)) * blocks.abs()  # the step's relative drift
    step = largest / 32767
    return (step + drifts + moved).flatten(-2)[..., :K]


@functools.lru_cache(maxsize=None)
def moe_case(fmt, down, D: int, I: int, scale_dtype, dtype, T: int):
    g = torch.Generator().manual_seed(D + I + T)
    E = 4
    x = torch.randn(T, D, generator=g).to(dtype)
    # Expert 3 chosen by no token; expert 0 by most.
    experts = torch.stack([torch.zeros(T, dtype=torch.long), torch.randint(1, 3, (T,), generator=g)], dim=1)
    weights = torch.softmax(torch.randn(T, 2, generator=g), dim=-1).to(dtype)
    w1, w3 = (stored(fmt, torch.randn(E, I, D, generator=g) / D ** 0.5, scale_dtype) for _ in range(2))
    w2 = stored(down, torch.randn(E, D, I, generator=g) / I ** 0.5, scale_dtype)
    return x, experts, weights, w1, w3, w2


# (format of w1 and w3, of w2, D, I): the last two as a GGUF file's Q4_K_M mixes them.
MOE_CASES = [(Int8(), Int8(), 96, 288), (Int4(32), Int4(32), 96, 160), (Int4(64), Int4(64), 128, 320),
             (Int4(128), Int4(128), 128, 384), (Blocks("q4_k"), Blocks("q4_k"), 256, 256),
             (Blocks("q4_k"), Blocks("q6_k"), 256, 512)]


@pytest.mark.parametrize("T", [9, 17])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("fmt, down, D, I", MOE_CASES, ids=[f"{f.spec}-{d.spec}-D{D}-I{i}" for f, d, D, i in MOE_CASES])
def test_prompt_moe_matches_its_float64_model(path, fmt, down, D, I, dtype, T):
    """Each token's two experts, one at a time in float64: h = silu(w1 x) * (w3 x) rounded as the kernel
    rounds activations for w2 (bf16 on AMX, int16 blocks otherwise), then w2 h times the routing weight."""
    scale_dtype = SCALES[(D + T) % 3]
    x, experts, weights, w1, w3, w2 = moe_case(fmt, down, D, I, scale_dtype, dtype, T)
    got = layers.cpu_prompt_experts(fmt, x, experts, weights, w1, w3, w2, down)
    amx = uses_amx(path, x)
    W1, W3, W2 = (weights_as_multiplied(f, t, amx) for f, t in ((fmt, w1), (fmt, w3), (down, w2)))
    M1, M3, M2 = (term_magnitudes(f, t, w, amx) for f, t, w in ((fmt, w1, W1), (fmt, w3, W3), (down, w2, W2)))
    xs = activations(x, amx)
    want, slack = torch.zeros(T, D, dtype=torch.float64), torch.zeros(T, D, dtype=torch.float64)
    for n in range(T):
        for e, weight in zip(experts[n].tolist(), weights[n].double()):
            a1, a3 = W1[e] @ xs[n], W3[e] @ xs[n]
            bound1, bound3 = summation_slack(xs[n:n + 1], M1[e])[0], summation_slack(xs[n:n + 1], M3[e])[0]
            h64 = F.silu(a1) * a3
            h = h64.to(torch.bfloat16).double() if amx else int16_blocks(h64)
            want[n] += weight * (W2[e] @ h)
            slack[n] += weight.abs() * (W2[e].abs() @ h_slack(h64, a1, a3, bound1, bound3, amx) +
                                        summation_slack(h[None], M2[e])[0] + 4 * U * (W2[e] @ h).abs())
    assert got.dtype == dtype and got.shape == (T, D)
    assert_within(got, want, slack, dtype)


def test_amx_is_used_where_offered():
    """AMX is on (by default) exactly where the CPU has it (and Linux grants it, which every kernel since
    5.16 does), and MIXTRAL_NO_AMX-style requests turn it off; only the AVX-512 set has it."""
    if "avx512" not in cpu_kernels.supported():
        pytest.skip("no AVX-512: AMX never applies")
    with cpu_kernels.using("avx512"):
        with cpu_kernels.amx(True) as on:
            assert on == has_amx()
        with cpu_kernels.amx(False) as on:
            assert not on
    for isa in cpu_kernels.supported():
        if isa != "avx512":
            with cpu_kernels.using(isa), cpu_kernels.amx(True) as on:
                assert not on


def test_bad_arguments_are_refused_in_one_line():
    ops = cpu_kernels.ops()
    x = torch.randn(9, 64)
    t = Int8().quantize(torch.randn(5, 64))
    with pytest.raises(RuntimeError, match="format 'int8', 'int4', 'q8_0', .* expected, got 'int5'"):
        ops.prompt_linear(x, t[""], t["scales"], "int5")
    with pytest.raises(RuntimeError, match="rows of a multiple of 32 values expected"):
        t40 = Int8().quantize(torch.randn(5, 40))
        ops.prompt_linear(torch.randn(9, 40), t40[""], t40["scales"], "int8")
    with pytest.raises(RuntimeError, match="contiguous uint8 \\(int4\\) weights"):
        ops.prompt_linear(x, t[""], t["scales"], "int4")
    with pytest.raises(RuntimeError, match="out of range"):
        w = Int8().quantize(torch.randn(2, 32, 64))
        w2 = Int8().quantize(torch.randn(2, 64, 32))
        ops.prompt_moe(x, torch.full((9, 2), 2), torch.ones(9, 2), w[""], w[""], w2[""], w["scales"], w["scales"],
                       w2["scales"], "int8")


# ----------------------------------------------------------------------------- whole prompts

GRID = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            num_local_experts=4, num_experts_per_tok=2, rope_theta=1e6, max_position_embeddings=2048)


@pytest.fixture(scope="module")
def grid_checkpoints(tmp_path_factory, tokenizer_path):
    """int8 and int4 (groups of 32) checkpoints whose weights the format stores exactly: integers times
    bf16 scales (tests/test_kernels.py's on_grid), so that the kernels' arithmetic is all that differs
    from transformers."""
    from safetensors.torch import load_file, save_file
    from quantize import quantize_checkpoint
    from rounding import QUANTIZED_HF
    from scripts.convert_hf_checkpoint import convert_hf_checkpoint
    from scripts.make_tiny_checkpoint import write_hub_checkpoint
    from test_kernels import on_grid
    made = {}
    for name in ("int8", "int4"):
        folder = tmp_path_factory.mktemp(f"prompt-grid-{name}")
        write_hub_checkpoint(folder, GRID, tokenizer_path, seed=13, dtype=torch.float32, n_shards=1)
        tensors, g = load_file(folder / "model.safetensors"), torch.Generator().manual_seed(13)
        for key, w in tensors.items():
            if key.endswith(QUANTIZED_HF) or ".experts." in key:
                tensors[key] = on_grid(w.shape, name, g)
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        convert_hf_checkpoint(folder)
        made[name] = (folder, quantize_checkpoint(folder / "model.pth", "int8" if name == "int8" else "int4:g32:attn4"))
    for name in ("q4_k", "q6_k"):  # 256 wide, for their blocks of 256; on the grid as tests/test_quantize_blocks.py puts it
        from test_quantize_blocks import grid_checkpoint
        folder = grid_checkpoint(tmp_path_factory.mktemp(f"prompt-grid-{name}"), name)
        made[name] = (folder, quantize_checkpoint(folder / "model.pth", f"experts={name},attention={name},output={name}"))
    return made


@pytest.mark.parametrize("name", ["int8", "int4", "q4_k", "q6_k"])
def test_a_prompt_takes_the_prompt_kernels_and_matches_transformers(grid_checkpoints, name, path, monkeypatch):
    """A 24-token prompt: every linear layer and MoE of the quantized model goes to the prompt kernels
    (counted), and the logits match transformers' float32 on the same (exactly stored) weights. In
    float32 the kernels round activations to int16 blocks, finer than bf16: within bf16's rounding. In
    bf16, within a tenth more than PyTorch's own path (a bf16 copy of the weights and bf16 matmuls)."""
    import json
    from checkpoint import load_model, open_checkpoint
    folder, path_int = grid_checkpoints[name]
    vocab = json.loads((folder / "config.json").read_text()).get("vocab_size", 32000)
    idx = torch.randint(0, vocab, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = load_reference(folder)(idx).logits
    calls = {"linear": 0, "experts": 0}
    for paths, key in ((layers.LINEAR_PATHS, "linear"), (layers.EXPERTS_PATHS, "experts")):
        original = paths["cpu prompt kernel"]
        monkeypatch.setitem(paths, "cpu prompt kernel",
                            lambda *a, _o=original, _k=key: calls.__setitem__(_k, calls[_k] + 1) or _o(*a))
    errors = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = load_model(open_checkpoint(path_int), "cpu", dtype)
        model.setup_caches(max_batch_size=1, max_seq_length=32)
        before = dict(calls)
        with torch.no_grad():
            errors[dtype] = relative_error(model(idx, torch.arange(24)), want)
        n_layer = model.config.n_layer
        assert calls["linear"] - before["linear"] == 2 * n_layer + 1  # wqkv, wo of each layer; the head
        assert calls["experts"] - before["experts"] == n_layer
        if dtype == torch.bfloat16:
            with cpu_kernels.turned_off(), torch.no_grad():
                model.setup_caches(max_batch_size=1, max_seq_length=32)
                pytorchs = relative_error(model(idx, torch.arange(24)), want)
            assert calls["linear"] - before["linear"] == 2 * n_layer + 1  # no more calls: PyTorch's path
    print(name, path, {str(d): f"{e:.2e}" for d, e in errors.items()}, f"PyTorch's bf16 path {pytorchs:.2e}")
    assert errors[torch.float32] <= HALF_ULP[torch.bfloat16]
    assert errors[torch.bfloat16] <= 1.1 * pytorchs
