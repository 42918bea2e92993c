# Offline weight-only quantization: writes model_int8.pth (or model_int4.g32.pth, ...) beside model.pth,
# streamed from the mmapped source. The formats themselves (layout, rounding, kernels) are formats.py's;
# this script applies a scheme (a format per part of the model) to a file.
#
#   python quantize.py --checkpoint_path .../model.pth --format int8        # -> model_int8.pth
#   python quantize.py --checkpoint_path .../model.pth --format int4:g32    # -> model_int4.g32.pth
# (gpt-fast's --mode int8, and --mode int4 --groupsize 32, say the same.)
#
# int8: symmetric, per output channel: every row of a weight matrix gets one scale, max|row| / 127, and
# the row is stored as round(row / scale) in int8.
# int4:gN: symmetric, per group of N (32, 64 or 128) consecutive inputs of a row: the group's value of
# largest magnitude becomes -8, the others round to the nearest of -8..7 times its scale; two values a
# byte. Only the experts: attention and the output head stay int8, which costs a tenth more bytes per
# token and keeps the model far closer to the source (BENCHMARKS.md, quality); int4:gN:attn4 puts them in
# int4 too.
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
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor
from tqdm import tqdm

import calibrate
from checkpoint import check_tensors, check_values, load_state_dict, open_checkpoint, quantized_path
from cli import HelpFormatter, one_line_errors
from errors import UserError
from formats import PRESETS, Int4, detect_format, parse_scheme
from layers import stored_weights
from names import tensor_shapes
from writing import atomic_file, check_replaceable, reserve


def load_source(checkpoint_path: Path) -> tuple:
    """The checkpoint and the mmapped state dict of an unquantized checkpoint, checked against each other."""
    checkpoint = open_checkpoint(checkpoint_path)
    source = load_state_dict(checkpoint)
    fmt = detect_format(source)
    if fmt.quantized:
        raise UserError(f"{checkpoint_path} is already quantized (it holds {fmt.spec} weights); "
                        f"quantize the original model.pth instead")
    check_tensors({name: tuple(t.shape) if isinstance(t, torch.Tensor) else () for name, t in source.items()},
                  tensor_shapes(checkpoint.config), str(checkpoint_path))
    return checkpoint, source


def quantize_into(fmt, src: Tensor, out: dict, check, importance: Optional[Tensor] = None, rows_per_chunk: int = 256):
    """Quantizes src [..., out, in] into out ({key: tensor} in fmt's layout) a few rows at a time, each chunk
    first passed to check (non-finite weights): rows are independent, and small chunks keep the float32
    temporaries a few MB whatever the matrix. importance: [in] for a matrix, [E, in] for stacked experts
    (one per expert), or None."""
    matrices = src.reshape(-1, *src.shape[-2:])  # [M, out, in]: one per expert, or the one matrix
    weights = None if importance is None else importance.reshape(-1, src.shape[-1]).expand(matrices.shape[0], -1)
    rows_per_matrix = matrices.shape[1]
    for m, matrix in enumerate(matrices):
        for start in range(0, rows_per_matrix, rows_per_chunk):
            rows = matrix[start:start + rows_per_chunk]
            check(rows)
            chunk = fmt.quantize(rows, None if weights is None else weights[m])
            for key, t in chunk.items():
                row = m * rows_per_matrix + start
                out[key].view(-1, *t.shape[1:])[row:row + t.shape[0]] = t


def quantize_checkpoint(checkpoint_path: Path, spec: str = "int8", calibration_text: Optional[Path] = None,
                        imatrix: Optional[Path] = None) -> Path:
    """Writes checkpoint_path's model in the scheme `spec` (formats.parse_scheme: 'int8', 'int4:g32',
    'int4:g32:attn4', 'q4_k_m', ...) beside it (checkpoint.quantized_path) and returns the path written.

    With calibration_text, the full-precision model reads it first (calibrate.py) and every format that
    searches its scales weighs each input by its activations' mean square there; the statistics are saved
    beside the checkpoint (calibrate.imatrix_path), and `imatrix` reuses such a file instead. Without either,
    the searches count every input the same (int8 and int4 then round as they always have).

    Streaming, so that memory use stays a few MB above the interpreter's whatever the model:
    the source is mmapped and read a few rows at a time; the output file is first written with
    its final layout but no data (torch.serialization.skip_data), then mmapped writable and
    filled in place. Neither checkpoint is ever held in memory. The file's disk space is reserved
    before the map is written, and it is written under a temporary name and renamed when complete,
    so a full disk or an interrupted run leaves nothing behind (writing.atomic_file)."""
    if spec not in PRESETS:
        parse_scheme(spec)  # a bad spec is said before any file is read
    if calibration_text is not None and imatrix is not None:
        raise UserError("--calibration_text and --imatrix both give the statistics: keep one (--imatrix reuses the "
                        "file an earlier --calibration_text wrote)")
    checkpoint_path = Path(checkpoint_path)
    checkpoint, source = load_source(checkpoint_path)
    config = checkpoint.config
    scheme = parse_scheme(spec, config)
    if not scheme.quantized:
        raise UserError(f"--format {spec} quantizes nothing; choose int8, int4:g32 or a preset ({', '.join(PRESETS)})")
    check_replaceable(quantized_path(checkpoint_path, scheme))  # before the work, not after it
    quantized = stored_weights(config, scheme)  # source name -> (its format, {key: output name})
    for name, (fmt, _) in quantized.items():  # before any file is written
        inputs = source[name].shape[-1]
        problem = fmt.row_problem(inputs)
        if problem:
            raise UserError(f"--format {spec}: the {inputs} inputs of {name} (dim {config.dim}, "
                            f"intermediate_size {config.intermediate_size} in config.json) {problem}; "
                            f"choose a group size that divides them")
    importance = None
    if calibration_text is not None:
        importance, metadata = calibrate.calibrate(checkpoint, calibration_text)
        written = calibrate.imatrix_path(checkpoint_path)
        calibrate.save_imatrix(written, importance, metadata)
        print(f"wrote {written} ({metadata['tokens']} tokens of {metadata['text']})")
    elif imatrix is not None:
        importance, _ = calibrate.load_imatrix(Path(imatrix), checkpoint, source)
    layout = {}  # output name -> (shape, dtype), in the source's order
    for name, t in source.items():
        if name in quantized:
            fmt, stored = quantized[name]
            for key, shape_and_dtype in fmt.layout(tuple(t.shape), t.dtype).items():
                layout[stored[key]] = shape_and_dtype
        else:
            layout[name] = (tuple(t.shape), t.dtype)
    output = quantized_path(checkpoint_path, scheme)
    empty = {name: torch.empty(shape, dtype=t_dtype) for name, (shape, t_dtype) in layout.items()}  # touches no memory
    with atomic_file(output, sum(t.nbytes for t in empty.values())) as f:
        with torch.serialization.skip_data():
            torch.save(empty, f)
        f.flush()
        reserve(f, os.fstat(f.fileno()).st_size)  # the file has holes where the data goes
        with torch.serialization.set_default_mmap_options(mmap.MAP_SHARED):
            out = torch.load(f.name, mmap=True, weights_only=True)  # writes go to the file
        for name, src in tqdm(source.items(), desc="quantizing", unit="tensor"):
            check = lambda chunk, name=name: check_values(name, chunk, checkpoint_path)  # noqa: E731
            if name in quantized:
                fmt, stored = quantized[name]
                quantize_into(fmt, src, {key: out[stored_as] for key, stored_as in stored.items()}, check,
                              None if importance is None else importance[name])
            else:
                check(src)
                out[name].copy_(src)  # embedding, norms, router: as they are
        del out  # unmaps: the kernel has every written page
    return output


def format_spec(args) -> str:
    """--format, or what gpt-fast's --mode (and --groupsize, --int4_attention) say in its terms."""
    if args.mode is None:
        if args.groupsize is not None or args.int4_attention:
            raise UserError("--groupsize and --int4_attention go with --mode int4; with --format, write "
                            "int4:g64 or int4:g32:attn4 instead")
        return args.format
    if args.format is not None:
        raise UserError(f"--mode {args.mode} and --format {args.format} both name the format: keep one")
    if args.mode == "int8":
        if args.groupsize is not None or args.int4_attention:
            raise UserError("--groupsize and --int4_attention are for --mode int4 (groups of inputs sharing a "
                            "scale); --mode int8 has one scale per row: drop them")
        return "int8"
    return f"int4:g{args.groupsize or 32}" + (":attn4" if args.int4_attention else "")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Quantize a converted Mixtral checkpoint.",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--checkpoint_path", type=Path,
                        default=Path("checkpoints/mistralai/Mixtral-8x7B-v0.1/model.pth"),
                        help="the model.pth written by scripts/convert_hf_checkpoint.py")
    parser.add_argument("--format", default=None,
                        help="int8: one scale per output channel; int4:g32 (g64, g128): the experts with one scale "
                             "per group of 32 inputs, attention and the output head in int8; int4:g32:attn4: int4 "
                             "everywhere (README, Quantization); default int8")
    parser.add_argument("--mode", choices=["int8", "int4"], default=None, help="gpt-fast's spelling of --format")
    parser.add_argument("--groupsize", type=int, choices=Int4.GROUP_SIZES, default=None,
                        help="with --mode int4: inputs of a row that share a scale (default 32)")
    parser.add_argument("--int4_attention", action="store_true",
                        help="with --mode int4: attention and the output head in int4 too")
    parser.add_argument("--calibration_text", type=Path, default=None,
                        help="a plain-text file like the model's use: the full-precision model reads it once, and the "
                             "formats that search their scales weigh each input by its activations there; the "
                             "statistics are saved beside the checkpoint (MODEL.imatrix.safetensors)")
    parser.add_argument("--imatrix", type=Path, default=None,
                        help="the statistics an earlier --calibration_text saved, reused without running the model")
    args = parser.parse_args(argv)
    with one_line_errors():
        spec = format_spec(args) or "int8"
        try:
            output = quantize_checkpoint(args.checkpoint_path, spec, args.calibration_text, args.imatrix)
        except OSError as e:  # disk full, permissions
            raise UserError(f"could not write beside {args.checkpoint_path}: {e.strerror or e}")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
