# What every script's command line shares: the flags that name a checkpoint and where it runs, the checks of
# those flags, and how a script ends: bad input as one line on stderr with exit status 1 (never a traceback),
# Ctrl-C as one line with 130, a closed output pipe quietly as SIGPIPE would; under torchrun every rank runs
# the script and only rank 0 speaks.
import argparse
import contextlib
import os
import signal
import sys
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist

from errors import UserError
from tp import maybe_init_dist

PRECISIONS = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DEFAULT_CHECKPOINT = Path("checkpoints/mistralai/Mixtral-8x7B-v0.1/model.pth")


def add_model_flags(parser: argparse.ArgumentParser, compile_help: str):
    """--checkpoint_path, --device, --precision and --compile, as every script that runs the model spells them."""
    parser.add_argument("--checkpoint_path", type=Path, default=DEFAULT_CHECKPOINT,
                        help="Model checkpoint path (model.pth, or a quantized one beside it).")
    parser.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu",
                        help="Device to use (default: cuda when available, else cpu).")
    parser.add_argument("--precision", choices=list(PRECISIONS), default="bfloat16",
                        help="dtype of activations and unquantized weights.")
    parser.add_argument("--compile", action="store_true", help=compile_help)


def check_device(name: str):
    """A UserError unless this torch can run on device `name`: a device type it knows, built in and
    present (cuda, mps, xpu, ...), with that index; meta holds no data, so it cannot generate."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device torch knows (try cpu or cuda)") from None
    if device.type == "cpu":
        return
    if device.type == "meta":
        raise UserError(f"--device {name} holds shapes, not values: it cannot run the model; use --device cpu or cuda")
    backend = getattr(torch, device.type, None)
    if not hasattr(backend, "is_available") or not hasattr(backend, "device_count"):
        raise UserError(f"--device {name}: this torch ({torch.__version__}) has no {device.type} support; "
                        f"use --device cpu or cuda")
    if not backend.is_available():
        raise UserError(f"--device {name} was asked for but {device.type.upper()} is not available to this torch "
                        f"({torch.__version__}); use --device cpu")
    if device.index is not None and device.index >= backend.device_count():
        raise UserError(f"--device {name} was asked for but there are {backend.device_count()} {device.type} devices "
                        f"(numbered from 0)")


def check_writable(path: Path, flag: str):
    """A UserError unless a file can be written at path: said before any work, not after it."""
    folder = path.parent
    if path.is_dir() or not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"{flag} would write {path}, but {folder} is not a folder this user can write into; "
                        f"give a path in one")


@contextlib.contextmanager
def one_line_errors():
    """The one way a script ends on bad input: a UserError inside becomes 'error: ...' on stderr (from rank 0
    only under torchrun: every rank finds the same fault) and exit status 1; Ctrl-C one line and 130; a reader
    that went away (`generate.py ... | head`) a quiet stop."""
    try:
        yield
    except UserError as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except BrokenPipeError:
        exit_as_on_sigpipe()
    except KeyboardInterrupt:
        print("\nerror: interrupted", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)


def run_on_ranks(args, check: Callable, run: Callable):
    """A script's body (generate.py's, eval.py's): check(args), then run(args, rank, world_size) in each
    process under torchrun (rank None alone), ending as one_line_errors says."""
    with one_line_errors():
        check(args)
        rank = maybe_init_dist(args.device)  # None unless under torchrun
        world_size = dist.get_world_size() if rank is not None else 1
        with output_of_rank0_only(rank):
            run(args, rank, world_size)
    if rank is not None:
        dist.destroy_process_group()


def exit_as_on_sigpipe():
    """What a Unix tool does when the reader of its output goes away (`generate.py ... | head`): stop,
    quietly, with the status of a process killed by SIGPIPE. stdout is pointed at nothing first, or
    Python's flush of it at exit would report the closed pipe again."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(128 + signal.SIGPIPE)


@contextlib.contextmanager
def output_of_rank0_only(rank: Optional[int]):
    """Every rank computes the same tokens; only rank 0 (or a lone process) shows them and the timings."""
    if rank in (None, 0):
        yield
        return
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull), contextlib.redirect_stderr(devnull):
        yield
