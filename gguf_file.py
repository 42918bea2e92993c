# Reads a GGUF file, llama.cpp's one-file model format and the way most people hold Mixtral locally
# (Q4_K_M, Q8_0 ... from the hub's community repositories): checks that it is whole and holds a Mixtral,
# reads the model's shape and its SentencePiece tokenizer from the metadata, and lists the tensors where
# they lie in the file (memory-mapped, nothing read) for the weight loader, which turns GGUF's types into
# this repo's formats.
#
# What llama.cpp's converter (convert_hf_to_gguf.py, class LlamaModel) writes for Mixtral:
# - general.architecture 'llama' with experts: the shape under llama.* (block_count, embedding_length,
#   expert_count ...), the vocabulary under tokenizer.ggml.* and the chat template in tokenizer.chat_template.
# - Tensor names: token_embd, output_norm, output; per layer blk.N.attn_norm, attn_q, attn_k, attn_v,
#   attn_output, ffn_norm, ffn_gate_inp (the router), and each layer's experts stacked into one tensor
#   per matrix: ffn_gate_exps (our w1), ffn_up_exps (w3), ffn_down_exps (w2). Files converted before
#   April 2024 hold one tensor per expert instead: blk.N.ffn_gate.E.weight, ffn_up.E, ffn_down.E.
# - Shapes: GGUF lists a tensor's dimensions innermost first (ne[0] is the length of a row), so our
#   [rows, cols] matrix is ne = [cols, rows] there and stacked experts [E, rows, cols] are [cols, rows, E].
#   The bytes are the same row-major order as ours; gguf_tensors gives the shapes in our order.
# - attn_q and attn_k rows reordered within each head for llama.cpp's rotary layout (undo_rope_permute).
import math
import struct
import warnings
from pathlib import Path
from typing import NamedTuple, Optional

import gguf
import numpy as np
import sentencepiece as spm
import torch
from torch import Tensor

from errors import UserError
from model import ModelArgs

# Mixtral GGUFs say 'llama' (the converter writes Mixtral as a Llama with experts); 'mixtral' in case a
# file names it so.
MIXTRAL_ARCHITECTURES = ("llama", "mixtral")


# ----------------------------------------------------------------------------- the file

def open_gguf(path) -> gguf.GGUFReader:
    """The file's metadata and tensor list, read by the gguf package over a memory map of the file.
    Raises UserError, one line, for a path that is not a whole GGUF file this package can read."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a folder: give the .gguf file inside it")
    if not path.is_file():
        raise UserError(f"{path} not found: download the .gguf file first")
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise UserError(f"{path} cannot be read ({e.strerror})") from None
    if head[:4] != b"GGUF":
        raise UserError(f"{path} is not a GGUF file (it does not start with 'GGUF'): give a .gguf file, or "
                        f"a model.pth made by scripts/convert_hf_checkpoint.py")
    if len(head) < 8:
        raise UserError(f"{path} is truncated (it ends inside its header): download it again")
    version = int.from_bytes(head[4:], "little")
    if version & 0xFFFF == 0:  # the version's bytes reversed: written for a big-endian machine
        raise UserError(f"{path} is a big-endian GGUF file: its tensors are in the other byte order; "
                        f"use the little-endian file")
    if version not in gguf.gguf_reader.READER_SUPPORTED_VERSIONS:
        raise UserError(f"{path} is GGUF version {version}, which the gguf package cannot read (it reads "
                        f"{', '.join(map(str, gguf.gguf_reader.READER_SUPPORTED_VERSIONS))}): get a file "
                        f"converted by a current llama.cpp")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:
        # A file cut short makes the reader slice past the end of the map: a string or count comes back
        # empty (IndexError), or a tensor's bytes do not fill its shape (ValueError from reshape). A
        # damaged one gives unknown types or duplicate names (ValueError, KeyError).
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{path} is truncated or damaged ({detail}): download it again") from None
    parts = metadata(reader, "split.count", "integer", 1)
    if parts > 1:
        raise UserError(f"{path} is one part of a GGUF split into {parts} files: join them into one with "
                        f"llama.cpp's llama-gguf-split --merge, then give that file")
    return reader


def file_name(reader: gguf.GGUFReader) -> str:
    return reader.data.filename


# ----------------------------------------------------------------------------- metadata values

INTEGER_TYPES = {gguf.GGUFValueType.UINT8, gguf.GGUFValueType.INT8, gguf.GGUFValueType.UINT16,
                 gguf.GGUFValueType.INT16, gguf.GGUFValueType.UINT32, gguf.GGUFValueType.INT32,
                 gguf.GGUFValueType.UINT64, gguf.GGUFValueType.INT64}
NUMBER_TYPES = INTEGER_TYPES | {gguf.GGUFValueType.FLOAT32, gguf.GGUFValueType.FLOAT64}
ARRAY, STRING, BOOL, FLOAT32 = (gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING, gguf.GGUFValueType.BOOL,
                                gguf.GGUFValueType.FLOAT32)


def is_array_of(types: list, element_types: set) -> bool:
    # An empty array has no element type ([ARRAY] alone): it fits any.
    return types[0] == ARRAY and (len(types) == 1 or types[-1] in element_types)


# What each kind of metadata value must be: (described, test on the field's types and its value).
METADATA_KINDS = {
    "count": ("a positive integer", lambda types, v: types[0] in INTEGER_TYPES and v > 0),
    "integer": ("an integer of at least 0", lambda types, v: types[0] in INTEGER_TYPES and v >= 0),
    "number": ("a positive number", lambda types, v: types[0] in NUMBER_TYPES and math.isfinite(v) and v > 0),
    "flag": ("true or false", lambda types, v: types[0] == BOOL),
    "text": ("a string", lambda types, v: types[0] == STRING),
    "strings": ("an array of strings", lambda types, v: is_array_of(types, {STRING})),
    "numbers": ("an array of numbers", lambda types, v: is_array_of(types, NUMBER_TYPES)
                and all(math.isfinite(x) for x in v)),
    "integers": ("an array of integers", lambda types, v: is_array_of(types, INTEGER_TYPES)),
}

REQUIRED = object()  # metadata's default for a key that must be there


def metadata(reader: gguf.GGUFReader, key: str, kind: str, default=REQUIRED):
    """The value of a metadata key if it is of `kind` (METADATA_KINDS); an absent key gives the default,
    where there is one. Otherwise a UserError naming the file, the key and what it holds."""
    field = reader.get_field(key)
    if field is None:
        if default is REQUIRED:
            raise UserError(f"{file_name(reader)}: required key {key} is missing from the GGUF metadata")
        return default
    try:
        value = field.contents()
    except UnicodeDecodeError:
        raise UserError(f"{file_name(reader)}: GGUF key {key} holds text that is not UTF-8: the file is "
                        f"damaged; download it again") from None
    described, fits = METADATA_KINDS[kind]
    if not fits(field.types, value):
        held = " of ".join(t.name.lower() for t in field.types)
        if field.types[0] != ARRAY:
            held += f" {value!r}"
        raise UserError(f"{file_name(reader)}: GGUF key {key} is {held}, but it must be {described}; the file "
                        f"was not written by llama.cpp's converter, or is damaged")
    return value


def as_written(value: float) -> float:
    """A float32 setting as the converter read it from config.json. GGUF keeps llama.cpp's float
    settings (rope base, norm epsilon) in float32, so 1e-05 comes back as 9.99999974738e-06; the shortest
    decimal that rounds to the same float32 (numpy prints floats so) is the decimal config.json held."""
    return float(str(np.float32(value)))


# ----------------------------------------------------------------------------- the model's shape

def config_from_gguf(reader: gguf.GGUFReader) -> ModelArgs:
    """The model's shape from its metadata; a UserError, one line, for a file that is not a Mixtral or
    whose keys are missing or of the wrong type."""
    where = file_name(reader)
    arch = metadata(reader, "general.architecture", "text")
    name = metadata(reader, "general.name", "text", None)
    what = f"{name!r} (architecture {arch!r})" if name else f"a model of architecture {arch!r}"
    if arch not in MIXTRAL_ARCHITECTURES:
        raise UserError(f"{where} holds {what}, not Mixtral: this program runs Mixtral models only")
    num_experts = metadata(reader, f"{arch}.expert_count", "integer", 0)
    if num_experts == 0:
        raise UserError(f"{where} holds {what} without experts ({arch}.expert_count is absent or 0), a dense "
                        f"model such as Llama or Mistral, not Mixtral: this program runs Mixtral models only")

    def get(key, kind, default=REQUIRED):
        return metadata(reader, f"{arch}.{key}", kind, default)

    def get_float(key):  # a float setting, as config.json wrote it when GGUF holds it in float32
        value = get(key, "number")
        return as_written(value) if reader.get_field(f"{arch}.{key}").types[0] == FLOAT32 else float(value)

    n_head, dim = get("attention.head_count", "count"), get("embedding_length", "count")
    # llama.cpp's rule: heads are attention.key_length wide, else dim / heads, and rotate
    # rope.dimension_count of their dimensions, else all. Mixtral rotates whole heads (the converter
    # writes rope.dimension_count = head_dim), and its values are as wide as its keys.
    head_dim = get("attention.key_length", "count", dim // n_head)
    for key in ("attention.value_length", "rope.dimension_count"):
        if get(key, "count", head_dim) != head_dim:
            raise UserError(f"{where}: {arch}.{key} is {get(key, 'count')} but heads are {head_dim} wide: "
                            f"Mixtral's attention uses the whole head for keys, values and rotary embedding")
    try:
        return ModelArgs(
            block_size=get("context_length", "count"),
            vocab_size=vocab_size(reader, arch),
            n_layer=get("block_count", "count"),
            n_head=n_head,
            dim=dim,
            intermediate_size=get("feed_forward_length", "count"),
            n_local_heads=get("attention.head_count_kv", "count", n_head),
            head_dim=head_dim,
            # No default: llama.cpp's (1e4) is not Mixtral's (1e6), and a wrong base garbles long text quietly.
            rope_base=get_float("rope.freq_base"),
            norm_eps=get_float("attention.layer_norm_rms_epsilon"),
            num_experts=num_experts,
            num_activated_experts=get("expert_used_count", "count"),
            # llama.cpp reads the output head from token_embd when a file has no output.weight.
            tie_word_embeddings=not any(t.name == "output.weight" for t in reader.tensors),
        )
    except UserError as e:  # values that do not fit together (ModelArgs.__post_init__): name the file too
        raise UserError(str(e).replace("config:", f"{where}:", 1)) from None


def vocab_size(reader: gguf.GGUFReader, arch: str) -> int:
    """{arch}.vocab_size, which the converter writes, else the length of the token list."""
    tokens = metadata(reader, "tokenizer.ggml.tokens", "strings", None)
    listed = len(tokens) if tokens is not None else None
    said = metadata(reader, f"{arch}.vocab_size", "count", None)
    if said is None and not listed:
        raise UserError(f"{file_name(reader)} has neither {arch}.vocab_size nor a token list "
                        f"(tokenizer.ggml.tokens): its vocabulary size is unknown")
    if said is not None and listed is not None and said != listed:
        raise UserError(f"{file_name(reader)}: {arch}.vocab_size is {said} but tokenizer.ggml.tokens lists "
                        f"{listed} tokens: the file is damaged")
    return said if said is not None else listed


# ----------------------------------------------------------------------------- the tensors

class GGUFTensor(NamedTuple):
    type: str  # GGML's type name: 'F32', 'F16', 'BF16', 'Q8_0', 'Q4_K', 'Q6_K' ...
    shape: tuple  # in our order, rows before columns: [out, in]; stacked experts [E, out, in]
    data: Tensor  # uint8 [*shape[:-1], bytes per row]: the file's bytes in place, read-only


def gguf_tensors(reader: gguf.GGUFReader) -> dict:
    """Name -> GGUFTensor for every tensor in the file, in the file's order. Nothing is copied: each
    tensor's data is a view of the memory map (never write to it; clone first)."""
    tensors = {}
    for t in reader.tensors:
        shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists ne[0], the length of a row, first
        raw = t.data.view(np.uint8).reshape(*shape[:-1], -1)  # every GGML type stores each row as whole blocks
        with warnings.catch_warnings():
            # The map is read-only, and torch warns that writing to the tensor would fail; nothing writes.
            warnings.simplefilter("ignore", UserWarning)
            tensors[t.name] = GGUFTensor(t.tensor_type.name, shape, torch.from_numpy(raw))
    return tensors


def undo_rope_permute(rows: Tensor, n_heads: int) -> Tensor:
    """The hub's q_proj (or k_proj) rows from a GGUF file's attn_q (or attn_k) rows; n_heads: the query
    heads for q, the key/value heads for k.

    Hugging Face's rotary embedding rotates row i of a head with row i + h (h = head_dim / 2), llama.cpp's
    rotates rows 2i and 2i + 1. So llama.cpp's converter reorders each head's rows so that the pairs lie
    side by side: GGUF row 2i is hub row i, GGUF row 2i + 1 is hub row i + h (in numpy,
    w.reshape(n_heads, 2, h, cols).swapaxes(1, 2)). This puts them back: the same reshape with the two
    axes the other way round. Every GGML type keeps a row's values in its own blocks, so it works on a
    quantized tensor's bytes [rows, bytes per row] as well as on a float matrix [rows, cols]."""
    head_dim = rows.shape[0] // n_heads
    return rows.reshape(n_heads, head_dim // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


# ----------------------------------------------------------------------------- the tokenizer

# GGUF's token types are SentencePiece's piece types, numbered alike.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def tokenizer_from_gguf(reader: gguf.GGUFReader) -> spm.SentencePieceProcessor:
    """The SentencePiece tokenizer the file's vocabulary describes, built as Mixtral's tokenizer.model
    is: a BPE model over the same pieces and scores, byte fallback to the <0xXX> pieces, the 'identity'
    normalizer with a dummy space prefix and whitespace kept as it is."""
    where = file_name(reader)
    model = metadata(reader, "tokenizer.ggml.model", "text")
    if model != "llama":
        raise UserError(f"{where}: its tokenizer is of kind {model!r}, not a SentencePiece vocabulary ('llama') "
                        f"as Mixtral's: this program reads Mixtral's tokenizer only")
    pieces = metadata(reader, "tokenizer.ggml.tokens", "strings")
    if not pieces:
        raise UserError(f"{where}: tokenizer.ggml.tokens is empty: the file carries no vocabulary")
    scores = metadata(reader, "tokenizer.ggml.scores", "numbers")
    types = metadata(reader, "tokenizer.ggml.token_type", "integers", [NORMAL] * len(pieces))
    for key, values in (("tokenizer.ggml.scores", scores), ("tokenizer.ggml.token_type", types)):
        if len(values) != len(pieces):
            raise UserError(f"{where}: {key} has {len(values)} entries for {len(pieces)} tokens: the file is damaged")
    if not {*types} <= {NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE}:
        raise UserError(f"{where}: tokenizer.ggml.token_type holds {max(types)}, not a token type (1 to 6): "
                        f"the file is damaged")

    def token_id(key, default):
        value = metadata(reader, key, "integer", default)
        if value is not None and value >= len(pieces):
            raise UserError(f"{where}: {key} is {value}, past the {len(pieces)} tokens: the file is damaged")
        return value

    # SentencePiece takes its unknown piece from the piece types and wants exactly one. Converters since
    # mid-2024 retype the tokens tokenizer_config.json lists as added ones, Mixtral's <unk> among them,
    # as control; the unknown token's id says which it is (else the one of unknown type, else 0).
    unk = token_id("tokenizer.ggml.unknown_token_id", types.index(UNKNOWN) if UNKNOWN in types else 0)
    types = [CONTROL if t == UNKNOWN else t for t in types]
    types[unk] = UNKNOWN
    special = {"unk": unk,
               "bos": token_id("tokenizer.ggml.bos_token_id", 1),  # llama.cpp's defaults for this vocabulary
               "eos": token_id("tokenizer.ggml.eos_token_id", 2),
               "pad": token_id("tokenizer.ggml.padding_token_id", None)}
    proto = sentencepiece_model(
        pieces, scores, types, special,
        add_dummy_prefix=metadata(reader, "tokenizer.ggml.add_space_prefix", "flag", True),
        remove_extra_whitespaces=metadata(reader, "tokenizer.ggml.remove_extra_whitespaces", "flag", False))
    try:
        return spm.SentencePieceProcessor(model_proto=proto)
    except (RuntimeError, OSError) as e:  # sentencepiece's own check of the pieces: empty or repeated ones
        raise UserError(f"{where}: its vocabulary is not a valid SentencePiece model ({e})") from None


def chat_template(reader: gguf.GGUFReader) -> Optional[str]:
    """The Jinja chat template the file carries (tokenizer.chat_template), if any."""
    return metadata(reader, "tokenizer.chat_template", "text", None)


def is_instruct_template(template: Optional[str]) -> bool:
    """Whether a chat template writes Mixtral Instruct's turns, '[INST] {user} [/INST]{answer}</s>', which
    generation.user_turn writes; the base model's files carry no template."""
    return template is not None and "[INST]" in template and "[/INST]" in template


# sentencepiece builds a tokenizer from the bytes of its ModelProto (sentencepiece_model.proto). Its
# Python module for that message needs protobuf, which sentencepiece does not install, so the few fields
# a tokenizer uses are written here in protobuf's wire format: each field is a key, (number << 3) | wire
# type, then a varint (type 0), four little-endian float bytes (type 5), or a length and bytes (type 2).
#   ModelProto      1 pieces (each a SentencePiece message), 2 trainer_spec, 3 normalizer_spec
#   SentencePiece   1 piece, 2 score, 3 type
#   TrainerSpec     3 model_type (2: BPE), 4 vocab_size, 35 byte_fallback, 40-43 unk/bos/eos/pad id,
#                   45-48 unk/bos/eos/pad piece
#   NormalizerSpec  1 name, 3 add_dummy_prefix, 4 remove_extra_whitespaces (escape_whitespaces keeps its
#                   default, true: spaces become '▁')

def varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # a negative int32 (an absent pad id, -1) is written as its 64-bit two's complement
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def int_field(number: int, value: int) -> bytes:
    return varint(number << 3 | 0) + varint(value)


def float_field(number: int, value: float) -> bytes:
    return varint(number << 3 | 5) + struct.pack("<f", value)


def bytes_field(number: int, data: bytes) -> bytes:
    return varint(number << 3 | 2) + varint(len(data)) + data


def sentencepiece_model(pieces: list, scores: list, types: list, special: dict, add_dummy_prefix: bool,
                        remove_extra_whitespaces: bool) -> bytes:
    """A serialized SentencePiece ModelProto; special: {'unk', 'bos', 'eos', 'pad'} -> token id or None."""
    out = [bytes_field(1, bytes_field(1, p.encode()) + float_field(2, s) + int_field(3, t))
           for p, s, t in zip(pieces, scores, types)]
    trainer = int_field(3, 2) + int_field(4, len(pieces)) + int_field(35, BYTE in types)
    for i, kind in enumerate(("unk", "bos", "eos", "pad")):
        token = special[kind]
        trainer += int_field(40 + i, -1 if token is None else token)
        if token is not None:
            trainer += bytes_field(45 + i, pieces[token].encode())
    out.append(bytes_field(2, trainer))
    out.append(bytes_field(3, bytes_field(1, b"identity") + int_field(3, add_dummy_prefix)
                           + int_field(4, remove_extra_whitespaces)))
    return b"".join(out)
