"""formats.py: a spec names one format by value, schemes and their file names, and a checkpoint's formats told
by its content."""
import pytest
import torch

from errors import UserError
from formats import FullPrecision, Int4, Int8, Scheme, detect_format, file_tag, parse_format, parse_scheme


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
    assert parse_scheme("int8") == Scheme(Int8(), Int8(), Int8())
    assert parse_scheme("int4:g64") == Scheme(attention=Int8(), experts=Int4(64), output=Int8())
    assert parse_scheme("int4:g64:attn4") == Scheme.of(Int4(64))


@pytest.mark.parametrize("spec, tag", [("int8", "int8"), ("int4", "int4.g32"), ("int4:g64", "int4.g64"),
                                       ("int4:g32:attn4", "int4.g32.attn4"),
                                       ("experts=int8,attention=full,output=int8", "experts.int8.attention.full.output.int8")])
def test_a_scheme_spec_reads_back_and_names_its_file(spec, tag):
    """gpt-fast's file names (model_int8.pth, model_int4.g32.pth) come from the spec; every scheme's spec
    reads back as itself."""
    scheme = parse_scheme(spec)
    assert parse_scheme(scheme.spec) == scheme
    assert file_tag(scheme) == tag


@pytest.mark.parametrize("spec", ["int8:attn4", "experts=int8", "experts=int8,attention=int8,head=int8", "int4:g48"])
def test_a_bad_scheme_is_one_clear_error(spec):
    with pytest.raises(UserError):
        parse_scheme(spec)


def test_a_checkpoints_formats_are_told_by_its_content():
    """The dtypes and int4's scales say each part's format, whatever the file is called."""
    t = {"layers.0.attention.wqkv.weight": torch.zeros(4, 8, dtype=torch.int8),
         "layers.0.attention.scales": torch.zeros(4),
         "layers.0.block_sparse_moe.w1": torch.zeros(2, 4, 64, dtype=torch.uint8),
         "layers.0.block_sparse_moe.w1_scales": torch.zeros(2, 4, 2),
         "output.weight": torch.zeros(4, 8)}
    assert detect_format(t) == Scheme(attention=Int8(), experts=Int4(64), output=FullPrecision())


def test_a_scheme_may_give_the_down_projections_and_single_weights_their_own_format():
    """A GGUF file's mix (q6_k down projections in some layers) or a preset: each weight's format, and the
    spec that names it reads back as the same scheme."""
    scheme = parse_scheme("experts=q4_k,attention=q6_k,output=q6_k,down=q5_k,layers.1.block_sparse_moe.w2=q6_k")
    assert scheme.format_of("layers.0.block_sparse_moe.w1") == parse_format("q4_k")
    assert scheme.format_of("layers.0.block_sparse_moe.w2") == parse_format("q5_k")
    assert scheme.format_of("layers.1.block_sparse_moe.w2") == parse_format("q6_k")
    assert scheme.format_of("layers.1.attention.wo.weight") == parse_format("q6_k")
    assert parse_scheme(scheme.spec) == scheme


def test_detected_formats_keep_each_weights_own():
    """scheme_of (what detect_format returns) takes each part's most common format and keeps the others as
    overrides: every weight reads back as what it was."""
    from formats import scheme_of
    per_weight = {f"layers.{i}.block_sparse_moe.w{n}": parse_format("q6_k" if n == 2 and i % 3 == 0 else "q4_k")
                  for i in range(6) for n in (1, 2, 3)}
    per_weight.update({f"layers.{i}.attention.{w}.weight": Int8() for i in range(6) for w in ("wqkv", "wo")})
    per_weight["output.weight"] = FullPrecision()
    scheme = scheme_of(per_weight)
    assert scheme.experts == parse_format("q4_k") and scheme.attention == Int8() and len(scheme.overrides) == 2
    assert all(scheme.format_of(name) == fmt for name, fmt in per_weight.items())


def test_q4_k_m_gives_llama_cpps_layers_more_bits():
    """llama.cpp's Q4_K_M on Mixtral 8x7B (32 layers): q6_k down projections in layers 0-3, 28-31 and every third
    layer from 6 to 27 (its use_more_bits, written out here), q4_k in the others and in w1/w3, q5_k attention,
    q6_k output head. The layer count comes from the config; without one the preset is refused."""
    from types import SimpleNamespace
    scheme = parse_scheme("q4_k_m", SimpleNamespace(n_layer=32))
    more = [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    for i in range(32):
        assert scheme.format_of(f"layers.{i}.block_sparse_moe.w2") == parse_format("q6_k" if i in more else "q4_k")
        assert scheme.format_of(f"layers.{i}.block_sparse_moe.w1") == parse_format("q4_k")
        assert scheme.format_of(f"layers.{i}.block_sparse_moe.w3") == parse_format("q4_k")
        assert scheme.format_of(f"layers.{i}.attention.wqkv.weight") == parse_format("q5_k")
        assert scheme.format_of(f"layers.{i}.attention.wo.weight") == parse_format("q5_k")
    assert scheme.format_of("output.weight") == parse_format("q6_k")
    assert scheme.spec == "q4_k_m" and file_tag(scheme) == "q4_k_m"
    assert parse_scheme(scheme.spec, SimpleNamespace(n_layer=32)) == scheme
    # The 4 layers of the shipped model: the last eighth (layer 3) and layer 2.
    four = parse_scheme("q4_k_m", SimpleNamespace(n_layer=4))
    assert [four.format_of(f"layers.{i}.block_sparse_moe.w2").spec for i in range(4)] == ["q4_k", "q4_k", "q6_k", "q6_k"]


# Mixtral 8x7B's bytes per decoded token in each scheme, written out here from the block layouts: q4_k 144 bytes
# per 256 weights, q5_k 176, q6_k 210; int4:g32 16 bytes and a bf16 scale per 32; int8 a byte a weight and a bf16
# scale per row. A token reads attention (q: 4096 x 4096, k and v: 1024 x 4096, o: 4096 x 4096) and 2 of 8 experts
# (3 x 14336 x 4096 each) in 32 layers, the head (32000 x 4096), the router in bf16, and the norms and one
# embedding row in float32 (as the served model keeps them).
def mixtral_token_bytes(attention_bytes_per_weight: float, expert: float, output: float) -> float:
    attention, experts, head = 32 * (2 * 4096 * 4096 + 2 * 1024 * 4096), 32 * 2 * 3 * 14336 * 4096, 32000 * 4096
    plain = 32 * (2 * 8 * 4096 + 4 * 2 * 4096) + 4 * (4096 + 4096)  # router, two norms per layer; final norm, a row
    return attention * attention_bytes_per_weight + experts * expert + head * output + plain


@pytest.mark.parametrize("preset, attention, experts, output", [("q4_k_a6", "q6_k", "q4_k", "q6_k"),
                                                                ("q5_k_a5", "q5_k", "q5_k", "q6_k")])
def test_the_recommended_mixes_keep_one_format_for_all_of_an_experts_weights(preset, attention, experts, output):
    """The README's presets: each part in its format, and w1, w2 and w3 of every expert in one (the CPU kernels
    take one format for the three; a different down projection sends decoding to PyTorch's path)."""
    from types import SimpleNamespace
    scheme = parse_scheme(preset, SimpleNamespace(n_layer=32))
    for i in range(32):
        for w in ("w1", "w2", "w3"):
            assert scheme.format_of(f"layers.{i}.block_sparse_moe.{w}") == parse_format(experts)
        assert scheme.format_of(f"layers.{i}.attention.wqkv.weight") == parse_format(attention)
    assert scheme.format_of("output.weight") == parse_format(output) and scheme.spec == preset


def test_q4_k_a6_reads_fewer_bytes_per_mixtral_token_than_int4_g32():
    """The README's claim for the 4-bit preset, on Mixtral 8x7B's shapes (measuring.active_weight_bytes against the
    layouts written out above): below int4:g32, which q4_k_m is not."""
    from layers import build_model
    from measuring import active_weight_bytes
    from model import ModelArgs
    config = ModelArgs.from_name("Mixtral-8x7B-v0.1")
    measured = {}
    for spec in ("int4:g32", "q4_k_a6", "q4_k_m"):
        with torch.device("meta"):
            measured[spec] = active_weight_bytes(build_model(config, parse_scheme(spec, config), torch.bfloat16))
    int8_row = 1 + 2 / 4096  # int8 with a bf16 scale per row of 4096 inputs
    assert measured["int4:g32"] == pytest.approx(mixtral_token_bytes(int8_row, 18 / 32, int8_row), rel=1e-6)
    assert measured["q4_k_a6"] == pytest.approx(mixtral_token_bytes(210 / 256, 144 / 256, 210 / 256), rel=1e-6)
    assert measured["q4_k_a6"] < measured["int4:g32"] < measured["q4_k_m"]
    with pytest.raises(UserError, match="layer count"):
        parse_scheme("q4_k_m")


def test_a_checkpoint_in_a_preset_is_named_by_it():
    """detect_format names the preset whose formats every weight is in; one weight otherwise makes it a mix."""
    from types import SimpleNamespace
    preset = parse_scheme("q4_k_m", SimpleNamespace(n_layer=4))
    names = [f"layers.{i}.{w}" for i in range(4) for w in ("attention.wqkv.weight", "attention.wo.weight",
                                                          "block_sparse_moe.w1", "block_sparse_moe.w3", "block_sparse_moe.w2")]
    per_weight = {name: preset.format_of(name) for name in names + ["output.weight"]}
    from formats import scheme_of
    assert scheme_of(per_weight) == preset and scheme_of(per_weight).spec == "q4_k_m"
    per_weight["layers.0.block_sparse_moe.w2"] = parse_format("q6_k")
    mixed = scheme_of(per_weight)
    assert mixed.spec != "q4_k_m" and all(mixed.format_of(name) == fmt for name, fmt in per_weight.items())
