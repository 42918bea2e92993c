# Which code multiplies each step's weights: decided here, and only here, from the named thresholds below.
#
# model.py is the reference, written to be read. A model built by formats.py keeps model.py's structure
# (routing, attention, the residual stream) and sends its three heavy operations through this file:
#   linear       a linear layer's weight times x          -> linear_path()
#   run_experts  each token's K experts, weighted          -> experts_path()
#   attend       attention over the KV cache               -> attention_path()
# Each *_path() returns the name of the code that runs, and the operation calls that code: the weight
# format's own method (formats.py), a hand-written kernel (kernels/cpu.cpp, kernels/triton_moe.py) or
# a PyTorch expression. Tests ask the *_path() functions which path a shape takes.
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
import torch.nn.functional as F
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
    """Whether MIXTRAL_TRITON asks for the Triton kernels for `layers` ('experts' or 'linear'); if it
    does, imports them (and so triton, which only CUDA users need) and registers their ops."""
    value = os.environ.get(TRITON_VARIABLE, "")
    if value in ("", "0") or (value == "experts" and layers != "experts"):
        return False
    from kernels import triton_moe  # noqa: F401  registers torch.ops.mixtral_triton
    return True


def use_cpu_dequantize(q: Tensor, dtype: torch.dtype) -> bool:
    """Whether kernels/cpu.cpp reads back stored weights q in dtype: one pass instead of PyTorch's three."""
    return q.device.type == "cpu" and dtype in (torch.float32, torch.bfloat16, torch.float16) and cpu_kernels.available()


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
    'cpu prompt kernel'                     many tokens on a CPU, quantized weights read in place;
    'decode'                                a few tokens on a CPU, PyTorch (fmt.decode_linear);
    'prompt'                                many tokens on a CPU: a full-precision copy in matmul_dtype;
    'device'                                elsewhere (GPUs): fmt.linear, which torch.compile fuses."""
    kernel = kernel_path(x, "linear", fmt)
    if kernel:
        return kernel
    if prompt_kernel(x, fmt, x.shape[-1]):
        return "cpu prompt kernel"
    if x.device.type == "cpu":
        return "decode" if few_tokens(x) else "prompt"
    return "device"


def linear(fmt, x: Tensor, t: dict) -> Tensor:
    """x [..., in] times the weight stored in t (fmt's tensors): [..., out]."""
    path = linear_path(fmt, x)
    if path == "cpu kernel":
        return fmt.cpu_linear(x.reshape(-1, x.shape[-1]), t).view(*x.shape[:-1], -1)
    if path == "triton":
        return fmt.cuda_linear(x.reshape(-1, x.shape[-1]), t).view(*x.shape[:-1], -1)
    if path == "cpu prompt kernel":
        return fmt.cpu_prompt_linear(x.reshape(-1, x.shape[-1]), t).view(*x.shape[:-1], -1)
    if path == "decode":
        return fmt.decode_linear(x, t)
    if path == "prompt":
        return fmt.prompt_linear(x, t)
    return fmt.linear(x, t)


def compiled_batch_step(x: Tensor) -> bool:
    """A compiled step of a few tokens: it reads the chosen experts in place with no host sync (a GPU step
    stays one CUDA graph), even where the tokens choose more expert matrices than a grouped pass would
    read; the grouped pass of quantized formats reads its group sizes on the host, which a CUDA graph
    cannot. Eager runs keep the grouped pass, whose gathered copies are cheaper there."""
    return few_tokens(x) and torch.compiler.is_compiling()


def experts_path(fmt, x: Tensor, experts: Tensor, num_experts: int, width: int) -> str:
    """How each token's experts run, x [N, D], experts [N, K] of num_experts, of `width` (I) hidden values:
    'cpu kernel', 'triton'   the hand-written kernels (a few tokens);
    'cpu prompt kernel'      many tokens on a CPU, quantized weights read in place;
    'decode'                 matrix-vector products on the chosen experts' weights (fmt.decode_experts):
                             where the tokens choose at most as many expert matrices as a grouped pass
                             over all of them would read, and in a compiled step of a few tokens
                             (compiled_batch_step);
    'grouped'                prompts: one grouped matmul over all the chosen experts (fmt.grouped_experts),
                             for formats that have one, where half precision is not slow;
    'one by one'             prompts otherwise: each chosen expert over its tokens, its weights read back
                             in matmul_dtype (fmt.experts_one_by_one)."""
    kernel = kernel_path(x, "experts", fmt)
    if kernel:
        return kernel
    if prompt_kernel(x, fmt, x.shape[-1], width):
        return "cpu prompt kernel"
    if experts.numel() <= num_experts or compiled_batch_step(x):
        return "decode"
    if fmt.grouped_matmul and not (x.device.type == "cpu" and half_matmul_is_slow(x.dtype)):
        return "grouped"
    return "one by one"


def run_experts(fmt, x: Tensor, experts: Tensor, weights: Tensor, w1: dict, w3: dict, w2: dict) -> Tensor:
    """Each token's chosen experts: x [N, D], experts/weights [N, K] -> [N, D]."""
    path = experts_path(fmt, x, experts, w1[""].size(0), w1[""].size(1))
    if path == "cpu kernel":
        return fmt.cpu_experts(x, experts, weights, w1, w3, w2)
    if path == "cpu prompt kernel":
        return fmt.cpu_prompt_experts(x, experts, weights, w1, w3, w2)
    if path == "triton":
        return fmt.cuda_experts(x, experts, weights, w1, w3, w2)
    if path == "decode":
        return fmt.decode_experts(x, experts, weights, w1, w3, w2)
    if path == "grouped":
        return fmt.grouped_experts(x, experts, weights, w1, w3, w2)
    return fmt.experts_one_by_one(x, experts, weights, w1, w3, w2)


def attention_path(q: Tensor) -> str:
    """'decode' for one new token per sequence on a CPU (decode_attention), else 'sdpa' (PyTorch's
    scaled_dot_product_attention): on a CPU SDPA's fixed cost per call is large next to one token's
    small product, and written out the product fuses into the compiled decode step."""
    return "decode" if q.shape[2] == 1 and q.device.type == "cpu" else "sdpa"


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """model.Attention.attend on the path attention_path chooses: q [B, H, T, Dh], k/v [B, KV, S, Dh]."""
    if attention_path(q) == "decode":
        return decode_attention(q, k, v, mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def decode_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """One new token's attention over the cache, written out so that torch.compile fuses it into the
    decode step. q: [B, H, T, Dh], k/v: [B, KV, S, Dh], mask: [T, S] or [B, 1, T, S] -> [B, H, T, Dh]"""
    B, H, T, Dh = q.shape
    KV = k.shape[1]
    qg = q.reshape(B, KV, H // KV * T, Dh).float()  # [B, KV, H/KV, Dh]: the query heads sharing each kv head
    scores = (qg @ k.float().transpose(-1, -2)) * Dh ** -0.5  # [B, KV, H/KV, S]
    scores = scores.masked_fill(~mask, float("-inf"))
    y = scores.softmax(dim=-1) @ v.float()  # [B, KV, H/KV, Dh]
    return y.to(q.dtype).view(B, H, T, Dh)
