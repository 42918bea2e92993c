# Everything a checkpoint folder means. A folder as the hub ships it (mistralai/Mixtral-8x7B-v0.1) holds
# config.json, tokenizer.model and sharded safetensors; the converter adds model.pth (our names, bf16) and
# quantize.py adds model_int8.pth, model_int4.g32.pth, ... beside it. Here:
#   - config.json read into ModelArgs, every value checked, and ModelArgs written back as config.json;
#   - the one table between the hub's tensor names and ours, from which the converter, train_tiny.py and the
#     tests derive the names and shapes they need, and the check that a file's tensors fit the config;
#   - a weights file opened (checked, its config read once), loaded by memory map into the served model
#     (layers.py) in the formats its content says, and sharded for a tensor-parallel rank (tp.py);
#   - the tokenizer beside it, whether the model wants Mixtral's [INST] chat format, and the file name a
#     quantized checkpoint gets.
import contextlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from errors import UserError
from formats import Scheme, detect_format, file_tag
from kernels import cpu as cpu_kernels
from layers import build_model
from model import ModelArgs, Transformer
from tp import apply_tp


# ----------------------------------------------------------------------------- JSON files

# What each kind of value in a JSON file the checkpoint comes with must be: (described, test).
JSON_KINDS = {
    "count": ("a positive integer", lambda v: type(v) is int and v > 0),
    "number": ("a positive number", lambda v: type(v) in (int, float) and math.isfinite(v) and v > 0),
    "flag": ("true or false", lambda v: type(v) is bool),
    "text": ("a string", lambda v: type(v) is str),
    "object": ("a JSON object", lambda v: type(v) is dict),
}


REQUIRED = object()  # json_entry's default for a key that must be there


def json_entry(obj: dict, key: str, kind: str, where, default=REQUIRED):
    """obj[key], read from the JSON file `where`, if it is of `kind` (JSON_KINDS); an absent or null key
    gives the default, where there is one. Otherwise a UserError naming the key, the value and the
    file. The converter and the loader read config.json and the safetensors index through it, so that
    a wrong value is named where it is written rather than met later as a TypeError."""
    if obj.get(key) is None and default is not REQUIRED:
        return default
    if key not in obj:
        raise UserError(f"{where}: required key {key!r} is missing")
    described, fits = JSON_KINDS[kind]
    if not fits(obj[key]):
        raise UserError(f"{where}: {key} is {json.dumps(obj[key])}, but it must be {described}; fix the file or "
                        f"download it again")
    return obj[key]


def read_json_object(path, missing: str) -> dict:
    """The JSON object in the file at path; a UserError saying `missing` if there is no such file."""
    try:
        value = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"{path} not found: {missing}") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a folder, not a file: {missing}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise UserError(f"{path} is not a JSON object")
    return value


# ----------------------------------------------------------------------------- config.json

def config_from_hub(cfg: dict, where="config.json") -> ModelArgs:
    """A Hugging Face Mixtral config.json (transformers 4 or 5 spelling), every value checked by json_entry;
    `where` names the file in messages."""
    def get(key, kind, default=REQUIRED):
        return json_entry(cfg, key, kind, where, default)

    if get("hidden_act", "text", "silu") != "silu":
        raise UserError(f"{where}: hidden_act {cfg['hidden_act']!r} is not supported (Mixtral uses silu)")
    # transformers 4 writes rope_theta at the top level, transformers 5 inside rope_parameters.
    rope = get("rope_parameters", "object", {})
    if rope.get("rope_type", "default") != "default":
        raise UserError(f"{where}: rope_type {rope['rope_type']!r} is not supported")
    n_head, dim = get("num_attention_heads", "count"), get("hidden_size", "count")
    try:
        return ModelArgs(
            block_size=get("max_position_embeddings", "count"),
            vocab_size=get("vocab_size", "count"),
            n_layer=get("num_hidden_layers", "count"),
            n_head=n_head,
            dim=dim,
            intermediate_size=get("intermediate_size", "count"),
            n_local_heads=get("num_key_value_heads", "count", n_head),
            head_dim=get("head_dim", "count", dim // n_head),
            rope_base=float(json_entry(rope, "rope_theta", "number", where, get("rope_theta", "number", 1e6))),
            norm_eps=get("rms_norm_eps", "number", 1e-5),
            num_experts=get("num_local_experts", "count"),
            num_activated_experts=get("num_experts_per_tok", "count"),
            sliding_window=get("sliding_window", "count", None),
            tie_word_embeddings=get("tie_word_embeddings", "flag", False),
        )
    except UserError as e:  # values that do not fit together (ModelArgs.__post_init__): name the file too
        raise UserError(str(e).replace("config:", f"{where}:", 1)) from None


def read_config(path) -> ModelArgs:
    """The ModelArgs of the config.json at path."""
    return config_from_hub(read_json_object(path, "the checkpoint folder needs the model's config.json"), path)


def hub_config(c: ModelArgs) -> dict:
    """The config.json entries that describe c: config_from_hub backwards."""
    return dict(hidden_size=c.dim, intermediate_size=c.intermediate_size, num_hidden_layers=c.n_layer,
                num_attention_heads=c.n_head, num_key_value_heads=c.n_local_heads, head_dim=c.head_dim,
                num_local_experts=c.num_experts, num_experts_per_tok=c.num_activated_experts,
                vocab_size=c.vocab_size, max_position_embeddings=c.block_size, rope_theta=c.rope_base,
                rms_norm_eps=c.norm_eps)


# ----------------------------------------------------------------------------- tensor names

# Each of our tensors ({i}: a layer), the hub's tensor(s) it is made of, and how:
#   ""         one tensor, as it is;
#   "q,k,v"    the hub's q, k and v projections ({p}) stacked along the rows: one matmul per token, not three;
#   "experts"  each expert's ({e}) matrix stacked along a new first axis: [E, out, in].
# The rotary layout is the hub's (model.apply_rope): nothing is permuted.
NAMES = (
    ("tok_embeddings.weight", "model.embed_tokens.weight", ""),
    ("layers.{i}.attention_norm.weight", "model.layers.{i}.input_layernorm.weight", ""),
    ("layers.{i}.attention.wqkv.weight", "model.layers.{i}.self_attn.{p}_proj.weight", "q,k,v"),
    ("layers.{i}.attention.wo.weight", "model.layers.{i}.self_attn.o_proj.weight", ""),
    ("layers.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight", ""),
    ("layers.{i}.block_sparse_moe.gate.weight", "model.layers.{i}.block_sparse_moe.gate.weight", ""),
    ("layers.{i}.block_sparse_moe.w1", "model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight", "experts"),
    ("layers.{i}.block_sparse_moe.w2", "model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight", "experts"),
    ("layers.{i}.block_sparse_moe.w3", "model.layers.{i}.block_sparse_moe.experts.{e}.w3.weight", "experts"),
    ("norm.weight", "model.norm.weight", ""),
    ("output.weight", "lm_head.weight", ""),  # tied embeddings: the hub has no lm_head, the embedding serves
)


def hub_names(config: ModelArgs) -> dict:
    """Each of our tensor names -> (how it is made, the hub's names of the tensors it is made of, in order)."""
    names = {}
    for ours, hub, made in NAMES:
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


def check_tensors(found: dict, expected: dict, where: str):
    """A UserError unless the tensors found ({name: shape}) are exactly those expected, in name and shape:
    a file whose weights do not fit its config.json."""
    missing = [name for name in expected if name not in found]
    if missing:
        raise UserError(f"{where} does not fit its config.json: tensor {missing[0]} is missing ({len(missing)} "
                        f"missing)")
    unexpected = [name for name in found if name not in expected]
    if unexpected:
        raise UserError(f"{where} does not fit its config.json: {unexpected[0]} is not part of the model "
                        f"({len(unexpected)} unexpected)")
    for name, shape in expected.items():
        if found[name] is None or tuple(found[name]) != tuple(shape):
            raise UserError(f"{where} does not fit its config.json: {name} should be {tuple(shape)}, found "
                            f"{'nothing' if found[name] is None else tuple(found[name])}")


# ----------------------------------------------------------------------------- weights files

@dataclass(frozen=True)
class Checkpoint:
    """A weights file (model.pth, model_int8.pth, ...) and its config.json, read once."""
    path: Path
    config: ModelArgs

    @property
    def folder(self) -> Path:
        return self.path.parent


def check_checkpoint_file(path: Path):
    """A UserError unless path is a file: said first, before anything beside it is looked for. The hub's own
    files (safetensors, or their folder) are named as such, with the command that converts them."""
    hub_folder = path if path.is_dir() else path.parent
    if (path.suffix == ".safetensors" or path.name == "model.safetensors.index.json" or
            (path.is_dir() and not (path / "model.pth").exists() and any(path.glob("*.safetensors")))):
        raise UserError(f"{path} is a Hugging Face checkpoint: convert it first with python "
                        f"scripts/convert_hf_checkpoint.py --checkpoint_dir {hub_folder}, then give the "
                        f"{hub_folder / 'model.pth'} it writes")
    if path.is_dir():
        raise UserError(f"checkpoint {path} is a folder: give the model.pth (or model_int8.pth, "
                        f"model_int4.g32.pth) inside it")
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found: download and convert it first "
                        f"(scripts/download.py, scripts/convert_hf_checkpoint.py)")


def open_checkpoint(path) -> Checkpoint:
    """The checkpoint at path, its file checked and its config.json read; no weights are read yet."""
    path = Path(path)
    check_checkpoint_file(path)
    return Checkpoint(path, read_config(path.parent / "config.json"))


def load_state_dict(checkpoint: Checkpoint) -> dict:
    """The checkpoint's tensors, memory-mapped: nothing is read until used."""
    try:
        state_dict = torch.load(checkpoint.path, mmap=True, weights_only=True, map_location="cpu")
    except Exception as e:  # zip/pickle errors from a truncated or foreign file
        if is_safetensors(checkpoint.path):
            raise UserError(f"{checkpoint.path} is a Hugging Face checkpoint (safetensors) under another name: "
                            f"convert its folder first with python scripts/convert_hf_checkpoint.py "
                            f"--checkpoint_dir {checkpoint.folder}") from None
        raise UserError(f"{checkpoint.path} is not a readable checkpoint ({type(e).__name__}); convert it again")
    if not isinstance(state_dict, dict):
        raise UserError(f"{checkpoint.path} does not hold a state dict; convert it again")
    return state_dict


def is_safetensors(path: Path) -> bool:
    """Whether the file starts as a safetensors file does: an 8-byte header length, then the header's JSON."""
    with contextlib.suppress(OSError), open(path, "rb") as f:
        start = f.read(9)
        return len(start) == 9 and start[8:9] == b"{" and 0 < int.from_bytes(start[:8], "little") < 1 << 32
    return False


def load_model(checkpoint: Checkpoint, device: str, precision: torch.dtype, rank: Optional[int] = None,
               world_size: int = 1) -> Transformer:
    """The served model of the checkpoint, in the formats its content says (not its file name), its weights
    mmapped; with a rank, only that rank's tensor-parallel shard of them is kept."""
    state_dict = load_state_dict(checkpoint)
    with torch.device("meta"):
        model = build_model(checkpoint.config, detect_format(state_dict))
    try:
        model.load_state_dict(state_dict, assign=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else first[0]
        raise UserError(f"{checkpoint.path} does not fit {checkpoint.folder / 'config.json'}: {detail}")
    if rank is not None:
        apply_tp(model, rank, world_size)  # while the weights are still mmapped: a rank reads only its slices
    if torch.device(device).type == "cpu":
        cpu_kernels.available()  # built now, once, or one line saying why PyTorch's kernels are used
    # Module.to(dtype) casts floating-point tensors only: int8 and int4 (uint8) weights stay as they are.
    return model.to(device=device, dtype=precision).eval()


def quantized_path(path: Path, scheme: Scheme) -> Path:
    """Where quantize.py writes path's model in scheme: gpt-fast's names, model_int8.pth, model_int4.g32.pth
    (model_int4.g32.attn4.pth with int4 attention)."""
    return path.with_name(f"{path.stem}_{file_tag(scheme)}.pth")


# ----------------------------------------------------------------------------- tokenizer and chat format

def load_tokenizer(checkpoint: Checkpoint):
    import sentencepiece as spm
    path = checkpoint.folder / "tokenizer.model"
    if not path.is_file():
        raise UserError(f"tokenizer {path} not found: put the model's tokenizer.model beside the checkpoint")
    try:
        return spm.SentencePieceProcessor(model_file=str(path))
    except Exception as e:
        raise UserError(f"{path} is not a SentencePiece model ({e})")


def is_instruct(checkpoint: Checkpoint) -> bool:
    """Instruct checkpoints want [INST] ... [/INST] around each turn. The hub's tokenizer_config.json
    carries a chat template for them; without it, the hub's repo name says so."""
    tok_config = checkpoint.folder / "tokenizer_config.json"
    if tok_config.is_file():
        with contextlib.suppress(ValueError, OSError):
            return "[INST]" in str(json.loads(tok_config.read_text()).get("chat_template", ""))
    return "instruct" in checkpoint.folder.name.lower()
