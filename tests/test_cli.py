"""What every script's command line shares (cli.py) and generate.py's faults around it (issue 29): --help that
shows every default, --threads, the CPU kernels' first build said and timed apart, stdout that is closed or
full, a trace that cannot be written, arguments that are not UTF-8, prompt files read as written, and Ctrl-C
as one line and status 130 wherever it lands."""
import argparse
import json
import os
import re
import resource
import sys
from types import SimpleNamespace

import pytest
import torch

import generate as generate_script
from conftest import REPO, fails_cleanly, run_script
from kernels import cpu as cpu_kernels

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread: small models, a shared machine


def argv(folder, *extra) -> list:
    return [str(a) for a in ("--checkpoint_path", folder / "model.pth", "--device", "cpu", "--num_samples", "1",
                             "--max_new_tokens", "4", *extra)]


def ends_with_one_error(main, args: list, capsys, *words) -> str:
    """main(args) fails during its work: status 1, and after the progress lines one line saying why, naming
    each of words (no traceback). Returns that line."""
    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in args])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert exit_.value.code == 1 and lines[-1].startswith("error:") and "Traceback" not in err, err
    assert [line for line in lines if line.startswith("error:")] == lines[-1:], err
    assert all(word in lines[-1] for word in words), lines[-1]
    return lines[-1]


# ----------------------------------------------------------------------------- --help

class Parsed(Exception):
    """Raised in place of parsing: carries the parser a script built."""


def parser_of(main) -> argparse.ArgumentParser:
    """The parser a script's main (or parse_args) builds, caught as it parses."""
    def capture(parser, *args, **kwargs):
        raise Parsed(parser)
    original = argparse.ArgumentParser.parse_args
    argparse.ArgumentParser.parse_args = capture
    try:
        main([])
    except Parsed as e:
        return e.args[0]
    finally:
        argparse.ArgumentParser.parse_args = original
    raise AssertionError(f"{main} parsed nothing")


def script_parsers() -> dict:
    import eval as eval_script
    import quantize
    from scripts import bench_kernels, benchmark, convert_hf_checkpoint, make_tiny_checkpoint
    return {"generate.py": generate_script.parse_args, "eval.py": eval_script.parse_args, "quantize.py": quantize.main,
            "convert_hf_checkpoint.py": convert_hf_checkpoint.main,
            "make_tiny_checkpoint.py": make_tiny_checkpoint.main,
            "benchmark.py": benchmark.parse_args, "bench_kernels.py": bench_kernels.main}


def test_every_flag_has_help_and_shows_its_default():
    for script, main in script_parsers().items():
        parser = parser_of(main)
        text = " ".join(parser.format_help().split())  # argparse wraps lines anywhere
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help and action.help.strip(), f"{script} {action.option_strings[0]} has no help"
            if action.default is not None and action.default is not False:
                assert f"(default: {action.default})" in text, f"{script} {action.option_strings[0]}"
    generate_help = " ".join(parser_of(generate_script.parse_args).format_help().split())
    for flag, default in (("--num_samples", 5), ("--temperature", 0.8), ("--top_k", 200), ("--max_new_tokens", 200),
                          ("--threads", torch.get_num_threads())):
        assert re.search(rf"{flag} \S+ .*?\(default: {default}\)", generate_help), flag


def test_benchmark_compare_hf_is_spelled_as_every_flag_and_keeps_its_old_spelling():
    from scripts.benchmark import parse_args
    assert parse_args(["--compare_hf"]).compare_hf and parse_args(["--compare-hf"]).compare_hf
    assert not parse_args([]).compare_hf


# ----------------------------------------------------------------------------- --threads and the kernels

def test_threads_flag_sets_the_threads_and_the_timing_line_says_so(checkpoint, capsys, one_thread):
    generate_script.main(argv(checkpoint, "--threads", "2"))
    assert torch.get_num_threads() == 2
    assert re.search(r"^Time for inference 1: .* 2 CPU threads$", capsys.readouterr().err, re.M)
    fails_cleanly(generate_script.main, argv(checkpoint, "--threads", "0"), capsys, "--threads", "at least 1")


def test_a_first_build_of_the_cpu_kernels_is_said_and_timed_apart_from_loading(checkpoint, capsys, monkeypatch):
    """cli.prepare_cpu_kernels before the model: a build (kernels.cpu calls on_build before compiling) is
    announced and timed on its own line; a load from the cache says nothing of a build."""
    import time

    def available(build_seconds):
        def fake():
            if cpu_kernels.on_build is not None and build_seconds:
                cpu_kernels.on_build("avx512")
                time.sleep(build_seconds)
            return False  # then PyTorch's kernels: nothing real is built here
        return fake
    monkeypatch.setattr(cpu_kernels, "available", available(1.0))
    generate_script.main(argv(checkpoint))
    err = capsys.readouterr().err
    built = re.search(r"^building the CPU kernels for avx512 \(first use only\)…\nTime to build the CPU kernels: "
                      r"([\d.]+) seconds\nTime to load model: ([\d.]+) seconds$", err, re.M)
    assert built and float(built[1]) >= 1.0 > float(built[2]), err
    monkeypatch.setattr(cpu_kernels, "available", available(0))
    generate_script.main(argv(checkpoint))
    assert "build" not in capsys.readouterr().err


def test_the_build_hook_is_called_only_when_the_cache_lacks_a_build_of_the_current_sources(tmp_path, monkeypatch):
    """kernels.cpu.load: on_build(isa) before compiling when there is no library, or one older than a source;
    not when the library is newer than every source (ninja would only load it). Nothing is compiled here."""
    from torch.utils import cpp_extension
    compiled, announced = [], []
    monkeypatch.setattr(cpu_kernels, "_status", {})
    monkeypatch.setattr(cpu_kernels, "build_folder", lambda isa: tmp_path)
    monkeypatch.setattr(cpu_kernels, "register_fakes", lambda namespace: None)
    monkeypatch.setattr(cpp_extension, "load", lambda **kwargs: compiled.append(kwargs["name"]))
    monkeypatch.setattr(cpu_kernels, "on_build", announced.append)
    monkeypatch.setattr(cpu_kernels, "remove_if_damaged", lambda path: None)  # the stand-in library is no ELF file
    monkeypatch.setattr(cpu_kernels, "ops", lambda isa=None: SimpleNamespace(prompt_use_amx=lambda on: on))
    sources = cpu_kernels.SOURCES
    newest = max(p.stat().st_mtime for p in [*sources, *sources[0].parent.glob("cpu_*.h")])
    library = tmp_path / "mixtral_cpu_kernels_avx2.so"
    for state, expected in (("missing", ["avx2"]), ("older", ["avx2"]), ("newer", [])):
        if state != "missing":
            library.write_bytes(b"")
            os.utime(library, (newest + 10, newest + 10) if state == "newer" else (newest - 10, newest - 10))
        announced.clear()
        cpu_kernels._status.clear()
        cpu_kernels.load("avx2")
        assert announced == expected, state
    assert compiled == ["mixtral_cpu_kernels_avx2"] * 3  # cpp_extension.load itself is called every time


# ----------------------------------------------------------------------------- stdout and the trace

@pytest.fixture
def no_kernels(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "available", lambda: False)  # PyTorch's path: no build, no files written


def test_a_full_disk_under_stdout_is_one_line(checkpoint, capsys, monkeypatch, no_kernels):
    """`generate.py > /dev/full`: the text cannot be written (it was an OSError traceback, and Python's own
    complaint at exit)."""
    with open("/dev/full", "w") as full:
        monkeypatch.setattr(sys, "stdout", full)
        ends_with_one_error(generate_script.main, argv(checkpoint), capsys, "stdout", "No space left on device")


def test_a_closed_stdout_or_stdin_is_refused_before_any_work(checkpoint, capsys, monkeypatch):
    """`generate.py >&-` (Python's sys.stdout is then None: an AttributeError traceback), and `<&-` for a chat."""
    loads = []
    monkeypatch.setattr(generate_script, "load_model", lambda *args: loads.append(args))
    monkeypatch.setattr(sys, "stdout", None)
    fails_cleanly(generate_script.main, argv(checkpoint), capsys, "stdout is closed")
    monkeypatch.undo()
    monkeypatch.setattr(generate_script, "load_model", lambda *args: loads.append(args))
    monkeypatch.setattr(sys, "stdin", None)
    fails_cleanly(generate_script.main, argv(checkpoint, "--interactive"), capsys, "--interactive", "stdin", "closed")
    assert loads == []


def test_a_trace_that_cannot_be_written_is_one_line_and_leaves_no_file(checkpoint, tmp_path, capsys, no_kernels):
    """--profile under a file-size limit (as on a full disk): kineto's writer leaves a cut-short file and
    says nothing; now one line, status 1, and neither the trace nor its temporary file."""
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, limits[1]))  # Python ignores SIGXFSZ: writes fail with EFBIG
    try:
        ends_with_one_error(generate_script.main, argv(checkpoint, "--profile", tmp_path / "trace"), capsys,
                            str(tmp_path / "trace.json"), "File too large")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- prompts

def test_an_argument_that_is_not_utf8_is_named_before_any_work(checkpoint, capsys):
    """`--prompt $'caf\\xe9'` (Latin-1) reaches Python as a lone surrogate: a pybind11 cast error inside the
    tokenizer before; now one line naming the byte."""
    fails_cleanly(generate_script.main, argv(checkpoint, "--prompt", "caf\udce9"), capsys, "--prompt", "UTF-8", "0xe9",
                  "character 4")
    fails_cleanly(generate_script.main, argv(checkpoint, "--stop", "\udcff"), capsys, "--stop", "0xff")


def test_prompts_file_lines_end_at_newlines_only(tmp_path):
    """Python's splitlines() also splits at form feeds, \\x1c-\\x1e, \\x85 and U+2028/U+2029: prompts holding them
    were cut in pieces and every later line number was wrong."""
    path = tmp_path / "prompts.txt"
    path.write_bytes("a\x0cb\nc\u2028d\r\ne\x85f\x1cg\n\n  \nlast".encode())
    assert generate_script.read_prompts_file(path) == [(1, "a\x0cb"), (2, "c\u2028d"), (3, "e\x85f\x1cg"), (6, "last")]


def test_prompt_file_is_one_prompt_newlines_included(checkpoint, tokenizer, tmp_path, capsys):
    text = "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n"
    path = tmp_path / "prompt.py"
    path.write_text(text)
    generate_script.main(argv(checkpoint, "--prompt_file", path, "--temperature", "0"))
    out, err = capsys.readouterr()
    assert out.startswith(text)
    prompt_tokens = int(re.search(r"\((\d+) prompt tokens\)", err)[1])
    assert prompt_tokens == 1 + len(tokenizer.encode(text)) and text.count("\n") == 4
    fails_cleanly(generate_script.main, argv(checkpoint, "--prompt_file", tmp_path / "none.txt"), capsys,
                  "--prompt_file", "not found")


# ----------------------------------------------------------------------------- Ctrl-C

def test_ctrl_c_anywhere_is_one_line_and_status_130(checkpoint, tmp_path):
    """A real SIGINT in a child process: while loading, in the prefill, in a decode step, and in eval.py."""
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog, and then the dog sleeps in the sun. " * 3)
    result = run_script(REPO / "tests" / "interrupt_worker.py", checkpoint / "model.pth", text,
                        env={"MIXTRAL_NO_CPU_KERNELS": "1"})
    assert result.returncode == 0, result.stderr
    for moment, outcome in json.loads(result.stdout).items():
        errors = [line for line in outcome["stderr"].splitlines() if line.startswith("error:") or "Traceback" in line]
        assert outcome["status"] == 130 and errors == ["error: interrupted"], (moment, outcome)
