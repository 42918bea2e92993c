# What every script's command line shares: the flags that name a checkpoint and where it runs (and on how
# many CPU threads), --help that shows each flag's default, the checks of those flags, the CPU kernels built
# (on first use) apart from loading the model, and how a script ends: bad input as one line on stderr with
# exit status 1 (never a traceback), Ctrl-C as one line with 130, a closed output pipe quietly as SIGPIPE
# would, any other failure to write stdout as one line; under torchrun every rank runs the script and only
# rank 0 speaks.
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
from kernels import cpu as cpu_kernels
from measuring import Timer, available_memory
from tp import maybe_init_dist
from writing import readable_size

PRECISIONS = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DEFAULT_CHECKPOINT = Path("checkpoints/mistralai/Mixtral-8x7B-v0.1/model.pth")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each flag's default after its help line, where there is one to show (not None or False)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def add_model_flags(parser: argparse.ArgumentParser, compile_help: str):
    """--checkpoint_path, --device, --precision, --compile and --threads, as every script that runs the model
    spells them."""
    parser.add_argument("--checkpoint_path", type=Path, default=DEFAULT_CHECKPOINT,
                        help="Model checkpoint path (model.pth, or a quantized one beside it).")
    parser.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu",
                        help="Device to use: cuda when available, else cpu.")
    parser.add_argument("--precision", choices=list(PRECISIONS), default="bfloat16",
                        help="dtype of activations and unquantized weights.")
    parser.add_argument("--compile", action="store_true", help=compile_help)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="CPU threads the model's work runs on (the default is torch's: the physical cores). "
                             "On a machine busy with other work fewer are often faster: a thread that loses its "
                             "core holds up the others at every step.")


def check_model_flags(args):
    """The checks of add_model_flags' flags."""
    check_device(args.device)
    if args.threads < 1:
        raise UserError(f"--threads must be at least 1, got {args.threads}")


def check_text(value: str, flag: str):
    """A UserError unless an argument is UTF-8 text: Python hands on an argument's bytes that are not UTF-8
    as lone surrogates (U+DC80..U+DCFF), which the tokenizer cannot take."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        byte = ord(value[e.start]) - 0xDC00
        where = f"byte {byte:#04x}" if 0x80 <= byte <= 0xFF else f"character {value[e.start]!r}"
        raise UserError(f"{flag} is not UTF-8 text ({where} at character {e.start + 1}); give it in UTF-8") from None


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
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder; give the path of the file to write (in it, or beside it)")
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"{flag} would write {path}, but {folder} is not a folder this user can write into; "
                        f"give a path in one")


def check_memory(needed: int, device: str, asking: str, fix: str):
    """Refuses, before any allocation, to need more bytes than the device has available: the allocator's own
    failure is a traceback, and on a CPU that overcommits, a cache that is zeroed page by page is ended by the
    kernel's out-of-memory killer instead. asking: what needs them, with {} where their size goes."""
    available = available_memory(device)
    if available is not None and needed > available:
        raise UserError(f"{asking.format(readable_size(needed))}, more than the {readable_size(available)} of memory "
                        f"available on {device}; {fix}")


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
    process under torchrun (rank None alone) on --threads threads, ending as one_line_errors says."""
    with one_line_errors(), checked_output():
        check(args)
        torch.set_num_threads(args.threads)
        rank = maybe_init_dist(args.device)  # None unless under torchrun
        world_size = dist.get_world_size() if rank is not None else 1
        try:
            with output_of_rank0_only(rank):
                run(args, rank, world_size)
                sys.stdout.flush()  # a full disk is found here at the latest, while one line can still say so
        except RuntimeError as e:
            if rank is None or not lost_a_rank(e):
                raise
            # Said by every rank left (rank 0 may be the one that went), on its own stderr; the rank that went
            # said why, if it could, and torchrun's report says how it ended.
            other = f"rank {1 - rank}" if world_size == 2 else "another rank"
            print(f"error: {other} stopped in the middle of the run (its own line, or torchrun's report, says why); "
                  f"rank {rank} cannot go on without it", file=sys.stderr)
            sys.exit(1)
    if rank is not None:
        dist.destroy_process_group()


def lost_a_rank(e: RuntimeError) -> bool:
    """Whether a collective failed because another rank's process went away: gloo says its connection closed
    (or was reset); torch's own distributed errors say so by their type."""
    return isinstance(e, getattr(dist, "DistError", ())) or any(
        words in str(e) for words in ("Connection closed by peer", "Connection reset by peer"))


def prepare_cpu_kernels(device: str):
    """On a CPU, the kernels are loaded now, before the model, and a first use that builds them says so and is
    timed on its own line: that build takes longer than loading a model, once."""
    if torch.device(device).type != "cpu":
        return
    timer = Timer()

    def building(isa: str):
        if timer.began is None:  # a lower set tried after a failed build is the same build
            print(f"building the CPU kernels for {isa} (first use only)…", file=sys.stderr, flush=True)
            timer.start()
    cpu_kernels.on_build = building
    try:
        cpu_kernels.available()
    finally:
        cpu_kernels.on_build = None
    if timer.began is not None:
        print(f"Time to build the CPU kernels: {timer.stop():.02f} seconds", file=sys.stderr)


class CheckedOutput:
    """stdout, whose failed writes (a full disk, `> /dev/full`) become a UserError saying so. A reader that
    went away stays a BrokenPipeError, which one_line_errors ends quietly."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        return self.checked(self.stream.write, text)

    def flush(self):
        return self.checked(self.stream.flush)

    def __getattr__(self, name):
        return getattr(self.stream, name)

    def checked(self, fn, *args):
        try:
            return fn(*args)
        except BrokenPipeError:
            raise
        except OSError as e:
            # What stdout still buffers goes nowhere at exit, rather than failing again after the one line.
            with contextlib.suppress(OSError, ValueError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), self.stream.fileno())
            raise UserError(f"could not write the output to stdout: {e.strerror or e}") from None


@contextlib.contextmanager
def checked_output():
    """Within, stdout is a CheckedOutput. A closed stdout (`>&-`, which Python shows as None) is refused before
    any work; a closed stderr becomes nothing for good, or print(file=sys.stderr) would write to stdout."""
    if sys.stderr is None:
        sys.stderr = open(os.devnull, "w")
    if sys.stdout is None:
        raise UserError("stdout is closed (>&-): give the output somewhere to go, e.g. > out.txt or > /dev/null")
    stdout = sys.stdout
    sys.stdout = CheckedOutput(stdout)
    try:
        yield
    finally:
        sys.stdout = stdout


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
