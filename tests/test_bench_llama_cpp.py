"""scripts/bench_llama_cpp.sh checks every argument before it builds or writes anything: one line naming what
is wrong and what to give instead, status 1 (2 for no arguments, with the usage). Building llama.cpp and
running llama-bench are not tested here (minutes, and a source tree this repo does not ship)."""
import subprocess

import pytest

from conftest import REPO

SCRIPT = REPO / "scripts" / "bench_llama_cpp.sh"


def run(*args, env=None):
    import os
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


@pytest.fixture
def trees(tmp_path):
    """A stand-in llama.cpp tree (the two files the script looks for) and a hub-layout checkpoint folder."""
    source, checkpoint = tmp_path / "llama.cpp", tmp_path / "checkpoint"
    source.mkdir()
    checkpoint.mkdir()
    for path in (source / "CMakeLists.txt", source / "convert_hf_to_gguf.py", checkpoint / "config.json",
                 checkpoint / "model.safetensors", checkpoint / "tokenizer.model"):
        path.write_text("")
    return source, checkpoint


def test_no_arguments_prints_the_usage():
    result = run()
    assert result.returncode == 2 and result.stderr.startswith("usage: bash scripts/bench_llama_cpp.sh")


@pytest.mark.parametrize("case,words", [
    ("no source", ["not a folder", "git clone"]),
    ("not llama.cpp", ["not a llama.cpp source tree", "convert_hf_to_gguf.py"]),
    ("no checkpoint", ["not a hub-layout checkpoint", "--write_checkpoint"]),
    ("no tokenizer", ["tokenizer.model"]),
    ("threads", ["THREADS", "'two'"]),
    ("type", ["TYPES", "q9_9"]),
    ("stray argument", ["after --"]),
])
def test_bad_arguments_are_one_line_before_any_work(trees, tmp_path, case, words):
    source, checkpoint = trees
    args, env = [source, checkpoint, "2"], {}
    if case == "no source":
        args[0] = tmp_path / "nowhere"
    elif case == "not llama.cpp":
        (source / "convert_hf_to_gguf.py").unlink()
    elif case == "no checkpoint":
        (checkpoint / "model.safetensors").unlink()
    elif case == "no tokenizer":
        (checkpoint / "tokenizer.model").unlink()
    elif case == "threads":
        args[2] = "two"
    elif case == "type":
        env = {"TYPES": "bf16 q9_9"}
    elif case == "stray argument":
        args.append("-p")
    result = run(*args, env=env)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert all(word in lines[0] for word in words), lines[0]
    assert {p.name for p in checkpoint.iterdir()} <= {"config.json", "model.safetensors", "tokenizer.model"}  # no gguf
    assert not (source / "build").exists()  # nothing built
