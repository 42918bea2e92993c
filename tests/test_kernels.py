"""kernels/cpu.cpp against independent float64 computations (every weight dtype, shapes that are not
multiples of the kernels' tiles, one and several tokens), built for every instruction set this CPU
runs; inside the compiled decode step (one graph, no recompiles, the eager tokens); and generation
without them."""
import functools
import re

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, load_ours, load_reference, relative_error, run_script
from errors import UserError
from formats import FullPrecision, Int4, parse_format
import layers
from layers import EXPERTS_PATHS, LINEAR_PATHS, build_model
from generation import decode_compile_options
from kernels import cpu as cpu_kernels
from rounding import HALF_ULP, QUANTIZED_HF, assert_within_rounding, exact

U = 2.0 ** -24  # float32's unit roundoff

# D, I and the row counts are odd, below and above the kernels' tiles (4 rows, 8 columns, 64 rows a task).
D, I, E, VOCAB = 37, 77, 4, 131
# int4 rows hold whole groups. Groups of 32 (a scale per block of the activations) and 96 (groups that
# straddle the kernel's 64-value chunks) on widths that are not multiples of those chunks; 64 and 128
# (the scales of whole chunks) on widths that are not multiples of the kernel's 128-block segments.
INT4_WIDTHS = {"int4": (96, 160), "int4/96": (96, 288), "int4/64": (192, 320), "int4/128": (384, 4224)}
FORMAT_NAMES = ["full", "int8", "int4", "int4/96", "int4/64", "int4/128"]


def format_of(name: str):
    """'int4/N': int4 with groups of N; 'int4': groups of 32."""
    return Int4(int(name.split("/")[1])) if "/" in name else parse_format(name)


def widths(fmt: str) -> tuple:
    """D and I for format fmt."""
    return INT4_WIDTHS.get(fmt, (D, I))


@pytest.fixture(scope="module", autouse=True)
def kernels_built():
    assert cpu_kernels.available(), "the CPU kernels must build here (a C++ compiler and ninja are installed)"


# Every instruction set this CPU runs: the best (the default) and each lower one MIXTRAL_CPU_ISA can force.
ISAS = cpu_kernels.supported()


@pytest.fixture(params=ISAS)
def isa(request):
    """Within the test, eager code takes the kernels of this instruction set."""
    with cpu_kernels.using(request.param):
        yield request.param


def stored(fmt: str, w: torch.Tensor, dtype) -> dict:
    """w in format fmt, its full precision (and the scales) in dtype."""
    return format_of(fmt).quantize(w.to(dtype))


def activations(fmt: str, x: torch.Tensor) -> torch.Tensor:
    """x [..., K] in float64 as the quantized kernels take it (written here from the kernels'
    description, not from their code), each block scaled by its largest magnitude and rounded to nearest:
    int8 weights, int16 in blocks of 64 values (largest / 32767); int4 weights, int8 in blocks of 32
    (largest / 127). Full precision takes x as it is."""
    if fmt == "full":
        return x.double()
    block, top = (64, 32767) if fmt == "int8" else (32, 127)
    K = x.shape[-1]
    blocks = F.pad(x.float(), (0, -K % block)).unflatten(-1, (-1, block))  # [..., K/block, block]
    largest = blocks.abs().amax(dim=-1, keepdim=True)
    # Rounded as the kernels do it, in float32: x * (top / largest). Where that lands within float32
    # rounding of a tie (values a simple fraction of the largest, common in bf16), a float64 quotient
    # could round the other way: a whole step, visible at int8's 1/127.
    inverse = torch.full_like(largest, top) / largest  # a division (top / tensor would multiply by a reciprocal)
    q = torch.where(largest > 0, blocks * inverse, 0.0).round()
    return (q.double() * (largest.double() / top)).flatten(-2)[..., :K]


# The cases below run each instruction set on the same inputs, which do not depend on it; so the sets are
# the innermost loop (the first parametrize varies fastest) and a case's inputs and float64 values, most
# of its time, are made once for all of them (lru_cache of one case).
EACH_ISA = pytest.mark.parametrize("isa", ISAS, indirect=True)


@functools.lru_cache(maxsize=1)
def linear_case(fmt: str, dtype, tokens: int) -> tuple:
    """x, the stored weight and the float64 product of x as the kernels take it and the stored weight."""
    g = torch.Generator().manual_seed(tokens)
    D, _ = widths(fmt)
    x = torch.randn(tokens, D, generator=g).to(dtype)
    t = stored(fmt, torch.randn(VOCAB, D, generator=g) / D ** 0.5, dtype)
    return x, t, activations(fmt, x) @ exact(fmt, t).T


@EACH_ISA
@pytest.mark.parametrize("fmt", FORMAT_NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [1, 3, 8])
def test_linear_matches_float64(isa, fmt, dtype, tokens):
    x, t, want = linear_case(fmt, dtype, tokens)
    got = LINEAR_PATHS["cpu kernel"](format_of(fmt), x, t)
    assert got.dtype == dtype and got.shape == (tokens, VOCAB)
    assert_within_rounding(got, want, dtype)


def experts_float64(fmt, x, experts, weights, w1, w3, w2):
    """Each token's chosen experts, one at a time, in float64 (the activations as the kernel takes them).
    Also returns the slack due to h = silu(w1 x) * (w3 x), which the kernel computes in float32: where
    its int8 rounding (int4 weights) nears a tie, float32's last bits may round it a step (1/127 of
    its block's largest value) the other way; each such h may move y by that step times its w2 column.
    And the slack where h is in bf16 (bf16 weights and activations where the vector unit multiplies bf16
    pairs): the kernel rounds each h to bf16, by up to half a bf16 unit of it, which moves y by up to
    that times w2."""
    y, slack, h_in_bf16_slack = (torch.zeros(x.shape, dtype=torch.float64) for _ in range(3))
    for n in range(x.size(0)):
        for e, weight in zip(experts[n].tolist(), weights[n].double()):
            xn = activations(fmt, x[n])
            h = F.silu(w1[e] @ xn) * (w3[e] @ xn)
            y[n] += weight * (w2[e] @ activations(fmt, h.float()))  # the kernel holds h in float32
            if fmt.startswith("int4"):
                blocks = h.unflatten(-1, (-1, 32))
                step = blocks.abs().amax(dim=-1, keepdim=True) / 127
                scaled = blocks / step
                near_tie = ((scaled - scaled.floor() - 0.5).abs() < 1e-3).flatten()
                slack[n] += weight.abs() * (w2[e].abs() @ (near_tie * step.expand_as(blocks).flatten()))
            h_in_bf16_slack[n] += weight.abs() * (w2[e].abs() @ (h.abs() * HALF_ULP[torch.bfloat16]))
    return y, slack, h_in_bf16_slack


@functools.lru_cache(maxsize=1)
def moe_case(fmt: str, dtype, experts: tuple) -> tuple:
    """The inputs (x, experts, weights, stored w1, w3, w2) and experts_float64's three results."""
    g = torch.Generator().manual_seed(len(experts))
    D, I = widths(fmt)
    experts = torch.tensor(experts)
    x = torch.randn(experts.size(0), D, generator=g).to(dtype)
    weights = torch.softmax(torch.randn(experts.shape, generator=g), dim=-1).to(dtype)
    w1, w3 = (stored(fmt, torch.randn(E, I, D, generator=g) / D ** 0.5, dtype) for _ in range(2))
    w2 = stored(fmt, torch.randn(E, D, I, generator=g) / I ** 0.5, dtype)
    inputs = (x, experts, weights, w1, w3, w2)
    return inputs, experts_float64(fmt, x, experts, weights, exact(fmt, w1), exact(fmt, w3), exact(fmt, w2))


@EACH_ISA
@pytest.mark.parametrize("fmt", FORMAT_NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("experts", [((2, 0),), ((0, 2), (2, 1), (3, 2)), ((0, 2), (2, 1), (3, 2), (2, 0), (1, 2))])
def test_moe_matches_float64(isa, fmt, dtype, experts):
    """One token; three tokens, all of which chose expert 2 (read once for all); five, all with expert 2
    (float rows take 4 tokens a pass, then the fifth)."""
    inputs, (want, slack, h_in_bf16_slack) = moe_case(fmt, dtype, experts)
    x = inputs[0]
    got = EXPERTS_PATHS["cpu kernel"](format_of(fmt), *inputs)
    assert got.dtype == dtype and got.shape == x.shape
    h_in_bf16 = isa == "avx512" and fmt == "full" and dtype == torch.bfloat16  # vdpbf16ps
    assert_within_rounding(got, want, dtype, slack + h_in_bf16_slack if h_in_bf16 else slack)


def test_bad_arguments_are_refused_not_misread(isa):
    x = torch.randn(1, D)
    with pytest.raises(RuntimeError, match="format 'int8' takes int8 weights and scales; got int8 weights and no scales"):
        cpu_kernels.ops().linear(x, torch.zeros(VOCAB, D, dtype=torch.int8), None, "int8")
    with pytest.raises(RuntimeError, match="out of range"):
        t = stored("full", torch.randn(E, I, D), torch.float32)
        t2 = stored("full", torch.randn(E, D, I), torch.float32)
        EXPERTS_PATHS["cpu kernel"](FullPrecision(), x, torch.tensor([[0, E]]), torch.ones(1, 2), t, t, t2)


@pytest.mark.parametrize("op", ["linear", "moe"])
def test_a_format_that_does_not_match_the_weights_is_refused(isa, op):
    """The ops are told the format by name and check the tensors against it: weights of another format
    (int8 called int4, uint8 called full, floats called int8) or a name no one knows are refused with
    what the format takes, where dtypes alone would read int4 into any uint8 format."""
    x = torch.randn(1, 64)
    int8, int4, floats = (parse_format("int8").quantize(torch.randn(E, 64, 64)), parse_format("int4").quantize(torch.randn(E, 64, 64)),
                          parse_format("full").quantize(torch.randn(E, 64, 64)))
    wrong = [("int4", int8, "format 'int4' takes uint8 weights \\(two values a byte\\) and scales; got int8 weights and scales"),
             ("full", {"": int4[""]}, "format 'full' takes float32, bfloat16 or float16 weights and no scales; got uint8"),
             ("int8", floats, "format 'int8' takes int8 weights and scales; got float32 weights and no scales"),
             ("int3", int4, "unknown weight format 'int3'; one of full, int8, int4, q8_0, q4_0, q4_k, q5_k, q6_k expected")]
    for name, t, message in wrong:
        with pytest.raises(RuntimeError, match=f"mixtral_cpu.{op}: {message}"):
            if op == "linear":
                cpu_kernels.ops().linear(x, t[""][0], None if "scales" not in t else t["scales"][0], name)
            else:
                cpu_kernels.ops().moe(x, torch.tensor([[0, 1]]), torch.ones(1, 2), t[""], t[""], t[""], t.get("scales"),
                                      t.get("scales"), t.get("scales"), name)


@pytest.mark.parametrize("fmt", ["full", "int8", "int4"])
def test_compiled_decode_calls_the_kernels_in_one_graph(checkpoint, fmt):
    """generate.py's compiled decode step: one graph whose code calls the kernels for every linear layer
    and MoE, the eager step's logits, and no recompilation from one position to the next."""
    from torch._inductor.utils import run_and_get_code
    from layers import quantize_module
    model = load_ours(checkpoint)
    quantize_module(model, model.config, parse_format(fmt))
    model.setup_caches(max_batch_size=1, max_seq_length=64)
    idx = torch.randint(0, 32000, (1, 8), generator=torch.Generator().manual_seed(3))
    torch._dynamo.reset()
    step = torch.compile(lambda x, pos: model(x, pos), fullgraph=True, options=decode_compile_options("cpu"))
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        eager = [model(idx[:, i:i + 1], torch.tensor([i])) for i in range(4)]  # fills the cache, and the reference
        model.setup_caches(max_batch_size=1, max_seq_length=64)
        for layer in model.layers:
            layer.attention.kv_cache.k_cache.zero_(), layer.attention.kv_cache.v_cache.zero_()
        compiled, (code, *_) = run_and_get_code(step, idx[:, :1], torch.tensor([0]))
        compiled = [compiled] + [step(idx[:, i:i + 1], torch.tensor([i])) for i in range(1, 4)]
    # The compiled graph computes the layers around the kernels (norms, attention, routing) with its own
    # float32 summation order, so the kernels' inputs differ from eager's in their last bits. Full
    # precision passes that on as it is. The quantized kernels round activations to steps (int8 weights:
    # int16, 2^-15 of a block's largest value; int4: int8, 1/127 of it), and a value within float32
    # rounding of a tie may round a step the other way: the logits then move by about that step times
    # their norm. A few such values per step are allowed.
    step = {"full": 0.0, "int8": 2.0 ** -15, "int4": 1 / 127}[fmt]
    for a, b in zip(compiled, eager):
        if step:
            assert ((a - b).norm() / b.norm()).item() <= 1e-5 + 4 * step
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    n_layer = model.config.n_layer
    # The C++ wrapper's op calls: through aoti_torch_call_dispatcher, or (ops with a str argument, the
    # format's name) on a boxed stack, the op found once by name.
    calls = re.findall(r'(?:aoti_torch_call_dispatcher|findSchemaOrThrow)\("mixtral_cpu_\w+::(\w+)"', code)
    assert calls.count("moe") == n_layer, code
    assert calls.count("linear") == 3 * n_layer + 1  # wqkv, wo and the router of each layer; the head


def test_generation_names_its_kernels_and_any_forced_set_or_none_gives_the_same_text(checkpoint):
    """One line on stderr names the instruction set in use: the best by default, the lowest where
    MIXTRAL_CPU_ISA forces it, none where MIXTRAL_NO_CPU_KERNELS stands in for a machine without a
    compiler (then PyTorch's kernels). The greedy text is the same on each."""
    args = ("--checkpoint_path", checkpoint / "model.pth", "--prompt", "Hello, my name is", "--max_new_tokens", "6",
            "--num_samples", "1", "--temperature", "0", "--precision", "float32", "--device", "cpu")
    best, lowest = ISAS[0], ISAS[-1]
    runs = {
        "none": ({"MIXTRAL_NO_CPU_KERNELS": "1"}, "note: CPU kernels turned off by MIXTRAL_NO_CPU_KERNELS; using "
                 "PyTorch's kernels instead (slower decoding)"),
        best: ({"MIXTRAL_CPU_ISA": ""}, f"CPU kernels: {best} ({cpu_kernels.ISAS[best][2]}); "),
        lowest: ({"MIXTRAL_CPU_ISA": lowest}, f"CPU kernels: {lowest} ({cpu_kernels.ISAS[lowest][2]}); "),
    }
    texts = set()
    for env, line in runs.values():
        result = run_script(REPO / "generate.py", *args, env={**env, "OMP_NUM_THREADS": "1"})
        assert result.returncode == 0, result.stderr
        notes = [n for n in result.stderr.splitlines() if "kernel" in n  # a first build's own two lines aside
                 and not n.startswith(("building the CPU kernels for", "Time to build the CPU kernels:"))]
        assert len(notes) == 1 and notes[0].startswith(line), result.stderr
        texts.add(result.stdout.split("\nTime for inference 1:")[0])
    assert len(texts) == 1 and texts.pop().startswith("Hello, my name is")


def test_an_instruction_set_the_cpu_lacks_or_no_one_knows_is_refused_in_one_line(monkeypatch):
    # Quoted: a trailing space was invisible in the line ("MIXTRAL_CPU_ISA=avx2  is not one of ...").
    for asked in ("avx9000", "AVX2", "avx2 "):
        monkeypatch.setenv("MIXTRAL_CPU_ISA", asked)
        with pytest.raises(UserError, match=re.escape(f"MIXTRAL_CPU_ISA='{asked}' is not one of avx512, avxvnni, avx2; "
                                                      f"this CPU runs {', '.join(ISAS)}") + "$"):
            cpu_kernels.choose()
    lacking = [isa for isa in cpu_kernels.ISAS if isa not in ISAS]
    for asked in lacking:  # only on a CPU without some set: the suite runs on several kinds
        monkeypatch.setenv("MIXTRAL_CPU_ISA", asked)
        with pytest.raises(UserError, match=f"'{asked}' is not one this CPU runs"):
            cpu_kernels.choose()
    monkeypatch.setenv("MIXTRAL_CPU_ISA", ISAS[-1])
    assert cpu_kernels.choose() == ([ISAS[-1]], None)  # that set alone
    monkeypatch.delenv("MIXTRAL_CPU_ISA")
    assert cpu_kernels.choose() == (ISAS, None)  # the best first; a lower one where the best fails to build


def test_a_cpu_without_avx2_keeps_pytorchs_path_and_says_what_it_lacks(monkeypatch):
    """No set to build for (an older x86 CPU, or an ARM one): no set is chosen, and the reason names what
    is missing (available() prints it in one line and generation goes on with PyTorch's kernels)."""
    monkeypatch.delenv("MIXTRAL_CPU_ISA", raising=False)
    for caps, lacks in (({"architecture": "x86_64", "avx2": True, "fma3": True}, "f16c"),
                        ({"architecture": "aarch64"}, "x86-64")):
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda caps=caps: caps)
        assert cpu_kernels.supported() == []
        assert cpu_kernels.choose() == ([], f"the CPU kernels need x86-64 with avx2, fma3, f16c; this CPU lacks {lacks}")


def test_a_set_that_fails_to_build_gives_way_to_the_next_lower_one(monkeypatch, capsys):
    """A compiler too old for the best set's flags: the next set is tried, with a line saying so; where
    none builds, PyTorch's kernels, with a line saying so."""
    monkeypatch.delenv("MIXTRAL_CPU_ISA", raising=False)
    monkeypatch.setattr(cpu_kernels, "_status", {"loaded": cpu_kernels._status["loaded"]})  # a fresh first use
    built = cpu_kernels.why_not_built
    monkeypatch.setattr(cpu_kernels, "why_not_built",
                        lambda isa: f"could not build the {isa} CPU kernels (old compiler)" if isa == ISAS[0] else built(isa))
    lines = [f"note: could not build the {ISAS[0]} CPU kernels (old compiler); " +
             (f"trying {ISAS[1]}" if len(ISAS) > 1 else "using PyTorch's kernels instead (slower decoding)")]
    assert cpu_kernels.available() == (len(ISAS) > 1)
    if len(ISAS) > 1:
        assert cpu_kernels._status["isa"] == ISAS[1]
        lines.append(f"CPU kernels: {ISAS[1]} ({cpu_kernels.ISAS[ISAS[1]][2]}); MIXTRAL_CPU_ISA={'|'.join(ISAS)} "
                     "chooses among this CPU's")
    assert capsys.readouterr().err.splitlines() == lines


def test_a_build_lock_left_by_a_killed_build_is_taken_over_with_a_note(tmp_path, capsys, monkeypatch):
    """torch up to 2.13 locks a build with a file whose existence is the lock: left by a build killed
    before it could remove it, it made every later run wait forever. Holding the flock (which dies with
    its holder), any such file is stale: removed, with a note. torch 2.14 holds an OS lock on that file
    instead and leaves it after every healthy build: there it means nothing, and is left without a word."""
    monkeypatch.setattr(cpu_kernels, "torch_lock_is_a_baton", lambda: True)
    (tmp_path / "lock").write_text("")
    with cpu_kernels.build_lock(tmp_path):
        assert not (tmp_path / "lock").exists()
    assert capsys.readouterr().err.startswith(f"note: removing {tmp_path / 'lock'}, left by a build that did not finish")
    with cpu_kernels.build_lock(tmp_path):  # nothing to remove, nothing said
        pass
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(cpu_kernels, "torch_lock_is_a_baton", lambda: False)
    (tmp_path / "lock").write_text("")
    with cpu_kernels.build_lock(tmp_path):
        assert (tmp_path / "lock").exists()
    assert capsys.readouterr().err == ""


def test_the_lock_mechanism_is_read_from_this_torch():
    """Which of the two locks this torch uses, from its own source rather than from the code under test."""
    import inspect
    from torch.utils import cpp_extension
    source = inspect.getsource(cpp_extension)
    assert cpu_kernels.torch_lock_is_a_baton() == ("FileBaton(" in source)


def test_a_cached_build_loads_with_no_note_and_no_warning():
    """A run that loads a healthy cached build says one line, naming the set. torch 2.14 leaves its lock
    file after every build, which each later run reported as left by a build that did not finish; and
    torch's CUDA builds warn on every first use of their extension builder that no CUDA runtime is
    found, which means nothing for CPU kernels."""
    isa = ISAS[-1]
    cpu_kernels.load(isa)  # built (and cached) by this session
    result = run_script("-c", "from kernels import cpu; cpu.available()", env={"MIXTRAL_CPU_ISA": isa})
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [f"CPU kernels: {isa} ({cpu_kernels.ISAS[isa][2]}); MIXTRAL_CPU_ISA="
                                          f"{'|'.join(ISAS)} chooses among this CPU's"]


def elf_text_section(path) -> tuple:
    """(offset, size) of an ELF64 file's .text section (its machine code), from its section headers:
    e_shoff at byte 40, e_shentsize, e_shnum, e_shstrndx at 58; each header's name index at 0, file
    offset at 24 and size at 32."""
    import struct
    data = path.read_bytes()
    shoff, = struct.unpack_from("<Q", data, 40)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 58)

    def section(i):
        name, = struct.unpack_from("<I", data, shoff + i * shentsize)
        return (name, *struct.unpack_from("<QQ", data, shoff + i * shentsize + 24))
    _, names, _ = section(shstrndx)
    for i in range(shnum):
        name, offset, size = section(i)
        if data[names + name:names + name + 6] == b".text\0":
            return offset, size
    raise AssertionError(f"{path} has no .text section")


DEQUANTIZE_IN_A_NEW_PROCESS = """
import torch
from kernels import cpu
q = torch.arange(-16, 16, dtype=torch.int8).reshape(4, 8)
scales = torch.tensor([0.5, 1.25, -3.0, 1e-3])
out = cpu.load({isa!r}).dequantize_int8(q, scales, torch.float32)
# An int8 times a float32 is rounded once to float32, in the kernel as here.
print(torch.equal(out, (q.double() * scales.double()[:, None]).float()))
"""


def test_a_cached_library_damaged_inside_is_built_again_not_loaded(tmp_path):
    """A library whose headers are intact but whose machine code is not (a disk error, a copy gone
    wrong) passed the size check, and every later run died of SIGILL or SIGSEGV until the cache was
    deleted by hand. The checksum its build recorded finds it: one note, a new build, right results."""
    import shutil
    isa = ISAS[-1]
    cpu_kernels.load(isa)  # built (and cached) by this session
    folder = shutil.copytree(cpu_kernels.build_folder(isa), tmp_path / cpu_kernels.build_folder(isa).name)
    library, = folder.glob("*.so")
    offset, size = elf_text_section(library)
    with open(library, "r+b") as f:  # every instruction an ud2: whatever runs first raises SIGILL
        f.seek(offset)
        f.write(b"\x0f\x0b" * (size // 2))
    result = run_script("-c", DEQUANTIZE_IN_A_NEW_PROCESS.format(isa=isa), env={"TORCH_EXTENSIONS_DIR": str(tmp_path)})
    assert result.returncode == 0, (result.returncode, result.stderr)
    assert result.stdout.split() == ["True"]
    assert result.stderr.splitlines() == [f"note: {library} does not match the checksum recorded when it was built; "
                                          f"building it again"]


def test_a_cached_library_cut_short_is_removed_and_an_intact_one_kept(tmp_path, capsys):
    """A library cut short (a build or copy killed while writing) crashed with a bus error when loaded."""
    import shutil
    library, *_ = cpu_kernels.build_folder(cpu_kernels.choose()[0][0]).glob("*.so")  # built by kernels_built
    intact, cut = tmp_path / "intact.so", tmp_path / "cut.so"
    shutil.copy(library, intact)
    shutil.copy(library.with_name(library.name + ".sha256"), tmp_path / "intact.so.sha256")  # what its build recorded
    cut.write_bytes(library.read_bytes()[: library.stat().st_size // 2])
    cpu_kernels.remove_if_damaged(intact)
    cpu_kernels.remove_if_damaged(cut)
    assert intact.exists() and not cut.exists()
    assert capsys.readouterr().err == f"note: {cut} is damaged; building it again\n"


def test_ctrl_c_during_a_build_stops_the_run(monkeypatch):
    """The compiler sees Ctrl-C first and fails; torch reports a failed build (a RuntimeError), which
    alone means 'carry on without the kernels'. Interrupted, the run stops instead."""
    import os
    import signal
    with pytest.raises(KeyboardInterrupt):
        with cpu_kernels.interrupts_kept():
            os.kill(os.getpid(), signal.SIGINT)
            raise RuntimeError("Error building extension")
    with pytest.raises(RuntimeError):  # a build that fails by itself is still just a failed build
        with cpu_kernels.interrupts_kept():
            raise RuntimeError("Error building extension")


def test_formatted_model_stores_each_format_in_its_layout():
    """The checkpoint names and dtypes each format stores, written out here rather than taken from
    formats.py: the weight itself, and for int8 the int8 weight and one scale per output row."""
    from model import ModelArgs
    config = ModelArgs(n_layer=1, dim=8, n_head=2, n_local_heads=1, head_dim=4, intermediate_size=12,
                       num_experts=2, vocab_size=16, block_size=16)
    with torch.device("meta"):
        full = build_model(config, FullPrecision(), torch.bfloat16).state_dict()
        int8 = build_model(config, parse_format("int8"), torch.bfloat16).state_dict()
        int4 = build_model(config, Int4(4), torch.bfloat16).state_dict()
    prefix = "layers.0.block_sparse_moe."
    assert full[prefix + "w2"].dtype == torch.bfloat16 and prefix + "w2_scales" not in full
    assert int8[prefix + "w2"].dtype == torch.int8 and int8[prefix + "w2_scales"].shape == (2, 8)
    assert int8["output.weight"].dtype == torch.int8 and int8["output.scales"].shape == (16,)
    assert set(int8) - set(full) == {prefix + f"w{i}_scales" for i in (1, 2, 3)} | {
        "layers.0.attention.wqkv.scales", "layers.0.attention.wo.scales", "output.scales"}
    # int4, groups of 4 here: two values a byte, one scale per group of a row's inputs.
    assert set(int4) == set(int8)
    assert int4[prefix + "w1"].dtype == torch.uint8 and int4[prefix + "w1"].shape == (2, 12, 4)
    assert int4[prefix + "w2"].shape == (2, 8, 6) and int4[prefix + "w2_scales"].shape == (2, 8, 3)
    assert int4["output.weight"].shape == (16, 4) and int4["output.scales"].shape == (16, 2)
    assert int4["output.scales"].dtype == torch.bfloat16 and int4[prefix + "gate.weight"].dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantize_int4_rounds_each_weight_once(dtype):
    """A prompt's full-precision copy of int4 weights, groups of 32 and 64: (q - 8) * scale computed
    exactly (float64), then rounded once to dtype."""
    g = torch.Generator().manual_seed(1)
    packed = torch.randint(0, 256, (3, 37, 96), dtype=torch.uint8, generator=g)
    for groups in (6, 3):
        scales = torch.rand(3, 37, groups, generator=g).to(dtype)
        got = cpu_kernels.ops().dequantize_int4(packed, scales, dtype)
        assert torch.equal(got, exact("int4", {"": packed, "scales": scales}).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantize_int8_rounds_each_weight_once(dtype):
    """A prompt's full-precision copy of int8 weights: q * scale computed exactly, then rounded once to
    dtype (float64 here, where q * scale is exact), for rows of a length that is not a multiple of 8."""
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-127, 128, (3, 37, 53), dtype=torch.int8, generator=g)
    scales = torch.rand(3, 37, generator=g).to(dtype)
    got = cpu_kernels.ops().dequantize_int8(q, scales, dtype)
    assert torch.equal(got, (q.double() * scales.double()[..., None]).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", [40, 64])
def test_int8_linear_without_the_kernels_matches_float64(dtype, width):
    """The path a machine without the CPU kernels decodes on (Int8.linear: torch's int8 kernel where it is
    right, a dequantized copy where torch 2.13 returned inf and nan: widths that are not multiples of 16)."""
    g = torch.Generator().manual_seed(width)
    x = torch.randn(2, width, generator=g).to(dtype)
    t = stored("int8", torch.randn(VOCAB, width, generator=g) / width ** 0.5, dtype)
    got = parse_format("int8").linear(x, t)
    want = x.double() @ exact("int8", t).T
    assert torch.isfinite(got).all()
    # torch's kernel rounds to dtype along the way: a few units of dtype's rounding, not float32's.
    assert ((got.double() - want).norm() / want.norm()).item() < 8 * HALF_ULP[dtype] + 1e-6


# ----------------------------------------------------------------------------- each instruction set, end to end

# Wide enough for int4's groups.
GRID = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            num_local_experts=4, num_experts_per_tok=2, rope_theta=1e6, max_position_embeddings=2048)


def on_grid(shape, fmt: str, g) -> torch.Tensor:
    """Random weights that the format stores exactly: integers q times scales of 8 significant bits (a
    bf16 value), so that q * scale is exact in float32 and the scales are exact in bf16. int8: one scale
    per row, q in -127..127 with +-127 in each row (the row's largest, which quantize.py maps to 127);
    int4: one per group of 32, q in -8..7 with -8 in each group (its largest magnitude, mapped to -8)."""
    top, group = (127, shape[-1]) if fmt == "int8" else (8, 32)
    q = torch.randint(-top, top if fmt == "int8" else 8, shape, generator=g).unflatten(-1, (-1, group))
    q[..., 0] = -top
    scales = (torch.rand(q.shape[:-1] + (1,), generator=g) * 0.5 + 0.5) / (top * shape[-1] ** 0.5)
    return (q * scales.to(torch.bfloat16).float()).flatten(-2)


@pytest.fixture(scope="module")
def grid_checkpoints(tmp_path_factory, tokenizer_path):
    """name -> hub-layout checkpoint (converted) whose weights each format stores exactly; '+outliers':
    a few channels of every norm weight scaled up 30 times, as trained models have them, so that one
    value dominates each block of activations the kernels quantize."""
    from safetensors.torch import load_file, save_file
    from scripts.convert_hf_checkpoint import convert_hf_checkpoint
    from scripts.make_tiny_checkpoint import write_hub_checkpoint
    made = {}
    for name in ("bf16", "int8", "int4", "int4+outliers"):
        folder = tmp_path_factory.mktemp(f"grid-{name.replace('+', '-')}")
        write_hub_checkpoint(folder, GRID, tokenizer_path, seed=11, dtype=torch.float32, n_shards=1)
        tensors, g = load_file(folder / "model.safetensors"), torch.Generator().manual_seed(11)
        for key, w in tensors.items():
            if name == "bf16":
                tensors[key] = w.to(torch.bfloat16).float()
            elif key.endswith(QUANTIZED_HF) or ".experts." in key:
                tensors[key] = on_grid(w.shape, name[:4], g)
            elif key.endswith("layernorm.weight") and "outliers" in name:
                tensors[key] = w.clone().index_fill_(0, torch.tensor([3, 70, 101]), 30.0)
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        convert_hf_checkpoint(folder)
        made[name] = folder
    return made


@pytest.mark.parametrize("name", ["bf16", "int8", "int4", "int4+outliers"])
def test_every_instruction_set_decodes_grid_weights_as_closely_as_the_lowest(grid_checkpoints, name, one_thread):
    """Decode-step logits of each instruction set's kernels against transformers' float32 on weights the
    format stores exactly, so that the kernels' arithmetic is all that differs. In float32 the error
    stays within bf16's rounding (int8 and bf16 weights: int16 or float32 activations; int4 weights
    meet int8 activations, whose step is 1/127 of a block's largest value, which outliers make coarse:
    no more than the lowest set's there). In bf16, every set's error is within a tenth of the
    lowest's (AVX2, the kernels before the faster sets) or of bf16's own rounding."""
    from checkpoint import load_model, open_checkpoint
    from quantize import quantize_checkpoint
    folder = grid_checkpoints[name]
    path = folder / "model.pth" if name == "bf16" else quantize_checkpoint(folder / "model.pth", name[:4])
    idx = torch.randint(0, 32000, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = load_reference(folder)(idx).logits[:, 8:]
    errors = {}
    for dtype in (torch.float32, torch.bfloat16):
        for isa in ISAS:
            with cpu_kernels.using(isa), torch.no_grad():
                ours = load_model(open_checkpoint(path), "cpu", dtype)
                ours.setup_caches(max_batch_size=1, max_seq_length=64)
                ours(idx[:, :8], torch.arange(8))  # the prompt, on PyTorch's kernels
                decoded = torch.cat([ours(idx[:, i:i + 1], torch.tensor([i])) for i in range(8, 24)], dim=1)
            errors[isa, dtype] = relative_error(decoded, want)
    print(name, {f"{isa} {str(dtype)[6:]}": f"{e:.2e}" for (isa, dtype), e in errors.items()})
    lowest = ISAS[-1]
    for isa in ISAS:
        if name.startswith("int4"):
            assert errors[isa, torch.float32] <= 1.1 * errors[lowest, torch.float32]
        else:
            assert errors[isa, torch.float32] <= HALF_ULP[torch.bfloat16]
        assert errors[isa, torch.bfloat16] <= errors[lowest, torch.bfloat16] + 0.1 * max(
            errors[lowest, torch.bfloat16], HALF_ULP[torch.bfloat16])


# ----------------------------------------------------------------------------- attention

def attention_float64(q, k, v, allowed, scale):
    """One new token's attention in float64: q [B, H, Dh], k/v [B, KV, S, Dh], allowed [B, S] -> the output
    [B, H, Dh], the softmax [B, H, S] and the scores [B, H, S] (each query head with kv head h // (H / KV))."""
    B, H, Dh = q.shape
    G = H // k.shape[1]
    kk, vv = (t.double().repeat_interleave(G, dim=1) for t in (k, v))  # [B, H, S, Dh]
    scores = torch.einsum("bhd,bhsd->bhs", q.double(), kk) * scale
    p = scores.masked_fill(~allowed[:, None, :], float("-inf")).softmax(dim=-1)
    return torch.einsum("bhs,bhsd->bhd", p, vv), p, scores


@EACH_ISA
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shared", [True, False], ids=["one-position", "own-positions"])
@pytest.mark.parametrize("Dh", [64, 256])
def test_attention_matches_float64(isa, dtype, shared, Dh):
    """The attention kernel against float64: two sequences, 8 query heads on 2 key/value heads, a cache of 77
    positions (not a multiple of the 8 values a softmax vector takes), the mask allowing one position for both
    (a [1, S] mask) or each its own; heads up to dispatch.ATTENTION_MAX_HEAD on every set. Bound: float32
    scores err at most (Dh + 2) roundings of their terms' magnitudes, which moves each probability by at most
    twice that, relatively; the exp and the sums a few units more; then the output's own rounding to the dtype."""
    g = torch.Generator().manual_seed(5)
    B, H, KV, S = 2, 8, 2, 77  # heads of 64 values (Mixtral's are 128) and of dispatch's largest, 256
    q = torch.randn(B, H, Dh, generator=g).to(dtype)
    k, v = (torch.randn(B, KV, S, Dh, generator=g).to(dtype) for _ in range(2))
    pos = torch.tensor([50, 50]) if shared else torch.tensor([12, 76])
    allowed = torch.arange(S)[None, :] <= pos[:, None]  # [B, S]
    mask = allowed[:1] if shared else allowed[:, None, None, :]  # [1, S] as a shared step's, or [B, 1, 1, S]
    got = layers.cpu_kernel_attention(q[:, :, None], k, v, mask)[:, :, 0]
    scale = Dh ** -0.5
    want, p, _ = attention_float64(q, k, v, allowed, scale)
    G = H // KV
    magnitudes = torch.einsum("bhd,bhsd->bhs", q.double().abs(), k.double().abs().repeat_interleave(G, dim=1)) * scale
    score_error = (Dh + 2) * U * magnitudes.masked_fill(~allowed[:, None, :], 0).amax(dim=-1, keepdim=True)  # [B, H, 1]
    weighted = torch.einsum("bhs,bhsd->bhd", p, v.double().abs().repeat_interleave(G, dim=1))  # sum p |v|
    slack = weighted * (2 * score_error + (S + 16) * U)
    assert got.dtype == dtype and got.shape == want.shape
    err = (got.double() - want).abs()
    assert (err <= HALF_ULP[dtype] * want.abs() + slack).all(), (err - HALF_ULP[dtype] * want.abs() - slack).max()


def test_attention_refuses_what_it_cannot_take_in_one_line():
    ops = cpu_kernels.ops()
    q, k = torch.randn(1, 4, 24), torch.randn(1, 2, 5, 24)
    with pytest.raises(RuntimeError, match="head size 24 is not a multiple"):
        ops.attention(q, k, k, torch.ones(1, 5, dtype=torch.bool), 0.2)
    with pytest.raises(RuntimeError, match="KV dividing H"):
        ops.attention(torch.randn(1, 3, 32), torch.randn(1, 2, 5, 32), torch.randn(1, 2, 5, 32), torch.ones(1, 5, dtype=torch.bool), 0.2)
