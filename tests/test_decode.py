"""The decode path (a format's decode_experts) compiled as generate.py compiles it: same logits as transformers,
one graph for every step (no recompiles per token), and no gathered copy of the experts in the kernels."""
import pytest
import torch

from conftest import load_ours, load_reference, relative_error
from formats import FullPrecision
from generation import decode_compile_options
from layers import grouped_experts
from model import route


def decode_experts(x, experts, weights, w1, w3, w2):
    return FullPrecision().decode_experts(x, experts, weights, {"": w1}, {"": w3}, {"": w2})


@pytest.mark.parametrize("n_tokens", [1, 3])
def test_decode_experts_equals_grouped_experts(checkpoint, n_tokens):
    moe = load_ours(checkpoint).layers[0].block_sparse_moe
    x = torch.randn(n_tokens, moe.w1.shape[-1], generator=torch.Generator().manual_seed(0))
    weights, experts = route(moe.gate, x, moe.num_activated_experts)
    with torch.no_grad():
        fast = decode_experts(x, experts, weights, moe.w1, moe.w3, moe.w2)
        ref = grouped_experts(x, experts, weights, moe.w1, moe.w3, moe.w2)
    assert relative_error(fast, ref) < 1e-6


def test_compiled_decode_matches_transformers_without_recompiles(checkpoint):
    ref_model, ours = load_reference(checkpoint), load_ours(checkpoint)
    idx = torch.randint(0, 32000, (1, 16), generator=torch.Generator().manual_seed(5))
    torch._dynamo.reset()
    step = torch.compile(lambda x, pos: ours(x, pos), fullgraph=True, options=decode_compile_options("cpu"))
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        ref = ref_model(idx).logits
        logits = [ours(idx[:, :4], torch.arange(4))]  # eager prefill, then every token through one graph
        logits += [step(idx[:, i:i + 1], torch.tensor([i], dtype=torch.int)) for i in range(4, idx.size(1))]
    assert relative_error(torch.cat(logits, dim=1), ref) < 1e-4


def test_compiled_decode_experts_reads_the_experts_in_place(checkpoint):
    """No buffer the size of an expert in the generated code: the indexing is fused into the reductions."""
    import re
    from torch._inductor.utils import run_and_get_code
    moe = load_ours(checkpoint).layers[0].block_sparse_moe
    x = torch.randn(1, moe.w1.shape[-1], generator=torch.Generator().manual_seed(0))
    weights, experts = route(moe.gate, x, moe.num_activated_experts)
    torch._dynamo.reset()
    # The kernels are the same with either wrapper; the Python one states its buffers' sizes plainly.
    options = {**decode_compile_options("cpu"), "cpp_wrapper": False}
    fn = torch.compile(decode_experts, fullgraph=True, options=options)
    with torch.no_grad():
        out, (code, *_) = run_and_get_code(fn, x, experts, weights, moe.w1, moe.w3, moe.w2)
        assert relative_error(out, grouped_experts(x, experts, weights, moe.w1, moe.w3, moe.w2)) < 1e-6
    sizes = [eval(shape) for shape in re.findall(r"empty_strided_cpu\((\([\d, ]*\))", code)]
    assert sizes, code
    expert_numel = moe.w1[0].numel()
    assert all(torch.Size(s).numel() < expert_numel for s in sizes), sizes
    assert "extern_kernels.bmm" not in code and "aten.index" not in code  # no library matmul on a copy
