# Which code multiplies each step's weights: decided here, and only here, from the named thresholds below.
# Decisions only: this file calls no weight format and no layer. The served model (layers.py) asks, for each
# of its three heavy operations, which path runs, and looks the path's code up in its own tables:
#   a linear layer's weight times x          linear_path()
#   each token's K experts, weighted          experts_path()
#   attention over the KV cache               attention_path()
# (and dequantize_path(): how a prompt reads quantized weights back; quantize_path(): which code writes
# GGUF's blocks). The answer names a weight format's own expression (formats.py), a hand-written kernel
# (kernels/cpu.cpp, kernels/cpu_quantize.cpp, kernels/triton_moe.py) or a PyTorch path (layers.py). Tests
# ask the *_path() functions which path a shape takes.
#
# Why the paths differ:
# - A step of a few tokens (decoding) reads every weight it uses once and does little arithmetic with
#   it: memory-bound. The kernels read the stored bytes (int8, int4) in place, at memory speed.
# - A prompt's tokens share each weight: compute-bound. Quantized weights are multiplied in place by
#   the CPU prompt kernels (a block of rows expanded in cache at a time); elsewhere PyTorch's matrix
#   multiplications win, on a full-precision copy of quantized weights, converted one matrix at a time.
# - On CPUs without bf16/fp16 matrix instructions PyTorch multiplies half precision several times
#   slower than float32: prompts are multiplied in float32 there (matmul_dtype).
# The answers depend on shapes, the device, the environment and the CPU, never on values: torch.compile
# traces one of them and keeps the graph whole.
#
# Shapes in comments: N tokens, D model width, E experts, K experts per token, S cache length.
import os

import torch
from torch import Tensor

from kernels import cpu as cpu_kernels

# Up to this many tokens a step is memory-bound and the CPU kernels win; beyond it (prompts) the
# arithmetic dominates and PyTorch's matrix multiplications are faster.
CPU_KERNEL_MAX_TOKENS = 8
# The Triton kernels hold the tokens of a step in one tile of at most this many rows.
TRITON_MAX_TOKENS = 16
# Below this many tokens a full-precision expert keeps its own dtype on CPUs where half-precision
# matmuls are slow: converting its weights to float32 costs about as much as that many slow rows.
MIN_ROWS_TO_CONVERT = 8
# MIXTRAL_TRITON=1: the Triton kernels for the experts and the linear layers on CUDA; =experts: for the
# experts only (to tell the two apart when measuring); unset or 0: the compiled PyTorch path.
TRITON_VARIABLE = "MIXTRAL_TRITON"


def few_tokens(x: Tensor, most: int = CPU_KERNEL_MAX_TOKENS) -> bool:
    """x [..., D] holds at most `most` tokens: a memory-bound step."""
    return x.numel() <= most * x.shape[-1]


# A constant to torch.compile: a compiled step gets the answer at tracing time instead of a graph
# break on torch.cpu.get_capabilities().
@torch.compiler.assume_constant_result
def half_matmul_is_slow(dtype: torch.dtype) -> bool:
    """True on x86 CPUs without bf16 / fp16 matrix instructions (AVX512-BF16, AVX512-FP16, AMX): there
    torch multiplies half-precision matrices several times slower than float32 ones (BENCHMARKS.md)."""
    if dtype not in _half_matmul_is_slow:  # asked once per dtype
        native = {torch.bfloat16: ("avx512_bf16", "amx_bf16"), torch.float16: ("avx512_fp16", "amx_fp16")}
        caps = torch.cpu.get_capabilities()
        _half_matmul_is_slow[dtype] = (dtype in native and caps.get("architecture") == "x86_64"
                                       and not any(caps.get(f) for f in native[dtype]))
    return _half_matmul_is_slow[dtype]


_half_matmul_is_slow = {}


def matmul_dtype(x: Tensor) -> torch.dtype:
    """The dtype a prompt's matmuls run in: x's, but float32 on CPUs that multiply half precision slowly."""
    return torch.float32 if x.device.type == "cpu" and half_matmul_is_slow(x.dtype) else x.dtype


# The answer does not change within a process: torch.compile keeps it as a constant, as it does
# kernels.cpu.available()'s.
@torch.compiler.assume_constant_result
def triton_kernels_requested(layers: str) -> bool:
    """Whether MIXTRAL_TRITON asks for the Triton kernels for `layers` ('experts' or 'linear')."""
    value = os.environ.get(TRITON_VARIABLE, "")
    return value not in ("", "0") and (value != "experts" or layers == "experts")


def dequantize_path(fmt, q: Tensor, dtype: torch.dtype) -> str:
    """'cpu kernel' where kernels/cpu.cpp reads back weights q stored in fmt in dtype (one pass instead of
    PyTorch's three), else 'pytorch' (the format's own dequantize)."""
    if ("cpu dequantize" in fmt.kernels and q.device.type == "cpu"
            and dtype in (torch.float32, torch.bfloat16, torch.float16) and cpu_kernels.available()):
        return "cpu kernel"
    return "pytorch"


def quantize_path(w: Tensor) -> str:
    """'cpu kernel' where kernels/cpu_quantize.cpp writes GGUF's blocks of the weights w (quants.py's
    searches, compiled: PyTorch's take hours for Mixtral), else 'pytorch' (quants.py's own)."""
    return "cpu kernel" if w.device.type == "cpu" and cpu_kernels.available() else "pytorch"


def kernel_path(x: Tensor, layers: str, fmt) -> str:
    """'cpu kernel' or 'triton' where a hand-written kernel serves this step of the format, else ''."""
    if x.device.type == "cpu" and few_tokens(x) and "cpu" in fmt.kernels and cpu_kernels.available():
        return "cpu kernel"
    if (x.device.type == "cuda" and few_tokens(x, TRITON_MAX_TOKENS) and "triton" in fmt.kernels
            and triton_kernels_requested(layers)):
        return "triton"
    return ""


def prompt_kernel(x: Tensor, fmt, *widths: int) -> bool:
    """Whether kernels/cpu_prompt.cpp multiplies this step (more tokens than few_tokens) of format fmt
    on a CPU; its rows of `widths` inputs each must be whole steps of 32 values."""
    return (x.device.type == "cpu" and not few_tokens(x) and "cpu prompt" in fmt.kernels
            and all(w % 32 == 0 for w in widths) and cpu_kernels.available())


def linear_path(fmt, x: Tensor) -> str:
    """How x [..., in] is multiplied by a weight stored in fmt:
    'cpu kernel', 'triton'                  the hand-written kernels (a few tokens);
    'cpu prompt kernel'                     many tokens on a CPU, quantized weights read in place
                                            (layers.cpu_prompt_linear);
    'decode'                                a few tokens on a CPU, PyTorch (fmt.decode_linear);
    'prompt'                                many tokens on a CPU (layers.prompt_linear): quantized weights as a
                                            full-precision copy in matmul_dtype;
    'device'                                elsewhere (GPUs): fmt.linear, which torch.compile fuses."""
    kernel = kernel_path(x, "linear", fmt)
    if kernel:
        return kernel
    if prompt_kernel(x, fmt, x.shape[-1]):
        return "cpu prompt kernel"
    if x.device.type == "cpu":
        return "decode" if few_tokens(x) else "prompt"
    return "device"


def compiled_batch_step(x: Tensor) -> bool:
    """A compiled step of a few tokens: it reads the chosen experts in place with no host sync (a GPU step
    stays one CUDA graph), even where the tokens choose more expert matrices than a grouped pass would
    read; the grouped pass of quantized formats reads its group sizes on the host, which a CUDA graph
    cannot. Eager runs keep the grouped pass, whose gathered copies are cheaper there."""
    return few_tokens(x) and torch.compiler.is_compiling()


def experts_path(fmt, x: Tensor, experts: Tensor, num_experts: int, width: int, down=None) -> str:
    """How each token's experts run, x [N, D], experts [N, K] of num_experts of `width` (I) hidden values,
    their w1 and w3 stored in fmt and their w2 in down (fmt when None; the decode kernels take one format for all
    three, the prompt kernels one for w1 and w3 and one for w2):
    'cpu kernel', 'triton'   the hand-written kernels (a few tokens);
    'cpu kernel, one by one' a few tokens on a CPU with w2 in another format than w1 and w3: each chosen expert's
                             matrices through the linear kernel (layers.kernel_experts_one_by_one);
    'cpu prompt kernel'      many tokens on a CPU, quantized weights read in place (layers.cpu_prompt_experts);
    'decode'                 matrix-vector products on the chosen experts' weights (layers.decode_experts):
                             where the tokens choose at most as many expert matrices as a grouped pass
                             over all of them would read, and in a compiled step of a few tokens
                             (compiled_batch_step);
    'grouped'                prompts: one grouped matmul over all the chosen experts (layers.grouped_experts),
                             for formats that have one, where half precision is not slow;
    'one by one'             prompts otherwise: each chosen expert over its tokens, its weights read back
                             in matmul_dtype (layers.dequantized_experts)."""
    kernel = kernel_path(x, "experts", fmt)
    if kernel and down in (None, fmt):
        return kernel
    if kernel == "cpu kernel" and "cpu" in down.kernels:
        return "cpu kernel, one by one"
    if prompt_kernel(x, fmt, x.shape[-1], width) and (down in (None, fmt) or "cpu prompt" in down.kernels):
        return "cpu prompt kernel"
    if experts.numel() <= num_experts or compiled_batch_step(x):
        return "decode"
    if (fmt.grouped_matmul and (down or fmt).grouped_matmul
            and not (x.device.type == "cpu" and half_matmul_is_slow(x.dtype))):
        return "grouped"
    return "one by one"


# The most values of a head the CPU attention kernel holds (kernels/cpu.cpp's kMostHead), on every instruction set.
ATTENTION_MAX_HEAD = 256


def attention_path(q: Tensor) -> str:
    """How one step's queries q [B, H, T, Dh] attend over the cache: for one new token per sequence on a CPU,
    'cpu kernel' (kernels/cpu.cpp's attention: the cache read in place, where PyTorch's path converts all of
    it to float32 at every step) for heads of whole vectors of 16 values, else 'decode' (layers.decode_attention:
    on a CPU SDPA's fixed cost per call is large next to one token's small product, and written out the
    product fuses into the compiled decode step); 'sdpa' (PyTorch's scaled_dot_product_attention) otherwise."""
    if q.shape[2] != 1 or q.device.type != "cpu":
        return "sdpa"
    Dh = q.shape[-1]
    return "cpu kernel" if Dh % 16 == 0 and Dh <= ATTENTION_MAX_HEAD and cpu_kernels.available() else "decode"
