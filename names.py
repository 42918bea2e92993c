# The one table of tensor names: ours (model.py's state dict), the hub's (mistralai/Mixtral-8x7B-v0.1's
# safetensors, which transformers reads) and GGUF's (llama.cpp's files), and how each of ours is made of theirs.
# The converter, scripts/train_tiny.py, the GGUF reader and the tests derive what they need from it.
from typing import Callable

import torch

from model import ModelArgs

# Each of our tensors ({i}: a layer), the hub's tensor(s) it is made of, GGUF's, and how:
#   ""         one tensor, as it is;
#   "q,k,v"    the q, k and v projections ({p}) stacked along the rows: one matmul per token, not three;
#   "experts"  each expert's ({e}) matrix stacked along a new first axis: [E, out, in] (GGUF stacks them too).
# The rotary layout is the hub's (model.apply_rope): the hub's tensors are taken as they are; GGUF's q and k
# rows are reordered for llama.cpp's layout (gguf_file.undo_rope_permute puts them back).
NAMES = (
    ("tok_embeddings.weight", "model.embed_tokens.weight", "token_embd.weight", ""),
    ("layers.{i}.attention_norm.weight", "model.layers.{i}.input_layernorm.weight", "blk.{i}.attn_norm.weight", ""),
    ("layers.{i}.attention.wqkv.weight", "model.layers.{i}.self_attn.{p}_proj.weight", "blk.{i}.attn_{p}.weight",
     "q,k,v"),
    ("layers.{i}.attention.wo.weight", "model.layers.{i}.self_attn.o_proj.weight", "blk.{i}.attn_output.weight", ""),
    ("layers.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight", "blk.{i}.ffn_norm.weight", ""),
    ("layers.{i}.block_sparse_moe.gate.weight", "model.layers.{i}.block_sparse_moe.gate.weight",
     "blk.{i}.ffn_gate_inp.weight", ""),
    ("layers.{i}.block_sparse_moe.w1", "model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight",
     "blk.{i}.ffn_gate_exps.weight", "experts"),
    ("layers.{i}.block_sparse_moe.w2", "model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight",
     "blk.{i}.ffn_down_exps.weight", "experts"),
    ("layers.{i}.block_sparse_moe.w3", "model.layers.{i}.block_sparse_moe.experts.{e}.w3.weight",
     "blk.{i}.ffn_up_exps.weight", "experts"),
    ("norm.weight", "model.norm.weight", "output_norm.weight", ""),
    # Tied embeddings: neither the hub nor GGUF has a head of its own; the embedding serves.
    ("output.weight", "lm_head.weight", "output.weight", ""),
)


def gguf_names(config: ModelArgs) -> dict:
    """Each of our tensor names -> (how it is made, GGUF's names of the tensors it is made of, in order). GGUF
    files stack each layer's experts into one tensor: an 'experts' tensor is one GGUF tensor."""
    names = {}
    for ours, _, gguf, made in NAMES:
        for i in range(config.n_layer) if "{i}" in ours else [None]:
            parts = [gguf.format(i=i, p=p) for p in "qkv"] if made == "q,k,v" else [gguf.format(i=i)]
            if ours == "output.weight" and config.tie_word_embeddings:
                parts = ["token_embd.weight"]
            names[ours.format(i=i)] = (made, parts)
    return names


def hub_names(config: ModelArgs) -> dict:
    """Each of our tensor names -> (how it is made, the hub's names of the tensors it is made of, in order)."""
    names = {}
    for ours, hub, _, made in NAMES:
        for i in range(config.n_layer) if "{i}" in ours else [None]:
            if made == "q,k,v":
                parts = [hub.format(i=i, p=p) for p in "qkv"]
            elif made == "experts":
                parts = [hub.format(i=i, e=e) for e in range(config.num_experts)]
            else:
                parts = [hub.format(i=i)]
            if ours == "output.weight" and config.tie_word_embeddings:
                parts = ["model.embed_tokens.weight"]
            names[ours.format(i=i)] = (made, parts)
    return names


def tensor_shapes(config: ModelArgs) -> dict:
    """Each of our full-precision tensor names -> its shape."""
    D, I, V, E = config.dim, config.intermediate_size, config.vocab_size, config.num_experts
    q_size, kv_size = config.n_head * config.head_dim, config.n_local_heads * config.head_dim
    of_layer = {"attention_norm.weight": (D,), "attention.wqkv.weight": (q_size + 2 * kv_size, D),
                "attention.wo.weight": (D, q_size), "ffn_norm.weight": (D,), "block_sparse_moe.gate.weight": (E, D),
                "block_sparse_moe.w1": (E, I, D), "block_sparse_moe.w2": (E, D, I), "block_sparse_moe.w3": (E, I, D)}
    of_model = {"tok_embeddings.weight": (V, D), "norm.weight": (D,), "output.weight": (V, D)}
    return {name: of_layer[name.split(".", 2)[2]] if name.startswith("layers.") else of_model[name]
            for name in hub_names(config)}


def hub_parts(made: str, t: torch.Tensor, config: ModelArgs) -> list:
    """Our tensor t cut into the hub's tensors it is made of (NAMES says how)."""
    if made == "q,k,v":
        q_size, kv_size = config.n_head * config.head_dim, config.n_local_heads * config.head_dim
        return list(t.split([q_size, kv_size, kv_size]))
    if made == "experts":
        return list(t.unbind(0))
    return [t]


def joined(made: str, parts: list) -> torch.Tensor:
    """The hub's tensors made into ours: hub_parts backwards."""
    return torch.cat(parts) if made == "q,k,v" else torch.stack(parts) if made == "experts" else parts[0]


def hub_order(config: ModelArgs) -> list:
    """The hub's tensor names in the hub's order: the embedding, each layer's tensors (its experts last, each
    expert's w1, w2 and w3 together), the final norm and the head."""
    names = hub_names(config)
    order = list(names["tok_embeddings.weight"][1])
    for i in range(config.n_layer):
        rows = [(made, parts) for ours, (made, parts) in names.items() if ours.startswith(f"layers.{i}.")]
        order += [name for made, parts in rows if made != "experts" for name in parts]
        order += [parts[e] for e in range(config.num_experts) for made, parts in rows if made == "experts"]
    return order + [name for name in names["norm.weight"][1] + names["output.weight"][1] if name not in order]


def hub_tensor_shapes(config: ModelArgs) -> dict:
    """Each of the hub's tensor names -> its shape, in the hub's order."""
    shapes = {}
    for ours, shape in tensor_shapes(config).items():
        made, names = hub_names(config)[ours]
        parts = hub_parts(made, torch.empty(shape, device="meta"), config)
        shapes.update({name: tuple(part.shape) for name, part in zip(names, parts)})
    return {name: shapes[name] for name in hub_order(config)}


def to_hub(state_dict: dict, config: ModelArgs) -> dict:
    """Our full-precision tensors under the hub's names, in the hub's order (the converter backwards)."""
    hub = {}
    for ours, (made, names) in hub_names(config).items():
        hub.update(zip(names, hub_parts(made, state_dict[ours], config)))
    return {name: hub[name] for name in hub_tensor_shapes(config)}


def from_hub(read: Callable, config: ModelArgs) -> dict:
    """Our tensors, each made of the hub's tensors that read(name) returns."""
    return {ours: joined(made, [read(name) for name in names]) for ours, (made, names) in hub_names(config).items()}
