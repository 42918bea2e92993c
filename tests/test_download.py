"""scripts/download.py against a small stand-in for the Hugging Face Hub served on 127.0.0.1.

The stand-in serves only what huggingface_hub's snapshot_download(local_dir=...) calls:
  GET  /api/models/{repo_id}/revision/{revision}  -> {"id", "sha", "siblings"}  (HfApi.repo_info)
  GET  /api/models/{repo_id}/tree/{sha}           -> [{"type", "path", "size", "oid"}]  (list_repo_tree, recursive)
  HEAD /{repo_id}/resolve/{sha}/{filename}        -> X-Repo-Commit + ETag + Content-Length (get_hf_file_metadata)
  GET  /{repo_id}/resolve/{sha}/{filename}        -> the bytes
Safetensors files are served like LFS files on the real Hub: the HEAD answers 302 to another host (here
"localhost" instead of "127.0.0.1", a "CDN") with X-Linked-Etag / X-Linked-Size, and the GET goes there.
Errors carry the X-Error-Code header that huggingface_hub's hf_raise_for_status maps to its exceptions.
"""

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "download.py"
SHA = "0123456789abcdef0123456789abcdef01234567"  # a 40-hex commit hash


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


class HubHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_HEAD(self):
        self._serve(body=False)

    def do_GET(self):
        self._serve(body=True)

    def _reply(self, status, body=b"", headers=(), send_body=True):
        self.send_response(status)
        for key, value in headers:
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def _error(self, status, code, send_body):
        self._reply(status, json.dumps({"error": code}).encode(), [("X-Error-Code", code)], send_body)

    def _serve(self, body):
        self.server.requests.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))
        path = unquote(urlsplit(self.path).path).strip("/").split("/")
        if path[0] == "cdn":  # the "CDN" host of LFS files, keyed by sha256
            blob = self.server.blobs.get(path[1])
            return self._reply(200, blob, send_body=body) if blob else self._error(404, "EntryNotFound", body)

        api = path[0] == "api"
        if api:  # api/models/{org}/{name}/{revision|tree}/{rev}
            repo_id, kind = "/".join(path[2:4]), path[4] if len(path) > 4 else ""
        else:  # {org}/{name}/resolve/{rev}/{filename}
            repo_id, kind = "/".join(path[:2]), path[2] if len(path) > 2 else ""
        repo = REPOS.get(repo_id)
        if repo is None:
            return self._error(404, "RepoNotFound", body)
        status, code, where = repo.get("error", (None, None, None))
        if code and where == ("api" if api else "resolve"):
            return self._error(status, code, body)
        files = repo["files"]

        if api and kind == "revision":
            info = {"id": repo_id, "sha": SHA, "siblings": [{"rfilename": f} for f in files]}
            return self._reply(200, json.dumps(info).encode(), [("Content-Type", "application/json")])
        if api and kind == "tree":
            tree = [{"type": "file", "path": f, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                    for f, b in files.items()]
            return self._reply(200, json.dumps(tree).encode(), [("Content-Type", "application/json")])
        if not api and kind == "resolve" and "/".join(path[4:]) in files:
            data = files["/".join(path[4:])]
            headers = [("X-Repo-Commit", SHA)]
            if path[-1].endswith(".safetensors"):  # LFS file: redirect to the CDN
                sha256 = hashlib.sha256(data).hexdigest()
                self.server.blobs[sha256] = data
                headers += [("X-Linked-Etag", f'"{sha256}"'), ("X-Linked-Size", str(len(data))),
                            ("Location", f"http://localhost:{self.server.server_port}/cdn/{sha256}")]
                return self._reply(302, headers=headers, send_body=body)
            headers.append(("ETag", f'"{hashlib.sha1(data).hexdigest()}"'))
            return self._reply(200, data, headers, send_body=body)
        return self._error(404, "EntryNotFound", body)


@pytest.fixture(scope="module")
def hub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), HubHandler)  # loopback only, free port
    server.daemon_threads = True
    server.requests, server.blobs = [], {}
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def run_download(tmp_path, endpoint, *args, token=None):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "HUGGING_FACE_")) and "proxy" not in k.lower()}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HUB_ETAG_TIMEOUT="5", HF_HUB_DOWNLOAD_TIMEOUT="5")
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
