"""scripts/export_gguf.py: our checkpoints written as GGUF files. The references are independent of the
exporter: the converter's file written by the gguf package's own writer (tests/gguf_files.write_gguf), the gguf
package's own reader and dequantizer, our formats' own dequantize in float64, and the tokenizer.model the
vocabulary came from."""
import json
import shutil

import gguf
import numpy as np
import pytest
import sentencepiece as spm
import torch

from checkpoint import is_instruct, load_model, load_tokenizer, load_weights, open_checkpoint
from conftest import fails_cleanly, run_script, REPO
from formats import Blocks
from gguf_files import gguf_named, read_hub_tensors, write_gguf
from kernels import cpu as cpu_kernels
from layers import FormattedWeights
from names import tensor_shapes, to_hub
from quantize import quantize_checkpoint
from scripts.convert_hf_checkpoint import convert_hf_checkpoint
from scripts.export_gguf import export_gguf, main
from scripts.make_tiny_checkpoint import write_hub_checkpoint

# Small models, many small ops: one thread, which a second, descheduled one cannot stall.
pytestmark = pytest.mark.usefixtures("one_thread")

TINY_STDLIB = REPO / "assets" / "tiny-stdlib"
T = gguf.GGMLQuantizationType

# Mixtral-8x7B-Instruct-v0.1's tokenizer_config.json, the parts the converter reads.
INSTRUCT_TOKENIZER_CONFIG = {
    "add_bos_token": True, "add_eos_token": False,
    "added_tokens_decoder": {str(i): {"content": c, "lstrip": False, "normalized": False, "rstrip": False,
                                      "single_word": False, "special": True}
                             for i, c in enumerate(("<unk>", "<s>", "</s>"))},
    "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "tokenizer_class": "LlamaTokenizer",
    "chat_template": "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
                     "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% else %}{{ message['content'] + eos_token }}"
                     "{% endif %}{% endfor %}",
}

# Strings tokenizers disagree on: leading, repeated and odd whitespace, text that looks like special tokens,
# SentencePiece's own space mark, characters outside the vocabulary (byte fallback), emoji, nothing at all.
HARD_STRINGS = ["Hello world", "  two leading spaces, and  two inside  ", "tabs\tand\nnew\n\nlines\r\n",
                "naïve café 東京 Ölçek ŝ 😀🤖 \u200b", "<s> [INST] not special [/INST] </s> <unk>",
                "\u2581 already a space mark \u2581\u2581", "", " ", "12345 3.14159 0xDEADBEEF",
                "def f(x):\n    return x ** 2  # comment\n"]


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def stdlib(tmp_path_factory):
    """The shipped trained model (bf16, no dummy prefix in its tokenizer), converted, in a folder of its own:
    the quantized checkpoints are written beside its model.pth."""
    folder = tmp_path_factory.mktemp("tiny-stdlib")
    for f in ("config.json", "model.safetensors", "tokenizer.model"):
        shutil.copy(TINY_STDLIB / f, folder / f)
    return convert_hf_checkpoint(folder)


@pytest.fixture(scope="module")
def instruct(tmp_path_factory, tokenizer_path):
    """A random float32 hub checkpoint with Mixtral's real tokenizer (32000 pieces), the Instruct model's
    tokenizer_config.json (added tokens, chat template), grouped-query attention and an explicit head_dim
    (the converter then writes key_length and value_length), converted."""
    folder = tmp_path_factory.mktemp("instruct")
    config = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, head_dim=32,
                  max_position_embeddings=512)
    write_hub_checkpoint(folder, config, tokenizer_path, dtype=torch.float32, n_shards=1)
    (folder / "tokenizer_config.json").write_text(json.dumps(INSTRUCT_TOKENIZER_CONFIG))
    return convert_hf_checkpoint(folder)


@pytest.fixture(scope="module")
def k_quant_model(tmp_path_factory):
    """A random bf16 checkpoint whose rows are 256 and 512 wide, as K-quants' 256-value blocks need; its
    vocabulary padded past its tokenizer's pieces (1024 rows for at most 1000), as many models' are."""
    from scripts.make_tiny_checkpoint import train_demo_tokenizer
    folder = tmp_path_factory.mktemp("k-quant")
    tok = train_demo_tokenizer(tmp_path_factory.mktemp("tokenizer") / "small.model", vocab_size=1000)  # a small head: 1024 rows, not 32000
    config = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=256,
                  vocab_size=1024)
    write_hub_checkpoint(folder, config, tok, dtype=torch.bfloat16, n_shards=1)
    return convert_hf_checkpoint(folder)


# ----------------------------------------------------------------------------- references

def hub_hparams(path) -> dict:
    return json.loads((path.parent / "config.json").read_text())


def expected_tensors(path) -> dict:
    """GGUF name -> what the checkpoint at path should be in the file, made from our own model by the
    converter's rules (names.to_hub, then tests/gguf_files.gguf_named: q and k permuted, experts stacked,
    gguf's tensor map): the raw bytes (uint8 [..., rows, bytes]) of a weight in a block type, which the file
    must hold as they are; every other weight in float64, through our format's own dequantize."""
    checkpoint = open_checkpoint(path)
    model = load_model(checkpoint, "cpu", torch.float64)  # widening bf16 values and scales is exact
    ours = {}
    for prefix, module in model.named_modules():
        if isinstance(module, FormattedWeights):
            for name, fmt in module.formats.items():
                t = module.weight_tensors(name)
                blocks = isinstance(fmt, Blocks)
                ours[f"{prefix}.{name}"] = t[""].flatten(-2) if blocks else fmt.dequantize(t, torch.float64)
    state = model.state_dict()
    for name in tensor_shapes(checkpoint.config):
        ours.setdefault(name, state.get(name))
    return gguf_named(to_hub(ours, checkpoint.config), hub_hparams(path))


def gguf_values(t) -> torch.Tensor:
    """A GGUF tensor's values as the gguf package reads them, in float64."""
    return torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type))).double()


def fields(reader: gguf.GGUFReader) -> dict:
    """Every metadata key of a file -> its value (arrays as lists)."""
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def prompt_and_step(model, idx: torch.Tensor) -> tuple:
    """The logits of a prompt of 11 tokens (more than the decode kernels take; the prompt kernels, which
    take int8 and int4 but not the GGUF types they become, turned off: every format's weights are read back
    to floats and multiplied by PyTorch) and of one decode step after it."""
    model.setup_caches(1, 64)
    with torch.no_grad():
        with cpu_kernels.turned_off():
            prompt = model(idx[:, :-1], torch.arange(idx.size(1) - 1))
        return prompt, model(idx[:, -1:], torch.tensor([idx.size(1) - 1]))


# ----------------------------------------------------------------------------- the file llama.cpp reads

def test_a_float32_export_is_the_converters_file(instruct, tmp_path):
    """The export of a float32 model.pth against the converter's file of the same hub checkpoint (written as
    convert_hf_to_gguf.py does, by the gguf package's own writer and tensor map): the same tensors, names,
    types, shapes and bytes, the same metadata, plus the general.* keys the converter adds from the folder."""
    ours = gguf.GGUFReader(export_gguf(instruct, tmp_path / "ours.gguf"))
    folder = instruct.parent
    theirs = gguf.GGUFReader(write_gguf(tmp_path / "theirs.gguf", folder,
                                        gguf_named(read_hub_tensors(folder), hub_hparams(instruct))))
    mine = {t.name: t for t in ours.tensors}
    assert sorted(mine) == sorted(t.name for t in theirs.tensors)
    for t in theirs.tensors:
        assert (mine[t.name].tensor_type, list(mine[t.name].shape)) == (t.tensor_type, list(t.shape)), t.name
        assert np.array_equal(mine[t.name].data, t.data), t.name
    mine, want = fields(ours), fields(theirs)
    assert {k: v for k, v in mine.items() if k in want and k != "general.name"} == \
           {k: v for k, v in want.items() if k != "general.name"}
    assert set(mine) - set(want) == {"general.type", "general.size_label", "general.quantization_version"}
    assert mine["general.file_type"] == gguf.LlamaFileType.ALL_F32
    assert "[INST]" in mine["tokenizer.chat_template"] and mine["tokenizer.ggml.add_bos_token"] is True


def test_the_vocabulary_reads_back_with_the_same_ids(instruct, stdlib, tmp_path):
    """Mixtral's tokenizer (a dummy space prefix) and the shipped model's (none, which the file must say:
    llama.cpp assumes one): the tokenizer our loader builds from each exported file gives tokenizer.model's
    ids and text on strings tokenizers disagree on; the Instruct chat template comes along."""
    for path in (instruct, stdlib):
        exported = open_checkpoint(export_gguf(path, tmp_path / f"{path.parent.name}.gguf"))
        original = spm.SentencePieceProcessor(model_file=str(path.parent / "tokenizer.model"))
        tokenizer = load_tokenizer(exported)
        for text in HARD_STRINGS:
            ids = original.encode(text)
            assert tokenizer.encode(text) == ids, (path.parent.name, text)
            assert tokenizer.decode(ids) == original.decode(ids)
        assert is_instruct(exported) == (path == instruct)
    assert fields(gguf.GGUFReader(tmp_path / f"{stdlib.parent.name}.gguf"))["tokenizer.ggml.add_space_prefix"] is False



def test_an_instruct_model_without_its_chat_template_is_warned_of(stdlib, tmp_path, capsys):
    """A folder named as an Instruct model (as scripts/download.py names it) with no tokenizer_config.json: the
    file would carry no chat template, and llama.cpp would not know the [INST] format: said on stderr."""
    folder = tmp_path / "Mixtral-8x7B-Instruct-v0.1"
    folder.mkdir()
    for f in ("config.json", "model.pth", "tokenizer.model"):
        (folder / f).symlink_to(stdlib.parent / f)
    export_gguf(folder / "model.pth")
    assert "no tokenizer_config.json with Mixtral Instruct's chat template" in capsys.readouterr().err
    export_gguf(stdlib, tmp_path / "base.gguf")  # a base model's folder: nothing to say
    assert "warning" not in capsys.readouterr().err

# ----------------------------------------------------------------------------- each format, exactly

# Each scheme: quantize.py's file, the GGUF types of its attention, experts' gate and up, down projections and
# head, and the file type llama-quantize would name it.
SCHEMES = {
    "full": ("model.pth", (T.BF16, T.BF16, T.BF16, T.BF16), gguf.LlamaFileType.MOSTLY_BF16),
    "int8": ("model_int8.pth", (T.Q8_0, T.Q8_0, T.Q8_0, T.Q8_0), gguf.LlamaFileType.MOSTLY_Q8_0),
    "int4:g32": ("model_int4.g32.pth", (T.Q8_0, T.Q4_0, T.Q4_0, T.Q8_0), gguf.LlamaFileType.MOSTLY_Q4_0),
    "int4:g128:attn4": ("model_int4.g128.attn4.pth", (T.Q4_0, T.Q4_0, T.Q4_0, T.Q4_0), gguf.LlamaFileType.MOSTLY_Q4_0),
    "q8_0": ("model_q8_0.pth", (T.Q8_0, T.Q8_0, T.Q8_0, T.Q8_0), gguf.LlamaFileType.MOSTLY_Q8_0),
    "experts=q4_0,attention=int8,output=q8_0,down=int4:g64": (
        "model_experts.q4_0.attention.int8.output.q8_0.down.int4.g64.pth", (T.Q8_0, T.Q4_0, T.Q4_0, T.Q8_0),
        gguf.LlamaFileType.MOSTLY_Q4_0),
}


def part(gguf_name: str) -> int:
    """0 attention, 1 experts' gate and up, 2 down projections, 3 head; None for the embedding table, the norms
    and the router, which stay in full precision."""
    for i, keys in enumerate((("attn_q.", "attn_k.", "attn_v.", "attn_output."), ("ffn_gate_exps", "ffn_up_exps"),
                              ("ffn_down_exps",), ("output.weight",))):
        if any(key in gguf_name for key in keys):
            return i
    return None


@pytest.mark.parametrize("spec", SCHEMES)
def test_each_format_is_written_without_rounding(stdlib, tmp_path, spec):
    """The shipped model in each scheme (quantize.py's files), exported and read back: every weight in the
    GGUF type that holds it (int8 as Q8_0, int4 as Q4_0 with groups of 64 or 128 as 2 or 4 blocks, block
    types as themselves, bf16 as BF16), with exactly the values our format's dequantize gives in float64
    (through the gguf package's own dequantizer), a block type's bytes as they are; and our loader's
    logits of a prompt from the file are those from the checkpoint, bit for bit."""
    name, types, file_type = SCHEMES[spec]
    path = stdlib if spec == "full" else quantize_checkpoint(stdlib, spec)
    assert path.name == name
    exported = export_gguf(path, tmp_path / "model.gguf")
    reader = gguf.GGUFReader(exported)
    want = expected_tensors(path)
    assert sorted(want) == sorted(t.name for t in reader.tensors)
    for t in reader.tensors:
        expected = want[t.name]
        if expected.dtype == torch.uint8:  # a block type: its bytes
            assert np.array_equal(t.data.reshape(-1), expected.reshape(-1).numpy()), t.name
        else:
            assert torch.equal(gguf_values(t), expected.double()), t.name
        if part(t.name) is not None:
            assert t.tensor_type == types[part(t.name)], t.name
        else:  # the embedding table as stored; the norms and the router in F32, as the converter writes them
            assert t.tensor_type == (T.BF16 if t.name == "token_embd.weight" else T.F32), t.name
    assert fields(reader)["general.file_type"] == file_type

    idx = torch.randint(0, 2048, (1, 12), generator=torch.Generator().manual_seed(0))
    source = load_model(open_checkpoint(path), "cpu", torch.float32)
    from_file = load_model(open_checkpoint(exported), "cpu", torch.float32)
    (prompt, step), (file_prompt, file_step) = prompt_and_step(source, idx), prompt_and_step(from_file, idx)
    assert torch.equal(file_prompt, prompt)
    if spec in ("full", "q8_0"):  # the same formats on both sides: the same arithmetic, decoding too
        assert torch.equal(file_step, step)


def test_k_quant_mixes_keep_their_bytes_and_name(k_quant_model, tmp_path, capsys):
    """A Q4_K_M-like mix (q4_k experts and attention, q6_k down projections and head): every block's bytes
    as quantize.py wrote them, and general.file_type MOSTLY_Q4_K_M, as llama-quantize names such a mix;
    without the q6_k down projections, MOSTLY_Q4_K_S. The vocabulary is padded to the embedding's rows with
    unused [PADn] tokens, as the converter pads it (llama.cpp wants a token per row), and reads back."""
    for spec, file_type in (("experts=q4_k,attention=q4_k,output=q6_k,down=q6_k", gguf.LlamaFileType.MOSTLY_Q4_K_M),
                            ("experts=q4_k,attention=q4_k,output=q6_k", gguf.LlamaFileType.MOSTLY_Q4_K_S)):
        path = quantize_checkpoint(k_quant_model, spec)
        reader = gguf.GGUFReader(export_gguf(path, tmp_path / "model.gguf"))
        want = expected_tensors(path)
        for t in reader.tensors:
            if want[t.name].dtype == torch.uint8:
                assert np.array_equal(t.data.reshape(-1), want[t.name].reshape(-1).numpy()), t.name
        types = {t.name: t.tensor_type for t in reader.tensors}
        assert types["blk.1.ffn_up_exps.weight"] == T.Q4_K and types["output.weight"] == T.Q6_K
        assert fields(reader)["general.file_type"] == file_type
    # The demo tokenizer normalizes (nmt_nfkc: a newline becomes a space), which GGUF cannot say: a warning.
    assert "warning:" in capsys.readouterr().err
    original = spm.SentencePieceProcessor(model_file=str(k_quant_model.parent / "tokenizer.model"))
    tokens, types = fields(reader)["tokenizer.ggml.tokens"], fields(reader)["tokenizer.ggml.token_type"]
    assert original.vocab_size() < len(tokens) == 1024 and tokens[-1] == "[PAD1023]"
    assert set(types[original.vocab_size():]) == {gguf.TokenType.UNUSED}
    text = "def main(): return 0"  # no newline: this tokenizer maps it to a space, which GGUF cannot say
    assert load_tokenizer(open_checkpoint(tmp_path / "model.gguf")).encode(text) == original.encode(text)


def test_a_gguf_files_mix_goes_back_byte_for_byte(stdlib, tmp_path):
    """A GGUF file whose q and k are in one type and v in another (Q4_K_M's way: wqkv held in three parts)
    read by our loader and saved as a checkpoint, exported again: each tensor's bytes are the file's."""
    folder = stdlib.parent
    types = {"attn_q.": T.Q4_0, "attn_k.": T.Q4_0, "attn_output.": T.Q4_0, "ffn_gate_exps": T.Q4_0,
             "ffn_up_exps": T.Q4_0, "attn_v.": T.Q8_0, "ffn_down_exps": T.Q8_0, "output.weight": T.Q8_0}
    source = {}
    for name, t in gguf_named(to_hub(torch.load(stdlib, weights_only=True), open_checkpoint(stdlib).config),
                              hub_hparams(stdlib)).items():
        qtype = next((q for key, q in types.items() if key in name), None)
        if qtype is None:
            source[name] = t  # float32
        else:  # the gguf package's own quantizer
            source[name] = (qtype, gguf.quants.quantize(t.float().reshape(-1, t.shape[-1]).numpy(), qtype)
                            .reshape(*t.shape[:-1], -1))
    original = write_gguf(tmp_path / "original.gguf", folder, source)
    state_dict, scheme = load_weights(open_checkpoint(original))
    assert "layers.0.attention.wqkv.v" in state_dict  # three parts
    shutil.copytree(folder, tmp_path / "mix", ignore=shutil.ignore_patterns("*.pth", "*.gguf"))
    torch.save(state_dict, tmp_path / "mix" / "model_mix.pth")
    exported = gguf.GGUFReader(export_gguf(tmp_path / "mix" / "model_mix.pth"))
    want = {t.name: t for t in gguf.GGUFReader(original).tensors}
    assert sorted(t.name for t in exported.tensors) == sorted(want)
    for t in exported.tensors:
        assert t.tensor_type == want[t.name].tensor_type, t.name
        assert np.array_equal(t.data, want[t.name].data), t.name


# ----------------------------------------------------------------------------- refusals

def test_scales_fp16_cannot_hold_are_refused_naming_the_weight(stdlib, tmp_path, capsys):
    """int8 scales below fp16's normal range with bits fp16 has not (bf16 keeps them), or above its largest
    value: one line naming the weight, and no file written."""
    path = quantize_checkpoint(stdlib, "int8")
    state_dict = torch.load(path, weights_only=True)
    for value in (2.0 ** -20 * (1 + 2.0 ** -7), 1e5):
        bad = dict(state_dict)
        bad["layers.2.attention.wo.scales"] = bad["layers.2.attention.wo.scales"].clone()
        bad["layers.2.attention.wo.scales"][5] = value
        torch.save(bad, path.with_name("model_bad.pth"))
        output = tmp_path / "bad.gguf"
        capsys.readouterr()  # quantize.py's progress
        fails_cleanly(main, ["--checkpoint_path", path.with_name("model_bad.pth"), "--output", output], capsys,
                      "layers.2.attention.wo", "not exact in fp16")
        assert not output.exists() and not list(tmp_path.iterdir())


def test_an_int8_checkpoint_of_a_float32_model_is_refused(instruct, capsys, tmp_path):
    """Its scales are float32, which fp16 holds only by chance: refused before anything is written."""
    path = quantize_checkpoint(instruct, "int8")
    capsys.readouterr()  # quantize.py's progress
    fails_cleanly(main, ["--checkpoint_path", path, "--output", tmp_path / "x.gguf"], capsys,
                  "layers.0.attention.wqkv.weight", "not exact in fp16", "bf16")
    assert not list(tmp_path.iterdir())


def test_bad_paths_are_one_line(stdlib, tmp_path, capsys):
    fails_cleanly(main, ["--checkpoint_path", stdlib, "--output", tmp_path / "no" / "such" / "x.gguf"], capsys,
                  "--output", "is not a folder this user can write into")
    fails_cleanly(main, ["--checkpoint_path", stdlib, "--output", tmp_path], capsys, "--output", "is a folder")
    exported = export_gguf(stdlib, tmp_path / "model.gguf")
    capsys.readouterr()  # its progress
    fails_cleanly(main, ["--checkpoint_path", exported], capsys, "is a GGUF file already")
    fails_cleanly(main, ["--checkpoint_path", tmp_path / "missing.pth"], capsys, "not found")
    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    for f in ("config.json", "model.pth"):
        (no_tokenizer / f).symlink_to(stdlib.parent / f)
    fails_cleanly(main, ["--checkpoint_path", no_tokenizer / "model.pth"], capsys, "tokenizer.model")
    assert not list(no_tokenizer.glob("*.gguf*"))


def test_the_script_writes_beside_the_checkpoint(stdlib):
    """As a user runs it: the file named after the checkpoint, beside it, and one line saying so."""
    result = run_script(REPO / "scripts" / "export_gguf.py", "--checkpoint_path", stdlib, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"wrote {stdlib.with_suffix('.gguf')}"
    assert open_checkpoint(stdlib.with_suffix(".gguf")).config == open_checkpoint(stdlib).config


@pytest.fixture(scope="module")
def big(k_quant_model, tmp_path_factory):
    """Mixtral's proportions in small: 4 layers of 8 experts, which are most of the file (as in Mixtral 8x7B),
    one layer's stack of one of them a small part of it."""
    config = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=256,
                  vocab_size=1024)
    folder = write_hub_checkpoint(tmp_path_factory.mktemp("big"), config, k_quant_model.parent / "tokenizer.model",
                                  dtype=torch.bfloat16, n_shards=1)
    return quantize_checkpoint(convert_hf_checkpoint(folder), "int8")


def test_exporting_holds_one_tensor_not_the_model(big, tmp_path):
    """Exporting an int8 checkpoint (every weight's bytes made anew: Q8_0 blocks) grows a fresh process's
    anonymous memory by less than a third of the file: the checkpoint stays mmapped and one tensor's bytes are
    made at a time (the largest, an expert stack, is under a tenth of the file here). Measured as
    tests/test_quantize.py measures quantize.py: the second of two runs, with freed blocks handed back."""
    output = tmp_path / "model.gguf"
    result = run_script(REPO / "tests" / "memory_worker.py", "export", big, output,
                        env={"OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"})
    assert result.returncode == 0, result.stderr
    growth = int(result.stdout.split()[-1]) * 1024
    largest = max(t.data.nbytes for t in gguf.GGUFReader(output).tensors)
    assert largest < output.stat().st_size / 10
    assert growth < output.stat().st_size / 3, (growth, largest, output.stat().st_size)


def test_our_log_probabilities_in_llama_cpps_file(stdlib, tmp_path):
    """scripts/llama_cpp_logits.py writes what llama-perplexity --kl-divergence reads: its header, the tokens
    after a BOS, and for each chunk's second half each log-probability as a step count above the smallest one
    kept, within half a step of the model's own (float64) log_softmax."""
    from scripts.llama_cpp_logits import write_logits
    path = export_gguf(stdlib, tmp_path / "model.gguf")
    text = (REPO / "model.py").read_text()[:3000]
    (tmp_path / "text.txt").write_text(text)
    write_logits(path, tmp_path / "text.txt", 64, tmp_path / "ours.bin", torch.float32)
    data = (tmp_path / "ours.bin").read_bytes()
    assert data[:8] == b"_logits_"
    context, vocab, n_chunk = np.frombuffer(data[8:20], dtype=np.int32)
    checkpoint = open_checkpoint(path)
    tokens = [1] + load_tokenizer(checkpoint).encode(text)
    assert (context, vocab, n_chunk) == (64, 2048, len(tokens) // 64)
    assert np.frombuffer(data[20:20 + 4 * 64 * n_chunk], dtype=np.int32).tolist() == tokens[:64 * n_chunk]
    rows = np.frombuffer(data[20 + 4 * 64 * n_chunk:], dtype=np.uint16).reshape(n_chunk, 31, 2048 + 4)
    model = load_model(checkpoint, "cpu", torch.float32)
    model.setup_caches(1, 64)
    for i in (0, n_chunk - 1):
        chunk = torch.tensor([[1] + tokens[i * 64 + 1:(i + 1) * 64]])
        with torch.no_grad():
            want = torch.log_softmax(model(chunk, torch.arange(64))[0, 32:63].double(), dim=-1)  # [31, V]
        step, lowest = (torch.from_numpy(rows[i, :, :4].copy().view(np.float32)).double().unbind(-1))
        codes = torch.from_numpy(rows[i, :, 4:].astype(np.int64)).double()
        kept = codes > 0  # the rest lie more than 16 below the top: the file keeps them at its floor
        got = lowest[:, None] + step[:, None] * codes
        # Half a step, and float32's rounding of the differences of log-probabilities up to 16 (1e-5 is 80 ulps)
        assert ((got - want).abs()[kept] <= step[:, None].expand_as(got)[kept] / 2 + 1e-5).all()
        assert (want[~kept] <= lowest[:, None].expand_as(want)[~kept] + step[:, None].expand_as(want)[~kept]).all()
