# Writes one of our checkpoints (model.pth in bf16/fp16/fp32, or a quantized one beside it: int8, int4:gN, the
# block types q8_0 ... q6_k, any mix) as a GGUF file that llama.cpp, ollama and LM Studio read:
#
#   python scripts/export_gguf.py --checkpoint_path checkpoints/.../model_int4.g32.pth   # -> model_int4.g32.gguf
#
# The file is what llama.cpp's converter (convert_hf_to_gguf.py, class LlamaModel) and llama-quantize write
# for Mixtral: architecture 'llama' with experts, the shape under llama.*, the vocabulary of tokenizer.model
# with its special tokens and chat template, general.file_type naming the mix as llama-quantize would
# (MOSTLY_Q4_K_M ...). Tensors go under GGUF's names (names.py), q's and k's rows in llama.cpp's rotary
# order, and each weight in the GGUF type that holds its values exactly, never rounded again:
#   full precision  F32, F16 or BF16 as stored; the norms and the router in F32, as the converter writes
#                   them (llama.cpp reads those in F32 only), which holds bf16 and fp16 values exactly
#   q8_0 ... q6_k   their bytes as they are (formats.Blocks holds GGUF's own blocks)
#   int8            Q8_0: the row's scale as d of each of its 32-value blocks, the int8 codes as they are
#   int4:gN         Q4_0: the group's scale as d of each of its 32-value blocks (1, 2 or 4), nibbles reordered
# Q8_0 and Q4_0 keep d in fp16: a scale fp16 cannot hold exactly (a bf16 one below fp16's normal range, most
# fp32 ones) is refused, naming the weight, rather than rounded.
#
# Streaming: the checkpoint stays memory-mapped and each tensor is made just before it is written, so at most
# one tensor's GGUF bytes are in memory. The file is written under a temporary name and renamed when complete.
import argparse
import sys
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import gguf
import numpy as np
import sentencepiece as spm
import torch
from torch import Tensor
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from checkpoint import (Checkpoint, check_tensors, is_gguf, is_instruct, load_weights, open_checkpoint,  # noqa: E402
                        read_json_object)
from cli import check_writable, one_line_errors  # noqa: E402
from errors import UserError  # noqa: E402
from formats import Blocks, FullPrecision, Int4, Int8, WeightFormat, part_of, stored_name  # noqa: E402
from layers import build_model  # noqa: E402
from model import ModelArgs  # noqa: E402
from names import gguf_names, tensor_shapes  # noqa: E402
from writing import atomic_file  # noqa: E402

T = gguf.GGMLQuantizationType
FLOAT_TYPES = {torch.float32: T.F32, torch.float16: T.F16, torch.bfloat16: T.BF16}

# Rows converted at a time where the bytes are made anew (int8, int4, reordered rows): the temporaries stay
# a few MB whatever the tensor.
ROWS_PER_CHUNK = 1024


# ----------------------------------------------------------------------------- a weight's bytes

def ggml_type(fmt: WeightFormat, dtype: torch.dtype) -> T:
    """The GGUF type that holds a weight in fmt (stored in dtype when full precision) exactly."""
    if isinstance(fmt, Blocks):
        return T[fmt.name.upper()]
    return {Int8: T.Q8_0, Int4: T.Q4_0}.get(type(fmt)) or FLOAT_TYPES[dtype]


def check_fp16(scales: Tensor, name: str, fmt: WeightFormat):
    """A UserError naming the weight unless fp16 holds each of its scales exactly."""
    inexact = scales.to(torch.float16).float() != scales.float()
    if inexact.any():
        example = scales[inexact][0].item()
        raise UserError(
            f"{name}: {int(inexact.sum())} of its {scales.numel()} {fmt.spec} scales (e.g. {example:.6g}) are not "
            f"exact in fp16, where GGUF's {ggml_type(fmt, scales.dtype).name} keeps them (its normal range is "
            f"6.1e-05 to 65504, and it has 10 bits of mantissa): writing them would round them; quantize a bf16 "
            f"model.pth instead, or straight to a block type (quantize.py --format q8_0)")


def gguf_rows(fmt: WeightFormat, t: dict, rows) -> Tensor:
    """Rows `rows` (an index or a slice) of the weight whose tensors t ({key: tensor}, leading axes flattened
    into the rows) fmt holds, in the bytes of ggml_type(fmt): uint8 [rows, bytes per row]."""
    if isinstance(fmt, Int8):  # Q8_0 block: d fp16 | 32 int8 codes
        blocks = t[""][rows].view(torch.uint8).unflatten(-1, (-1, 32))  # [R, n / 32, 32]
        d = t["scales"][rows].to(torch.float16).view(torch.uint8).view(-1, 1, 2)  # [R, 1, 2]
        d = d.expand(-1, blocks.shape[1], 2)  # [R, n / 32, 2]: the row's scale in each of its blocks
        return torch.cat((d, blocks), dim=-1).flatten(1)
    if isinstance(fmt, Int4):  # Q4_0 block: d fp16 | 16 bytes, value j in byte j's low nibble, j + 16 in its high
        packed = t[""][rows]  # [R, n / 2]: value 2i low, 2i + 1 high, each as q + 8, as Q4_0 keeps it
        q = torch.stack((packed & 15, packed >> 4), dim=-1).flatten(1).unflatten(-1, (-1, 32))  # [R, n / 32, 32]
        nibbles = q[..., :16] | (q[..., 16:] << 4)  # [R, n / 32, 16]
        scales = t["scales"][rows].to(torch.float16)  # [R, groups]; a group of 64 or 128 values is 2 or 4 blocks
        d = scales.repeat_interleave(q.shape[1] // scales.shape[1], dim=1).contiguous().view(torch.uint8)
        return torch.cat((d.unflatten(-1, (-1, 2)), nibbles), dim=-1).flatten(1)
    if isinstance(fmt, Blocks):  # [R, blocks, bytes]: GGUF's bytes already
        return t[""][rows].flatten(1)
    return t[""][rows].contiguous().view(torch.uint8)


def rope_permute(n_rows: int, n_heads: int) -> Tensor:
    """Our (the hub's) row of each GGUF row of q (or k): llama.cpp's converter puts rows i and i + h of a head
    (h = head_dim / 2), which the hub's rotary embedding turns together, side by side as rows 2i and 2i + 1,
    llama.cpp's pairs. gguf_file.undo_rope_permute is the way back."""
    return torch.arange(n_rows).reshape(n_heads, 2, n_rows // n_heads // 2).swapaxes(1, 2).reshape(-1)


def gguf_nbytes(qtype: T, shape: tuple) -> int:
    values, size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape)) // values * size


class Planned(NamedTuple):
    """A GGUF tensor to write: its type, its shape in values (ours: [..., rows, cols]) and its bytes, made
    when asked: uint8 [..., bytes per row]."""
    type: T
    shape: tuple
    data: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return gguf_nbytes(self.type, self.shape)

    @property
    def byte_shape(self) -> tuple:
        return (*self.shape[:-1], self.nbytes // int(np.prod(self.shape[:-1])))


def planned(name: str, fmt: WeightFormat, t: dict, shape: tuple, rows: Optional[Tensor] = None,
            f32: bool = False) -> Planned:
    """Weight `name` of shape [..., rows, cols], held by fmt in its tensors t, as a GGUF tensor: all its rows,
    or those of `rows` (its leading axes flattened) in that order; f32: a full-precision one widened to F32."""
    flat = {key: v.reshape(-1, *v.shape[len(shape) - 1:]) for key, v in t.items()}  # leading axes into the rows
    if isinstance(fmt, (Int8, Int4)):
        check_fp16(flat["scales"], name, fmt)
    if f32:
        flat = {"": flat[""].float()}
    qtype = T.F32 if f32 else ggml_type(fmt, t[""].dtype)
    order = torch.arange(int(np.prod(shape[:-1]))) if rows is None else rows
    shape = (*shape[:-1], shape[-1]) if rows is None else (rows.numel(), shape[-1])
    byte_shape = (*shape[:-1], gguf_nbytes(qtype, shape) // order.numel())

    def data() -> np.ndarray:
        if rows is None and (f32 or isinstance(fmt, (FullPrecision, Blocks))):  # the mmapped bytes, no copy
            return gguf_rows(fmt, flat, slice(None)).numpy().reshape(byte_shape)
        out = torch.empty(order.numel(), byte_shape[-1], dtype=torch.uint8)
        for start in range(0, order.numel(), ROWS_PER_CHUNK):
            chunk = slice(start, start + ROWS_PER_CHUNK)
            out[chunk] = gguf_rows(fmt, flat, chunk if rows is None else rows[chunk])  # a slice reads in place
        return out.numpy().reshape(byte_shape)

    return Planned(qtype, shape, data)


def weight_tensors(state_dict: dict, name: str, fmt: WeightFormat, shape: tuple) -> dict:
    """{key: tensor} of weight `name` (formats.PARTS' names: 'layers.0.attention.wqkv.q') in fmt, mmapped."""
    prefix, weight = name.rsplit(".", 1)
    return {key: state_dict[f"{prefix}.{stored_name(weight, key)}"] for key in fmt.layout(shape, torch.float32)}


def file_order(name: str) -> int:
    """Where a GGUF tensor goes in the file: token_embd first, then layer by layer as the converter writes them
    (a layer's weights lie together), output_norm and output last."""
    if name.startswith("blk."):
        return int(name.split(".")[1])
    return -1 if name == "token_embd.weight" else 1 << 30


def plan(state_dict: dict, scheme, config: ModelArgs) -> dict:
    """GGUF name -> Planned, in the file's order. Every int8 and int4 scale is checked here, before anything is
    written."""
    shapes = tensor_shapes(config)
    q_size, kv_size = config.n_head * config.head_dim, config.n_local_heads * config.head_dim
    tensors = {}
    for ours, (made, names) in gguf_names(config).items():
        if made != "q,k,v":
            fmt = scheme.format_of(ours) if part_of(ours) else FullPrecision()
            # The converter's rule: 1-D tensors, norms and the router in F32 (llama.cpp reads them so).
            f32 = part_of(ours) is None and (len(shapes[ours]) == 1 or names[0].endswith("ffn_gate_inp.weight"))
            t = weight_tensors(state_dict, ours, fmt, shapes[ours])
            tensors[names[0]] = planned(ours, fmt, t, shapes[ours], f32=f32)
            continue
        # wqkv: attn_q, attn_k and attn_v, q's and k's rows in llama.cpp's rotary order
        orders = (rope_permute(q_size, config.n_head), rope_permute(kv_size, config.n_local_heads),
                  torch.arange(kv_size))
        prefix = ours[:-len(".weight")]
        if f"{prefix}.q" in state_dict:  # stored in three parts, each in its own format (from a GGUF file's mix)
            for p, gguf_name, order in zip("qkv", names, orders):
                fmt = scheme.format_of(f"{prefix}.{p}")
                shape = (order.numel(), config.dim)
                t = weight_tensors(state_dict, f"{prefix}.{p}", fmt, shape)
                tensors[gguf_name] = planned(f"{prefix}.{p}", fmt, t, shape, order)
        else:
            fmt = scheme.format_of(ours)
            t = weight_tensors(state_dict, ours, fmt, shapes[ours])
            for gguf_name, order, start in zip(names, orders, (0, q_size, q_size + kv_size)):
                tensors[gguf_name] = planned(ours, fmt, t, shapes[ours], order + start)
    return {name: tensors[name] for name in sorted(tensors, key=file_order)}


# ----------------------------------------------------------------------------- general.file_type

# The file type llama-quantize names a file after, by the type most of the weights are in; a 4- or 5-bit
# K-quant mix that gives the attention values or the down projections Q6_K is llama-quantize's _M, else _S.
FILE_TYPES = {T.F32: "ALL_F32", T.F16: "MOSTLY_F16", T.BF16: "MOSTLY_BF16", T.Q8_0: "MOSTLY_Q8_0",
              T.Q4_0: "MOSTLY_Q4_0", T.Q4_K: "MOSTLY_Q4_K_S", T.Q5_K: "MOSTLY_Q5_K_S", T.Q6_K: "MOSTLY_Q6_K"}


def file_type(tensors: dict) -> gguf.LlamaFileType:
    """The file type of a file of these tensors (GGUF name -> Planned): that of the type most of the
    weights' values are in (the embedding table, norms and router, which llama-quantize leaves in their
    types, do not count)."""
    values = {}
    for name, t in tensors.items():
        if name.startswith(("blk.", "output.")) and not name.endswith(("_norm.weight", "ffn_gate_inp.weight")):
            values[t.type] = values.get(t.type, 0) + int(np.prod(t.shape))
    main = max(values, key=values.get)
    name = FILE_TYPES[main]
    medium = any(t.type == T.Q6_K for n, t in tensors.items() if n.endswith(("attn_v.weight", "ffn_down_exps.weight")))
    if main in (T.Q4_K, T.Q5_K) and medium:
        name = name.replace("_S", "_M")
    return gguf.LlamaFileType[name]


# ----------------------------------------------------------------------------- the vocabulary

def vocabulary(folder: Path, vocab_size: int) -> tuple:
    """(tokens, scores, types) as the converter's _create_vocab_sentencepiece makes them: the pieces of
    tokenizer.model (gguf's SentencePieceVocab), padded to the model's vocab_size with unused [PADn] tokens;
    the added tokens tokenizer_config.json lists become control tokens (user-defined if not special), score
    -1000."""
    path = folder / "tokenizer.model"
    if not path.is_file():
        raise UserError(f"tokenizer {path} not found: put the model's tokenizer.model beside the checkpoint; "
                        f"a GGUF file carries its vocabulary")
    try:
        pieces = list(gguf.SentencePieceVocab(folder).all_tokens())
    except Exception as e:  # sentencepiece's own error for a file that is not a model, or bad added_tokens.json
        raise UserError(f"{path} is not a SentencePiece model ({str(e).splitlines()[0] if str(e) else e!r})") from None
    if len(pieces) > vocab_size:
        raise UserError(f"{path} has {len(pieces)} pieces, more than the model's vocab_size {vocab_size} "
                        f"(config.json): it is not this model's tokenizer")
    tokens = [p for p, _, _ in pieces] + [f"[PAD{i}]".encode() for i in range(len(pieces), vocab_size)]
    scores = [s for _, s, _ in pieces] + [-10000.0] * (vocab_size - len(pieces))
    types = [int(t) for _, _, t in pieces] + [int(gguf.TokenType.UNUSED)] * (vocab_size - len(pieces))
    tok_config = folder / "tokenizer_config.json"
    added = read_json_object(tok_config, "").get("added_tokens_decoder", {}) if tok_config.is_file() else {}
    for i, token in added.items() if isinstance(added, dict) else ():
        if not (i.isdigit() and int(i) < vocab_size and isinstance(token, dict) and "content" in token):
            continue  # the converter skips tokens past the vocabulary too
        text = token["content"]
        special = token.get("special") or text.startswith("<|") and text.endswith("|>")
        tokens[int(i)] = (text if special else text.replace("\u2581", " ")).encode()
        scores[int(i)] = -1000.0
        types[int(i)] = int(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
    return tokens, scores, types


def normalizer(model: bytes) -> dict:
    """The normalizer of a serialized SentencePiece model (its ModelProto's normalizer_spec, field 3): its
    name (field 1), whether it maps characters (a precompiled map, field 2), add_dummy_prefix and
    remove_extra_whitespaces (fields 3 and 4; protobuf's default for a flag left out: true)."""
    spec = next((value for number, value in proto_fields(model) if number == 3), b"")
    flags = {"name": "", "maps": False, "add_dummy_prefix": True, "remove_extra_whitespaces": True}
    for number, value in proto_fields(spec):
        if number in (1, 2):
            flags["name" if number == 1 else "maps"] = value.decode() if number == 1 else bool(value)
        if number in (3, 4):
            flags[("add_dummy_prefix", "remove_extra_whitespaces")[number - 3]] = bool(value)
    return flags


def proto_fields(data: bytes):
    """(field number, value) of each field of a serialized protobuf message: varints as ints, length-delimited
    fields as bytes (gguf_file.py writes the same wire format)."""
    def varint(at):
        value, shift = 0, 0
        while True:
            byte = data[at]
            value, shift, at = value | (byte & 0x7F) << shift, shift + 7, at + 1
            if byte < 0x80:
                return value, at

    at = 0
    while at < len(data):
        key, at = varint(at)
        wire = key & 7
        if wire == 0:
            value, at = varint(at)
        elif wire == 2:
            n, at = varint(at)
            value, at = data[at:at + n], at + n
        else:  # fixed 64 or 32 bits
            n = 8 if wire == 1 else 4
            value, at = data[at:at + n], at + n
        yield key >> 3, value


# ----------------------------------------------------------------------------- metadata

def add_metadata(writer: gguf.GGUFWriter, checkpoint: Checkpoint, tensors: dict):
    """The metadata llama.cpp's converter writes for Mixtral (TextModel and LlamaModel's set_gguf_parameters,
    the general.* keys of prepare_metadata, _set_vocab_sentencepiece), from config.json and tokenizer.model."""
    c, folder = checkpoint.config, checkpoint.folder
    hparams = read_json_object(folder / "config.json", "")
    total, shared, expert, experts = writer.get_total_parameter_count()
    try:
        meta = gguf.Metadata.load(None, folder, None, total)  # name, size label ... from the folder and its card
    except Exception:  # a model card the package cannot parse: its name alone
        meta = gguf.Metadata()
    meta.name = meta.name or folder.name
    meta.size_label = meta.size_label or gguf.size_label(total, shared, expert, experts)
    writer.add_type(gguf.GGUFType.MODEL)
    meta.set_gguf_meta_model(writer)
    writer.add_block_count(c.n_layer)
    writer.add_context_length(c.block_size)
    writer.add_embedding_length(c.dim)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.n_head)
    writer.add_head_count_kv(c.n_local_heads)
    writer.add_rope_freq_base(c.rope_base)
    writer.add_layer_norm_rms_eps(c.norm_eps)
    writer.add_expert_count(c.num_experts)
    writer.add_expert_used_count(c.num_activated_experts)
    if "head_dim" in hparams:
        writer.add_key_length(c.head_dim)
        writer.add_value_length(c.head_dim)
    writer.add_file_type(file_type(tensors))
    writer.add_vocab_size(c.vocab_size)
    writer.add_rope_dimension_count(c.head_dim)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    tokens, scores, types = vocabulary(folder, c.vocab_size)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    try:
        special = gguf.SpecialVocab(folder, n_vocab=len(tokens))  # ids, add_bos/eos and the chat template
    except (ValueError, OSError) as e:
        raise UserError(f"{folder}: tokenizer_config.json or config.json cannot be read ({e})") from None
    if "unk" not in special.special_token_ids:  # the hub's tokenizer.json says <unk>; tokenizer.model does too
        tokenizer = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
        special.special_token_ids["unk"] = tokenizer.unk_id()
    special.add_to_gguf(writer, quiet=True)
    if special.chat_template is None and is_instruct(checkpoint):  # told by the folder's name alone
        print(f"warning: {folder} has no tokenizer_config.json with Mixtral Instruct's chat template: llama.cpp and "
              f"ollama will not know its [INST] format; put the hub repo's tokenizer_config.json there and export "
              f"again", file=sys.stderr)
    # The converter leaves these out, and llama.cpp then adds a space prefix and folds no whitespace: the file
    # says what this tokenizer does. Character maps (NFKC ...) GGUF cannot carry at all.
    flags = normalizer((folder / "tokenizer.model").read_bytes())
    if not flags["add_dummy_prefix"]:
        writer.add_add_space_prefix(False)
    if flags["remove_extra_whitespaces"]:
        writer.add_remove_extra_whitespaces(True)
    if flags["maps"]:
        print(f"warning: {folder / 'tokenizer.model'} normalizes text ({flags['name']}) before splitting it, which "
              f"a GGUF file cannot say: llama.cpp, and this repo reading the file, split some text differently "
              f"(newlines, full-width and compatibility characters); Mixtral's tokenizer does not normalize",
              file=sys.stderr)


# ----------------------------------------------------------------------------- the file

def export_gguf(checkpoint_path, output=None) -> Path:
    """Writes the checkpoint at checkpoint_path (a .pth with config.json and tokenizer.model beside it) as a
    GGUF file at output (default: beside it, named alike, .gguf) and returns output's path."""
    path = Path(checkpoint_path)
    if path.is_file() and is_gguf(path):
        raise UserError(f"{path} is a GGUF file already: llama.cpp reads it as it is; give a model.pth (or a "
                        f"quantized .pth beside it) to export")
    checkpoint = open_checkpoint(path)
    output = Path(output) if output is not None else path.with_suffix(".gguf")
    check_writable(output, "--output")
    config = checkpoint.config
    if config.sliding_window is not None and config.sliding_window < config.block_size:
        raise UserError(f"{path.parent / 'config.json'}: sliding_window is {config.sliding_window}, but llama.cpp "
                        f"reads a Mixtral GGUF file (architecture llama) as attending over its whole context "
                        f"({config.block_size}): it would run another model")
    state_dict, scheme = load_weights(checkpoint)
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in build_model(config, scheme).state_dict().items()}
    check_tensors({name: tuple(t.shape) if isinstance(t, Tensor) else None for name, t in state_dict.items()},
                  expected, str(path))
    tensors = plan(state_dict, scheme, config)  # every scale checked before a byte is written

    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    for name, t in tensors.items():
        writer.add_tensor_info(name, t.byte_shape, np.dtype(np.uint8), t.nbytes, raw_dtype=t.type)
    add_metadata(writer, checkpoint, tensors)
    nbytes = sum(t.nbytes for t in tensors.values())
    with atomic_file(output, nbytes) as f:
        writer.open_output_file(Path(f.name))  # the temporary file atomic_file renames when complete
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with tqdm(total=nbytes, desc="writing", unit="B", unit_scale=True) as progress:
            for t in tensors.values():
                writer.write_tensor_data(t.data())
                progress.update(t.nbytes)
        writer.close()
    return output


def main(argv=None):
    parser = argparse.ArgumentParser(description="Write a checkpoint (model.pth, or a quantized one) as a GGUF "
                                                 "file for llama.cpp, ollama and LM Studio.")
    parser.add_argument("--checkpoint_path", type=Path, required=True,
                        help="model.pth, or a quantized checkpoint beside it (model_int8.pth, model_q4_k.pth ...), "
                             "with config.json and tokenizer.model in its folder")
    parser.add_argument("--output", type=Path, default=None,
                        help="the GGUF file to write (default: the checkpoint's name with .gguf, beside it)")
    args = parser.parse_args(argv)
    with one_line_errors():
        try:
            output = export_gguf(args.checkpoint_path, args.output)
        except OSError as e:  # a file that vanished or cannot be read
            raise UserError(f"could not export {args.checkpoint_path}: {e.strerror or e}") from None
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
