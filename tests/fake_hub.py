"""A stand-in for the Hugging Face Hub on 127.0.0.1, for scripts/download.py and the README's commands: it
serves repos of files that a test puts in server.repos, and records each request in server.requests.

It serves only what huggingface_hub's snapshot_download(local_dir=...) calls:
  GET  /api/models/{repo_id}/revision/{revision}  -> {"id", "sha", "siblings"}  (HfApi.repo_info)
  GET  /api/models/{repo_id}/tree/{sha}           -> [{"type", "path", "size", "oid"}]  (list_repo_tree)
  HEAD /{repo_id}/resolve/{sha}/{filename}        -> X-Repo-Commit + ETag + Content-Length
  GET  /{repo_id}/resolve/{sha}/{filename}        -> the bytes
Safetensors files are served like LFS files on the real Hub: the HEAD answers 302 to another host
("localhost" instead of "127.0.0.1", a "CDN") with X-Linked-Etag / X-Linked-Size. Errors carry the
X-Error-Code header that huggingface_hub maps to its exceptions.

A repo is {"files": {name: bytes}}, with "error": (status, X-Error-Code, "api" or "resolve") to answer
the API's or the files' requests with that error instead, and "stall": {names} whose downloads (GET)
get no answer for a minute, as from a server that hangs."""
import contextlib
import hashlib
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

HUB_SHA = "0123456789abcdef0123456789abcdef01234567"  # a 40-hex commit hash


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
        repo = self.server.repos.get(repo_id)
        if repo is None:
            return self._error(404, "RepoNotFound", body)
        status, code, where = repo.get("error", (None, None, None))
        if code and where == ("api" if api else "resolve"):
            return self._error(status, code, body)
        files = repo["files"]

        if api and kind == "revision":
            info = {"id": repo_id, "sha": HUB_SHA, "siblings": [{"rfilename": f} for f in files]}
            return self._reply(200, json.dumps(info).encode(), [("Content-Type", "application/json")])
        if api and kind == "tree":
            tree = [{"type": "file", "path": f, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                    for f, b in files.items()]
            return self._reply(200, json.dumps(tree).encode(), [("Content-Type", "application/json")])
        if not api and kind == "resolve" and "/".join(path[4:]) in files:
            if body and "/".join(path[4:]) in repo.get("stall", ()):
                time.sleep(60)  # the client has given up or been stopped by then
                self.close_connection = True
                return
            data = files["/".join(path[4:])]
            headers = [("X-Repo-Commit", HUB_SHA)]
            if path[-1].endswith(".safetensors"):  # LFS file: redirect to the CDN
                sha256 = hashlib.sha256(data).hexdigest()
                self.server.blobs[sha256] = data
                headers += [("X-Linked-Etag", f'"{sha256}"'), ("X-Linked-Size", str(len(data))),
                            ("Location", f"http://localhost:{self.server.server_port}/cdn/{sha256}")]
                return self._reply(302, headers=headers, send_body=body)
            headers.append(("ETag", f'"{hashlib.sha1(data).hexdigest()}"'))
            return self._reply(200, data, headers, send_body=body)
        return self._error(404, "EntryNotFound", body)


@contextlib.contextmanager
def serving():
    """The stand-in, on a free port of the loopback interface only, for the duration of the block."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), HubHandler)
    server.daemon_threads = True
    server.requests, server.blobs, server.repos = [], {}, {}
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def hub_client_env(hf_home, endpoint: str) -> dict:
    """The environment for a huggingface_hub client pointed at the stand-in: no real token or proxy
    leaks in, no progress bars, short timeouts."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "HUGGING_FACE_")) and "proxy" not in k.lower()}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(hf_home), HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HUB_ETAG_TIMEOUT="5", HF_HUB_DOWNLOAD_TIMEOUT="5")
    return env
