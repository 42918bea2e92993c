"""scripts/download.py against tests/fake_hub.py's stand-in for the Hugging Face Hub served on 127.0.0.1."""
import os
import socket
import subprocess
import sys
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
}
NEEDED = {"config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
          "model.safetensors.index.json", "tokenizer.model"}


@pytest.fixture(scope="module", autouse=True)
def serve_repos(hub):
    hub.repos.update(REPOS)


def run_download(tmp_path, endpoint, *args, token=None):
    env = hub_client_env(tmp_path / "hf_home", endpoint)
    if token is not None:
        env["HF_TOKEN"] = token
    cmd = [sys.executable, str(SCRIPT), "--checkpoint_dir", str(tmp_path / "checkpoints"), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)


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
