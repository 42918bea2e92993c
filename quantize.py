# Offline weight-only quantization: writes model_int8.pth (or model_int4.g32.pth) beside model.pth,
# streamed from the mmapped source. The formats themselves (layout, rounding, kernels) are formats.py's;
# this script applies one to a file.
#
# int8: symmetric, per output channel: every row of a weight matrix gets one scale, max|row| / 127, and
# the row is stored as round(row / scale) in int8.
# int4: symmetric, per group of --groupsize (32, 64 or 128) consecutive inputs of a row: the group's
# value of largest magnitude becomes -8, the others round to the nearest of -8..7 times its scale;
# two values a byte. By default only the experts: attention and the output head stay int8, which costs
# a tenth more bytes per token and keeps the model far closer to the source (BENCHMARKS.md, quality);
# --int4_attention puts them in int4 too.
# Quantized: attention wqkv and wo, the output head, and each expert's w1, w2, w3. Kept as they are:
# the embedding table (one row is read per token), the norms, and the router (gate), whose few
# weights decide which experts run.
#
# Layout in the checkpoint (formats.stored_name; other scripts rely on these names):
#   int8 linear:  X.weight int8 [out, in]    X.scales [out]
#   int8 experts: X.w1 int8 [E, I, D]  X.w1_scales [E, I]
#                 X.w3 int8 [E, I, D]  X.w3_scales [E, I]
#                 X.w2 int8 [E, D, I]  X.w2_scales [E, D]
#   int4: the same names, X.weight uint8 [out, in/2] and X.scales [out, in/groupsize]; experts
#         X.w1 uint8 [E, I, D/2], X.w1_scales [E, I, D/groupsize], ..., X.w2 uint8 [E, D, I/2].
# Scales are in the source checkpoint's dtype; loading casts them to --precision like any weight.
import argparse
import mmap
import os
import sys
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from formats import FORMATS, Int4, Scheme, detect_format, parse_format, stored_weights
from model import ModelArgs, Transformer, UserError, load_checkpoint
from writing import atomic_file, reserve

QUANTIZED_FORMATS = [name for name in FORMATS if name != "full precision"]


def load_source(checkpoint_path: Path) -> tuple[ModelArgs, dict]:
    """The config and the mmapped state dict of an unquantized checkpoint, checked against each other."""
    config, source = load_checkpoint(checkpoint_path)
    fmt = detect_format(source)
    if fmt.quantized:
        raise UserError(f"{checkpoint_path} is already quantized (it holds {fmt.name} weights); "
                            f"quantize the original model.pth instead")
    with torch.device("meta"):
        expected = Transformer(config).state_dict()
    unexpected = [name for name in source if name not in expected]
    if unexpected:
        raise UserError(f"{checkpoint_path} does not fit {checkpoint_path.parent / 'config.json'}: "
                            f"{unexpected[0]} is not part of the model")
    for name, t in expected.items():
        if name not in source or source[name].shape != t.shape:
            found = tuple(source[name].shape) if name in source else "nothing"
            raise UserError(f"{checkpoint_path} does not fit {checkpoint_path.parent / 'config.json'}: "
                                f"{name} should be {tuple(t.shape)}, found {found}")
    return config, source


def quantize_into(fmt, src: Tensor, out: dict, rows_per_chunk: int = 256):
    """Quantizes src [..., out, in] into out ({key: tensor} in fmt's layout) a few rows at a time:
    rows are independent, and small chunks keep the float32 temporaries a few MB whatever the matrix."""
    rows = src.reshape(-1, src.shape[-1])
    for start in range(0, rows.shape[0], rows_per_chunk):
        for key, t in fmt.quantize(rows[start:start + rows_per_chunk]).items():
            out[key].view(-1, *t.shape[1:])[start:start + t.shape[0]] = t


def output_path(checkpoint_path: Path, mode: str, groupsize: int, int4_attention: bool = False) -> Path:
    """gpt-fast's names: model_int8.pth, model_int4.g32.pth; model_int4.g32.attn4.pth with int4 attention."""
    suffix = f"_{mode}.g{groupsize}" if mode == "int4" else f"_{mode}"
    suffix += ".attn4" if mode == "int4" and int4_attention else ""
    return checkpoint_path.with_name(f"{checkpoint_path.stem}{suffix}.pth")


def quantize_checkpoint(checkpoint_path: Path, mode: str = "int8", groupsize: int = 32,
                        int4_attention: bool = False) -> Path:
    """Writes <name>_int8.pth (int4: <name>_int4.g<groupsize>.pth, and .attn4 before .pth with
    int4_attention) beside checkpoint_path and returns its path.

    Streaming, so that memory use stays a few MB above the interpreter's whatever the model:
    the source is mmapped and read a few rows at a time; the output file is first written with
    its final layout but no data (torch.serialization.skip_data), then mmapped writable and
    filled in place. Neither checkpoint is ever held in memory. The file's disk space is reserved
    before the map is written, and it is written under a temporary name and renamed when complete,
    so a full disk or an interrupted run leaves nothing behind (writing.atomic_file)."""
    if mode not in QUANTIZED_FORMATS:
        raise UserError(f"unknown mode {mode!r}: choose one of {', '.join(QUANTIZED_FORMATS)}")
    if mode == "int4" and groupsize not in Int4.GROUP_SIZES:
        raise UserError(f"unknown group size {groupsize}: choose one of {', '.join(map(str, Int4.GROUP_SIZES))}")
    if int4_attention and mode != "int4":
        raise UserError("--int4_attention is for --mode int4")
    checkpoint_path = Path(checkpoint_path)
    config, source = load_source(checkpoint_path)
    # source name -> (its format, {key: output name})
    chosen = parse_format(f"int4:g{groupsize}" if mode == "int4" else mode)
    quantized = stored_weights(config, Scheme.quantizing(chosen, int4_attention))
    for name, (fmt, _) in quantized.items():  # before any file is written
        inputs = source[name].shape[-1]
        problem = fmt.row_problem(inputs)
        if problem:
            raise UserError(f"--groupsize {groupsize}: the {inputs} inputs of {name} (dim {config.dim}, "
                            f"intermediate_size {config.intermediate_size} in config.json) {problem}; "
                            f"choose a group size that divides them")
    layout = {}  # output name -> (shape, dtype), in the source's order
    for name, t in source.items():
        if name in quantized:
            fmt, stored = quantized[name]
            for key, shape_and_dtype in fmt.layout(tuple(t.shape), t.dtype).items():
                layout[stored[key]] = shape_and_dtype
        else:
            layout[name] = (tuple(t.shape), t.dtype)
    output = output_path(checkpoint_path, mode, groupsize, int4_attention)
    empty = {name: torch.empty(shape, dtype=t_dtype) for name, (shape, t_dtype) in layout.items()}  # touches no memory
    with atomic_file(output, sum(t.nbytes for t in empty.values())) as f:
        with torch.serialization.skip_data():
            torch.save(empty, f)
        f.flush()
        reserve(f, os.fstat(f.fileno()).st_size)  # the file has holes where the data goes
        with torch.serialization.set_default_mmap_options(mmap.MAP_SHARED):
            out = torch.load(f.name, mmap=True, weights_only=True)  # writes go to the file
        for name, src in tqdm(source.items(), desc="quantizing", unit="tensor"):
            if name in quantized:
                fmt, stored = quantized[name]
                quantize_into(fmt, src, {key: out[stored_as] for key, stored_as in stored.items()})
            else:
                out[name].copy_(src)  # embedding, norms, router: as they are
        del out  # unmaps: the kernel has every written page
    return output


def main(argv=None):
    parser = argparse.ArgumentParser(description="Quantize a converted Mixtral checkpoint.")
    parser.add_argument("--checkpoint_path", type=Path,
                        default=Path("checkpoints/mistralai/Mixtral-8x7B-v0.1/model.pth"),
                        help="the model.pth written by scripts/convert_hf_checkpoint.py")
    parser.add_argument("--mode", choices=QUANTIZED_FORMATS, default="int8",
                        help="int8: one scale per output channel; int4: the experts with one scale per group of "
                             "--groupsize inputs, attention and the output head in int8")
    parser.add_argument("--groupsize", type=int, choices=Int4.GROUP_SIZES, default=None,
                        help="int4 only: inputs of a row that share a scale (smaller: more accurate, larger file); "
                             "default 32")
    parser.add_argument("--int4_attention", action="store_true",
                        help="int4 only: attention and the output head in int4 too (a tenth fewer bytes per token, "
                             "less accurate: README, Quality)")
    args = parser.parse_args(argv)
    try:
        if args.groupsize is not None and args.mode != "int4":
            raise UserError(f"--groupsize is for --mode int4 (groups of inputs sharing a scale); --mode {args.mode} "
                            f"has one scale per row: drop --groupsize")
        output = quantize_checkpoint(args.checkpoint_path, args.mode, args.groupsize or 32, args.int4_attention)
    except UserError as e:
        sys.exit(f"error: {e}")
    except OSError as e:  # disk full, permissions
        sys.exit(f"error: could not write beside {args.checkpoint_path}: {e.strerror or e}")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
