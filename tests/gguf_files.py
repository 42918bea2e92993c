"""GGUF files written in the tests as llama.cpp's converter (convert_hf_to_gguf.py, class LlamaModel) writes
Mixtral, with the gguf package's own writer, tensor-name map and vocabulary classes: what the GGUF reader and
loader are checked against."""
import json
import shutil

import gguf
import numpy as np
import torch
from safetensors.torch import load_file

from scripts.make_tiny_checkpoint import MIXTRAL_CONFIG


def vocabulary(folder, current: bool):
    """(tokens, scores, types) as the converter's _create_vocab_sentencepiece makes them: the pieces of
    tokenizer.model through the gguf package's own SentencePieceVocab; converters since mid-2024 then
    retype the added tokens tokenizer_config.json lists (<unk>, <s>, </s>) as control, score -1000."""
    tokens, scores, types = map(list, zip(*gguf.SentencePieceVocab(folder).all_tokens()))
    tok_config = folder / "tokenizer_config.json"
    if current and tok_config.is_file():
        for i, token in json.loads(tok_config.read_text()).get("added_tokens_decoder", {}).items():
            tokens[int(i)], scores[int(i)] = token["content"].encode(), -1000.0
            types[int(i)] = gguf.TokenType.CONTROL if token["special"] else gguf.TokenType.USER_DEFINED
    return tokens, scores, types


def llama_cpp_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """convert_hf_to_gguf.py's LlamaModel.permute: each head's rows [0, h, 1, h + 1, ...], h = head_dim / 2."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_named(hub: dict, hp: dict) -> dict:
    """GGUF name -> tensor, as the converter's modify_tensors makes them from the hub's: q and k
    permuted, each layer's experts stacked [E, rows, cols], names through gguf's own tensor map."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, hp["num_hidden_layers"])
    n_head, n_kv = hp["num_attention_heads"], hp["num_key_value_heads"]
    out = {}
    for name, t in hub.items():
        if ".experts." in name:
            continue
        if name.endswith("q_proj.weight"):
            t = llama_cpp_permute(t, n_head)
        if name.endswith("k_proj.weight"):
            t = llama_cpp_permute(t, n_kv)
        out[names.get_name(name, try_suffixes=(".weight",))] = t
    for i in range(hp["num_hidden_layers"]):
        for w in ("w1", "w2", "w3"):
            stacked = torch.stack([hub[f"model.layers.{i}.block_sparse_moe.experts.{e}.{w}.weight"]
                                   for e in range(hp["num_local_experts"])])
            out[names.get_name(f"layers.{i}.feed_forward.experts.{w}.weight", try_suffixes=(".weight",))] = stacked
    return out


def write_gguf(path, folder, tensors: dict = None, arch="llama", current_vocab=True, vocab=True, edit=None):
    """A GGUF file of the hub checkpoint in `folder` (config.json, tokenizer.model, maybe
    tokenizer_config.json) with the metadata the converter writes (TextModel and LlamaModel's
    set_gguf_parameters, _set_vocab_sentencepiece, SpecialVocab); tensors: GGUF name -> float tensor,
    written as float32, or (GGML type, raw bytes) written as they are. edit(writer) changes the metadata before
    it is written."""
    hp = json.loads((folder / "config.json").read_text())
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name("Mixtral")
    writer.add_block_count(hp["num_hidden_layers"])
    writer.add_context_length(hp["max_position_embeddings"])
    writer.add_embedding_length(hp["hidden_size"])
    writer.add_feed_forward_length(hp["intermediate_size"])
    writer.add_head_count(hp["num_attention_heads"])
    writer.add_head_count_kv(hp["num_key_value_heads"])
    writer.add_rope_freq_base(hp["rope_parameters"]["rope_theta"] if "rope_parameters" in hp else hp["rope_theta"])
    writer.add_layer_norm_rms_eps(hp["rms_norm_eps"])
    writer.add_expert_count(hp["num_local_experts"])
    writer.add_expert_used_count(hp["num_experts_per_tok"])
    if "head_dim" in hp:
        writer.add_key_length(hp["head_dim"])
        writer.add_value_length(hp["head_dim"])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_vocab_size(hp["vocab_size"])
    writer.add_rope_dimension_count(hp.get("head_dim") or hp["hidden_size"] // hp["num_attention_heads"])
    if vocab:
        tokens, scores, types = vocabulary(folder, current_vocab)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        gguf.SpecialVocab(folder, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)
        writer.add_unk_token_id(0)  # SpecialVocab finds it in tokenizer.json, which these folders lack
    if edit:
        edit(writer)
    for name, t in (tensors or {"output_norm.weight": torch.ones(hp["hidden_size"])}).items():
        if isinstance(t, tuple):  # (GGML type, its raw bytes uint8 [..., bytes per row]): written as they are
            qtype, raw = t
            writer.add_tensor(name, np.ascontiguousarray(raw), raw_dtype=qtype)
        else:
            writer.add_tensor(name, t.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def hub_folder(folder, config: dict, tokenizer_path, tokenizer_config=None):
    """config.json (MIXTRAL_CONFIG with `config` over it) and tokenizer.model, without weights."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {**MIXTRAL_CONFIG, **config}
    if "rope_parameters" in config:
        cfg.pop("rope_theta")
    (folder / "config.json").write_text(json.dumps(cfg))
    shutil.copy(tokenizer_path, folder / "tokenizer.model")
    if tokenizer_config:
        (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return folder


def read_hub_tensors(folder) -> dict:
    tensors = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors
