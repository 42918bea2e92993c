"""Faults a user meets (issue 22): a full disk, a file-size limit, SIGTERM and SIGHUP while a checkpoint
is written, a closed stdout, devices this torch cannot use, wrong-typed config values, requests beyond
memory or context. Each must end with one line and a non-zero exit (a closed pipe: quietly), never a
traceback, a silently wrong result or a half-written file."""
import io
import json
import os
import resource
import signal
import sys
from pathlib import Path

import pytest
import torch

import generate as generate_script
import quantize as quantize_script
from conftest import REPO, fails_cleanly, run_script
from scripts.convert_hf_checkpoint import main as convert_main


def linked_folder(checkpoint, tmp_path, *names, config_changes=None):
    """A checkpoint folder of links to the test checkpoint's files (nothing copied), with config.json
    changed as asked."""
    folder = tmp_path / "ckpt"
    folder.mkdir(parents=True)
    for name in names:
        (folder / name).symlink_to(checkpoint / name)
    config = json.loads((checkpoint / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **(config_changes or {})}))
    return folder


def argv(folder, *extra):
    return ["--checkpoint_path", folder / "model.pth", "--device", "cpu", "--num_samples", "1", *extra]


def leftovers(folder) -> list:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def one_error_line(stderr: str, *words) -> str:
    """The one line a failed script printed (progress bars aside), naming each of words."""
    lines = [line for line in stderr.splitlines() if line.strip() and "%|" not in line]
    assert len(lines) == 1 and lines[0].startswith("error:"), stderr
    assert all(word in lines[0] for word in words), lines[0]
    return lines[0]


# ----------------------------------------------------------------------------- generate.py's flags

def test_non_finite_temperature_is_refused(checkpoint, capsys):
    for value in ("nan", "inf"):
        fails_cleanly(generate_script.main, argv(checkpoint, "--max_new_tokens", "2", "--temperature", value), capsys,
                      "--temperature", value)


def test_devices_this_torch_cannot_use_are_refused(checkpoint, capsys):
    from scripts.benchmark import main as benchmark_main
    for device in ("mps", "xpu", "meta"):
        fails_cleanly(generate_script.main, argv(checkpoint) + ["--device", device], capsys, f"--device {device}")
        fails_cleanly(benchmark_main, ["--model", "tiny", "--device", device], capsys, f"--device {device}")


def test_kv_cache_beyond_memory_is_refused_before_allocating(checkpoint, capsys):
    line = fails_cleanly(generate_script.main, argv(checkpoint, "--batch_size", "10000000", "--max_new_tokens", "2000"),
                         capsys, "--batch_size 10000000", "--max_new_tokens 2000", "KV cache", "GB")
    assert "7864.3 GB" in line  # 2 (k, v) x 3 layers x 1e7 sequences x 2 heads x 2048 positions x 16 x 2 bytes


def test_interactive_max_new_tokens_past_the_context_is_refused(checkpoint, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\n"))
    fails_cleanly(generate_script.main, argv(checkpoint, "--interactive", "--max_new_tokens", "2100"), capsys,
                  "--max_new_tokens 2100", "context of 2048")


def test_profile_into_an_unwritable_folder_is_refused_up_front(checkpoint, tmp_path, capsys):
    fails_cleanly(generate_script.main, argv(checkpoint, "--max_new_tokens", "2", "--profile", tmp_path / "no" / "trace"),
                  capsys, "--profile", str(tmp_path / "no"))


def test_a_folder_given_as_checkpoint_is_named_as_such(checkpoint, capsys):
    fails_cleanly(generate_script.main, ["--checkpoint_path", checkpoint, "--device", "cpu"], capsys, "folder",
                  str(checkpoint))


def test_under_torchrun_only_rank_0_prints_the_error(checkpoint, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, lines in (("1", 0), ("0", 1)):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(SystemExit) as exit_:
            generate_script.main([str(a) for a in argv(checkpoint, "--temperature", "-1")])
        assert exit_.value.code == 1
        assert len(capsys.readouterr().err.splitlines()) == lines


def test_a_closed_stdout_ends_generation_quietly(checkpoint, capsys, monkeypatch):
    """`generate.py ... | head -c 10`: the reader has gone; what Unix tools do is stop, with no message."""
    monkeypatch.setattr("kernels.cpu.available", lambda: False)  # no kernel build: PyTorch's path
    read_end, write_end = os.pipe()
    os.close(read_end)
    with open(write_end, "w") as closed_pipe:
        monkeypatch.setattr(sys, "stdout", closed_pipe)
        with pytest.raises(SystemExit) as exit_:
            generate_script.main([str(a) for a in argv(checkpoint, "--max_new_tokens", "4")])
        assert exit_.value.code == 128 + signal.SIGPIPE
    assert not [line for line in capsys.readouterr().err.splitlines() if "rror" in line or "Traceback" in line]


# ----------------------------------------------------------------------------- config.json and the index

def test_wrong_typed_config_values_are_named_by_converter_and_loader(checkpoint, tmp_path, capsys):
    for key, value in (("hidden_size", "256"), ("num_local_experts", None)):
        folder = linked_folder(checkpoint, tmp_path / key, "model.pth", "tokenizer.model", config_changes={key: value})
        expected = (str(folder / "config.json"), key, json.dumps(value))
        fails_cleanly(convert_main, ["--checkpoint_dir", folder], capsys, *expected)
        fails_cleanly(generate_script.main, argv(folder), capsys, *expected)
    folder = linked_folder(checkpoint, tmp_path / "index")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": [1, 2]}))
    fails_cleanly(convert_main, ["--checkpoint_dir", folder], capsys, "model.safetensors.index.json", "weight_map",
                  "[1, 2]")
    assert leftovers(folder) == [] and not (folder / "model.pth").exists()


def test_groupsize_with_int8_is_refused(checkpoint, tmp_path, capsys):
    folder = linked_folder(checkpoint, tmp_path, "model.pth")
    fails_cleanly(quantize_script.main, ["--checkpoint_path", folder / "model.pth", "--mode", "int8", "--groupsize", "64"],
                  capsys, "--groupsize", "int4")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.pth"]


# ----------------------------------------------------------------------------- writing checkpoints

HUB_FILES = ("model.safetensors.index.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


def limit_file_size(nbytes: int):
    """In the child, before it runs: files may grow to nbytes, as on a nearly full disk. A write past
    that fails with EFBIG (Python ignores SIGXFSZ, which would otherwise kill the process)."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, resource.RLIM_INFINITY))


def test_full_disk_while_quantizing(checkpoint, tmp_path):
    """quantize.py under a file-size limit: one line naming the file and the space it needs, and no
    temporary file (it was a RuntimeError traceback, and on a full disk a bare SIGBUS)."""
    folder = linked_folder(checkpoint, tmp_path, "model.pth")
    result = run_script("quantize.py", "--checkpoint_path", folder / "model.pth", preexec_fn=limit_file_size(1 << 20))
    assert result.returncode == 1
    one_error_line(result.stderr, str(folder / "model_int8.pth"), "File too large", "MB")
    assert leftovers(folder) == [] and not (folder / "model_int8.pth").exists()


def test_full_disk_while_converting(checkpoint, tmp_path):
    """The converter under a file-size limit: one line, as for quantize.py (it was torch's writer's
    RuntimeError traceback), and the model.pth that was there is left as it was."""
    folder = linked_folder(checkpoint, tmp_path, "model.pth", *HUB_FILES)
    result = run_script("scripts/convert_hf_checkpoint.py", "--checkpoint_dir", folder,
                        preexec_fn=limit_file_size(1 << 20))
    assert result.returncode == 1
    one_error_line(result.stderr, str(folder / "model.pth"), "File too large", "MB")
    assert leftovers(folder) == [] and (folder / "model.pth").is_symlink()


def test_quantize_reserves_the_disk_space_before_writing_through_the_map(checkpoint, tmp_path, monkeypatch):
    """A full disk found while a shared map is written is a SIGBUS: no message, no clean-up. So every
    block of the output is allocated (a full disk is then an error) before the map is made."""
    folder = linked_folder(checkpoint, tmp_path, "model.pth")
    real_load, seen = quantize_script.torch.load, []

    def load(path, *args, **kwargs):
        if str(path).endswith(".tmp"):
            stat = os.stat(path)
            seen.append((stat.st_blocks * 512, stat.st_size))
        return real_load(path, *args, **kwargs)
    monkeypatch.setattr(quantize_script.torch, "load", load)
    quantize_script.quantize_checkpoint(folder / "model.pth", "int8")
    (allocated, size), = seen
    assert allocated >= size


QUANTIZE_AT_A_BARRIER = """
import os, sys, time
sys.path.insert(0, os.getcwd())
import quantize
barrier, real_save = sys.argv[1], quantize.torch.save

def save(*args, **kwargs):  # each run waits here, its temporary file open, until both runs are here
    open(os.path.join(barrier, str(os.getpid())), "w").close()
    deadline = time.monotonic() + 120
    while len(os.listdir(barrier)) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    return real_save(*args, **kwargs)
quantize.torch.save = save
quantize.main(sys.argv[2:])
"""


def test_two_runs_writing_the_same_output_at_once_both_succeed(checkpoint, tmp_path):
    """Two quantize.py runs with one output shared one temporary file: the first to finish renamed it
    away under the other (which then failed, or died of SIGBUS when one truncated what the other had
    mapped). Each has its own now: both succeed, the output is whole, nothing is left behind."""
    import subprocess
    import torch
    folder = linked_folder(checkpoint, tmp_path, "model.pth")
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    command = [sys.executable, "-c", QUANTIZE_AT_A_BARRIER, barrier, "--checkpoint_path", folder / "model.pth"]
    runs = [subprocess.Popen([str(a) for a in command], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for _ in range(2)]
    results = [(run.wait(timeout=300), run.stderr.read()) for run in runs]
    for run in runs:
        run.stdout.close()
        run.stderr.close()
    assert len(list(barrier.iterdir())) == 2  # both runs had their temporary file open at once
    assert [code for code, _ in results] == [0, 0], results
    assert leftovers(folder) == []
    written = torch.load(folder / "model_int8.pth", weights_only=True)
    source = torch.load(checkpoint / "model.pth", weights_only=True)
    assert written["tok_embeddings.weight"].equal(source["tok_embeddings.weight"])  # kept as it is
    q, scales = written["layers.0.attention.wo.weight"], written["layers.0.attention.wo.scales"]
    w = source["layers.0.attention.wo.weight"].double()
    # int8, one scale a row: each weight within half a step (scale / 2) of the source, the scale max|row| / 127.
    assert q.dtype == torch.int8 and ((q.double() * scales.double()[:, None] - w).abs() <= scales.double()[:, None] / 2 * (1 + 1e-6)).all()
    assert torch.allclose(scales.double(), w.abs().amax(dim=1) / 127, rtol=1e-6)


def test_a_read_only_output_is_refused_not_replaced(checkpoint, tmp_path, capsys):
    """A read-only model_int8.pth or model.pth is the user's 'keep this': it was replaced silently.
    Now one line names it, and it is left as it was."""
    import stat
    folder = linked_folder(checkpoint, tmp_path, "model.pth", *HUB_FILES)
    kept = folder / "model_int8.pth"
    kept.write_bytes(b"keep me")
    kept.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
    fails_cleanly(quantize_script.main, ["--checkpoint_path", folder / "model.pth"], capsys, str(kept), "read-only")
    assert kept.read_bytes() == b"keep me" and leftovers(folder) == []
    output = folder / "model.pth"
    output.unlink()
    output.write_bytes(b"keep me too")
    output.chmod(stat.S_IRUSR)
    fails_cleanly(convert_main, ["--checkpoint_dir", folder], capsys, str(output), "read-only")
    assert output.read_bytes() == b"keep me too" and leftovers(folder) == []


@pytest.fixture
def counted_signals():
    """A handler for SIGTERM and SIGHUP that only counts them, in place of the default (which would end
    pytest) while a test sends them to its own process; the handlers before it are restored after."""
    received = []

    def count(signum, frame):
        received.append(signum)
    previous = {s: signal.signal(s, count) for s in (signal.SIGTERM, signal.SIGHUP)}
    yield count, received
    for s, handler in previous.items():
        signal.signal(s, handler)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_signal_while_writing_removes_the_temporary_file(checkpoint, tmp_path, capsys, monkeypatch, counted_signals,
                                                           signum):
    """A job scheduler's SIGTERM, or a closed terminal's SIGHUP, arriving while the converter or quantize.py
    writes (sent by the process to itself once its temporary file is written) ends the run as Ctrl-C
    would: one line, the signal's exit status, no temporary file, no output; and the process's own
    handler is back afterwards."""
    folder = linked_folder(checkpoint, tmp_path, *HUB_FILES)
    real_save = quantize_script.torch.save

    def save_then_signal(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        assert leftovers(folder)
        os.kill(os.getpid(), signum)
    monkeypatch.setattr(quantize_script.torch, "save", save_then_signal)  # the one torch module both scripts use

    def stopped(main, args, output):
        with pytest.raises(SystemExit) as exit_:
            main([str(a) for a in args])
        assert exit_.value.code == 128 + signum
        one_error_line(capsys.readouterr().err, signal.Signals(signum).name, output)
        assert leftovers(folder) == [] and not (folder / output).exists()

    stopped(convert_main, ["--checkpoint_dir", folder], "model.pth")
    (folder / "model.pth").symlink_to(checkpoint / "model.pth")  # quantize.py writes beside its source
    stopped(quantize_script.main, ["--checkpoint_path", folder / "model.pth"], "model_int8.pth")
    count, received = counted_signals
    assert received == [] and signal.getsignal(signum) is count


def test_the_signal_line_starts_a_line_of_its_own_after_a_progress_bar(checkpoint, tmp_path, capsys, monkeypatch,
                                                                        counted_signals):
    """SIGTERM while quantize.py's progress bar is drawn: the bar ends without a newline, and the error
    line was glued to it (not found by a reader looking for lines that start with 'error:')."""
    folder = linked_folder(checkpoint, tmp_path, "model.pth")
    real_quantize_into = quantize_script.quantize_into

    def quantize_into_then_signal(*args, **kwargs):
        real_quantize_into(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr(quantize_script, "quantize_into", quantize_into_then_signal)
    with pytest.raises(SystemExit) as exit_:
        quantize_script.main(["--checkpoint_path", str(folder / "model.pth")])
    assert exit_.value.code == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "%|" in err  # a bar was drawn
    assert [line for line in err.split("\n") if line.startswith("error: stopped by SIGTERM")], repr(err)
    assert leftovers(folder) == []


# ----------------------------------------------------------------------------- scripts/train_tiny.py, make_tiny_checkpoint.py

TINY_TRAINING = ["--max_files", "12", "--steps", "3", "--eval_every", "3", "--vocab_size", "800", "--dim", "32",
                 "--n_layer", "2", "--n_head", "2", "--n_kv_head", "1", "--intermediate_size", "32", "--seq_len", "32",
                 "--batch_size", "2", "--val_windows", "2", "--threads", "1"]
OLD_FOLDER = {"config.json": b'{"old": 1}', "model.safetensors": b"old weights", "tokenizer.model": b"old tokenizer",
              "model.pth": b"old conversion"}


def old_folder(path):
    """A checkpoint folder as an earlier run left it."""
    path.mkdir(parents=True)
    for name, data in OLD_FOLDER.items():
        (path / name).write_bytes(data)
    return path


def folder_files(path) -> dict:
    return {p.name: p.read_bytes() for p in path.iterdir()}


def test_train_tiny_under_a_file_size_limit_leaves_the_old_folder_whole(tmp_path):
    """A write that failed (file-size limit) left the new tokenizer.model beside the old weights, and
    every later run on the folder failed. The limit is found before training now, and the folder stays
    as it was, with nothing beside it."""
    out = old_folder(tmp_path / "tiny")
    result = run_script("scripts/train_tiny.py", "--out_dir", out, *TINY_TRAINING, preexec_fn=limit_file_size(64 << 10))
    assert result.returncode == 1
    one_error_line(result.stderr, str(out), "file-size limit")
    assert "step 3" not in result.stdout + result.stderr  # refused before training
    assert folder_files(out) == OLD_FOLDER and [p.name for p in tmp_path.iterdir()] == ["tiny"]


def test_train_tiny_replaces_an_old_folder_as_a_whole(tmp_path):
    """Written file by file over an old folder, the new checkpoint kept the old folder's other files: a
    model.pth converted from the old weights stood beside the new ones."""
    from scripts import train_tiny
    out = old_folder(tmp_path / "tiny")
    train_tiny.main([str(a) for a in ["--out_dir", out, *TINY_TRAINING]])
    import torch
    torch.set_num_threads(1)  # main set its own
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.model", "training.json"]
    assert (out / "config.json").read_bytes() != OLD_FOLDER["config.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"]


def test_train_tiny_refuses_a_folder_that_holds_more_than_a_checkpoint(tmp_path, capsys):
    """The folder is replaced as a whole, so one holding anything else (a notes file, a subfolder: any
    folder given by mistake) is refused before any work, and left as it was."""
    from scripts import train_tiny
    out = old_folder(tmp_path / "tiny")
    (out / "notes.txt").write_text("mine")
    fails_cleanly(train_tiny.main, ["--out_dir", out, *TINY_TRAINING], capsys, str(out), "notes.txt")
    assert folder_files(out) == {**OLD_FOLDER, "notes.txt": b"mine"} and [p.name for p in tmp_path.iterdir()] == ["tiny"]


def test_train_tiny_refuses_the_shipped_model_without_force(capsys, monkeypatch):
    """The default --out_dir was the shipped assets/tiny-stdlib: a bare run replaced the repo's model."""
    from scripts import train_tiny
    shipped = REPO / "assets" / "tiny-stdlib"
    before = folder_files(shipped)
    monkeypatch.chdir(REPO)
    for out_dir in (shipped, "assets/tiny-stdlib", "assets/../assets/tiny-stdlib"):
        fails_cleanly(train_tiny.main, ["--out_dir", out_dir, *TINY_TRAINING], capsys, str(out_dir), "assets", "--force")
    assert folder_files(shipped) == before
    assert not [p for p in shipped.parent.iterdir() if p.name.endswith(".tmp")]


def test_ctrl_c_while_training_is_one_line_and_leaves_the_old_folder(tmp_path):
    import subprocess
    out = old_folder(tmp_path / "tiny")
    command = [sys.executable, "scripts/train_tiny.py", "--out_dir", out, *TINY_TRAINING[:-1], "1", "--steps", "100000"]
    with open(tmp_path / "stderr", "w+") as err:
        process = subprocess.Popen([str(a) for a in command], cwd=REPO, stdout=subprocess.PIPE, stderr=err, text=True,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
        for line in process.stdout:  # the model is built: training starts now
            if line.startswith("model:"):
                break
        process.send_signal(signal.SIGINT)
        process.stdout.read()
        assert process.wait(timeout=60) == 128 + signal.SIGINT
        err.seek(0)
        one_error_line(err.read(), "stopped by SIGINT", str(out))
    assert folder_files(out) == OLD_FOLDER and sorted(p.name for p in tmp_path.iterdir()) == ["stderr", "tiny"]


@pytest.mark.parametrize("flags, words", [
    (["--steps", "0"], ["--steps", "at least 1"]),
    (["--steps", "-5"], ["--steps", "at least 1"]),
    (["--vocab_size", "100"], ["--vocab_size 100", "too small"]),
    (["--stdlib", "{tmp}/nowhere"], ["--stdlib", "nowhere", "not a folder"]),
    (["--stdlib", "{tmp}/empty"], ["--stdlib", "empty", "no .py files"]),
], ids=["steps-0", "steps-negative", "vocab-too-small", "stdlib-missing", "stdlib-empty"])
def test_bad_training_arguments_are_one_line_each(tmp_path, capsys, flags, words):
    from scripts import train_tiny
    (tmp_path / "empty").mkdir()
    flags = [f.format(tmp=tmp_path) for f in flags]
    fails_cleanly(train_tiny.main, ["--out_dir", tmp_path / "out", *TINY_TRAINING, *flags], capsys, *words)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_train_tiny_finds_a_place_it_cannot_write_before_any_work(tmp_path, capsys, monkeypatch):
    """A file where the folder (or its parent) should go was found only after training, as a traceback."""
    from scripts import train_tiny
    read = []
    monkeypatch.setattr(train_tiny, "stdlib_files", lambda *args: read.append(args))
    (tmp_path / "a_file").write_text("mine")
    fails_cleanly(train_tiny.main, ["--out_dir", tmp_path / "a_file", *TINY_TRAINING], capsys, "a_file", "is a file")
    fails_cleanly(train_tiny.main, ["--out_dir", tmp_path / "a_file" / "tiny", *TINY_TRAINING], capsys, "cannot write",
                  str(tmp_path / "a_file" / "tiny"))
    assert read == [] and (tmp_path / "a_file").read_text() == "mine" and len(list(tmp_path.iterdir())) == 1


def test_make_tiny_checkpoint_under_a_file_size_limit_leaves_the_old_folder_whole(tmp_path):
    """The writer train_tiny.py uses, on its own: the first shard that did not fit was left cut short
    among the old folder's files."""
    out = old_folder(tmp_path / "tiny")
    result = run_script("scripts/make_tiny_checkpoint.py", "--checkpoint_dir", out, preexec_fn=limit_file_size(1 << 20))
    assert result.returncode == 1
    one_error_line(result.stderr, str(out), "File too large")
    assert folder_files(out) == OLD_FOLDER and [p.name for p in tmp_path.iterdir()] == ["tiny"]


# ----------------------------------------------------------------------------- checkpoint contents

def corrupted(folder, tmp_path, change) -> Path:
    """A copy of folder's model_int4.g32.pth (made once) with change(state_dict) applied."""
    import shutil
    from quantize import quantize_checkpoint
    if not (folder / "model_int4.g32.pth").exists():
        quantize_checkpoint(folder / "model.pth", "int4:g32")
    out = tmp_path / "ckpt"
    out.mkdir()
    for name in ("config.json", "tokenizer.model"):
        shutil.copy(folder / name, out / name)
    state_dict = torch.load(folder / "model_int4.g32.pth", weights_only=True)
    change(state_dict)
    torch.save(state_dict, out / "model.pth")
    return out / "model.pth"


def _set(name, value):
    return lambda sd: sd.__setitem__(name, value)


@pytest.mark.parametrize("change, words", [
    (_set("layers.0.ffn_norm.weight", [1.0, 2.0]), ["holds list", "not a tensor"]),
    (lambda sd: sd.__setitem__(7, torch.zeros(3)), ["under 7", "not a tensor"]),
    (_set("layers.0.block_sparse_moe.w1_scales", torch.zeros(())), ["w1_scales", "should be"]),
    (_set("layers.0.block_sparse_moe.w1_scales", torch.zeros(0)), ["w1_scales", "should be"]),
    (lambda sd: sd.__setitem__("layers.0.block_sparse_moe.w1_scales",
                               sd["layers.0.block_sparse_moe.w1_scales"].repeat_interleave(4, -1)), ["groups of 8"]),
    (lambda sd: sd.__setitem__("layers.0.attention.wqkv.weight", sd["layers.0.attention.wqkv.weight"].long()),
     ["wqkv.weight is int64", "weights here are floats"]),
    (lambda sd: sd.pop("layers.1.block_sparse_moe.w2_scales"), ["w2_scales", "missing"]),
], ids=["a list", "an int key", "0-dim scales", "empty scales", "groups of 8", "int64 weights", "missing scales"])
def test_a_checkpoint_whose_contents_do_not_fit_is_one_line(checkpoint, tmp_path, capsys, change, words):
    """Names, types, dtypes and shapes are checked against the formats' layouts when loading: no traceback,
    none from inside a kernel."""
    import generate as generate_script
    path = corrupted(checkpoint, tmp_path, change)
    capsys.readouterr()  # the quantizer's progress bar, when it made the file
    fails_cleanly(generate_script.main, ["--checkpoint_path", path, "--device", "cpu", "--max_new_tokens", "2",
                                         "--num_samples", "1"], capsys, *words)


def test_a_tokenizer_of_another_vocabulary_is_refused(checkpoint, tmp_path, capsys):
    """Loading a tokenizer.model whose size is not the model's vocab_size: one line naming both."""
    import shutil
    import generate as generate_script
    from scripts.make_tiny_checkpoint import train_demo_tokenizer
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for name in ("config.json", "model.pth"):
        shutil.copy(checkpoint / name, folder / name)
    train_demo_tokenizer(folder / "tokenizer.model", vocab_size=500)
    fails_cleanly(generate_script.main, ["--checkpoint_path", folder / "model.pth", "--device", "cpu"], capsys,
                  "tokens but the model has 32000", "another model")


def test_quantizing_into_a_folder_is_refused_before_the_work(checkpoint, tmp_path, capsys, monkeypatch):
    import shutil
    import quantize as quantize_script
    from formats import Int8
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for name in ("config.json", "model.pth", "tokenizer.model"):
        shutil.copy(checkpoint / name, folder / name)
    (folder / "model_int8.pth").mkdir()
    calls = []
    monkeypatch.setattr(Int8, "quantize", lambda *args, **kwargs: calls.append(1))
    fails_cleanly(quantize_script.main, ["--checkpoint_path", folder / "model.pth", "--mode", "int8"], capsys,
                  "model_int8.pth is a folder")
    assert not calls  # nothing was quantized first


@pytest.mark.parametrize("name", ["layers.1.block_sparse_moe.w2", "layers.0.attention_norm.weight"])
def test_quantizing_non_finite_weights_is_refused_naming_the_tensor(checkpoint, tmp_path, capsys, name):
    """One NaN or Inf in a weight that is quantized (checked chunk by chunk as it is read) or copied: one line
    naming it, and no output file."""
    import shutil
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for f in ("config.json", "tokenizer.model"):
        shutil.copy(checkpoint / f, folder / f)
    state_dict = torch.load(checkpoint / "model.pth", weights_only=True)
    state_dict[name].view(-1)[-1] = float("inf")
    torch.save(state_dict, folder / "model.pth")
    line = fails_cleanly(quantize_script.main, ["--checkpoint_path", folder / "model.pth", "--format", "int4:g32"],
                         capsys, name, "NaN or Inf")
    assert line.startswith("error: tensor") and not (folder / "model_int4.g32.pth").exists()


# ----------------------------------------------------------------------------- input without end, models without sense

UNBOUNDED_CHILD = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (4 << 30, resource.RLIM_INFINITY))  # a normal run peaks near 1.5 GB
sys.path.insert(0, sys.argv[1])
import eval as eval_script, generate as generate_script, quantize as quantize_script
ckpt, run, zero = ["--checkpoint_path", sys.argv[2]], ["--device", "cpu", "--threads", "1"], "/dev/zero"
for main, argv in [(eval_script.main, run + ["--text", zero]), (generate_script.main, run + ["--prompts_file", zero]),
                   (generate_script.main, run + ["--prompt_file", zero]),
                   (quantize_script.main, ["--format", "q4_0", "--calibration_text", zero])]:
    try:
        main(ckpt + argv)
    except SystemExit as e:
        print(f"exit {e.code}", file=sys.stderr, flush=True)
"""


def test_input_without_end_is_read_in_bounded_pieces(checkpoint):
    """/dev/zero as eval's --text, generate's --prompts_file and --prompt_file, quantize's --calibration_text,
    under a 4 GB address-space limit (each was read at once: gigabytes in seconds, then a MemoryError traceback,
    or without the limit the out-of-memory killer). A line longer than the context could spell is refused in
    one line before it is held whole."""
    result = run_script("-c", UNBOUNDED_CHILD, REPO, checkpoint / "model.pth", timeout=240,
                        env={"MALLOC_ARENA_MAX": "2"})
    lines = [line for line in result.stderr.splitlines() if line.startswith(("error:", "exit", "note:"))]
    assert "Traceback" not in result.stderr and "MemoryError" not in result.stderr, result.stderr[-3000:]
    chars = 2048 * 16  # the model's context times the tokenizer's longest piece
    assert lines == [
        f"error: line 1 of --text /dev/zero is longer than {chars} characters: more tokens than the model's "
        f"context of 2048 holds; break it", "exit 1",
        f"error: line 1 of --prompts_file /dev/zero is longer than {chars} characters: more tokens than the "
        f"model's context holds; shorten it", "exit 1",
        f"error: --prompt_file /dev/zero is longer than {chars} characters: more tokens than the model's context "
        f"holds; shorten it", "exit 1",
        f"error: line 1 of --calibration_text /dev/zero is longer than {chars} characters: more tokens than the "
        f"model's context of 2048 holds; break it", "exit 1"], result.stderr[-3000:]


def test_a_chat_line_longer_than_the_context_is_read_past_in_pieces(capsys, monkeypatch):
    """The chat's stdin: a line longer than the context could spell is said and skipped, read limit characters
    at a time, never held whole (it was one readline(): /dev/zero filled memory); the next line is a turn."""
    asked = []

    class Recording(io.StringIO):
        def readline(self, size=-1):
            asked.append(size)
            return super().readline(size)
    monkeypatch.setattr(sys, "stdin", Recording("x" * 100_000 + "\nHello\n"))
    assert list(generate_script.read_prompts(limit=1000)) == ["Hello"]
    assert "note: that line is longer than 1000 characters" in capsys.readouterr().err
    assert asked and all(0 < size <= 1001 for size in asked), asked


def test_a_fifo_with_no_writer_says_what_it_waits_for(checkpoint, tmp_path):
    """A FIFO no program writes into, as eval's --text: one line saying it waits for a writer (it blocked in
    silence); Ctrl-C then ends it in one line."""
    import subprocess
    import time
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    child = subprocess.Popen([sys.executable, "eval.py", "--checkpoint_path", checkpoint / "model.pth", "--device",
                              "cpu", "--text", fifo], cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        import select
        assert select.select([child.stderr], [], [], 120)[0], "no line: it waits in silence"
        line = child.stderr.readline()  # the child's first line, once it waits
        assert line.startswith(f"note: --text {fifo} is a pipe with nothing in it yet: waiting for a program to "
                               f"write into it"), line
        time.sleep(0.2)
        child.send_signal(signal.SIGINT)
        assert child.wait(timeout=30) == 128 + signal.SIGINT
        assert [line for line in child.stderr.read().splitlines() if line.strip()] == ["error: interrupted"]
    finally:
        child.kill()


def test_a_fifo_and_a_pipe_with_writers_are_read(checkpoint, tmp_path, capsys):
    """A FIFO whose writer comes later is waited for, said once; a pipe that has its text already
    (`--prompts_file <(...)`) is read at once, with nothing said."""
    import threading
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)

    def write_later():
        time.sleep(0.5)
        fifo.write_text("first\nsecond\n")
    import time
    writer = threading.Thread(target=write_later)
    writer.start()
    assert generate_script.read_prompts_file(fifo) == [(1, "first"), (2, "second")]
    writer.join()
    assert capsys.readouterr().err.startswith(f"note: --prompts_file {fifo} is a pipe with nothing in it yet")
    read_end, write_end = os.pipe()
    os.write(write_end, b"a\r\nb")
    os.close(write_end)
    assert generate_script.read_prompts_file(f"/dev/fd/{read_end}") == [(1, "a"), (2, "b")]
    os.close(read_end)
    assert capsys.readouterr().err == ""


def a_checkpoint_with(checkpoint, tmp_path, name: str, change) -> Path:
    """A copy of the test checkpoint whose tensor `name` is change(tensor)."""
    import shutil
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for f in ("config.json", "tokenizer.model"):
        shutil.copy(checkpoint / f, folder / f)
    state_dict = torch.load(checkpoint / "model.pth", weights_only=True)
    state_dict[name] = change(state_dict[name])
    torch.save(state_dict, folder / "model.pth")
    return folder / "model.pth"


def fails_after_loading(main, argv, capsys, *words) -> str:
    """main(argv) fails once the model is loaded: exit 1, its last line on stderr the one error line, naming
    words, and nothing on stdout. Returns that line."""
    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in argv])
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip() and "%|" not in line]
    assert exit_.value.code == 1 and [line for line in lines if line.startswith("error:")] == lines[-1:], captured.err
    assert "Traceback" not in captured.err and captured.out == "", captured
    assert all(word in lines[-1] for word in words), lines[-1]
    return lines[-1]


def test_non_finite_logits_are_an_error_not_text(checkpoint, tmp_path, capsys):
    """One +inf in one attention matrix, given to generate.py and eval.py directly (conversion and quantize.py
    refuse it; reading every tensor at load would cost a pass over the file, the logits cost nothing): one line
    saying so (generate printed ⁇ ⁇ ⁇ with exit 0, eval a bare NaN in its JSON line). Greedy and sampled,
    streamed, batched and with no host sync per step (--ignore_eos, batched)."""
    import eval as eval_script

    def one_inf(t):
        t = t.clone()
        t[0, 0] = float("inf")
        return t
    path = a_checkpoint_with(checkpoint, tmp_path, "layers.0.attention.wqkv.weight", one_inf)
    for flags, where in ((["--temperature", "0"], "at new token 1"), ([], "at new token 1"),
                         (["--batch_size", "2", "--ignore_eos"], "at new token 1 of sequence 1")):
        fails_after_loading(generate_script.main, argv(path.parent, "--max_new_tokens", "3", *flags), capsys,
                            "logits are not finite", where, "a weight that is not finite")
    # With nothing to read the tokens as they come (no streaming, no end of sequence), checked once at the end.
    from conftest import load_ours
    from errors import UserError
    from generation import generate_batch
    with pytest.raises(UserError, match="not finite.* during the generation"):
        generate_batch(load_ours(path.parent), [torch.tensor([1, 2, 3])], 4, temperature=0.5)
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog.\n")
    fails_after_loading(eval_script.main, ["--checkpoint_path", path, "--device", "cpu", "--text", text,
                                           "--reference_path", checkpoint / "model.pth"], capsys,
                        "the model's logits are not finite", "chunk 1")


def test_eval_json_line_is_strict_json_when_a_figure_overflows(checkpoint, tmp_path, capsys, tokenizer):
    """A finite model that gives its text almost no probability (the output layer scaled by 1e6): the
    perplexity passes float64's range. It was an OverflowError traceback; it is null in a valid JSON line."""
    import eval as eval_script
    path = a_checkpoint_with(checkpoint, tmp_path, "output.weight", lambda t: t * 1e6)
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog.\n")
    eval_script.main([str(a) for a in ("--checkpoint_path", path, "--device", "cpu", "--text", text,
                                       "--precision", "float32")])
    last = capsys.readouterr().out.splitlines()[-1]

    def refuse(constant):
        raise AssertionError(f"{constant} is not JSON")
    summary = json.loads(last, parse_constant=refuse)
    assert summary["perplexity"] is None and summary["tokens"] == len(tokenizer.encode(text.read_text())), last


def test_eval_refuses_a_context_beyond_memory_before_allocating(checkpoint, tmp_path, capsys):
    """generate.py's memory check, shared: a --context whose KV cache and scores exceed the memory available
    is one line (it was the allocator's traceback, or the out-of-memory killer)."""
    import eval as eval_script
    folder = linked_folder(checkpoint, tmp_path, "model.pth", "tokenizer.model",
                           config_changes={"max_position_embeddings": 10 ** 9})
    text = tmp_path / "text.txt"
    text.write_text("Hello.\n")
    line = fails_cleanly(eval_script.main, ["--checkpoint_path", folder / "model.pth", "--device", "cpu", "--text", text,
                                            "--context", str(10 ** 9)], capsys, "--context 1000000000", "KV cache",
                         "memory available on cpu", "lower --context")
    # the KV cache (2 x 3 layers x 2 heads x 1e9 positions x 16 x 2 bytes) and the scores (1e9 x 32000 x 18 bytes)
    assert "576384.0 GB" in line, line


TORCHRUN = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
DYING_RANK = """
import os, signal, sys
sys.path.insert(0, os.environ["REPO"])
import model
forward, calls = model.Transformer.forward, []
def forward_then_die(self, *args, **kwargs):  # rank 1 is killed at its third forward pass, mid-generation
    calls.append(1)
    if os.environ["RANK"] == "1" and len(calls) == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return forward(self, *args, **kwargs)
model.Transformer.forward = forward_then_die
import generate
generate.main()
"""


def test_a_rank_that_dies_is_named_in_one_line_by_the_other(checkpoint, tmp_path):
    """Two CPU ranks under torchrun; rank 1 is killed mid-generation. Rank 0 said it in ~74 lines of gloo
    traceback; now one line naming rank 1 (torchrun's own report follows, which is torchrun's)."""
    script = tmp_path / "dying_rank.py"
    script.write_text(DYING_RANK)
    result = run_script(*TORCHRUN, script, "--device", "cpu", "--checkpoint_path", checkpoint / "model.pth",
                        "--max_new_tokens", "8", "--num_samples", "1", env={"REPO": str(REPO)}, timeout=240)
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if line.startswith(("error:", "[rank"))]
    assert ours == ["error: rank 1 stopped in the middle of the run (its own line, or torchrun's report, says "
                    "why); rank 0 cannot go on without it"], result.stderr[-4000:]
    assert "pair.cc" not in result.stderr and 'generate.py", line' not in result.stderr


def test_a_fifo_shard_is_named_as_not_a_file(checkpoint, tmp_path, capsys):
    """A shard the index lists that is a FIFO (or a folder): it was reported as missing."""
    folder = linked_folder(checkpoint, tmp_path, *HUB_FILES[:2], "tokenizer.model")
    os.mkfifo(folder / HUB_FILES[2])
    fails_cleanly(convert_main, ["--checkpoint_dir", folder], capsys, HUB_FILES[2], "not a regular file")
    assert not (folder / "model.pth").exists()


IMATRIX_CHILD = """
import sys
sys.path.insert(0, sys.argv[1])
import quantize
for path in sys.argv[3:]:
    try:
        quantize.main(["--checkpoint_path", sys.argv[2], "--format", "q4_0", "--imatrix", path])
    except SystemExit as e:
        print(f"exit {e.code}", file=sys.stderr)
"""


def test_an_imatrix_that_is_a_fifo_or_a_folder_is_refused_not_waited_on(checkpoint, tmp_path):
    """--imatrix naming a FIFO blocked forever in safetensors' open, in silence, past Ctrl-C (a child, and its
    timeout fails the test); a folder was called 'not a safetensors file (OSError)'."""
    folder = linked_folder(checkpoint, tmp_path, "model.pth", "tokenizer.model")
    fifo = tmp_path / "stats.imatrix.safetensors"
    os.mkfifo(fifo)
    result = run_script("-c", IMATRIX_CHILD, REPO, folder / "model.pth", fifo, tmp_path, timeout=60)
    assert result.stderr.splitlines() == [
        f"error: --imatrix {path} is not a regular file; give the .imatrix.safetensors file a --calibration_text "
        f"run saved" if n % 2 == 0 else "exit 1" for n, path in enumerate((fifo, fifo, tmp_path, tmp_path))]
    assert leftovers(folder) == []
