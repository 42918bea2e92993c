"""A GGUF file as a checkpoint (checkpoint.py): files written here by the gguf package's own writer and
quantizers, as llama.cpp's converter and quantizer write Mixtral, load into the served model with each tensor
in its file's type; their logits are those of our own format on the same blocks, and those of a float64 model
of the blocks as the gguf package reads them back; generate.py runs on one with no tokenizer.model."""
import gguf
import numpy as np
import pytest
import torch

import quants
from checkpoint import load_model, load_tokenizer, open_checkpoint
from conftest import REPO, relative_error, run_script
from errors import UserError
from formats import parse_format
from kernels import cpu as cpu_kernels
from gguf_files import gguf_named, read_hub_tensors, write_gguf
from model import Transformer
from rounding import HALF_ULP
from names import from_hub

TINY_STDLIB = REPO / "assets" / "tiny-stdlib"
# Small models, many small ops: one thread, which a second, descheduled one cannot stall.
pytestmark = pytest.mark.usefixtures("one_thread")
# The weights a format may store, by GGUF name: everything else (embedding, norms, router) stays float.
FORMATTED = ("attn_q.", "attn_k.", "attn_v.", "attn_output.", "_exps.", "output.weight")


def quantized(t: torch.Tensor, qtype: gguf.GGMLQuantizationType) -> tuple:
    """(type, raw bytes) of t [..., rows, cols], quantized by the gguf package where it can (Q8_0, Q4_0), and
    by quants.py for the K-quants, which it reads but does not write."""
    rows = t.float().reshape(-1, t.shape[-1])
    if qtype in (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q5_0):
        raw = gguf.quants.quantize(rows.numpy(), qtype)
    else:
        raw = quants.quantize(qtype.name.lower(), rows).numpy()
    return qtype, raw.reshape(*t.shape[:-1], -1)


def gguf_file(tmp_path, folder, types: dict, edit=None) -> tuple:
    """A GGUF file of the hub checkpoint in folder, each GGUF tensor whose name contains a key of `types` in that
    type (the longest key that matches), the others float32; and the float64 tensors the gguf package reads
    back from it, by GGUF name."""
    hp = {**gguf_config(folder)}
    tensors = gguf_named(read_hub_tensors(folder), hp)
    written = {}
    for name, t in tensors.items():
        keys = [key for key in types if key in name]
        qtype = types[max(keys, key=len)] if keys else None
        written[name] = quantized(t, qtype) if qtype is not None else t
    path = write_gguf(tmp_path / "model.gguf", folder, written, edit=edit)
    back = {t.name: torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type))).double()
            for t in gguf.GGUFReader(path).tensors}
    return path, back


def gguf_config(folder) -> dict:
    import json
    return json.loads((folder / "config.json").read_text())


def float64_model(path, back: dict) -> Transformer:
    """model.py's reference in float64 with the weights the gguf package reads back from the file, named back
    to the hub's names through gguf's own tensor-name map (q and k put back in the hub's rotary order) and
    made ours by the converter's rule."""
    from gguf_file import undo_rope_permute
    config = open_checkpoint(path).config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.n_layer)
    hub = {}
    for i in range(config.n_layer):
        for hub_name in ("input_layernorm", "post_attention_layernorm", "self_attn.o_proj", "block_sparse_moe.gate",
                         "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            name = f"model.layers.{i}.{hub_name}.weight"
            hub[name] = back[names.get_name(name, try_suffixes=(".weight",))]
        for name, heads in (("q_proj", config.n_head), ("k_proj", config.n_local_heads)):
            hub[f"model.layers.{i}.self_attn.{name}.weight"] = undo_rope_permute(
                hub[f"model.layers.{i}.self_attn.{name}.weight"], heads)
        for w in ("w1", "w2", "w3"):
            stacked = back[names.get_name(f"layers.{i}.feed_forward.experts.{w}.weight", try_suffixes=(".weight",))]
            for e in range(config.num_experts):
                hub[f"model.layers.{i}.block_sparse_moe.experts.{e}.{w}.weight"] = stacked[e]
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        hub[name] = back[names.get_name(name, try_suffixes=(".weight",))]
    model = Transformer(config).double()
    model.load_state_dict(from_hub(hub.__getitem__, config))
    return model


@pytest.fixture(scope="module")
def stdlib_hub(tmp_path_factory, tokenizer_path):
    """The shipped trained model's hub files, in a folder of its own (the asset is not written to)."""
    import shutil
    folder = tmp_path_factory.mktemp("tiny-stdlib")
    for f in ("config.json", "model.safetensors", "tokenizer.model"):
        shutil.copy(TINY_STDLIB / f, folder / f)
    return folder


Q8, Q4, Q5 = gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q5_0


MIXED = {**{n: Q4 for n in FORMATTED}, "attn_v.": Q8, "ffn_down_exps": Q8, "output.weight": Q8, "token_embd": Q4}


@pytest.mark.parametrize("types", [{}, {n: Q8 for n in FORMATTED}, {n: Q4 for n in FORMATTED}, MIXED],
                         ids=["F32", "Q8_0", "Q4_0", "mixed like Q4_K_M"])
def test_a_gguf_file_loads_each_tensor_in_its_type(stdlib_hub, tmp_path, types):
    """Every tensor keeps its file's type (the mixed file's v rows, down projections and head in Q8_0 beside
    Q4_0, its embedding quantized too) and the logits of a prompt and a decode step are the float64 model's
    of the same blocks: within float32's summation on PyTorch's paths; on the CPU kernels, within the int8
    rounding of a decode step's activations, and within bf16's rounding for a prompt's (the prompt kernels
    round them to int16 in blocks of 256, finer than bf16)."""
    path, back = gguf_file(tmp_path, stdlib_hub, types)
    checkpoint = open_checkpoint(path)
    model = load_model(checkpoint, "cpu", torch.float32)
    attention, moe = model.layers[0].attention, model.layers[0].block_sparse_moe
    spec = lambda qtype: qtype.name.lower() if qtype else "full"  # noqa: E731
    if types is MIXED:  # q and k in one type, v in another: wqkv in three parts
        assert [f.spec for f in attention.wqkv.formats.values()] == ["q4_0", "q4_0", "q8_0"]
        assert moe.formats["w2"].spec == "q8_0" and moe.formats["w1"].spec == "q4_0"
    else:
        qtype = types.get("attn_q.")
        assert attention.wqkv.format.spec == spec(qtype) and moe.format.spec == spec(qtype)
    reference = float64_model(path, back)
    idx = torch.tensor([load_tokenizer(checkpoint).encode("def fibonacci(n):\n    if n < 2:")])
    model.setup_caches(1, 64)
    last = torch.tensor([idx.size(1) - 1])
    with torch.no_grad():
        want = reference(idx)
        prompt = model(idx[:, :-1], torch.arange(idx.size(1) - 1))
        step = model(idx[:, -1:], last)
        with cpu_kernels.turned_off():
            pytorch_prompt = model(idx[:, :-1], torch.arange(idx.size(1) - 1))
            pytorch_step = model(idx[:, -1:], last)
    assert relative_error(pytorch_prompt, want[:, :-1]) < 1e-5 and relative_error(pytorch_step, want[:, -1:]) < 1e-5
    assert relative_error(prompt, want[:, :-1]) < HALF_ULP[torch.bfloat16]
    # The CPU kernels round a block type's activations to int8 in blocks of 32 (a step of 1/127 of each block's
    # largest value: about 0.6 % of a block's RMS), through every layer.
    assert relative_error(step, want[:, -1:]) < 2e-2


def test_gguf_blocks_are_our_formats_blocks(stdlib_hub, tmp_path):
    """A GGUF file in Q8_0 holds, tensor for tensor, the bytes our own q8_0 format writes from the same
    weights (quantize.py's rounding is llama.cpp's), so both give the same logits."""
    from layers import quantize_module
    from formats import parse_scheme
    path, _ = gguf_file(tmp_path, stdlib_hub, {n: Q8 for n in FORMATTED})
    from_gguf = load_model(open_checkpoint(path), "cpu", torch.float32)
    ours = quantize_module(load_model(open_checkpoint(stdlib_hub / "model.pth"), "cpu", torch.float32)
                           if (stdlib_hub / "model.pth").exists() else converted(stdlib_hub), from_gguf.config,
                           parse_scheme("q8_0"))
    theirs, mine = from_gguf.state_dict(), ours.state_dict()
    for name in ("layers.1.block_sparse_moe.w2", "layers.0.attention.wo.weight", "output.weight"):
        assert torch.equal(theirs[name], mine[name]), name


def converted(folder):
    from scripts.convert_hf_checkpoint import convert_hf_checkpoint
    convert_hf_checkpoint(folder)
    return load_model(open_checkpoint(folder / "model.pth"), "cpu", torch.float32)


@pytest.fixture(scope="module")
def small_tokenizer(tmp_path_factory) -> tuple:
    """(path, vocabulary size) of a small SentencePiece tokenizer: a 32000-row head would make the float64
    reference the test's slowest part."""
    import sentencepiece as spm
    from scripts.make_tiny_checkpoint import train_demo_tokenizer
    path = train_demo_tokenizer(tmp_path_factory.mktemp("tokenizer") / "tokenizer.model", vocab_size=1000)
    return path, spm.SentencePieceProcessor(model_file=str(path)).vocab_size()


@pytest.mark.parametrize("qtype", [gguf.GGMLQuantizationType.Q4_K, gguf.GGMLQuantizationType.Q5_K,
                                   gguf.GGMLQuantizationType.Q6_K])
def test_k_quant_files_load_on_rows_of_256(tmp_path, small_tokenizer, qtype):
    """K-quants need rows of whole 256-value blocks: a random hub checkpoint of such widths, its experts and
    attention in the K-quant, the head in Q6_K, against the float64 model of the same blocks."""
    from scripts.make_tiny_checkpoint import write_hub_checkpoint
    cfg = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, vocab_size=small_tokenizer[1],
               max_position_embeddings=256)
    folder = write_hub_checkpoint(tmp_path / "hub", cfg, small_tokenizer[0], dtype=torch.float32, n_shards=1)
    path, back = gguf_file(tmp_path, folder, {**{n: qtype for n in FORMATTED},
                                               "output.weight": gguf.GGMLQuantizationType.Q6_K})
    model = load_model(open_checkpoint(path), "cpu", torch.float32)
    assert model.layers[1].block_sparse_moe.format == parse_format(qtype.name.lower())
    assert model.output.format == parse_format("q6_k")
    idx = torch.randint(0, small_tokenizer[1], (1, 10), generator=torch.Generator().manual_seed(0))
    model.setup_caches(1, 32)
    with torch.no_grad():
        want = float64_model(path, back)(idx)
        with cpu_kernels.turned_off():
            assert relative_error(model(idx, torch.arange(10)), want) < 1e-5
        # The prompt kernels: activations rounded to int16 in blocks of 256, finer than bf16.
        assert relative_error(model(idx, torch.arange(10)), want) < HALF_ULP[torch.bfloat16]


def test_the_tokenizer_and_config_come_from_the_file(stdlib_hub, tmp_path):
    """No tokenizer.model or config.json beside it: the file's vocabulary gives the shipped tokenizer's ids
    (its tokenizer adds no space before the text, which the file says: llama.cpp's converter leaves the key
    out for Llama-type models, and then llama.cpp, and this reader, add one, as Mixtral's tokenizer does)."""
    import sentencepiece as spm
    path, _ = gguf_file(tmp_path, stdlib_hub, {}, edit=lambda writer: writer.add_add_space_prefix(False))
    assert not (tmp_path / "tokenizer.model").exists() and not (tmp_path / "config.json").exists()
    checkpoint = open_checkpoint(path)
    text = "import os\n\nclass Foo(object):\n    def __init__(self, x):  # 😀\n"
    mine = spm.SentencePieceProcessor(model_file=str(TINY_STDLIB / "tokenizer.model"))
    assert load_tokenizer(checkpoint).encode(text) == mine.encode(text)


def test_generate_runs_on_a_gguf_file(stdlib_hub, tmp_path):
    """generate.py --checkpoint_path FILE.gguf, greedy: the text of the same model's model.pth."""
    path, _ = gguf_file(tmp_path, stdlib_hub, {}, edit=lambda writer: writer.add_add_space_prefix(False))
    converted(stdlib_hub)
    args = ["--device", "cpu", "--prompt", "def fibonacci(n):", "--max_new_tokens", "24", "--num_samples", "1",
            "--temperature", "0", "--precision", "float32"]
    texts = [run_script(REPO / "generate.py", "--checkpoint_path", p, *args, env={"OMP_NUM_THREADS": "1"})
             for p in (path, stdlib_hub / "model.pth")]
    assert all(r.returncode == 0 for r in texts), [r.stderr for r in texts]
    first = lambda out: out.split("Time for inference")[0]  # noqa: E731
    assert "def fibonacci(n):" in texts[0].stdout and first(texts[0].stdout) == first(texts[1].stdout)


def test_an_unsupported_type_is_one_line_naming_the_tensor(stdlib_hub, tmp_path):
    path, _ = gguf_file(tmp_path, stdlib_hub, {"blk.1.ffn_down_exps": Q5})
    with pytest.raises(UserError, match=r"tensor blk\.1\.ffn_down_exps\.weight is of type Q5_0.*reads F32"):
        load_model(open_checkpoint(path), "cpu", torch.float32)


def test_a_tensor_that_disagrees_with_the_metadata_is_refused(stdlib_hub, tmp_path):
    import shutil
    folder = tmp_path / "hub"
    shutil.copytree(stdlib_hub, folder)
    hp = gguf_config(folder)
    tensors = gguf_named(read_hub_tensors(folder), hp)
    tensors["blk.0.ffn_norm.weight"] = tensors["blk.0.ffn_norm.weight"][:-1]
    short = len(tensors["blk.0.ffn_norm.weight"])  # one less than the model's width
    path = write_gguf(tmp_path / "bad.gguf", folder, tensors)
    with pytest.raises(UserError, match=rf"blk\.0\.ffn_norm\.weight is \({short},\), but the file's metadata implies"):
        load_model(open_checkpoint(path), "cpu", torch.float32)
