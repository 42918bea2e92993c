# Builds kernels/cpu.cpp on first use and registers its ops (torch.ops.mixtral_cpu.linear, .moe,
# .dequantize_int8 and .dequantize_int4), with fake implementations so that torch.compile(fullgraph=True) keeps the decode
# step one graph around them.
#
# The build (torch.utils.cpp_extension, ninja) is cached under ~/.cache/torch_extensions (or
# TORCH_EXTENSIONS_DIR): later runs load it in a fraction of a second. Ranks under torchrun share that
# cache: the first to arrive takes its lock file and compiles, the others wait and load the result.
# Where the kernels cannot be had (no compiler, not x86 with AVX2/FMA/F16C, or MIXTRAL_NO_CPU_KERNELS=1)
# available() says why in one line on stderr and the caller keeps PyTorch's own path.
import contextlib
import os
import sys
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu.cpp")
DISABLE_VARIABLE = "MIXTRAL_NO_CPU_KERNELS"
# The kernels' instruction set: every x86-64 CPU of the last decade (AMD since Zen, Intel since Haswell).
REQUIRED_FEATURES = ("avx2", "fma3", "f16c")


_status = {}  # "available": the answer, once found


# The answer does not change within a process: torch.compile calls this at tracing time (building the
# kernels then if need be) and keeps the result as a constant, instead of tracing the build.
@torch.compiler.assume_constant_result
def available() -> bool:
    """True once the ops are loaded (built on the first call). Otherwise prints why, once per process,
    and returns False."""
    if "available" not in _status:
        reason = why_unavailable()
        if reason is not None:
            print(f"note: {reason}; using PyTorch's kernels instead (slower decoding)", file=sys.stderr, flush=True)
        _status["available"] = reason is None
    return _status["available"]


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


def why_unavailable():
    if os.environ.get(DISABLE_VARIABLE, "") not in ("", "0"):
        return f"CPU kernels turned off by {DISABLE_VARIABLE}"
    caps = torch.cpu.get_capabilities()
    missing = [f for f in REQUIRED_FEATURES if not caps.get(f)]
    if caps.get("architecture") != "x86_64" or missing:
        return f"the CPU kernels need x86-64 with {', '.join(REQUIRED_FEATURES)}; this CPU lacks {', '.join(missing) or 'x86-64'}"
    try:
        build()
    except Exception as e:  # no compiler, no ninja, a failed compile: all mean the same to the user
        detail = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        return f"could not build the CPU kernels ({detail[:200]})"
    return None


def build():
    """Compiles (or finds in the cache) and loads the kernels into this process."""
    from torch.utils import cpp_extension
    try:  # ninja from PyPI: on PATH only inside an activated virtual environment, so say where it is
        import ninja
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass  # a system ninja may still be on PATH
    # -fopenmp: at::parallel_for is a template compiled here, and runs serially without it.
    cpp_extension.load(name="mixtral_cpu_kernels", sources=[str(SOURCE)], is_python_module=False,
                       extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"], extra_ldflags=["-fopenmp"],
                       verbose=False)
    # What torch.compile needs to know of each op: its output's shape and dtype.
    torch.library.register_fake("mixtral_cpu::linear", lambda x, weight, scales: x.new_empty(x.shape[0], weight.shape[0]))
    torch.library.register_fake("mixtral_cpu::moe", lambda x, *_: torch.empty_like(x))
    torch.library.register_fake("mixtral_cpu::dequantize_int8", lambda q, scales, dtype: q.new_empty(q.shape, dtype=dtype))
    torch.library.register_fake("mixtral_cpu::dequantize_int4",
                                lambda packed, scales, dtype: packed.new_empty(*packed.shape[:-1], 2 * packed.shape[-1], dtype=dtype))
