# Builds kernels/cpu.cpp, kernels/cpu_prompt.cpp and kernels/cpu_quantize.cpp on first use, for the best
# instruction set this CPU has, and registers their ops (torch.ops.mixtral_cpu_<set>.linear, .moe,
# .dequantize_int8, .dequantize_int4; .prompt_linear, .prompt_moe) with fake implementations, so that
# torch.compile(fullgraph=True) keeps the decode step one graph around them (.quantize_blocks, which
# writes GGUF's blocks for quantize.py, is never traced and has none).
#
# One build per instruction set: cpu.cpp holds what all share and includes the inner dot
# products of its set (cpu_avx2.h, cpu_avx512.h), compiled with that set's flags. MIXTRAL_CPU_ISA=<set>
# chooses a lower set than the best (every path can then be run, and measured, on one machine);
# MIXTRAL_NO_CPU_KERNELS=1 none at all. The first use prints one line naming the set.
#
# The build (torch.utils.cpp_extension, ninja) is cached under ~/.cache/torch_extensions (or
# TORCH_EXTENSIONS_DIR): later runs load it in a fraction of a second. Ranks under torchrun share that
# cache: the first to arrive builds, the others wait and load the result. A library in the cache is
# loaded only if its bytes are those its build recorded (a damaged one would crash every run): otherwise
# it is built again. Where the kernels cannot be had (no compiler, not x86 with AVX2/FMA/F16C)
# available() says why in one line on stderr and the caller keeps PyTorch's own path.
import contextlib
import fcntl
import hashlib
import logging
import os
import signal
import struct
import sys
import time
from pathlib import Path

import torch

from errors import UserError

# cpu.cpp: the decode kernels; cpu_prompt.cpp: the prompt kernels (prompt_linear, prompt_moe);
# cpu_quantize.cpp: GGUF's block quantizers (quantize_blocks, quants.py's searches). One library.
SOURCES = [Path(__file__).with_name(name) for name in ("cpu.cpp", "cpu_prompt.cpp", "cpu_quantize.cpp")]
DISABLE_VARIABLE = "MIXTRAL_NO_CPU_KERNELS"
# MIXTRAL_NO_AMX=1: the prompt kernels multiply with integer dot products even where the CPU has AMX.
AMX_VARIABLE = "MIXTRAL_NO_AMX"
ISA_VARIABLE = "MIXTRAL_CPU_ISA"
# The instruction sets, best first: what the CPU must report (torch.cpu.get_capabilities()), the compiler
# flags, and the words the one line uses. avx2 is every x86-64 CPU of the last decade (AMD since Zen,
# Intel since Haswell); avxvnni adds the 256-bit integer dot products of Intel's Alder Lake and later.
ISAS = {
    "avx512": (("avx2", "fma3", "f16c", "avx512_f", "avx512_bw", "avx512_vl", "avx512_vnni", "avx512_bf16"),
               ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mavx512bf16"],
               "AVX-512 with VNNI and BF16"),
    "avxvnni": (("avx2", "fma3", "f16c", "avx_vnni"), ["-mavx2", "-mfma", "-mf16c", "-mavxvnni"], "AVX2 with AVX-VNNI"),
    "avx2": (("avx2", "fma3", "f16c"), ["-mavx2", "-mfma", "-mf16c"], "AVX2"),
}
_status = {}  # "available": the answer, once found; "isa": the set in use; "loaded": the sets loaded
# Called with the instruction set just before its kernels are compiled (the cache has no build of the
# current sources): a script can say so, and time the build apart from loading the model.
on_build = None


def supported() -> list:
    """The instruction sets this CPU runs, best first."""
    caps = torch.cpu.get_capabilities()
    if caps.get("architecture") != "x86_64":
        return []
    return [isa for isa, (needs, _, _) in ISAS.items() if all(caps.get(f) for f in needs)]


# The answer does not change within a process: torch.compile calls this at tracing time (building the
# kernels then if need be) and keeps the result as a constant, instead of tracing the build.
@torch.compiler.assume_constant_result
def available() -> bool:
    """True once the ops of the chosen instruction set are loaded (built on the first call). Otherwise
    prints why, once per process, and returns False."""
    if "available" not in _status:
        candidates, reason = choose()
        for isa in candidates:  # a compiler too old for the best set may still build a lower one
            reason = why_not_built(isa)
            if reason is None:
                break
            if isa != candidates[-1]:
                print(f"note: {reason}; trying {candidates[candidates.index(isa) + 1]}", file=sys.stderr, flush=True)
        else:
            isa = None
        if reason is not None:
            print(f"note: {reason}; using PyTorch's kernels instead (slower decoding)", file=sys.stderr, flush=True)
        elif int(os.environ.get("RANK", "0")) == 0:  # under torchrun every rank loads the same set
            print(f"CPU kernels: {isa} ({ISAS[isa][2]}); {ISA_VARIABLE}={'|'.join(supported())} chooses among "
                  f"this CPU's", file=sys.stderr, flush=True)
        _status["available"], _status["isa"] = reason is None, isa
    return _status["available"]


def choose():
    """([the instruction sets to try, best first], None) or ([], why none can be)."""
    if os.environ.get(DISABLE_VARIABLE, "") not in ("", "0"):
        return [], f"CPU kernels turned off by {DISABLE_VARIABLE}"
    runs = supported()
    if not runs:
        caps, needs = torch.cpu.get_capabilities(), ISAS["avx2"][0]
        missing = [f for f in needs if not caps.get(f)] if caps.get("architecture") == "x86_64" else ["x86-64"]
        return [], f"the CPU kernels need x86-64 with {', '.join(needs)}; this CPU lacks {', '.join(missing)}"
    asked = os.environ.get(ISA_VARIABLE, "")
    if asked and asked not in runs:
        what = f"not one of {', '.join(ISAS)}" if asked not in ISAS else "not one this CPU runs"
        raise UserError(f"{ISA_VARIABLE}={asked!r} is {what}; this CPU runs {', '.join(runs)}")
    return [asked] if asked else runs, None


def ops(isa: str = None):
    """The ops' namespace (torch.ops.mixtral_cpu_<set>) of the set in use, or of `isa` (built if need be)."""
    return getattr(torch.ops, f"mixtral_cpu_{isa or _status['isa']}")


@contextlib.contextmanager
def turned_off():
    """Within: eager code takes PyTorch's kernels (a reference to check a device against). Compiled
    steps keep the answer they were traced with."""
    before = available()
    _status["available"] = False
    try:
        yield
    finally:
        _status["available"] = before


@contextlib.contextmanager
def using(isa: str):
    """Within: eager code takes the kernels of instruction set `isa` (built if need be)."""
    available()
    load(isa)
    before = _status["available"], _status["isa"]
    _status["available"], _status["isa"] = True, isa
    try:
        yield
    finally:
        _status["available"], _status["isa"] = before


def why_not_built(isa: str):
    try:
        load(isa)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # no compiler, no ninja, a failed compile: all mean the same to the user
        detail = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        return f"could not build the {isa} CPU kernels ({detail[:200]})"
    return None


def load(isa: str):
    """Compiles (or finds in the cache) and loads the kernels of instruction set `isa` into this process."""
    loaded = _status.setdefault("loaded", set())
    if isa not in loaded:
        cpp_extension = extension_builder()
        try:  # ninja from PyPI: on PATH only inside an activated virtual environment, so say where it is
            import ninja
            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            pass  # a system ninja may still be on PATH
        name, folder = f"mixtral_cpu_kernels_{isa}", build_folder(isa)
        # -fopenmp: at::parallel_for is a template compiled here, and runs serially without it.
        flags = ["-O3", *ISAS[isa][1], f"-DMIXTRAL_ISA_{isa.upper()}", f"-DMIXTRAL_OPS=mixtral_cpu_{isa}", "-fopenmp"]
        with build_lock(folder), interrupts_kept():
            for library in folder.glob("*.so"):
                remove_if_damaged(library)
            if on_build is not None and not built(folder / f"{name}.so"):
                on_build(isa)
            cpp_extension.load(name=name, sources=[str(s) for s in SOURCES], is_python_module=False, extra_cflags=flags,
                               extra_ldflags=["-fopenmp"], build_directory=str(folder), verbose=False)
            for library in folder.glob("*.so"):  # built (or found intact) and loaded: these bytes are good
                record_checksum(library)
        register_fakes(f"mixtral_cpu_{isa}")
        loaded.add(isa)
        ops(isa).prompt_use_amx(amx_wanted())
    return ops(isa)


def built(library: Path) -> bool:
    """Whether library is there and newer than every source: loading it will not compile."""
    sources = [*SOURCES, *SOURCES[0].parent.glob("cpu_*.h")]
    return library.is_file() and library.stat().st_mtime >= max(source.stat().st_mtime for source in sources)


def amx_wanted() -> bool:
    return os.environ.get(AMX_VARIABLE, "") in ("", "0")


@contextlib.contextmanager
def amx(on: bool):
    """Within: the prompt kernels of the set in use take AMX's tiles (where the CPU and the OS offer them:
    the answer is what this yields) or integer dot products."""
    try:
        yield ops().prompt_use_amx(on)
    finally:
        ops().prompt_use_amx(amx_wanted())


def build_folder(isa: str) -> Path:
    """Where instruction set isa's build is cached."""
    return Path(extension_builder()._get_build_directory(f"mixtral_cpu_kernels_{isa}", verbose=False))


def extension_builder():
    """torch.utils.cpp_extension, imported without the warning torch's CUDA builds print when they find
    a CUDA toolkit but no GPU ("No CUDA runtime is found"): it concerns CUDA extensions, and these
    kernels are CPU code. Only that warning, and only while importing it here."""
    logger = logging.getLogger("torch.utils.cpp_extension")

    def not_the_cuda_warning(record):
        return "No CUDA runtime is found" not in record.getMessage()
    logger.addFilter(not_the_cuda_warning)
    try:
        from torch.utils import cpp_extension
    finally:
        logger.removeFilter(not_the_cuda_warning)
    return cpp_extension


def register_fakes(namespace: str):
    """What torch.compile needs to know of each op: its output's shape and dtype."""
    torch.library.register_fake(f"{namespace}::linear",
                                lambda x, weight, scales, format: x.new_empty(x.shape[0], weight.shape[0]))
    torch.library.register_fake(f"{namespace}::moe", lambda x, *_: torch.empty_like(x))
    torch.library.register_fake(f"{namespace}::dequantize_int8", lambda q, scales, dtype: q.new_empty(q.shape, dtype=dtype))
    torch.library.register_fake(f"{namespace}::dequantize_int4",
                                lambda packed, scales, dtype: packed.new_empty(*packed.shape[:-1], 2 * packed.shape[-1], dtype=dtype))
    torch.library.register_fake(f"{namespace}::attention", lambda q, k, v, mask, scale: torch.empty_like(q))
    torch.library.register_fake(f"{namespace}::prompt_linear", lambda x, weight, scales, fmt: x.new_empty(x.shape[0], weight.shape[0]))
    torch.library.register_fake(f"{namespace}::prompt_moe", lambda x, *_: torch.empty_like(x))


def torch_lock_is_a_baton() -> bool:
    """Whether this torch locks a build with a file whose mere existence is the lock (its FileBaton, up to
    torch 2.13), which a killed build leaves behind. Later versions hold an OS lock on that file, which
    dies with its holder, and leave the file after every build."""
    return hasattr(extension_builder(), "FileBaton")


@contextlib.contextmanager
def build_lock(folder: Path):
    """One build at a time per folder, among processes (torchrun's ranks share the cache). An flock is
    released by the kernel when its holder dies, however it dies, so it never goes stale; torch's own
    lock file inside the folder can, when a build is killed, where torch takes its existence for the
    lock. Holding the flock, no one else builds: any such file left there is stale, and is removed with
    a note."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "mixtral.flock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one line for all the ranks that wait
                print(f"waiting for another process's build of the CPU kernels in {folder}", file=sys.stderr, flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        torch_lock = folder / "lock"
        if torch_lock.exists() and torch_lock_is_a_baton():
            age = time.time() - torch_lock.stat().st_mtime
            print(f"note: removing {torch_lock}, left by a build that did not finish ({age:.0f} s ago)",
                  file=sys.stderr, flush=True)
            torch_lock.unlink(missing_ok=True)
        yield


def remove_if_damaged(library: Path):
    """Removes a cached library, and the objects it was linked from, so that they are built again, when
    loading it could crash: when it is shorter than its own ELF header says (a build or a copy cut short:
    a bus error), or when its bytes are not those its build recorded (damaged inside: SIGSEGV or SIGILL),
    or when no build recorded them (a build killed before it could, or a cache older than checksums)."""
    try:
        with open(library, "rb") as f:
            header = f.read(64)
        size = library.stat().st_size
    except FileNotFoundError:
        return
    # ELF64: section headers at e_shoff (offset 40), e_shentsize and e_shnum (58, 60), at the file's end.
    intact = len(header) == 64 and header[:4] == b"\x7fELF"
    if intact:
        shoff, = struct.unpack_from("<Q", header, 40)
        shentsize, shnum = struct.unpack_from("<HH", header, 58)
        intact = shoff + shentsize * shnum <= size
    recorded = checksum_path(library)
    if not intact:
        problem = "is damaged"
    elif not recorded.exists():
        problem = "has no checksum recorded by its build"
    elif recorded.read_text().strip() != sha256(library):
        problem = "does not match the checksum recorded when it was built"
    else:
        return
    print(f"note: {library} {problem}; building it again", file=sys.stderr, flush=True)
    # The objects too: whatever damaged the library may have damaged them, and ninja would link them again.
    for built in (library, recorded, *library.parent.glob("*.o")):
        built.unlink(missing_ok=True)


def checksum_path(library: Path) -> Path:
    return library.with_name(library.name + ".sha256")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()  # a library of a few hundred KB


def record_checksum(library: Path):
    """Writes the library's checksum beside it (under the build lock; renamed into place, so never half
    written), unless it is the one there already."""
    recorded, digest = checksum_path(library), sha256(library)
    if not recorded.exists() or recorded.read_text().strip() != digest:
        tmp = recorded.with_name(recorded.name + ".tmp")
        tmp.write_text(digest + "\n")
        os.replace(tmp, recorded)


@contextlib.contextmanager
def interrupts_kept():
    """Ctrl-C during a build stops the run, as anywhere else. The compiler sees it first and fails, and
    torch reports that as a failed build, which would otherwise mean 'carry on without the kernels'."""
    interrupted = []
    try:
        before = signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))
    except ValueError:  # not the main thread: signals are not ours to handle
        yield
        return
    try:
        yield
    except Exception:
        if interrupted:
            raise KeyboardInterrupt from None
        raise
    finally:
        signal.signal(signal.SIGINT, before)
    if interrupted:
        raise KeyboardInterrupt
