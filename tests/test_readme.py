"""The README's commands, run verbatim as a new user would, in a fresh folder, and the GPU check's
rehearsal on the CPU. Minutes of subprocesses, so not part of the quick suite (`python -m pytest tests`):
CI runs them, with the README's line `MIXTRAL_README_TESTS=1 python -m pytest tests/test_readme.py -q`
(the demo command itself CI runs verbatim).

The hub stand-in serves a small random-weight checkpoint under the real repo id, so that
`export MODEL_REPO=mistralai/Mixtral-8x7B-v0.1` and every command after it run unchanged."""
import json
import os
import re

import pytest

from conftest import REPO, mixtral_tokenizer_path
from fake_hub import hub_client_env
from scripts.make_tiny_checkpoint import TINY, write_hub_checkpoint

README = (REPO / "README.md").read_text()


def bash_blocks(section: str) -> list:
    """The ```bash blocks of one '## section' of the README."""
    body = README.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)```", body, re.S)


@pytest.fixture(scope="module")
def user_folder(hub, tmp_path_factory):
    """A fresh folder holding only links to the repo's scripts, with the stand-in hub serving the repo."""
    # One layer: the README's generate commands compile and run five 200-token samples each.
    config = {**TINY, "num_hidden_layers": 1, "hidden_size": 128, "intermediate_size": 256}
    hub_files = write_hub_checkpoint(tmp_path_factory.mktemp("hub"), config, mixtral_tokenizer_path())
    hub.repos["mistralai/Mixtral-8x7B-v0.1"] = {"files": {f.name: f.read_bytes() for f in hub_files.iterdir()}}
    folder = tmp_path_factory.mktemp("user")
    for name in ("generate.py", "eval.py", "model.py", "formats.py", "quantize.py", "tp.py", "server.py", "kernels",
                 "scripts"):
        if (REPO / name).exists():
            (folder / name).symlink_to(REPO / name)
    return folder


def run_bash(script: str, folder, hub, timeout=600):
    import subprocess
    env = hub_client_env(folder / "hf_home", f"http://127.0.0.1:{hub.server_port}")
    return subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_download_convert_generate_and_quantize_commands(user_folder, hub):
    """One user session, in the README's order: each command needs what the one before wrote."""
    download, = bash_blocks("Downloading Weights")
    generate, = bash_blocks("Generate Text")
    quantize, generate_int8, quantize_int4, generate_int4 = bash_blocks("Quantization")
    cpu_kernels, = bash_blocks("CPU kernels")  # a forced instruction set, then no kernels at all
    assert "python scripts/download.py --repo_id $MODEL_REPO" in download
    assert "MIXTRAL_CPU_ISA=avx2 " in cpu_kernels and "MIXTRAL_NO_CPU_KERNELS=1 " in cpu_kernels
    assert "--mode int8" in quantize and "model_int8.pth" in generate_int8
    assert "--mode int4 --groupsize 32" in quantize_int4 and "model_int4.g32.pth" in generate_int4
    result = run_bash(download + generate + quantize + generate_int8 + quantize_int4 + generate_int4 + cpu_kernels,
                      user_folder, hub)
    assert result.returncode == 0, result.stderr[-3000:]
    folder = user_folder / "checkpoints" / "mistralai" / "Mixtral-8x7B-v0.1"
    assert all((folder / name).is_file() for name in ("model.pth", "model_int8.pth", "model_int4.g32.pth"))
    # Each generate command: five timed samples (after the compile warm-up where compiled), then the summary, on
    # stderr; stdout holds the samples' text alone, each starting with the prompt.
    assert result.stderr.count("Time for inference 5:") == 5 and result.stderr.count("Average tokens/sec:") == 5
    assert "Time for inference" not in result.stdout and "tokens/sec" not in result.stdout
    assert result.stdout.count("Hello, my name is") == 25
    # The last run that loads the CPU kernels is the one that forces AVX2, and it says so.
    assert re.findall(r"^CPU kernels: (\S+) ", result.stderr, re.M)[-1] == "avx2", result.stderr[-3000:]
    # Only the run told to do without the CPU kernels says so.
    assert result.stderr.count("CPU kernels turned off by MIXTRAL_NO_CPU_KERNELS") == 1


def test_batch_and_conversation_commands(user_folder, hub):
    download, = bash_blocks("Downloading Weights")
    examples, = bash_blocks("Batches and conversations")
    if (user_folder / "checkpoints" / "mistralai" / "Mixtral-8x7B-v0.1" / "model.pth").is_file():  # the session above
        download = "export MODEL_REPO=mistralai/Mixtral-8x7B-v0.1\n"
    result = run_bash(download + examples, user_folder, hub)
    assert result.returncode == 0, result.stderr[-3000:]
    out, err = result.stdout, result.stderr
    # The prompts file: its three prompts, labelled by line number (line 3 is blank), in batches of 2 and 1.
    assert re.findall(r"^== (line \d+) ==$", out, re.M) == ["line 1", "line 2", "line 4"]
    assert err.count("tokens/sec summed over 2 sequences") == 1 and "Time for inference 2:" in err
    # The conversation: two turns, then end of input; the prompts and timings on stderr, the answers on stdout.
    assert err.count("What is your prompt?") == 3 and "What is your prompt?" not in out
    assert "tokens/s" not in out


def test_serving_commands(user_folder, hub):
    """The server started in the background, asked by curl and by the openai client, then stopped by SIGTERM,
    which it answers with a clean exit."""
    download, = bash_blocks("Downloading Weights")
    serving, = bash_blocks("Serving")
    if (user_folder / "checkpoints" / "mistralai" / "Mixtral-8x7B-v0.1" / "model.pth").is_file():  # the session above
        download = "export MODEL_REPO=mistralai/Mixtral-8x7B-v0.1\n"
    result = run_bash(download + serving + "kill $!\nwait $!\n", user_folder, hub)
    assert result.returncode == 0, result.stderr[-3000:]
    completion, _ = json.JSONDecoder().raw_decode(result.stdout, result.stdout.index("{"))  # curl's, no newline after
    assert completion["object"] == "text_completion" and completion["usage"]["completion_tokens"] == 20
    assert "Traceback" not in result.stderr


def test_quality_commands(user_folder, hub):
    """eval.py on the downloaded checkpoint, as on the real model, with a few lines standing in for
    wikitext-2 (no network here); then the random-weight table's loop as printed."""
    download, = bash_blocks("Downloading Weights")
    _, _, quantize_int4, _ = bash_blocks("Quantization")
    get_wikitext, real_model, random_weights = bash_blocks("Quality")
    assert "wikitext-2-raw-v1.zip" in get_wikitext and "wikitext-2-raw/wiki.test.raw" in real_model
    (user_folder / "wikitext-2-raw").mkdir(exist_ok=True)
    (user_folder / "wikitext-2-raw" / "wiki.test.raw").write_text(
        " = Valkyria Chronicles III = \n\n Senjō no Valkyria 3 : Unrecorded Chronicles is a tactical role @-@ playing "
        "video game developed by Sega and Media.Vision for the PlayStation Portable . \n" * 8)
    result = run_bash(download + quantize_int4 + real_model + random_weights, user_folder, hub, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    # The real model's two commands (the second against its reference), then five per random checkpoint.
    assert len(figures) == 12 and "kl_mean" not in figures[0] and all("kl_mean" in f for f in figures[1:])
    assert all(0 < f["kl_mean"] and f["top1_agreement"] < 1 for f in figures[1:])


def test_gguf_commands(user_folder, hub, tmp_path, monkeypatch):
    """A community repository's Q4_K_M file (a small one: K-quants' blocks want rows of 256) downloaded and
    generated from; then our int4 checkpoint exported for llama.cpp, and generated from as well. One thread:
    the block types run on PyTorch's many small ops, which a second, descheduled thread on a shared machine
    stalls (measured 35x slower)."""
    import gguf
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    from quantize import quantize_checkpoint
    from scripts.convert_hf_checkpoint import convert_hf_checkpoint
    from scripts.export_gguf import export_gguf
    from scripts.make_tiny_checkpoint import train_demo_tokenizer
    # A small vocabulary: the block types run on PyTorch's paths, where a 32000-row head would make the five
    # 200-token samples of the README's command take many minutes on a shared machine.
    tokenizer = train_demo_tokenizer(tmp_path / "small.model", vocab_size=1000)
    config = {**TINY, "num_hidden_layers": 1, "hidden_size": 256, "intermediate_size": 512, "num_local_experts": 4,
              "vocab_size": 1024}
    folder = convert_hf_checkpoint(write_hub_checkpoint(tmp_path / "q4_k_m", config, tokenizer))
    community = export_gguf(quantize_checkpoint(folder, "experts=q4_k,attention=q4_k,output=q6_k,down=q6_k"))
    hub.repos["TheBloke/Mixtral-8x7B-v0.1-GGUF"] = {"files": {"mixtral-8x7b-v0.1.Q4_K_M.gguf": community.read_bytes()}}
    run_gguf, export = bash_blocks("GGUF files")
    assert "--repo_id TheBloke/Mixtral-8x7B-v0.1-GGUF --filename mixtral-8x7b-v0.1.Q4_K_M.gguf" in run_gguf
    result = run_bash(run_gguf, user_folder, hub)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("Time for inference") == 5, result.stderr[-3000:]  # one per sample, on stderr

    download, = bash_blocks("Downloading Weights")
    _, _, quantize_int4, _ = bash_blocks("Quantization")
    checkpoints = user_folder / "checkpoints" / "mistralai" / "Mixtral-8x7B-v0.1"
    if not (checkpoints / "model_int4.g32.pth").is_file():  # the first README test's session did not run
        export = download + quantize_int4 + export
    else:  # the reader's shell still holds the download section's MODEL_REPO
        export = "".join(line + "\n" for line in download.splitlines() if line.startswith("export ")) + export
    result = run_bash(export, user_folder, hub)
    assert result.returncode == 0, result.stderr[-3000:]
    exported = gguf.GGUFReader(checkpoints / "model_int4.g32.gguf")
    types = {t.name: t.tensor_type.name for t in exported.tensors}
    assert types["blk.0.ffn_up_exps.weight"] == "Q4_0" and types["blk.0.attn_q.weight"] == "Q8_0"
    result = run_bash(f"python generate.py --checkpoint_path {checkpoints / 'model_int4.g32.gguf'} --num_samples 1 "
                      f"--max_new_tokens 20\n", user_folder, hub)
    assert result.returncode == 0 and "Time for inference 1:" in result.stderr, result.stderr[-3000:]

def test_gpu_check_script_runs_on_a_tiny_shape_on_cpu():
    """The five runs in order, each with its table; prefill measured once per format (the Triton kernels
    are for decode steps); the Triton runs, on a CPU, say that they measure the CPU's kernels."""
    import subprocess
    result = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh")], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "GPU_CHECK_TINY": "1"})
    out = result.stdout
    titles = re.findall(r"^== (.*)$", out, re.M)
    assert titles == ["int8, 1 layers, compiled path", "int8, 1 layers, Triton kernels",
                      "bf16, 1 layers, compiled path", "bf16, 1 layers, Triton kernels",
                      "int4, 1 layers, Triton kernels"], out + result.stderr
    tables = [block for block in out.split("### Mixtral benchmark:")[1:]]
    assert len(tables) == 5 and all("| this repo | decode | 5 + 8 |" in t and "| this repo | decode | 32 + 8 |" in t
                                    for t in tables), out
    assert ["| prefill | 32 |" in t for t in tables] == [True, False, True, False, False]
    assert result.stderr.count("note: --triton: the Triton kernels run on CUDA only") == 3, result.stderr
    assert result.returncode == 0
