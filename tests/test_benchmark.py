"""scripts/benchmark.py: its arithmetic against the shape's own formula, and end-to-end runs on a tiny shape.
No test here asserts a speed: the machine is shared, and speed is what the benchmark reports."""
import json
import os
import re

import pytest
import torch

from conftest import REPO, fails_cleanly, run_script
from measuring import active_weight_bytes
from model import ModelArgs, Transformer
from scripts.bench_common import BENCH_SHAPES, fraction_of_limit, limit_tokens_per_s, model_args, random_model
from scripts.benchmark import prefill_flops

SCRIPT = REPO / "scripts" / "benchmark.py"
COLUMNS = ["engine", "phase", "tokens", "tokens/s", "GB read per step", "GB/s", "GFLOP/s", "% of limit", "peak memory GB"]


def active_bytes_by_formula(c: ModelArgs, bytes_per_weight: int) -> int:
    """What one decoded token reads, written out from the architecture, independently of the model code."""
    attention = c.dim * (c.n_head + 2 * c.n_local_heads) * c.head_dim + c.n_head * c.head_dim * c.dim
    experts = c.num_activated_experts * 3 * c.intermediate_size * c.dim  # K of E experts, w1 w3 w2
    per_layer = attention + experts + c.num_experts * c.dim + 2 * c.dim  # + router + two norms
    return bytes_per_weight * (c.n_layer * per_layer + c.dim + c.vocab_size * c.dim + c.dim)  # + norm, head, one row


def meta_model(config: ModelArgs, dtype) -> Transformer:
    with torch.device("meta"):
        return Transformer(config).to(dtype)


@pytest.mark.parametrize("name", ["cpu-bench", "tiny", "Mixtral-8x7B-v0.1"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_active_weight_bytes_match_the_shape_formula(name, dtype):
    config = model_args(name)
    size = torch.empty(0, dtype=dtype).element_size()
    assert active_weight_bytes(meta_model(config, dtype)) == active_bytes_by_formula(config, size)


def test_cpu_bench_shape_is_the_one_the_targets_are_stated_for():
    config = model_args("cpu-bench")
    model = meta_model(config, torch.bfloat16)
    assert (config.dim, config.n_layer, config.n_head, config.n_local_heads, config.head_dim) == (1024, 8, 16, 4, 64)
    assert (config.num_experts, config.num_activated_experts, config.intermediate_size) == (8, 2, 3584)
    assert abs(sum(p.numel() for p in model.parameters()) / 0.79e9 - 1) < 0.01
    assert abs(active_weight_bytes(model) / 0.46e9 - 1) < 0.01


def test_n_layer_override_and_unknown_names():
    assert model_args("Mixtral-8x7B-v0.1", 16).n_layer == 16
    assert model_args("cpu-bench").n_layer == BENCH_SHAPES["cpu-bench"]["n_layer"]
    from errors import UserError
    with pytest.raises(UserError, match="unknown model"):
        model_args("no-such-model")


@pytest.mark.parametrize("name", ["cpu-bench", "Mixtral-8x7B-v0.1"])
def test_prefill_flops_count_the_weights_each_token_multiplies(name):
    """2 flops per weight a token multiplies, counted here from the model's own tensors (K of E experts;
    not the embedding, which is a look-up, nor the norms), plus causal attention: 2 x 2 x Dh per query
    and key it meets, in q @ k.T and in scores @ v."""
    config = model_args(name)
    tensors = meta_model(config, torch.bfloat16).state_dict()
    multiplied = sum(t.numel() * (config.num_activated_experts / config.num_experts if ".block_sparse_moe.w" in n else 1)
                     for n, t in tensors.items() if t.dim() >= 2 and not n.startswith("tok_embeddings"))
    T = 512
    pairs = T * (T + 1) // 2  # (query, key) pairs under the causal mask
    attention = config.n_layer * config.n_head * pairs * 4 * config.head_dim
    assert prefill_flops(config, T) == pytest.approx(2 * multiplied * T + attention, rel=1e-12)


def test_limit_and_fraction():
    # 57 GB/s over 0.46 GB per token: 123.9 tokens/s; 74.3 tokens/s of it is 60 %.
    assert limit_tokens_per_s(57e9, 0.46e9) == pytest.approx(123.91, abs=0.01)
    assert fraction_of_limit(74.35, int(0.46e9), 57e9) == pytest.approx(0.6, abs=1e-3)
    assert fraction_of_limit(10.0, 1000, 1e4) == pytest.approx(1.0)


def test_random_model_is_made_in_place_in_the_precision_asked():
    model = random_model(model_args("tiny"), "cpu", torch.bfloat16, seed=3)
    tensors = model.state_dict()
    assert all(t.dtype == torch.bfloat16 and t.device.type == "cpu" for t in tensors.values())
    assert all(torch.isfinite(t).all() for t in tensors.values())
    assert torch.equal(tensors["norm.weight"], torch.ones_like(tensors["norm.weight"]))
    w1 = tensors["layers.0.block_sparse_moe.w1"].float()
    assert abs(w1.std().item() * model.config.dim ** 0.5 - 1) < 0.1  # 1/sqrt(fan_in)
    again = random_model(model_args("tiny"), "cpu", torch.bfloat16, seed=3)
    assert torch.equal(again.state_dict()["output.weight"], tensors["output.weight"])


def parse_table(stdout: str) -> tuple:
    lines = [line for line in stdout.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    return header, rows


def number(cell: str) -> float:
    assert re.fullmatch(r"\d+(\.\d+)?(e-\d+)?", cell), cell
    return float(cell)


def test_benchmark_runs_end_to_end_on_a_tiny_shape():
    result = run_script(SCRIPT, "--model", "tiny", "--device", "cpu", "--runs", "2", "--max_new_tokens", "6",
                        "--decode_prompts", "3", "9", "--batch_sizes", "1", "3", "--ragged", "--prefill_lengths", "16", "40",
                        "--probe_mb", "64", timeout=300)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    header, rows = parse_table(out)
    assert header == COLUMNS
    assert [(r[0], r[1], r[2]) for r in rows] == [
        ("this repo", "decode", "3 + 6"), ("this repo", "decode", "3..5 + 6, batch 3"), ("this repo", "decode", "9 + 6"),
        ("this repo", "decode", "9..11 + 6, batch 3"), ("this repo", "prefill", "16"), ("this repo", "prefill", "40")]
    for r in rows:
        assert number(r[3]) > 0 and number(r[8]) > 0  # tokens/s, peak memory
        if r[1] == "decode":
            assert number(r[4]) > 0 and number(r[5]) > 0 and number(r[7]) > 0 and r[6] == "-"  # GB per step, GB/s, %
        else:
            assert number(r[6]) > 0 and r[4] == r[5] == r[7] == "-"  # GFLOP/s
    # A step of 3 tokens reads what one token reads plus the other experts they chose, at most all of them.
    config = model_args("tiny")
    one = active_bytes_by_formula(config, 2) / 1e9
    every_expert = one + config.n_layer * (config.num_experts - config.num_activated_experts) * 3 * config.dim \
        * config.intermediate_size * 2 / 1e9
    for r in rows[1:4:2]:
        assert one < number(r[4]) <= every_expert + 1e-3, (r, one, every_expert)
        # GB/s: the bytes of a step times the steps per second (tokens/s over the batch), to rounding.
        assert number(r[5]) == pytest.approx(number(r[3]) / 3 * number(r[4]), rel=0.05)
    assert number(rows[0][4]) == pytest.approx(one, rel=1e-2)
    assert re.search(r"float32 matmul .* same run: [\d.]+ GFLOP/s", out)
    assert "AMD" in out or "Intel" in out or "cores" in out  # the machine is named
    assert f"torch {torch.__version__}" in out
    # Decoding reads: the limit is the read probe's bandwidth, the copy probe's only printed beside it.
    bw = re.search(r"read ([\d.]+) GB/s \(copy ([\d.]+) GB/s\); limit = read ([\d.]+) GB/s / ([\d.e-]+) GB per token", out)
    assert bw and float(bw[1]) > 0 and float(bw[2]) > 0 and bw[3] == bw[1]


def test_compare_hf_adds_transformers_rows(checkpoint, capsys):
    """benchmark.py's main in this process (the end-to-end run above is the one in a fresh process)."""
    from scripts.benchmark import main
    main([str(a) for a in ("--checkpoint_path", checkpoint / "model.pth", "--precision", "float32", "--device", "cpu",
                           "--runs", "1", "--max_new_tokens", "4", "--decode_prompts", "4", "--prefill_lengths", "32",
                           "--probe_mb", "64", "--compare-hf")])
    out = capsys.readouterr().out
    header, rows = parse_table(out)
    engines = {(r[0].split(" ")[0], r[1]) for r in rows}
    assert engines == {("this", "decode"), ("this", "prefill"), ("transformers", "decode"), ("transformers", "prefill")}
    assert all(number(r[3]) > 0 for r in rows)
    assert "prefill 32: this repo / transformers = " in out


@pytest.mark.parametrize("argv, message", [
    (["--model", "tiny", "--compare-hf"], "error: --compare-hf needs --checkpoint_path"),
    (["--model", "nope"], "error: unknown model 'nope'"),
    (["--model", "tiny", "--runs", "0"], "error: --runs must be at least 1"),
])
def test_bad_arguments_are_one_line_errors(capsys, argv, message):
    from scripts.benchmark import main
    with pytest.raises(SystemExit) as exit_info:
        main(argv + ["--probe_mb", "8"])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.startswith(message)


@pytest.mark.parametrize("stored, asked", [("int8", "--int4"), ("int4", "--int8"), ("int4", "--int4")])
def test_a_quantized_checkpoint_is_not_quantized_again(checkpoint, tmp_path, capsys, stored, asked):
    """--int8/--int4 on a checkpoint that quantize.py already wrote: one line, not its codes quantized as if
    they were weights (int4's file keeps attention in int8, so even --int4 would requantize that)."""
    import shutil
    from quantize import quantize_checkpoint
    from scripts.benchmark import main
    for name in ("config.json", "model.pth"):
        shutil.copy(checkpoint / name, tmp_path / name)
    path = quantize_checkpoint(tmp_path / "model.pth", stored)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint_path", str(path), asked, "--probe_mb", "8", "--runs", "1"])
    assert exit_info.value.code == 1
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("CPU kernels:")]
    assert len(err) == 1 and err[0].startswith("error: the model is already quantized"), err


def test_verify_passes_for_the_compiled_int4_step_and_catches_a_wrong_one(capsys, monkeypatch):
    """--verify compares the compiled decode step with the eager CPU model before any timing. On the CPU
    both paths are ours and must agree; a device copy whose weights differ must be refused."""
    import scripts.benchmark as benchmark
    argv = ["--verify", "--model", "tiny", "--device", "cpu", "--int4", "--decode_prompts", "3",
            "--max_new_tokens", "3", "--prefill_lengths", "--runs", "1", "--probe_mb", "8"]
    benchmark.main(argv)
    out = capsys.readouterr().out
    assert re.search(r"verify: compiled decode on cpu vs eager on cpu \(tiny shape, float32, int4:g32:attn4\): "
                     r"logits agree, "
                     r"relative error \d\.\d\de-\d\d", out), out
    assert "| this repo (compiled) | decode | 3 + 3 |" not in out  # --verify without --compile: eager rows

    import scripts.verify_decode as verify_decode
    real_twin = verify_decode.device_twin

    def perturbed_twin(model, device):  # stands in for a device path that computes something else
        twin = real_twin(model, device)
        twin.layers[0].block_sparse_moe.gate.weight.data.mul_(-1)  # routes every token elsewhere
        return twin
    monkeypatch.setattr(verify_decode, "device_twin", perturbed_twin)
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(argv)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: the compiled decode step on cpu disagrees with the eager model"), err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_gpu_check_without_a_gpu_is_one_line_error():
    import subprocess
    result = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh")], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1
    assert result.stderr.startswith("error: no CUDA GPU visible") and result.stderr.count("\n") == 1, result.stderr
    assert "==" not in result.stdout  # no run was started


def test_bench_kernels_lists_every_kernel_on_a_small_shape(capsys, monkeypatch):
    """scripts/bench_kernels.py, in this process, on a shape that is quick to cycle through (and a small
    bandwidth probe: it only prints a figure, which is not checked here)."""
    import scripts.bench_kernels as bench_kernels
    from scripts.benchmark import Bandwidth
    monkeypatch.setattr(bench_kernels, "Bandwidth", lambda device: Bandwidth(device, 8 << 20))
    bench_kernels.main(["--rows", "67", "--cols", "96", "--mb", "1", "--runs", "1", "--threads", "1"])
    out = capsys.readouterr().out
    header, rows = parse_table(out)
    assert header == ["kernel", "GB/s of weights", "G weights/s"]
    names = [r[0] for r in rows]
    from kernels import cpu as cpu_kernels
    for isa in cpu_kernels.supported():  # each instruction set this CPU runs; rows of 96 hold GGUF's blocks of 32
        assert {f"kernels/cpu.cpp {isa}, bf16", f"kernels/cpu.cpp {isa}, int8", f"kernels/cpu.cpp {isa}, int4:g32",
                f"kernels/cpu.cpp {isa}, q8_0", f"kernels/cpu.cpp {isa}, q4_0"} <= set(names), names
    assert "torch F.linear, bf16" in names
    # Bytes per weight: bf16 2; int8 1 (ours: and a bf16 scale per row of 96); int4 half a byte and a bf16
    # scale per 32; GGUF's blocks of 32 values, 34 bytes (q8_0) or 18 (q4_0).
    bytes_per = {"bf16": 2, "int4:g32": 0.5 + 2 / 32, "q8_0": 34 / 32, "q4_0": 18 / 32}
    for r in rows:
        per_weight = bytes_per.get(r[0].split(", ")[-1], 1 + 2 / 96 if r[0].startswith("kernels/") else 1)
        assert number(r[1]) > 0 and number(r[2]) == pytest.approx(number(r[1]) / per_weight, rel=0.02)


def test_write_checkpoint_writes_the_named_shape_for_both_loaders(tmp_path, capsys):
    """--write_checkpoint: the hub-layout folder's config.json describes the named shape, and the
    converted model.pth loads (this repo) beside safetensors that transformers loads; its tokenizer has
    the vocabulary's size (which the scripts require), here fewer than the 1000 demo pieces, and for
    cpu-bench's 32000 more, padded with pieces no text encodes to."""
    import sentencepiece as spm
    from scripts.benchmark import main
    from scripts.make_tiny_checkpoint import padded_tokenizer
    from checkpoint import load_tokenizer, read_config
    main(["--write_checkpoint", str(tmp_path), "--model", "tiny", "--precision", "float32"])
    assert f"wrote {tmp_path / 'model.pth'}" in capsys.readouterr().out
    assert read_config(tmp_path / "config.json") == model_args("tiny")
    from conftest import load_reference
    from checkpoint import load_model, open_checkpoint
    ours, ref = load_model(open_checkpoint(tmp_path / "model.pth"), "cpu", torch.float32), load_reference(tmp_path)
    torch.testing.assert_close(ours.output.weight, ref.lm_head.weight)
    assert load_tokenizer(open_checkpoint(tmp_path / "model.pth")).vocab_size() == model_args("tiny").vocab_size
    big = spm.SentencePieceProcessor(model_file=str(padded_tokenizer(tmp_path / "big.model", 32000)))
    text = "def main():\n    print('Hello, my name is Mixtral')  # 😀"
    assert big.vocab_size() == 32000 and big.decode(big.encode(text)) == text
    assert max(big.encode(text * 20)) < 1000 and big.id_to_piece(31999) == "<unused_31999>"


def test_triton_flag_sets_the_variable_on_cuda_and_labels_the_rows(monkeypatch):
    """--triton is MIXTRAL_TRITON=1 on CUDA, and the rows say which kernels they measured; elsewhere
    neither (the CPU has no Triton path)."""
    from scripts.benchmark import triton_label, use_triton
    monkeypatch.delenv("MIXTRAL_TRITON", raising=False)
    use_triton("cpu")
    assert "MIXTRAL_TRITON" not in os.environ and triton_label("cuda") == ""
    use_triton("cuda")
    assert triton_label("cuda") == ", MIXTRAL_TRITON=1" and triton_label("cpu") == ""
    monkeypatch.setenv("MIXTRAL_TRITON", "experts")
    assert triton_label("cuda") == ", MIXTRAL_TRITON=experts"


@pytest.mark.parametrize("argv, words", [
    (["--threads", "-1"], ["--threads", "at least 1"]),
    (["--threads", "0"], ["--threads", "at least 1"]),
    (["--probe_mb", "-5"], ["--probe_mb", "at least 1"]),
    (["--decode_prompts", "4000", "--max_new_tokens", "100"], ["4000", "--max_new_tokens 100", "context of 4096"]),
    (["--decode_prompts", "4000", "--batch_sizes", "2", "--ragged", "--max_new_tokens", "96"],
     ["4001", "--max_new_tokens 96", "context of 4096"]),
    (["--prefill_lengths", "16", "5000"], ["--prefill_lengths", "5000", "context of 4096"]),
    (["--batch_sizes", "1", "1000000000"], ["--batch_sizes 1000000000", "KV cache", "memory available"]),
], ids=["threads-negative", "threads-0", "probe-negative", "decode-past-context", "ragged-past-context",
        "prefill-past-context", "batch-beyond-memory"])
def test_flags_the_run_cannot_honour_are_refused_before_any_work(capsys, monkeypatch, argv, words):
    """Each was a traceback (torch's thread setter, a negative tensor size, an index past the rotary
    table, the allocator), after loading or building the model for some."""
    from scripts import benchmark
    built = []
    monkeypatch.setattr(benchmark, "random_model", lambda *args, **kwargs: built.append(args))
    fails_cleanly(benchmark.main, ["--model", "tiny", *argv], capsys, *words)
    assert built == []


def test_write_checkpoint_into_a_file_or_a_foreign_folder_is_refused(tmp_path, capsys):
    from scripts.benchmark import main
    (tmp_path / "a_file").write_text("mine")
    fails_cleanly(main, ["--write_checkpoint", tmp_path / "a_file", "--model", "tiny"], capsys, str(tmp_path / "a_file"),
                  "is a file")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "notes.txt").write_text("mine")
    fails_cleanly(main, ["--write_checkpoint", tmp_path / "folder", "--model", "tiny"], capsys, "notes.txt")
    assert (tmp_path / "a_file").read_text() == (tmp_path / "folder" / "notes.txt").read_text() == "mine"


def test_default_prefill_lengths_beyond_a_short_context_are_skipped_with_a_note(tiny_stdlib, capsys):
    """The shipped model's context is 256 tokens: the default prefill lengths 512 and 2048 crashed (an
    index past its rotary table). Given by default, they are skipped, and the note says so."""
    from scripts.benchmark import main
    main([str(a) for a in ["--checkpoint_path", tiny_stdlib / "model.pth", "--runs", "1", "--probe_mb", "8",
                           "--max_new_tokens", "4", "--precision", "float32"]])
    out, err = capsys.readouterr()
    _, rows = parse_table(out)
    assert [(r[1], r[2]) for r in rows] == [("decode", "5 + 4"), ("prefill", "128")]
    assert "note: --prefill_lengths 512 2048 skipped: beyond the model's context of 256 tokens" in err


def test_profile_shows_each_ops_share_of_a_decode_step(tiny_stdlib, capsys):
    """--profile: a table of ops by their self time per decode step, the CPU kernels among them (a linear call
    for wqkv, wo and the router of each layer, and one for the head), shares that add up to the profiled step
    at most."""
    from kernels import cpu as cpu_kernels
    from scripts.benchmark import main
    main([str(a) for a in ["--checkpoint_path", tiny_stdlib / "model.pth", "--runs", "1", "--probe_mb", "8",
                           "--max_new_tokens", "6", "--prefill_lengths", "--profile"]])
    out = capsys.readouterr().out
    table = out.split("| op | calls a step | ms a step | share of the step |")[1].split("\n\n")[0]
    rows = [line.split(" | ") for line in table.strip().split("\n")[1:]]
    shares = [float(r[-1].rstrip(" |%")) for r in rows]
    assert len(rows) == 13 and sum(shares) <= 100.5
    if cpu_kernels.available():
        linear = [r for r in rows if r[0].endswith("::linear")]
        n_layer = json.loads((tiny_stdlib / "config.json").read_text())["num_hidden_layers"]
        assert linear and float(linear[0][1]) == 3 * n_layer + 1, table
