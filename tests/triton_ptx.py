"""Run by test_triton.py in a process of its own (without TRITON_INTERPRET: the test process's kernels are the
interpreter's): compiles each kernel of kernels/triton_moe.py for the H200 (sm_90) with Triton's own compiler,
no GPU needed, and prints per kernel and format, one line each: the sizes of its asynchronous copies to shared
memory, those of them that copy the weights' bytes (int8 weights and every packed format's bytes are the
kernels' only 8-bit tensors; '-' where there are none), its int-to-float conversions and its tensor-core
multiplies."""
import re
import sys
from pathlib import Path

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernels import triton_moe as m  # noqa: E402


def compile(kernel, pointers, consts, divisible):
    # As a launch on the GPU specializes it: 16-byte aligned pointers, and the sizes and strides of
    # Mixtral's shapes, all multiples of 16.
    signature = {n: "constexpr" if n in consts else pointers.get(n, "i32") for n in kernel.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(kernel.arg_names) if n in pointers or n in divisible}
    compiled = triton.compile(ASTSource(kernel, signature, constexprs=consts, attrs=attrs),
                              target=GPUTarget("cuda", 90, 32), options=m.launch_options())
    return compiled.asm["ttgir"], compiled.asm["ptx"]


def weight_copy_widths(ttgir: str, copies: list) -> list:
    """The bytes each thread copies at once in each asynchronous copy of an 8-bit tensor (the weights): its
    contiguity where Triton writes it on the copy (3.7), else the last size per thread of the copy's layout
    (3.8 leaves the attribute out), kept only where the PTX has copies of that width."""
    per_thread = dict(re.findall(r"#(blocked\d*) = #ttg\.blocked<\{sizePerThread = \[[\d, ]*?(\d+)\]", ttgir))
    widths = []
    for contiguity, layout in re.findall(r"async_copy_global_to_local [^:]*?(?:\{contiguity = (\d+) : i32\} )?"
                                         r": tensor<[0-9x]*!tt\.ptr<i8>, #(blocked\d*)>", ttgir):
        width = contiguity or per_thread[layout]
        if hex(int(width)) in copies or str(int(width)) in copies:
            widths.append(width)
    return widths


sizes = {"D", "I", "part_len", "w_expert_stride", "w_row_stride", "s_expert_stride", "s_row_stride"}
formats = [("full", m.FLOAT, "*bf16", 1), ("int8", m.INT8, "*i8", 1), ("int4", m.INT4, "*u8", 32)]
formats += [(name, quant, "*u8", 1) for name, (quant, _, _) in m.GGUF.items()]
for fmt, quant, weight, group in formats:
    common = dict(QUANT=quant, GROUP=group, BLOCK_N=16, BLOCK_SLOTS=2, BLOCK_COLS=m.block_cols(quant, group),
                  DOT_DTYPE=tl.bfloat16)
    gate_up = compile(m.gate_up_kernel, dict(x_ptr="*bf16", experts_ptr="*i64", w1_ptr=weight, w3_ptr=weight,
                                             s1_ptr="*bf16", s3_ptr="*bf16", h_ptr="*fp32"),
                      {**common, "BLOCK_ROWS": m.block_rows(2, 14336, 132)}, sizes)
    down = compile(m.down_kernel, dict(h_ptr="*fp32", experts_ptr="*i64", weights_ptr="*bf16", w2_ptr=weight,
                                       s2_ptr="*bf16", y_ptr="*fp32"),
                   {**common, "BLOCK_ROWS": m.block_rows(2, 4096, 132)}, sizes)
    for name, (ttgir, ptx) in (("gate_up", gate_up), ("down", down)):
        copies = re.findall(r"cp\.async\.c[ag]\.shared\.global \[[^]]*\], \[[^]]*\], (\w+)", ptx)
        weight_copies = weight_copy_widths(ttgir, copies)
        print(name, fmt, "copies", ",".join(sorted(set(copies))),
              "weight_copies", ",".join(sorted(set(weight_copies), key=int)) or "-",
              "int_to_float", len(re.findall(r"cvt\.rn\.f32\.[su]", ptx)),
              "mma", len(re.findall(r"\bmma\.sync|wgmma\.mma", ptx)))
