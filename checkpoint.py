# Everything a checkpoint folder means. A folder as the hub ships it (mistralai/Mixtral-8x7B-v0.1) holds
# config.json, tokenizer.model and sharded safetensors; the converter adds model.pth (our names, bf16) and
# quantize.py adds model_int8.pth, model_int4.g32.pth, ... beside it. Here:
#   - config.json read into ModelArgs, every value checked, and ModelArgs written back as config.json;
#   - the check that a file's tensors fit the config (their names: names.py);
#   - a weights file opened (checked, its config read once), loaded by memory map into the served model
#     (layers.py) in the formats its content says, and sharded for a tensor-parallel rank (tp.py);
#   - a GGUF file (llama.cpp's, as the hub's community repositories hold Mixtral) read the same way: its
#     metadata for the config (gguf_file.py), its tensors kept in their types, its vocabulary as the tokenizer;
#   - the tokenizer beside it, whether the model wants Mixtral's [INST] chat format, and the file name a
#     quantized checkpoint gets.
import contextlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

import quants
from errors import UserError
from formats import FullPrecision, Scheme, detect_format, file_tag, parse_format, part_of, scheme_of
from gguf_file import (chat_template, config_from_gguf, gguf_tensors, is_instruct_template, open_gguf,
                       tokenizer_from_gguf, undo_rope_permute)
from kernels import cpu as cpu_kernels
from layers import build_model
from model import ModelArgs, Transformer
from names import gguf_names, tensor_shapes
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


def check_values(name: str, tensor: torch.Tensor, path: Path):
    """Refuses weights no model can run: integer ones (a quantized export, which the converter does not read)
    and NaN or Inf (a damaged file: one makes every later activation NaN). The converter and quantize.py check
    each tensor (or each chunk of one) as they read it, so a bad one stops the run before the rest is done."""
    if not tensor.is_floating_point():
        raise UserError(f"tensor {name} in {path} holds {str(tensor.dtype).removeprefix('torch.')} values, not "
                        f"floating point: full-precision weights are bfloat16, float16 or float32, not a quantized export")
    bad = ~torch.isfinite(tensor)
    if bad.any():
        raise UserError(f"tensor {name} in {path} holds {int(bad.sum())} NaN or Inf values: the file is damaged; "
                        f"download it again")


# ----------------------------------------------------------------------------- weights files

@dataclass(frozen=True)
class Checkpoint:
    """A weights file (model.pth, model_int8.pth, ..., or a GGUF file) and its config, read once."""
    path: Path
    config: ModelArgs
    gguf: Optional[object] = None  # a GGUF file's reader (gguf_file.open_gguf): its metadata and tensors

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


def is_gguf(path: Path) -> bool:
    """A GGUF file, by its name or its first bytes."""
    if path.suffix == ".gguf":
        return True
    with contextlib.suppress(OSError):
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    return False


def open_checkpoint(path) -> Checkpoint:
    """The checkpoint at path, its file checked and its config read (config.json beside it, or a GGUF file's
    metadata); no weights are read yet."""
    path = Path(path)
    if is_gguf(path):
        reader = open_gguf(path)
        return Checkpoint(path, config_from_gguf(reader), reader)
    check_checkpoint_file(path)
    return Checkpoint(path, read_config(path.parent / "config.json"))


def load_state_dict(checkpoint: Checkpoint) -> dict:
    """The tensors of a converted checkpoint (.pth), memory-mapped: nothing is read until used."""
    if checkpoint.gguf is not None:
        raise UserError(f"{checkpoint.path} is a GGUF file: it is already quantized as its maker chose; give "
                        f"a model.pth (scripts/convert_hf_checkpoint.py) to quantize it yourself")
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


def load_weights(checkpoint: Checkpoint) -> tuple:
    """(the state dict, the scheme it is stored in) of any checkpoint, told by its content."""
    if checkpoint.gguf is not None:
        return gguf_weights(checkpoint)
    state_dict = load_state_dict(checkpoint)
    return state_dict, detect_format(state_dict)


def load_model(checkpoint: Checkpoint, device: str, precision: torch.dtype, rank: Optional[int] = None,
               world_size: int = 1) -> Transformer:
    """The served model of the checkpoint, in the formats its content says (not its file name), its weights
    mmapped; with a rank, only that rank's tensor-parallel shard of them is kept."""
    state_dict, scheme = load_weights(checkpoint)
    with torch.device("meta"):
        model = build_model(checkpoint.config, scheme)
    check_state_dict(state_dict, model.state_dict(), checkpoint.path)
    model.load_state_dict(state_dict, assign=True)
    if rank is not None:
        apply_tp(model, rank, world_size)  # while the weights are still mmapped: a rank reads only its slices
    if torch.device(device).type == "cpu":
        cpu_kernels.available()  # built now, once, or one line saying why PyTorch's kernels are used
    # Module.to(dtype) casts floating-point tensors only: int8 and int4 (uint8) weights stay as they are.
    return model.to(device=device, dtype=precision).eval()


def check_state_dict(state_dict: dict, expected: dict, where: Path):
    """A UserError unless the state dict holds exactly the tensors the model built for it expects: every name,
    shape and, for stored codes, dtype (full-precision tensors may be any float: loading casts them). A file
    that a bug, another tool or a hand wrote wrongly is named here, not met as a crash inside a kernel."""
    bad = next((name for name, t in state_dict.items() if not isinstance(name, str) or not isinstance(t, torch.Tensor)),
               None)
    if bad is not None:
        raise UserError(f"{where} holds {type(state_dict[bad]).__name__} under {bad!r}, not a tensor: it is not a "
                        f"checkpoint this repo wrote; convert or quantize it again")
    check_tensors({name: tuple(t.shape) for name, t in state_dict.items()},
                  {name: tuple(t.shape) for name, t in expected.items()}, str(where))
    for name, want in expected.items():
        got = state_dict[name].dtype
        if got != want.dtype and not (got.is_floating_point and want.dtype.is_floating_point):
            raise UserError(f"{where}: {name} is {str(got).removeprefix('torch.')}, but its format stores "
                            f"{str(want.dtype).removeprefix('torch.')}; convert or quantize it again")


def quantized_path(path: Path, scheme: Scheme) -> Path:
    """Where quantize.py writes path's model in scheme: gpt-fast's names, model_int8.pth, model_int4.g32.pth
    (model_int4.g32.attn4.pth with int4 attention)."""
    return path.with_name(f"{path.stem}_{file_tag(scheme)}.pth")


# ----------------------------------------------------------------------------- GGUF files

# GGUF's tensor types this repo reads: floats as they are, llama.cpp's block types as formats.Blocks holding the
# same bytes (never rounded again).
GGUF_FLOATS = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
GGUF_BLOCKS = {name.upper(): name for name in quants.BLOCKS}


def gguf_tensor(name: str, tensor, where: Path) -> tuple:
    """(format, tensor in that format's layout) of a GGUF tensor, its bytes in place where they can be."""
    if tensor.type in GGUF_FLOATS:
        return FullPrecision(), tensor.data.view(GGUF_FLOATS[tensor.type]).reshape(tensor.shape)
    if tensor.type in GGUF_BLOCKS:
        fmt = parse_format(GGUF_BLOCKS[tensor.type])
        return fmt, tensor.data.view(*fmt.layout(tensor.shape, torch.uint8)[""][0])
    raise UserError(f"{where}: tensor {name} is of type {tensor.type}, which this repo does not read; it reads "
                    f"{', '.join([*GGUF_FLOATS, *GGUF_BLOCKS])} (a file quantized to Q4_K_M, Q5_K_M, Q6_K, Q8_0 or Q4_0)")


def gguf_weights(checkpoint: Checkpoint) -> tuple:
    """(state dict, scheme) of a GGUF file: each weight a format stores keeps the file's type; the embedding
    table, the norms and the router, which this repo keeps in full precision, are read back in float32.
    The q and k rows get the hub's rotary order back (gguf_file.undo_rope_permute); q, k and v become wqkv,
    in three parts where the file quantized them differently."""
    config, where = checkpoint.config, checkpoint.path
    tensors = gguf_tensors(checkpoint.gguf)
    expected = tensor_shapes(config)
    state_dict, formats = {}, {}

    def read(name: str, shape: tuple) -> tuple:
        if name not in tensors:
            raise UserError(f"{where} lacks tensor {name}, which a Mixtral of its metadata has: the file is "
                            f"damaged or not a Mixtral; download it again")
        if tuple(tensors[name].shape) != tuple(shape):
            raise UserError(f"{where}: tensor {name} is {tuple(tensors[name].shape)}, but the file's metadata "
                            f"implies {tuple(shape)}; the file is damaged")
        return gguf_tensor(name, tensors[name], where)

    for ours, (made, names) in gguf_names(config).items():
        shape = expected[ours]
        if made == "q,k,v":
            q_size, kv_size = config.n_head * config.head_dim, config.n_local_heads * config.head_dim
            parts = [read(name, (rows, config.dim)) for name, rows in zip(names, (q_size, kv_size, kv_size))]
            parts = [(fmt, undo_rope_permute(t, heads) if heads else t)
                     for (fmt, t), heads in zip(parts, (config.n_head, config.n_local_heads, 0))]
            if len({fmt for fmt, _ in parts}) == 1:
                formats[ours], state_dict[ours] = parts[0][0], torch.cat([t for _, t in parts])
            else:
                for p, (fmt, t) in zip("qkv", parts):
                    formats[f"{ours[:-len('weight')]}{p}"], state_dict[f"{ours[:-len('weight')]}{p}"] = fmt, t
            continue
        if made == "experts" and names[0] not in tensors:  # files converted before 2024: a tensor per expert
            per_expert = [read(names[0].replace("_exps.weight", f".{e}.weight"), shape[1:]) for e in range(shape[0])]
            fmt, t = per_expert[0][0], torch.stack([t for _, t in per_expert])
            if len({f for f, _ in per_expert}) > 1:
                raise UserError(f"{where}: the experts of {names[0]} are quantized to different types; "
                                f"this repo stores a layer's experts in one format")
        else:
            fmt, t = read(names[0], shape)
        if part_of(ours) is None and fmt.quantized:  # kept in full precision here
            fmt, t = FullPrecision(), fmt.dequantize({"": t}, torch.float32)
        if part_of(ours) is not None:
            formats[ours] = fmt
        state_dict[ours] = t
    return state_dict, scheme_of(formats)


# ----------------------------------------------------------------------------- tokenizer and chat format

def load_tokenizer(checkpoint: Checkpoint):
    """The SentencePiece tokenizer: tokenizer.model beside the weights, or the vocabulary a GGUF file carries."""
    import sentencepiece as spm
    if checkpoint.gguf is not None:
        tokenizer, where = tokenizer_from_gguf(checkpoint.gguf), f"{checkpoint.path}'s vocabulary"
    else:
        path = checkpoint.folder / "tokenizer.model"
        if not path.is_file():
            raise UserError(f"tokenizer {path} not found: put the model's tokenizer.model beside the checkpoint")
        try:
            tokenizer, where = spm.SentencePieceProcessor(model_file=str(path)), str(path)
        except Exception as e:
            raise UserError(f"{path} is not a SentencePiece model ({e})")
    # A larger vocabulary gives ids the embedding table lacks; a smaller one cannot spell every token the model
    # may choose. Either way the tokenizer is another model's.
    if tokenizer.vocab_size() != checkpoint.config.vocab_size:
        raise UserError(f"{where} has {tokenizer.vocab_size()} tokens but the model has {checkpoint.config.vocab_size} "
                        f"(vocab_size): the tokenizer belongs to another model; put this model's beside it")
    return tokenizer


def is_instruct(checkpoint: Checkpoint) -> bool:
    """Instruct checkpoints want [INST] ... [/INST] around each turn. The hub's tokenizer_config.json (or a
    GGUF file's metadata) carries a chat template for them; without one, the hub's repo name (or the file's
    name) says so."""
    if checkpoint.gguf is not None:
        template = chat_template(checkpoint.gguf)
        if template is not None:
            return is_instruct_template(template)
        return "instruct" in checkpoint.path.name.lower()
    tok_config = checkpoint.folder / "tokenizer_config.json"
    if tok_config.is_file():
        with contextlib.suppress(ValueError, OSError):
            return "[INST]" in str(json.loads(tok_config.read_text()).get("chat_template", ""))
    return "instruct" in checkpoint.folder.name.lower()
