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
