"""layers.py: the PyTorch paths every format shares, and quantizing a model in memory."""
import pytest
import torch
import torch.nn.functional as F

import dispatch
from checkpoint import load_state_dict, open_checkpoint
from conftest import relative_error, small_random_model
from errors import UserError
from formats import FullPrecision, Int4, Int8
from kernels import cpu as cpu_kernels
from layers import build_model, dequantized_experts, quantize_module, run_experts


def test_int4_prompt_experts_of_each_group_size_match_float64():
    """dequantized_experts reads its format from the spec, group size included."""
    g = torch.Generator().manual_seed(0)
    E, I, D, N = 3, 128, 128, 6
    w1, w3, w2 = (torch.randn(E, *shape, generator=g) for shape in ((I, D), (I, D), (D, I)))
    x, experts = torch.randn(N, D, generator=g), torch.tensor([[0, 1], [1, 2], [0, 2], [2, 1], [0, 1], [1, 0]])
    weights = torch.softmax(torch.randn(N, 2, generator=g), dim=-1)
    for fmt in (Int4(32), Int4(64), Int4(128)):
        stored = [fmt.quantize(w) for w in (w1, w3, w2)]
        # The weights each group size's rounding gives, read back independently of the format's code.
        back = []
        for t in stored:
            q = torch.stack((t[""] & 15, t[""] >> 4), dim=-1).flatten(-2).double() - 8  # [E, out, in]
            back.append((q.unflatten(-1, (t["scales"].shape[-1], -1)) * t["scales"].double()[..., None]).flatten(-2))
        b1, b3, b2 = back
        xd, wd = x.double(), weights.double()
        ref = torch.stack([sum(wd[n, k] * b2[e] @ (F.silu(b1[e] @ xd[n]) * (b3[e] @ xd[n]))
                               for k, e in enumerate(experts[n].tolist())) for n in range(N)])
        out = dequantized_experts(x, experts, weights, fmt.spec, *(list(t.values()) for t in stored))
        assert relative_error(out, ref) < 1e-5, fmt


def test_a_quantized_model_is_not_quantized_again(checkpoint):
    """benchmark.py --int4 on a checkpoint that is already int8 used to quantize its codes as weights."""
    loaded = open_checkpoint(checkpoint / "model.pth")
    config, state_dict = loaded.config, load_state_dict(loaded)
    model = build_model(config, FullPrecision())
    model.load_state_dict(state_dict)
    quantize_module(model, config, Int8())
    with pytest.raises(UserError, match="already quantized"):
        quantize_module(model, config, Int4(32))
    assert quantize_module(model, config, Int8()) is model  # asking for what it holds changes nothing


@pytest.mark.parametrize("float32_path", [False, True])
def test_prompt_experts_in_bf16_match_a_float64_loop(monkeypatch, float32_path):
    """A prompt's full-precision experts in bf16: the grouped matmul, and (on CPUs whose half-precision
    matmuls are slow) each expert one by one in float32, against each token's experts computed one by one
    in float64. Expert 0 and 1 get many tokens (converted), 2 and 3 a few (left in bf16): both branches of
    the float32 path run."""
    assert not dispatch.half_matmul_is_slow(torch.float32)  # float32 models are never converted
    monkeypatch.setattr(dispatch, "half_matmul_is_slow", lambda dtype: float32_path)
    g = torch.Generator().manual_seed(3)
    E, I, D, N = 4, 48, 32, 20
    w1, w3 = (torch.randn(E, I, D, generator=g) / D ** 0.5 for _ in range(2))
    w2 = torch.randn(E, D, I, generator=g) / I ** 0.5
    x = torch.randn(N, D, generator=g)
    experts = torch.stack([torch.zeros(N, dtype=torch.long), torch.tensor([1] * 15 + [2] * 3 + [3] * 2)], dim=1)
    weights = torch.softmax(torch.randn(N, 2, generator=g), dim=-1)
    bf16 = [t.to(torch.bfloat16) for t in (x, weights, w1, w3, w2)]
    fmt, (w1, w3, w2) = FullPrecision(), ({"": w} for w in bf16[2:])
    assert dispatch.experts_path(fmt, bf16[0], experts, E, I) == ("one by one" if float32_path else "grouped")
    out = run_experts(fmt, bf16[0], experts, bf16[1], w1, w3, w2)
    x, weights, w1, w3, w2 = (t.double() for t in bf16)  # the same rounded inputs, exact arithmetic
    ref = torch.stack([sum(weights[n, k] * w2[e] @ (F.silu(w1[e] @ x[n]) * (w3[e] @ x[n]))
                           for k, e in enumerate(experts[n].tolist())) for n in range(N)])
    assert out.dtype == torch.bfloat16
    assert relative_error(out, ref) < 1e-2  # bf16 rounding of the output and of h


def test_a_mixed_model_runs_each_weight_in_its_own_format():
    """Experts whose down projections are in another format than their gate and up projections, and a wo
    unlike wqkv: quantize_module stores each weight in its own format, the model says so, and its prompt
    and decode steps (PyTorch's paths and the kernels' where they take the formats) match the same model
    with every weight dequantized by its own format, in float64."""
    from formats import parse_format, parse_scheme
    from layers import model_scheme
    from model import Transformer
    config, model = small_random_model(n_layer=2)
    scheme = parse_scheme("experts=q4_0,attention=q8_0,output=int8,down=q8_0,layers.1.attention.wo.weight=int8")
    quantize_module(model, config, scheme)
    assert model_scheme(model) == scheme
    assert model.layers[1].attention.wo.format == Int8() and model.layers[0].attention.wo.format == parse_format("q8_0")
    reference = Transformer(config).double()
    with torch.no_grad():
        for name, p in reference.named_parameters():
            module, _, weight = name.rpartition(".")
            owner = model.get_submodule(module)
            formats = getattr(owner, "formats", {})
            if weight in formats:
                p.copy_(formats[weight].dequantize(owner.weight_tensors(weight), torch.float64))
            else:
                p.copy_(getattr(owner, weight))
    model.setup_caches(1, 32)
    if cpu_kernels.available():  # the q8_0 down projections take the experts one by one through the kernels
        x = torch.randn(1, config.dim)
        assert dispatch.experts_path(scheme.experts, x, torch.tensor([[0, 1]]), 4, config.intermediate_size,
                                     scheme.down) == "cpu kernel, one by one"
    idx = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = reference(idx)
        prompt = model(idx[:, :11], torch.arange(11))
        step = model(idx[:, 11:], torch.tensor([11]))
        with cpu_kernels.turned_off():
            pytorch_prompt = model(idx[:, :11], torch.arange(11))
            pytorch_step = model(idx[:, 11:], torch.tensor([11]))
    assert relative_error(pytorch_prompt, want[:, :11]) < 1e-5 and relative_error(pytorch_step, want[:, 11:]) < 1e-5
    # The prompt kernels round int8 weights' activations to int16 in blocks of 256 (a step of 2^-15 of each
    # block's largest value, some 2^-13 of its RMS on these Gaussian rows).
    assert relative_error(prompt, want[:, :11]) < 1e-3
    # The CPU kernels round the activations of int8 weights to int16 (a step of 2^-15 of each block's largest
    # value) and of block types to int8 in blocks of 32 (1/127 of it: about 0.6 % of a block's RMS).
    assert relative_error(step, want[:, 11:]) < 2e-2


def test_an_experts_gate_and_up_projections_share_a_format():
    from formats import parse_scheme
    from model import ModelArgs
    config = ModelArgs(n_layer=1, dim=64, n_head=4, n_local_heads=2, head_dim=16, intermediate_size=128,
                       num_experts=4, num_activated_experts=2, vocab_size=64, block_size=64)
    with pytest.raises(UserError, match="share a format"):
        with torch.device("meta"):
            build_model(config, parse_scheme("experts=int8,attention=int8,output=int8,layers.0.block_sparse_moe.w3=q8_0"))
