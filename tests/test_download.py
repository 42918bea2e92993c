"""scripts/download.py against tests/fake_hub.py's stand-in for the Hugging Face Hub served on 127.0.0.1."""
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import unquote

import pytest

from fake_hub import hub_client_env

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "download.py"

def _files(with_tokenizer=True):
    names = [
        "config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
        "model.safetensors.index.json", "tokenizer.json", "consolidated.00.pt", "generation_config.json",
        "consolidated.safetensors",  # Mistral-format duplicate of the weights: must not be downloaded
    ] + (["tokenizer.model"] if with_tokenizer else [])
    return {name: os.urandom(100 + i) for i, name in enumerate(names)}


REPOS = {
    "org/public": {"files": _files()},
    "org/gated-api": {"files": _files(), "error": (401, "GatedRepo", "api")},
    "org/gated-files": {"files": _files(), "error": (403, "GatedRepo", "resolve")},
    "org/no-main": {"files": _files(), "error": (404, "RevisionNotFound", "api")},
    "org/no-tokenizer": {"files": _files(with_tokenizer=False)},
    "org/stalls": {"files": _files(), "stall": {"tokenizer.model"}},
    "org/gguf": {"files": {"model.Q4_K_M.gguf": os.urandom(5000), "model.Q8_0.gguf": os.urandom(9000),
                           "README.md": b"community quantizations"}},
}
NEEDED = {"config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
          "model.safetensors.index.json", "tokenizer.model"}


@pytest.fixture(scope="module", autouse=True)
def serve_repos(hub):
    hub.repos.update(REPOS)


def download_command(tmp_path, endpoint, *args, token=None, env_changes=None) -> tuple:
    """(the command line, its environment) of a download from endpoint into tmp_path."""
    env = {**hub_client_env(tmp_path / "hf_home", endpoint), **(env_changes or {})}
    if token is not None:
        env["HF_TOKEN"] = token
    return [sys.executable, str(SCRIPT), "--checkpoint_dir", str(tmp_path / "checkpoints"), *args], env


def run_download(tmp_path, endpoint, *args, token=None, env_changes=None, timeout=60):
    cmd, env = download_command(tmp_path, endpoint, *args, token=token, env_changes=env_changes)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def endpoint(server):
    return f"http://127.0.0.1:{server.server_port}"


def downloaded(tmp_path, repo_id):
    root = tmp_path / "checkpoints" / repo_id
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*")
            if p.is_file() and ".cache" not in p.relative_to(root).parts}


def assert_one_error_line(result, *words):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_public_repo_downloads_only_needed_files(hub, tmp_path):
    result = run_download(tmp_path, endpoint(hub), "--repo_id", "org/public")
    assert result.returncode == 0, result.stderr
    files = downloaded(tmp_path, "org/public")
    assert set(files) == NEEDED
    for name, data in files.items():
        assert data == REPOS["org/public"]["files"][name], name
    fetched = {unquote(p) for m, p, _ in hub.requests if m == "GET" and "/resolve/" in p}
    assert not any(skip in p for p in fetched for skip in ("consolidated", "tokenizer.json", "generation_config"))


@pytest.mark.parametrize("repo_id", ["org/gated-api", "org/gated-files"])
def test_gated_repo(hub, tmp_path, repo_id):
    result = run_download(tmp_path, endpoint(hub), "--repo_id", repo_id)
    assert_one_error_line(result, "gated", "HF_TOKEN", f"{endpoint(hub)}/{repo_id}")


def test_unknown_repo(hub, tmp_path):
    result = run_download(tmp_path, endpoint(hub), "--repo_id", "org/does-not-exist")
    assert_one_error_line(result, "not found", "org/does-not-exist")


def test_revision_not_found(hub, tmp_path):
    assert_one_error_line(run_download(tmp_path, endpoint(hub), "--repo_id", "org/no-main"), "revision")


def test_repo_without_tokenizer_model(hub, tmp_path):
    result = run_download(tmp_path, endpoint(hub), "--repo_id", "org/no-tokenizer")
    assert_one_error_line(result, "tokenizer.model")


def test_offline(tmp_path):
    with socket.socket() as s:  # a port on which nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = run_download(tmp_path, f"http://127.0.0.1:{port}", "--repo_id", "org/public")
    assert_one_error_line(result, "cannot reach", "network")


def test_token_reaches_hub(hub, tmp_path):
    def auth_headers():
        return {h.get("authorization") for _, p, h in hub.requests if p.startswith(("/api/", "/org/"))}

    hub.requests.clear()
    assert run_download(tmp_path / "env", endpoint(hub), "--repo_id", "org/public", token="hf_env").returncode == 0
    assert auth_headers() == {"Bearer hf_env"}

    hub.requests.clear()
    result = run_download(tmp_path / "cli", endpoint(hub), "--repo_id", "org/public", "--hf_token", "hf_cli",
                          token="hf_env")
    assert result.returncode == 0, result.stderr
    assert auth_headers() == {"Bearer hf_cli"}


@contextlib.contextmanager
def silent_server():
    """A server on 127.0.0.1 that accepts every connection and never answers. Yields (its URL, the
    connections it has accepted so far)."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted = []

    def accept():
        with contextlib.suppress(OSError):  # the listener shut down
            while True:
                accepted.append(listener.accept()[0])
    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}", accepted
    finally:
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        for connection in accepted:
            connection.close()


def test_a_hub_that_accepts_and_never_answers_times_out_in_one_line(tmp_path):
    """huggingface_hub sends its first request (the repo's revision) with no timeout: the download
    waited forever. Every request is bounded now, by the hub client's own HF_HUB_DOWNLOAD_TIMEOUT, and
    the line says what timed out and after how long."""
    with silent_server() as (url, accepted):
        started = time.monotonic()
        result = run_download(tmp_path, url, "--repo_id", "org/public", timeout=40,
                              env_changes={"HF_HUB_DOWNLOAD_TIMEOUT": "2", "HF_HUB_ETAG_TIMEOUT": "2"})
        assert accepted  # it did connect: the answer is what never came
    assert_one_error_line(result, "timed out after 2 s", f"{url}/api/models/org/public", "HF_HUB_DOWNLOAD_TIMEOUT")
    assert time.monotonic() - started < 30


def interrupted(cmd, env, started) -> subprocess.CompletedProcess:
    """Runs cmd until started() is true (a request is under way), then sends it SIGINT, as Ctrl-C does."""
    process = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not started() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, process.communicate()
    process.send_signal(signal.SIGINT)
    try:
        out, err = process.communicate(timeout=20)  # now, not when the hub client's threads give up
    finally:
        process.kill()
    return subprocess.CompletedProcess(cmd, process.returncode, out, err)


def test_ctrl_c_while_waiting_for_the_hub_is_one_line_and_exit_130(tmp_path):
    """Ctrl-C printed 73 lines of tracebacks (the hub client's, httpx's) and exit 1."""
    with silent_server() as (url, accepted):
        cmd, env = download_command(tmp_path, url, "--repo_id", "org/public",
                                    env_changes={"HF_HUB_DOWNLOAD_TIMEOUT": "600"})
        result = interrupted(cmd, env, lambda: accepted)
    assert result.returncode == 130
    assert_one_error_line(result, "stopped by SIGINT", "again")


def test_ctrl_c_while_files_download_is_one_line_and_exit_130(hub, tmp_path):
    """While files download, the hub client's threads wait in network reads that Python cannot interrupt:
    an ordinary exit waits for them to time out (and retry). Ctrl-C ends the run at once."""
    def stalled():
        return any(m == "GET" and p.endswith("/tokenizer.model") and "org/stalls" in p for m, p, _ in hub.requests)
    cmd, env = download_command(tmp_path, endpoint(hub), "--repo_id", "org/stalls",
                                env_changes={"HF_HUB_DOWNLOAD_TIMEOUT": "600"})
    result = interrupted(cmd, env, stalled)
    assert result.returncode == 130
    assert_one_error_line(result, "stopped by SIGINT", "again")


def test_a_file_that_never_comes_is_retried_then_named_in_the_last_line(hub, tmp_path):
    """A download that stalls is retried by the hub client (its notes say so), then ends with a line
    naming the file and the time it was given."""
    def gets():
        return sum(m == "GET" and p.endswith("/tokenizer.model") and "org/stalls" in p for m, p, _ in hub.requests)
    before = gets()
    result = run_download(tmp_path, endpoint(hub), "--repo_id", "org/stalls", env_changes={"HF_HUB_DOWNLOAD_TIMEOUT": "1"})
    assert result.returncode == 1 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: timed out after 1 s waiting for an answer to GET ") and "tokenizer.model" in last, last
    assert "HF_HUB_DOWNLOAD_TIMEOUT" in last
    assert gets() - before > 1  # retried


def test_one_file_of_a_repo_downloads_alone(hub, tmp_path):
    """--filename: a GGUF file of a community repository, nothing else of the repo, byte for byte."""
    result = run_download(tmp_path, endpoint(hub), "--repo_id", "org/gguf", "--filename", "model.Q4_K_M.gguf")
    assert result.returncode == 0, result.stderr
    assert downloaded(tmp_path, "org/gguf") == {"model.Q4_K_M.gguf": REPOS["org/gguf"]["files"]["model.Q4_K_M.gguf"]}
    assert "model.Q4_K_M.gguf" in result.stdout


def test_a_file_the_repo_lacks_is_one_line(hub, tmp_path):
    result = run_download(tmp_path, endpoint(hub), "--repo_id", "org/gguf", "--filename", "model.Q5_K_M.gguf")
    assert_one_error_line(result, "has no file 'model.Q5_K_M.gguf'", "--filename")
