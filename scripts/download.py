# Download the Hugging Face files that scripts/convert_hf_checkpoint.py needs into checkpoints/<repo_id>, or
# one file of a repo (--filename: a GGUF file from a community repository, which generate.py reads as it is).
# Every failure, a stalled server and Ctrl-C included, ends the run with one line; an interrupted download
# resumes where it stopped when run again.
import argparse
import importlib
import importlib.util
import os
import signal
import sys
from pathlib import Path

from huggingface_hub import constants, get_session, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from writing import STOPPING_SIGNALS, say_stopped  # noqa: E402

# Only what the converter reads. "model*.safetensors" (not "*.safetensors") so that repos which also ship
# Mistral's consolidated.safetensors don't download the weights twice; *.pt, *.bin, tokenizer.json are skipped.
ALLOW_PATTERNS = ["config.json", "model.safetensors.index.json", "model*.safetensors", "tokenizer.model"]

# huggingface_hub 2.x talks through httpx2 (1.x: httpx); their network errors are not OSErrors (requests' are).
HTTP_MODULES = [importlib.import_module(m) for m in ("httpx2", "httpx") if importlib.util.find_spec(m)]
NET_ERRORS = tuple(m.HTTPError for m in HTTP_MODULES)
TIMEOUTS = tuple(m.TimeoutException for m in HTTP_MODULES)
TIMEOUT_VARIABLES = "HF_HUB_DOWNLOAD_TIMEOUT and HF_HUB_ETAG_TIMEOUT"


def _first_line(e: BaseException) -> str:
    lines = [line for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


def bounded(request):
    """The hub client's request hook that gives every request it sends without a timeout (its repo_info
    and file listing: None, which waits forever on a server that accepts and never answers) the one it
    uses for downloads, HF_HUB_DOWNLOAD_TIMEOUT (10 s unless set), to connect and between reads. Requests
    it bounds itself keep their own; those it retries (file listing, downloads) are still retried."""
    timeout = request.extensions.get("timeout") or {}
    request.extensions["timeout"] = {kind: constants.HF_HUB_DOWNLOAD_TIMEOUT if timeout.get(kind) is None else timeout[kind]
                                     for kind in ("connect", "read", "write", "pool")}


def bound_every_request():
    session = get_session()  # the one client every huggingface_hub call goes through
    if bounded not in session.event_hooks["request"]:
        session.event_hooks = {**session.event_hooks, "request": [*session.event_hooks["request"], bounded]}


def timed_out(e: BaseException) -> str:
    """The line for a request that timed out: which, after how long, and what to do."""
    try:
        request = e.request
    except RuntimeError:  # an error raised without its request
        return (f"error: a request to {constants.ENDPOINT} timed out: check your network connection, proxy or "
                f"HF_ENDPOINT, or allow more seconds with {TIMEOUT_VARIABLES}, then retry")
    connecting = type(e).__name__ == "ConnectTimeout"
    seconds = request.extensions.get("timeout", {}).get("connect" if connecting else "read")
    waiting = "connecting to" if connecting else "waiting for an answer to"
    after = f" after {seconds:g} s" if seconds is not None else ""
    return (f"error: timed out{after} {waiting} {request.method} {request.url}: check your network connection, "
            f"proxy or HF_ENDPOINT, or allow more seconds with {TIMEOUT_VARIABLES}, then retry")


def stop_at_once(signum, frame):
    """Ctrl-C, SIGTERM, SIGHUP: one line and the shell's status for the signal, now. The hub client's
    download threads wait in network reads that Python cannot interrupt, and an ordinary exit would wait
    for them; what they fetched stays in the folder's .cache, and the next run resumes from it."""
    say_stopped(signum, "run the same command again to resume the download")
    os._exit(128 + signum)


def download(repo_id: str, checkpoint_dir: str, hf_token: str | None, filename: str | None = None) -> Path:
    """Into <checkpoint_dir>/<repo_id>: the converter's files, or the one file `filename`; returns the folder,
    or the file."""
    local_dir = Path(checkpoint_dir) / repo_id
    bound_every_request()
    # token=None lets huggingface_hub fall back to $HF_TOKEN or the token saved by `hf auth login`.
    if filename is not None:
        return Path(hf_hub_download(repo_id, filename, local_dir=local_dir, token=hf_token))
    snapshot_download(repo_id, local_dir=local_dir, allow_patterns=ALLOW_PATTERNS, token=hf_token)
    return local_dir


def main(argv=None):
    parser = argparse.ArgumentParser(description="Download a Hugging Face checkpoint for convert_hf_checkpoint.py.")
    parser.add_argument("--repo_id", type=str, default="mistralai/Mixtral-8x7B-v0.1", help="Hugging Face repo id")
    parser.add_argument("--hf_token", type=str, default=None, help="Hugging Face token (default: $HF_TOKEN)")
    parser.add_argument("--checkpoint_dir", type=str, default="checkpoints", help="saves to <checkpoint_dir>/<repo_id>")
    parser.add_argument("--filename", type=str, default=None,
                        help="only this file of the repo, e.g. a GGUF file (mixtral-8x7b-v0.1.Q4_K_M.gguf), which "
                             "generate.py reads as it is (default: the files the converter needs)")
    args = parser.parse_args(argv)
    repo, url = args.repo_id, f"{constants.ENDPOINT}/{args.repo_id}"
    for s in STOPPING_SIGNALS:
        signal.signal(s, stop_at_once)

    # Each failure becomes one actionable line on stderr instead of huggingface_hub's multi-line traceback.
    # Order matters: GatedRepoError is a RepositoryNotFoundError, and every HfHubHTTPError is an OSError.
    try:
        local_dir = download(repo, args.checkpoint_dir, args.hf_token, args.filename)
    except RemoteEntryNotFoundError:  # an HfHubHTTPError: before it
        sys.exit(f"error: {repo} has no file {args.filename!r}: check --filename against the repo's files at "
                 f"{url}/tree/main")
    except GatedRepoError:
        sys.exit(f"error: {repo} is gated and your token has no access: accept its terms at {url} "
                 "and pass --hf_token or set HF_TOKEN")
    except RepositoryNotFoundError:
        sys.exit(f"error: repository {repo} not found (or private and your token has no access): "
                 "check --repo_id, and pass --hf_token or set HF_TOKEN if it is private")
    except RevisionNotFoundError:
        sys.exit(f"error: {repo} has no '{constants.DEFAULT_REVISION}' revision: check --repo_id")
    except HfHubHTTPError as e:  # 5xx, 429, bad token...
        sys.exit(f"error: {constants.ENDPOINT} refused to serve {repo} ({_first_line(e)}): retry later")
    except LocalEntryNotFoundError as e:  # no connection to the Hub (or no answer), or HF_HUB_OFFLINE=1
        cause = e.__cause__ or e
        if isinstance(cause, TIMEOUTS):
            sys.exit(timed_out(cause))
        sys.exit(f"error: cannot reach {constants.ENDPOINT} to download {repo} ({type(cause).__name__}): "
                 "check your network connection, proxy or HF_ENDPOINT, then retry")
    except TIMEOUTS as e:  # a file's download, after the hub client's own retries
        sys.exit(timed_out(e))
    except (OSError, *NET_ERRORS) as e:  # connection lost mid-download, disk full, size mismatch...
        sys.exit(f"error: downloading {repo} failed ({type(e).__name__}: {_first_line(e)}): "
                 "check your network connection and free disk space, then retry")
    except ValueError as e:  # malformed repo id
        sys.exit(f"error: invalid --repo_id {repo!r}: {_first_line(e)}")

    if args.filename is not None:
        print(f"Downloaded {args.filename} of {repo}: {local_dir}")
        return
    # A repo without these files (e.g. .bin-only or GGUF) downloads "successfully" but cannot be converted.
    missing = [n for n in ("config.json", "tokenizer.model") if not (local_dir / n).is_file()]
    if not any(local_dir.glob("*.safetensors")):
        missing.append("*.safetensors")
    if missing:
        sys.exit(f"error: {repo} has no {', '.join(missing)}: convert_hf_checkpoint.py needs config.json, "
                 f"model*.safetensors and tokenizer.model (got only what is in {local_dir})")
    print(f"Downloaded {repo} to {local_dir}")


if __name__ == "__main__":
    main()
