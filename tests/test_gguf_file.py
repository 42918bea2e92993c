"""gguf_file.py reads GGUF files written here by the gguf package's own writer the way llama.cpp's
converter (convert_hf_to_gguf.py, class LlamaModel) writes Mixtral: the model's shape against the hub's
config.json, the tokenizer against Mixtral's tokenizer.model, the tensors against the hub's safetensors
(a real trained Mixtral, assets/tiny-stdlib), and damaged or foreign files refused in one line."""
import json

import gguf
import pytest
import torch

from conftest import CONFIGS, REPO
from gguf_files import gguf_named, hub_folder, llama_cpp_permute, read_hub_tensors, write_gguf
from errors import UserError
from gguf_file import (chat_template, config_from_gguf, gguf_tensors, is_instruct_template, open_gguf,
                       tokenizer_from_gguf, undo_rope_permute)
from checkpoint import read_config

TINY_STDLIB = REPO / "assets" / "tiny-stdlib"

# Mixtral-8x7B-Instruct-v0.1's chat template, as its tokenizer_config.json published it.
INSTRUCT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")

# The hub's tokenizer_config.json of Mixtral-8x7B-Instruct-v0.1 (the entries the converter reads).
TOKENIZER_CONFIG = {
    "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
    "pad_token": None, "legacy": True, "tokenizer_class": "LlamaTokenizer", "chat_template": INSTRUCT_TEMPLATE,
    "added_tokens_decoder": {str(i): {"content": c, "lstrip": False, "normalized": False, "rstrip": False,
                                      "single_word": False, "special": True}
                             for i, c in enumerate(["<unk>", "<s>", "</s>"])},
}


# ----------------------------------------------------------------------------- the tokenizer

# Strings where a tokenizer's settings show: the dummy prefix, runs of spaces (kept, not collapsed),
# newlines and tabs, characters the vocabulary lacks (byte fallback), control pieces typed as text.
HARD_STRINGS = [
    "", " ", "hello", " hello", "  hello", "hello ", "a  b   c    d", "\n", "line one\nline two\n\n\tindented",
    "\t\ttabs\t", "emoji 😀🦙 and CJK 我想在工作 日本語", "bytes \x00\x01\x7f \U0001f9ec 𝔘𝔫𝔦", "ÀÉÎÕÜ café naïve",
    "[INST] hi [/INST]", "<s> typed as text </s> <unk>", "def f(x):\n    return x  # ok\n", "é" * 3 + "\u0301",
    "The quick brown fox. " * 200,
]


@pytest.fixture(scope="module", params=["2023 converter", "current converter"])
def vocab_gguf(request, tmp_path_factory, tokenizer_path):
    """Mixtral 8x7B Instruct's metadata and vocabulary; 'current converter' retypes <unk> as control."""
    tmp = tmp_path_factory.mktemp("vocab")
    folder = hub_folder(tmp / "hub", {}, tokenizer_path, TOKENIZER_CONFIG)
    return open_gguf(write_gguf(tmp / "mixtral.gguf", folder, current_vocab=request.param == "current converter"))


def test_tokenizer_from_gguf_gives_mixtral_tokenizer_ids(vocab_gguf, tokenizer):
    ours = tokenizer_from_gguf(vocab_gguf)
    assert ours.vocab_size() == tokenizer.vocab_size() == 32000
    assert [ours.id_to_piece(i) for i in range(32000)] == [tokenizer.id_to_piece(i) for i in range(32000)]
    assert (ours.bos_id(), ours.eos_id(), ours.unk_id()) == (tokenizer.bos_id(), tokenizer.eos_id(),
                                                              tokenizer.unk_id()) == (1, 2, 0)
    for text in HARD_STRINGS:
        ids = ours.encode(text)
        assert ids == tokenizer.encode(text), text
        assert ours.decode(ids) == text
    assert ours.encode("\x00")[-1] == tokenizer.piece_to_id("<0x00>")  # no piece has it: byte fallback


def test_chat_template_is_read_and_recognised(vocab_gguf, tmp_path):
    assert chat_template(vocab_gguf) == INSTRUCT_TEMPLATE
    assert is_instruct_template(chat_template(vocab_gguf))
    base = open_gguf(write_gguf(tmp_path / "base.gguf", TINY_STDLIB))  # no tokenizer_config.json: no template
    assert chat_template(base) is None and not is_instruct_template(None)
    assert not is_instruct_template("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}")


# ----------------------------------------------------------------------------- the model's shape

@pytest.mark.parametrize("config", [
    {}, {"num_hidden_layers": 56, "hidden_size": 6144, "num_attention_heads": 48, "intermediate_size": 16384,
         "vocab_size": 32768, "max_position_embeddings": 65536},  # Mixtral 8x7B, 8x22B
    *CONFIGS.values(), {**CONFIGS["gqa_top2"], "rms_norm_eps": 1e-6, "rope_theta": 5e5, "tie_word_embeddings": True},
], ids=["8x7B", "8x22B", *CONFIGS, "eps-1e-6"])
def test_config_from_gguf_is_what_config_json_says(config, tmp_path, tokenizer_path):
    folder = hub_folder(tmp_path, config, tokenizer_path)
    expected = read_config(folder / "config.json")
    # The converter writes no output.weight for tied embeddings; the head is read from token_embd.
    tensors = {"token_embd.weight": torch.zeros(2, 2)} | ({} if expected.tie_word_embeddings
                                                          else {"output.weight": torch.zeros(2, 2)})
    path = write_gguf(tmp_path / "m.gguf", folder, tensors, vocab=False)
    assert config_from_gguf(open_gguf(path)) == expected


def test_vocab_size_comes_from_the_token_list_without_the_key(tmp_path):
    def drop_vocab_size(writer):
        del writer.kv_data[0]["llama.vocab_size"]
    path = write_gguf(tmp_path / "m.gguf", TINY_STDLIB, edit=drop_vocab_size)
    assert config_from_gguf(open_gguf(path)).vocab_size == 2048


# ----------------------------------------------------------------------------- the tensors

@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """assets/tiny-stdlib, a trained Mixtral, converted as llama.cpp converts: (hub tensors, reader)."""
    hub = read_hub_tensors(TINY_STDLIB)
    hp = json.loads((TINY_STDLIB / "config.json").read_text())
    path = write_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf", TINY_STDLIB, gguf_named(hub, hp))
    return hub, open_gguf(path)


def test_gguf_tensors_are_the_hub_tensors_in_our_order(tiny_gguf):
    hub, reader = tiny_gguf
    config = config_from_gguf(reader)
    assert config == read_config(TINY_STDLIB / "config.json")
    tensors = gguf_tensors(reader)
    assert len(tensors) == 3 + 10 * config.n_layer  # embeddings, final norm, head; 10 per layer

    def float_of(name):
        t = tensors[name]
        assert t.type == "F32" and t.data.dtype == torch.uint8 and t.data.shape[-1] == t.shape[-1] * 4
        return t.data.view(torch.float32).reshape(t.shape)

    assert torch.equal(float_of("token_embd.weight"), hub["model.embed_tokens.weight"].float())
    assert torch.equal(float_of("output.weight"), hub["lm_head.weight"].float())
    for i in range(config.n_layer):
        hf = f"model.layers.{i}."
        assert torch.equal(undo_rope_permute(float_of(f"blk.{i}.attn_q.weight"), config.n_head),
                           hub[hf + "self_attn.q_proj.weight"].float())
        assert torch.equal(undo_rope_permute(float_of(f"blk.{i}.attn_k.weight"), config.n_local_heads),
                           hub[hf + "self_attn.k_proj.weight"].float())
        assert torch.equal(float_of(f"blk.{i}.attn_v.weight"), hub[hf + "self_attn.v_proj.weight"].float())
        assert torch.equal(float_of(f"blk.{i}.ffn_gate_inp.weight"), hub[hf + "block_sparse_moe.gate.weight"].float())
        E, I, D = config.num_experts, config.intermediate_size, config.dim
        for ours, w, shape in (("ffn_gate_exps", "w1", (E, I, D)), ("ffn_down_exps", "w2", (E, D, I)),
                               ("ffn_up_exps", "w3", (E, I, D))):
            assert tensors[f"blk.{i}.{ours}.weight"].shape == shape  # [E, rows, cols]
            for e in range(config.num_experts):
                assert torch.equal(float_of(f"blk.{i}.{ours}.weight")[e],
                                   hub[hf + f"block_sparse_moe.experts.{e}.{w}.weight"].float())


def test_gguf_tensors_are_views_of_the_mapped_file(tiny_gguf):
    _, reader = tiny_gguf
    tensors = gguf_tensors(reader)
    base = reader.data.ctypes.data
    for t in reader.tensors:
        assert tensors[t.name].data.data_ptr() == base + t.data_offset  # in place: no copy


def test_undo_rope_permute_undoes_the_converter_on_real_weights(tiny_gguf):
    hub, _ = tiny_gguf
    n_head = json.loads((TINY_STDLIB / "config.json").read_text())["num_attention_heads"]
    q = hub["model.layers.0.self_attn.q_proj.weight"]  # [n_head * 32, D]
    assert q.shape[0] == n_head * 32
    permuted = llama_cpp_permute(q, n_head)
    assert not torch.equal(permuted, q)
    assert torch.equal(undo_rope_permute(permuted, n_head), q)
    # GGUF row 2i is hub row i, GGUF row 2i + 1 hub row i + 16, in each head of 32 rows.
    assert torch.equal(permuted[32 + 2 * 5], q[32 + 5]) and torch.equal(permuted[32 + 2 * 5 + 1], q[32 + 5 + 16])


def ggml_rope(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """llama.cpp's rotary embedding for the 'llama' architecture (GGML_ROPE_TYPE_NORM), in float64:
    dimensions 2i and 2i + 1 of each head rotate together by position * base^(-2i / head_dim)."""
    head_dim = x.shape[-1]
    theta = positions[:, None] * base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    cos, sin = theta.cos()[:, None], theta.sin()[:, None]  # [T, 1, Dh/2]
    out = torch.empty_like(x)
    out[..., 0::2] = x[..., 0::2] * cos - x[..., 1::2] * sin
    out[..., 1::2] = x[..., 0::2] * sin + x[..., 1::2] * cos
    return out


def test_permuted_rows_are_llama_cpp_rotary_layout(tiny_gguf):
    """Why the converter permutes: with the permuted q and k rows, llama.cpp's rotation of adjacent pairs
    gives the vectors transformers' rotation of half-heads gives (reordered alike), so the same attention
    scores; undo_rope_permute brings the hub's layout back for model.py's half-head rotation."""
    from transformers.models.mixtral.modeling_mixtral import apply_rotary_pos_emb
    hub, reader = tiny_gguf
    config = config_from_gguf(reader)
    tensors = gguf_tensors(reader)
    H, Hkv, Dh, T = config.n_head, config.n_local_heads, config.head_dim, 7
    x = torch.randn(T, config.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    positions = torch.arange(100, 100 + T, dtype=torch.float64)

    def project(w, heads):  # [T, heads, Dh]
        return (x @ w.double().T).reshape(T, heads, Dh)

    q_hub = project(hub["model.layers.1.self_attn.q_proj.weight"], H)
    k_hub = project(hub["model.layers.1.self_attn.k_proj.weight"], Hkv)
    # transformers' rotary tables: cos/sin of position * base^(-2i / Dh), repeated over both halves.
    theta = positions[:, None] * config.rope_base ** (-torch.arange(0, Dh, 2, dtype=torch.float64) / Dh)
    emb = torch.cat((theta, theta), dim=-1)  # [T, Dh]
    q_hf, k_hf = apply_rotary_pos_emb(q_hub, k_hub, emb.cos(), emb.sin(), unsqueeze_dim=1)

    def gguf_rows(name):
        t = tensors[name]
        return t.data.view(torch.float32).reshape(t.shape)

    q_cpp = ggml_rope(project(gguf_rows("blk.1.attn_q.weight"), H), positions, config.rope_base)
    k_cpp = ggml_rope(project(gguf_rows("blk.1.attn_k.weight"), Hkv), positions, config.rope_base)
    # Each side is a handful of float64 products and sums of O(1) values: agreement to ~1e-15, 1e-12 allowed.
    interleave = torch.stack((torch.arange(Dh // 2), torch.arange(Dh // 2, Dh)), dim=1).flatten()
    torch.testing.assert_close(q_cpp, q_hf[..., interleave], rtol=0, atol=1e-12)
    torch.testing.assert_close(k_cpp, k_hf[..., interleave], rtol=0, atol=1e-12)
    group = H // Hkv  # scores of query head h against key head h // group, every pair of positions
    scores_hf = torch.einsum("qhd,khd->hqk", q_hf, k_hf.repeat_interleave(group, dim=1))
    scores_cpp = torch.einsum("qhd,khd->hqk", q_cpp, k_cpp.repeat_interleave(group, dim=1))
    torch.testing.assert_close(scores_cpp, scores_hf, rtol=0, atol=1e-10)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_undo_rope_permute_works_on_quantized_bytes(qtype, tmp_path):
    """A quantized row is its own blocks, so permuting rows commutes with quantizing (gguf's own
    quantizer): undoing the permutation on a file's Q8_0/Q4_0 bytes gives the hub rows' quantized bytes."""
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(1))  # 2 heads of 32 rows
    kind = gguf.GGMLQuantizationType[qtype]

    def add_quantized(writer):
        writer.add_tensor("blk.0.attn_k.weight", gguf.quants.quantize(llama_cpp_permute(w, 2).numpy(), kind),
                          raw_dtype=kind)

    reader = open_gguf(write_gguf(tmp_path / "q.gguf", TINY_STDLIB, edit=add_quantized, vocab=False))
    t = gguf_tensors(reader)["blk.0.attn_k.weight"]
    assert t.type == qtype and t.shape == (64, 96)
    assert t.data.shape == (64, gguf.quants.quant_shape_to_byte_shape((96,), kind)[0])
    assert torch.equal(undo_rope_permute(t.data, 2), torch.from_numpy(gguf.quants.quantize(w.numpy(), kind)))


# ----------------------------------------------------------------------------- bad files

def refused(path, *words, read=open_gguf) -> str:
    """read(path) must raise UserError with one line naming each of words."""
    with pytest.raises(UserError) as e:
        read(path)
    message = str(e.value)
    assert "\n" not in message and "Traceback" not in message, message
    for word in words:
        assert word in message, message
    return message


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory):
    """A whole small file: tiny-stdlib's metadata and vocabulary, a few tensors; bytes of the file."""
    tensors = {"token_embd.weight": torch.randn(2048, 128), "output_norm.weight": torch.ones(128),
               "output.weight": torch.randn(2048, 128)}
    path = write_gguf(tmp_path_factory.mktemp("small") / "small.gguf", TINY_STDLIB, tensors)
    return path


def test_missing_path_and_folder_are_refused(tmp_path):
    refused(tmp_path / "absent.gguf", "absent.gguf", "not found")
    refused(tmp_path, "is a folder")


def test_not_gguf_is_refused(tmp_path, small_gguf):
    (tmp_path / "model.pth").write_bytes(b"PK\x03\x04" + bytes(100))  # a torch.save zip
    refused(tmp_path / "model.pth", "not a GGUF file")
    (tmp_path / "empty.gguf").write_bytes(b"")
    refused(tmp_path / "empty.gguf", "not a GGUF file")
    data = bytearray(small_gguf.read_bytes())
    data[4:8] = (1).to_bytes(4, "little")
    (tmp_path / "v1.gguf").write_bytes(data)
    refused(tmp_path / "v1.gguf", "version 1")
    data[4:8] = (3).to_bytes(4, "big")
    (tmp_path / "big.gguf").write_bytes(data)
    refused(tmp_path / "big.gguf", "big-endian")


def test_truncated_files_are_refused(tmp_path, small_gguf):
    data = small_gguf.read_bytes()
    whole = open_gguf(small_gguf)
    last = whole.tensors[-1]
    cuts = {"in the magic": 3, "in the version": 6, "in the counts": 20,
            "in the vocabulary": whole.fields["tokenizer.ggml.scores"].offset + 1000,
            "in the tensor list": whole.tensors[0].field.offset + 10,
            "in the first tensor's data": whole.data_offset + 100,
            "one byte short": last.data_offset + last.n_bytes - 1}
    for where, cut in cuts.items():
        (tmp_path / "cut.gguf").write_bytes(data[:cut])
        refused(tmp_path / "cut.gguf", "truncated")


def test_other_models_are_refused(tmp_path):
    folder = TINY_STDLIB
    qwen = write_gguf(tmp_path / "qwen.gguf", folder, arch="qwen2moe", vocab=False,
                      edit=lambda w: w.add_name("Qwen1.5-MoE-A2.7B"))
    refused(open_gguf(qwen), "Qwen1.5-MoE-A2.7B", "qwen2moe", "not Mixtral", read=config_from_gguf)

    def dense(writer):
        del writer.kv_data[0]["llama.expert_count"]
        del writer.kv_data[0]["llama.expert_used_count"]
    llama = write_gguf(tmp_path / "llama.gguf", folder, vocab=False, edit=dense)
    refused(open_gguf(llama), "without experts", "llama.expert_count", read=config_from_gguf)

    def no_experts_used(writer):
        del writer.kv_data[0]["llama.expert_used_count"]
    refused(open_gguf(write_gguf(tmp_path / "used.gguf", folder, vocab=False, edit=no_experts_used)),
            "llama.expert_used_count", "missing", read=config_from_gguf)

    def gpt2_vocab(writer):
        writer.add_tokenizer_model("gpt2")
    refused(open_gguf(write_gguf(tmp_path / "gpt2.gguf", folder, edit=gpt2_vocab)), "'gpt2'",
            read=tokenizer_from_gguf)


@pytest.mark.parametrize("key, value, vtype", [
    ("llama.block_count", "32", gguf.GGUFValueType.STRING),
    ("llama.rope.freq_base", "1e6", gguf.GGUFValueType.STRING),
    ("llama.attention.head_count", [32] * 4, gguf.GGUFValueType.ARRAY),  # per-layer counts: not Mixtral's
    ("llama.expert_used_count", 0, gguf.GGUFValueType.UINT32),
    ("llama.attention.layer_norm_rms_epsilon", -1.0, gguf.GGUFValueType.FLOAT32),
    ("general.architecture", 7, gguf.GGUFValueType.UINT32),
])
def test_keys_of_the_wrong_type_are_named(key, value, vtype, tmp_path):
    path = write_gguf(tmp_path / "m.gguf", TINY_STDLIB, vocab=False,
                      edit=lambda w: w.add_key_value(key, value, vtype, gguf.GGUFValueType.UINT32
                                                     if vtype == gguf.GGUFValueType.ARRAY else None))
    refused(open_gguf(path), key, "must be", read=config_from_gguf)


def test_bad_vocabularies_are_named(tmp_path):
    folder = TINY_STDLIB

    def tokens_as_numbers(writer):
        writer.add_key_value("tokenizer.ggml.tokens", list(range(2048)), gguf.GGUFValueType.ARRAY,
                             gguf.GGUFValueType.UINT32)
    refused(open_gguf(write_gguf(tmp_path / "a.gguf", folder, edit=tokens_as_numbers)),
            "tokenizer.ggml.tokens", "must be", read=tokenizer_from_gguf)

    def short_scores(writer):
        writer.add_token_scores([0.0] * 10)
    refused(open_gguf(write_gguf(tmp_path / "b.gguf", folder, edit=short_scores)),
            "tokenizer.ggml.scores", "10 entries", read=tokenizer_from_gguf)

    def bos_past_the_end(writer):
        writer.add_bos_token_id(40000)
    refused(open_gguf(write_gguf(tmp_path / "c.gguf", folder, edit=bos_past_the_end)),
            "tokenizer.ggml.bos_token_id", "40000", "2048 tokens", read=tokenizer_from_gguf)


def test_split_files_are_refused(tmp_path):
    path = write_gguf(tmp_path / "m-00001-of-00002.gguf", TINY_STDLIB, vocab=False,
                      edit=lambda w: w.add_uint16("split.count", 2))
    refused(path, "split into 2 files", "llama-gguf-split")
