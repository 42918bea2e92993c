"""quantize.py --mode int4's default: int4 experts with attention and the output head in int8, one
checkpoint mixing formats. Its file, how generate.py loads it (each part's format told by its content),
its logits against transformers with the same roundings done here in float64, and tensor parallelism
checking each sliced weight against its own format."""
import copy

import pytest
import torch

from conftest import load_reference, relative_error
from rounding import QUANTIZED_HF, round_to_nearest, unpack

import tp
from checkpoint import load_model, open_checkpoint
from errors import UserError
from formats import Int4, Int8, Scheme
from layers import quantize_module
from model import ModelArgs, Transformer
from quantize import quantize_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread

# Which checkpoint tensors must be int4 and which int8, written out here rather than taken from quantize.py.
INT4_SUFFIXES = (".block_sparse_moe.w1", ".block_sparse_moe.w2", ".block_sparse_moe.w3")
INT8_SUFFIXES = (".attention.wqkv.weight", ".attention.wo.weight")


@pytest.fixture(scope="module")
def mixed(make_checkpoint):
    """The wide-enough default test checkpoint (dim 64, expert width 128) in quantize.py's int4."""
    return quantize_checkpoint(make_checkpoint("gqa_top2") / "model.pth", "int4:g32")


def round_int8(w: torch.Tensor) -> tuple:
    """int8 as quantize.py describes it, in float64: per row, scale = max|row| / 127 rounded to the weights'
    dtype, each weight rounded to the nearest multiple of it. Returns w / scale, q and scale [..., 1]."""
    scale = (w.double().abs().amax(dim=-1, keepdim=True) / 127).to(w.dtype).double()
    ratio = torch.where(scale > 0, w.double() / scale, 0.0)
    return ratio, ratio.round().clamp(-127, 127), scale


def round_int4(w: torch.Tensor, groupsize: int = 32) -> torch.Tensor:
    q, scale = round_to_nearest(w, groupsize)
    return q * scale.repeat_interleave(groupsize, dim=-1)


def test_experts_are_int4_and_attention_and_head_int8(make_checkpoint, mixed):
    source = torch.load(make_checkpoint("gqa_top2") / "model.pth", weights_only=True)
    stored = torch.load(mixed, weights_only=True)
    assert mixed.name == "model_int4.g32.pth"
    for name, w in source.items():
        if name.endswith(INT4_SUFFIXES):
            assert torch.equal(unpack(stored[name]), round_to_nearest(w, 32)[0]), name
        elif name.endswith(INT8_SUFFIXES) or name == "output.weight":
            ratio, q, scale = round_int8(w)
            near_tie = (ratio - ratio.floor() - 0.5).abs() < 1e-5  # float32's quotient may round either way
            assert stored[name].dtype == torch.int8 and ((stored[name] == q) | near_tie).all(), name
            assert torch.equal(stored[name[:-len("weight")] + "scales"].double(), scale[:, 0]), name
        else:  # router, embedding, norms: the very same tensor
            assert torch.equal(stored[name], w), name


def test_loads_each_part_in_its_format_and_errs_as_the_roundings_do(make_checkpoint, mixed):
    """Our logits on a prompt against transformers' with the experts int4-rounded and attention and the
    head int8-rounded here (equal but for float32 rounding and weights at a rounding tie), and the int4
    error itself, against unrounded transformers, far larger."""
    model = load_model(open_checkpoint(mixed), "cpu", torch.float32)
    model.setup_caches(max_batch_size=1, max_seq_length=64)
    layer = model.layers[1]
    assert isinstance(layer.block_sparse_moe.format, Int4) and layer.block_sparse_moe.format.groupsize == 32
    assert all(type(fmt) is Int8 for fmt in (layer.attention.wqkv.format, layer.attention.wo.format, model.output.format))
    reference = load_reference(make_checkpoint("gqa_top2"))
    rounded = copy.deepcopy(reference)
    with torch.no_grad():
        for name, p in rounded.named_parameters():
            if ".experts." in name:
                p.copy_(round_int4(p))
            elif name.endswith(QUANTIZED_HF):
                _, q, scale = round_int8(p)
                p.copy_(q * scale)
    idx = torch.randint(0, 32000, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, want, full = model(idx, torch.arange(24)), rounded(idx).logits, reference(idx).logits
    assert relative_error(want, full) > 0.01  # the roundings are visible: the comparison is not vacuous
    assert relative_error(ours, want) < 1e-3


def random_model(config: ModelArgs, scheme) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(config)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    return quantize_module(model, config, scheme)


def test_tensor_parallel_checks_each_sliced_weight_against_its_own_format():
    """Groups of 128 over 2 ranks: each rank holds 64 of wo's 128 inputs (not a whole group) and 128 of
    w2's 256 (one group). int4 everywhere is refused, naming wo; int8 attention slices freely."""
    config = ModelArgs(n_layer=1, dim=128, n_head=4, n_local_heads=2, head_dim=32, intermediate_size=256,
                       num_experts=4, num_activated_experts=2, vocab_size=64, block_size=64)
    with pytest.raises(UserError, match=r"each rank 64 of wo's inputs"):
        tp.apply_tp(random_model(config, Int4(128)), 0, 2)
    model = random_model(config, Scheme(attention=Int8(), experts=Int4(128), output=Int8()))
    w2_scales = model.layers[0].block_sparse_moe.w2_scales
    tp.apply_tp(model, 1, 2)
    moe, wo = model.layers[0].block_sparse_moe, model.layers[0].attention.wo
    assert torch.equal(moe.w2_scales, w2_scales[..., 1:])  # rank 1's group of w2's inputs
    assert wo.weight.shape == (128, 64) and wo.scales.shape == (128,)  # int8: half the inputs, every row's scale
