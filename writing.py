# Writing a checkpoint so that no fault leaves part of one behind: the converter and quantize.py write
# a file (atomic_file), scripts/make_tiny_checkpoint.py and scripts/train_tiny.py a folder of files
# (atomic_folder), under a temporary name beside the output, renamed when complete. A full disk, a
# file-size limit or a signal (Ctrl-C, SIGTERM from `timeout` or a job scheduler, SIGHUP from a closed
# terminal) removes the temporary one and ends the run with one line. Each run has a temporary name of
# its own, so that two runs writing one output never write one file; the last to finish wins, whole.
import contextlib
import errno
import fnmatch
import os
import resource
import secrets
import shutil
import signal
import stat
import sys
import threading
from pathlib import Path

from errors import UserError

# The signals that ask a run to stop, and let it clean up first.
STOPPING_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def readable_size(nbytes: int) -> str:
    return f"{nbytes / 1e9:.1f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.1f} MB"


def check_replaceable(path: Path):
    """Refuses, in one line, to replace a read-only file (making it so is how a user says 'keep this') or a
    folder, and to write where the folder does not let this user. Callers with a long way to go before
    writing call it up front too."""
    if path.is_dir():
        raise UserError(f"{path} is a folder: the output would replace it; move it or remove it first")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise UserError(f"{path.parent} is not a folder this user can write into: cannot write {path.name} there")
    if not path.exists():
        return
    # os.access alone would pass every file for root, who may write anything: the mode bits say it too.
    if not os.access(path, os.W_OK) or not os.stat(path).st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH):
        raise UserError(f"{path} is read-only: make it writable (chmod u+w) or remove it to write it again")


def temporary_path(path: Path) -> Path:
    """A name beside path that no other run uses: path's name, a random part, '.tmp'."""
    return path.with_name(f"{path.name}.{secrets.token_hex(4)}.tmp")


@contextlib.contextmanager
def atomic_file(path: Path, needed_bytes: int):
    """Yields a file opened for writing under a temporary name of this run's own beside path (its name
    ends in '.tmp'), renamed to path when the block ends. A write error, or a stopping signal, removes it
    and raises a UserError (SystemExit for a signal) with one line naming the path, and for a full disk
    the space needed_bytes asks for there. A read-only file at path is refused before anything is written.
    Write torch.save's output through the file object yielded: torch's own writer, given a path,
    reports a full disk as a RuntimeError that does not say so."""
    check_replaceable(path)
    tmp = temporary_path(path)
    try:
        with stop_cleanly_on_signals(f"{path} was not written"):
            try:
                with open(tmp, "xb") as f:  # x: never another's file, however unlikely the name
                    yield f
            except (OSError, RuntimeError) as e:
                raise UserError(write_failure(path, needed_bytes, writer_cause(e))) from None
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_folder(path: Path, replaceable: tuple = ()):
    """Yields a new, empty folder beside path, under a temporary name of this run's own, to write into;
    when the block ends it takes path's place, so that path is never a mix of old and new files: an old
    folder there is renamed aside, the new one renamed to path, the old one removed. A write error, or a
    stopping signal, removes the new folder, leaves path as it was, and raises a UserError (SystemExit
    for a signal) with one line naming path. The folder is made at once, so a place that cannot be
    written is found before the work that fills it. An old folder is replaced only if each of its
    entries is a file whose name matches one of the replaceable patterns (fnmatch): anything else in
    it is not this writer's to remove, and path is refused."""
    path = Path(path)
    check_folder_replaceable(path, replaceable)
    tmp = temporary_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        with stop_cleanly_on_signals(f"{path} was not written"):
            try:
                yield tmp
                replace_folder(tmp, path)
            except OSError as e:
                raise UserError(write_failure(path, None, e)) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_folder_replaceable(path: Path, replaceable: tuple):
    if not path.exists():
        return
    if not path.is_dir():
        raise UserError(f"{path} is a file: give a folder to write into")
    for entry in sorted(path.iterdir()):
        if entry.is_dir() or not any(fnmatch.fnmatch(entry.name, pattern) for pattern in replaceable):
            raise UserError(f"{path} holds {entry.name}, which is not a checkpoint's: the folder would be replaced "
                            f"as a whole, so give a new folder (or one holding a checkpoint only)")


def replace_folder(new: Path, path: Path):
    """new takes path's place; an old folder at path is removed once it has."""
    if not path.exists():
        os.rename(new, path)
        return
    aside = temporary_path(path)
    os.rename(path, aside)
    try:
        os.rename(new, path)
    except OSError:
        os.rename(aside, path)
        raise
    if aside.is_symlink():  # a link to a folder: the link was replaced, not what it points to
        aside.unlink()
    else:
        shutil.rmtree(aside, ignore_errors=True)


def check_room(path: Path, sizes: list):
    """Refuses files of these sizes (bytes) where path will be, before the work that leads to them: one
    larger than the file-size limit (ulimit -f), or all of them more than the free space."""
    limit, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if limit != resource.RLIM_INFINITY and max(sizes) > limit:
        raise UserError(f"{path} needs a file of {readable_size(max(sizes))}, more than the file-size limit "
                        f"(ulimit -f) of {readable_size(limit)}: raise the limit, or write elsewhere")
    existing = next(p for p in (Path(path).absolute(), *Path(path).absolute().parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if sum(sizes) > free:
        raise UserError(f"{path} needs {readable_size(sum(sizes))} and {existing} has {readable_size(free)} free: "
                        f"make room there")


def writer_cause(error: BaseException) -> BaseException:
    """What made a write fail. torch's writer calls the file object's write() and turns any exception it
    raises (a full disk's OSError, a signal's SystemExit) into a RuntimeError of its own, keeping the
    original as the context: that original is the cause, and a stopping signal's exit is raised again."""
    cause = error
    while isinstance(cause, RuntimeError) and cause.__context__ is not None:
        cause = cause.__context__
    if isinstance(cause, (SystemExit, KeyboardInterrupt)):
        raise cause
    if not isinstance(cause, OSError):
        raise error  # not a write error: a bug, shown as one
    return cause


def write_failure(path: Path, needed_bytes, error: OSError) -> str:
    """The line for a failed write: what happened, where, and for a full disk how much space it needs
    (needed_bytes; None where it is not known)."""
    message = f"could not write {path}: {error.strerror or error}"
    size = readable_size(needed_bytes) if needed_bytes is not None else None
    if error.errno == errno.EFBIG:
        return message + (f"; it needs {size}, more than" if size else "; a file grew past") + \
            " the file-size limit (ulimit -f) or what the file system allows"
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        free = readable_size(shutil.disk_usage(path.parent).free)
        return message + (f"; it needs {size} in {path.parent}, which has {free} free" if size else
                          f"; {path.parent} has {free} free") + ": make room there"
    return message


def reserve(f, nbytes: int):
    """Allocates the disk blocks of the file's first nbytes now, so that a full disk is an error here and
    not later: a write through a shared memory map into a block the disk cannot give is a SIGBUS,
    which kills the process with no message and no clean-up."""
    try:
        os.posix_fallocate(f.fileno(), 0, nbytes)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise
        # A file system that cannot reserve: writing every block once, through write() (whose errors
        # are errors), allocates it; the map's writes then land in blocks the file already has.
        chunk = 1 << 20
        for offset in range(0, nbytes, chunk):
            os.pwrite(f.fileno(), os.pread(f.fileno(), chunk, offset), offset)


@contextlib.contextmanager
def stop_cleanly_on_signals(what: str):
    """Within the block, Ctrl-C, SIGTERM and SIGHUP exit through Python (running every `finally` that
    removes a temporary file) with one line and the shell's status for a signal, 128 + its number.
    Signal handlers belong to the main thread: elsewhere the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        say_stopped(signum, what)
        raise SystemExit(128 + signum)

    previous = {s: signal.signal(s, stop) for s in STOPPING_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def say_stopped(signum: int, what: str):
    """The one line for a stopping signal. A progress bar's line has no newline until the bar closes:
    with one drawn, the error line starts a line of its own."""
    start = "\n" if progress_bar_drawn() else ""
    print(f"{start}error: stopped by {signal.Signals(signum).name}; {what}", file=sys.stderr, flush=True)


def progress_bar_drawn() -> bool:
    """Whether a tqdm bar is open now (tqdm keeps every open bar in its class's _instances). tqdm is
    looked up, not imported: a process that has not imported it has no bar."""
    tqdm = sys.modules.get("tqdm.std")
    return tqdm is not None and len(getattr(tqdm.tqdm, "_instances", ())) > 0
