"""formats.py's specs and values, dispatch.py's choice of path, and model.py as the pure reference: it runs
without a KV cache and trains (its gradients are transformers')."""
import pytest
import torch
import torch.nn.functional as F

import dispatch
from conftest import load_reference, relative_error
from formats import (FORMATS, FullPrecision, Int4, Int8, Scheme, dequantized_experts, formatted_model,
                     parse_format, quantize_module)
from kernels import cpu as cpu_kernels
from model import ModelArgs, Transformer, UserError, load_checkpoint


@pytest.mark.parametrize("spec, fmt", [("full", FullPrecision()), ("int8", Int8()), ("int4", Int4(32)),
                                       ("int4:g32", Int4(32)), ("int4:g64", Int4(64)), ("int4:g128", Int4(128))])
def test_a_spec_names_one_format_by_value(spec, fmt):
    assert parse_format(spec) == fmt and hash(parse_format(spec)) == hash(fmt)
    assert parse_format(fmt.spec) == fmt  # every format's spec reads back as itself
    others = [f for f in (FullPrecision(), Int8(), Int4(32), Int4(64), Int4(128)) if f is not fmt and f != fmt]
    assert len(others) == 4  # not equal to any other format, Int4 groups included


@pytest.mark.parametrize("spec", ["int4:g48", "int4:64", "int4:g", "int8:g32", "fp8", "", "full:x"])
def test_a_bad_spec_is_one_clear_error(spec):
    with pytest.raises(UserError, match="int4:g32"):
        parse_format(spec)


def test_quantizing_int4_keeps_attention_and_the_head_int8_unless_asked():
    assert Scheme.quantizing(Int8()) == Scheme(Int8(), Int8(), Int8())
    assert Scheme.quantizing(Int4(64)) == Scheme(attention=Int8(), experts=Int4(64), output=Int8())
    assert Scheme.quantizing(Int4(64), int4_attention=True) == Scheme.of(Int4(64))


def test_the_path_of_each_step():
    """The names dispatch.py gives each shape, with the CPU kernels and without."""
    D = 64
    one, prompt = torch.randn(1, 1, D), torch.randn(1, dispatch.CPU_KERNEL_MAX_TOKENS + 1, D)
    kernels = cpu_kernels.available()
    for fmt in (FullPrecision(), Int8(), Int4()):
        assert dispatch.linear_path(fmt, one) == ("cpu kernel" if kernels else "decode")
        # Many tokens: quantized weights read in place by the prompt kernels, rows of whole steps of 32 values.
        assert dispatch.linear_path(fmt, prompt) == ("cpu prompt kernel" if kernels and fmt.quantized else "prompt")
        assert dispatch.linear_path(fmt, prompt[..., :40]) == "prompt"
        with cpu_kernels.turned_off():
            assert dispatch.linear_path(fmt, one) == "decode"
            assert dispatch.linear_path(fmt, prompt) == "prompt"
        x, few = torch.randn(1, D), torch.tensor([[0, 1]])
        assert dispatch.experts_path(fmt, x, few, 8, 96) == ("cpu kernel" if kernels else "decode")
        with cpu_kernels.turned_off():
            assert dispatch.experts_path(fmt, x, few, 8, 96) == "decode"  # 2 expert matrices of 8
        many = torch.randint(0, 8, (dispatch.CPU_KERNEL_MAX_TOKENS + 1, 2))
        x = torch.randn(many.shape[0], D)  # float32: never slow, so full precision has its grouped matmul
        pytorchs = "grouped" if fmt == FullPrecision() else "one by one"
        assert dispatch.experts_path(fmt, x, many, 8, 96) == ("cpu prompt kernel" if kernels and fmt.quantized else pytorchs)
        assert dispatch.experts_path(fmt, x, many, 8, 80) == pytorchs
        with cpu_kernels.turned_off():
            assert dispatch.experts_path(fmt, x, many, 8, 96) == pytorchs
    assert dispatch.attention_path(torch.randn(1, 4, 1, 16)) == "decode"
    assert dispatch.attention_path(torch.randn(1, 4, 2, 16)) == "sdpa"


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
    config, state_dict = load_checkpoint(checkpoint / "model.pth")
    model = formatted_model(config, FORMATS["full precision"])
    model.load_state_dict(state_dict)
    quantize_module(model, config, Int8())
    with pytest.raises(UserError, match="already quantized"):
        quantize_module(model, config, Int4(32))
    assert quantize_module(model, config, Int8()) is model  # asking for what it holds changes nothing


@pytest.fixture(scope="module")
def reference_pair(checkpoint):
    config, state_dict = load_checkpoint(checkpoint / "model.pth")
    ours = Transformer(config)  # model.py alone: no format, no kernels, no cache
    ours.load_state_dict(state_dict)
    return ours, load_reference(checkpoint)


def test_the_reference_without_a_cache_matches_transformers(reference_pair):
    ours, ref = reference_pair
    idx = torch.randint(0, ours.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert relative_error(ours(idx), ref(idx).logits) < 1e-5


def test_the_reference_trains_with_transformers_gradients(reference_pair):
    """A training step's gradients, through every layer and the experts' loop, equal transformers'."""
    ours, ref = reference_pair
    idx = torch.randint(0, ours.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(2))
    for model, logits in ((ours, lambda: ours(idx[:, :-1])), (ref, lambda: ref(idx[:, :-1]).logits)):
        model.zero_grad()
        F.cross_entropy(logits().flatten(0, 1), idx[:, 1:].flatten()).backward()
    pairs = [(ours.tok_embeddings.weight, ref.model.embed_tokens.weight), (ours.output.weight, ref.lm_head.weight),
             (ours.layers[0].block_sparse_moe.gate.weight, ref.model.layers[0].mlp.gate.weight)]
    for mine, theirs in pairs:
        assert theirs.grad is not None and theirs.grad.norm() > 0
        assert relative_error(mine.grad, theirs.grad) < 1e-4
    expert_grads = [p.grad for p in ours.layers[0].block_sparse_moe.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in expert_grads)
