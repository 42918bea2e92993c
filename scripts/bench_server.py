# Load test of a running server.py: for 1, 2, 4 and 8 concurrent streaming clients, the tokens/s summed
# over the clients and the time to first token. Each client asks for --max_tokens tokens (ignore_eos, so
# that every request is as long) of a prompt of its own; a round is every client started at once, and the
# levels are interleaved round by round (the machine may be shared: a slow moment hits every level alike),
# each figure the median over its rounds. Python's standard library only: the server is the one measured.
#
#   python scripts/benchmark.py --model cpu-bench --write_checkpoint DIR    # random weights; then put the real
#   cp .../mistral_common/data/tokenizer.model.v1 DIR/tokenizer.model        # tokenizer (32000 tokens) beside them
#   python quantize.py --checkpoint_path DIR/model.pth --mode int4
#   python server.py --checkpoint_path DIR/model_int4.g32.pth --threads 1 --max_seq_length 256 &
#   python scripts/bench_server.py --url http://127.0.0.1:8000 --clients 1 2 4 8 --max_tokens 64 --rounds 3
import argparse
import json
import statistics
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cli import one_line_errors  # noqa: E402
from errors import UserError  # noqa: E402

WORDS = "the of and to in is was for on as with by at from that this which an be or are it has not".split()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Summed tokens/s and time to first token of concurrent streaming "
                                            "clients of a running server.py.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8], help="concurrent clients per level")
    p.add_argument("--max_tokens", type=int, default=64, help="tokens each client asks for")
    p.add_argument("--prompt_words", type=int, default=32, help="words in each client's prompt")
    p.add_argument("--rounds", type=int, default=3, help="rounds of every level")
    return p.parse_args(argv)


def post(url: str, body: dict, timeout: float = 600):
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    return urllib.request.urlopen(request, timeout=timeout)


def model_name(url: str) -> str:
    try:
        with urllib.request.urlopen(f"{url}/v1/models", timeout=10) as r:
            return json.load(r)["data"][0]["id"]
    except (OSError, ValueError, KeyError, IndexError) as e:
        raise UserError(f"no server.py answers at {url} ({e}); start one, or give its --url") from None


def client(url: str, body: dict, out: dict):
    """One streaming request: out gets its seconds to the first event, to the end, and its tokens."""
    start = time.perf_counter()
    first = tokens = None
    try:
        with post(f"{url}/v1/completions", body) as response:
            for line in response:
                if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                    continue
                first = first or time.perf_counter() - start
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    out["error"] = chunk["error"]["message"]
                    return
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    except urllib.error.HTTPError as e:
        out["error"] = f"HTTP {e.code}: {e.read().decode(errors='replace')[:200]}"
        return
    except OSError as e:
        out["error"] = str(e)
        return
    out.update(first=first, end=time.perf_counter() - start, tokens=tokens)


def round_of(url: str, name: str, clients: int, args, seed: int) -> tuple:
    """(summed tokens/s, median seconds to first token) of `clients` requests started together."""
    outs = [{} for _ in range(clients)]
    threads = []
    for i in range(clients):
        words = [WORDS[(seed * 7 + i * 13 + j * 5) % len(WORDS)] for j in range(args.prompt_words)]
        body = {"model": name, "prompt": " ".join(words), "max_tokens": args.max_tokens, "temperature": 0,
                "ignore_eos": True, "stream": True}
        threads.append(threading.Thread(target=client, args=(url, body, outs[i])))
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    for o in outs:
        if "error" in o or o.get("tokens") is None:
            raise UserError(f"a request failed: {o.get('error', 'it ended without its usage')}")
    return sum(o["tokens"] for o in outs) / wall, statistics.median(o["first"] for o in outs)


def main(argv=None):
    args = parse_args(argv)
    with one_line_errors():
        if min(args.clients) < 1 or args.max_tokens < 1 or args.rounds < 1:
            raise UserError("--clients, --max_tokens and --rounds must be at least 1")
        url = args.url.rstrip("/")
        name = model_name(url)
        round_of(url, name, 1, args, seed=-1)  # warm-up: the first request pays for anything lazy
        figures = {n: [] for n in args.clients}
        for r in range(args.rounds):
            for n in args.clients:
                figures[n].append(round_of(url, name, n, args, seed=r))
                print(f"round {r + 1}, {n} clients: {figures[n][-1][0]:.1f} tokens/s, "
                      f"{figures[n][-1][1]:.2f} s to first token", file=sys.stderr, flush=True)
        one = statistics.median(tps for tps, _ in figures[args.clients[0]])
        print(f"| clients | tokens/s summed | x {args.clients[0]} client(s) | time to first token (median) |")
        print("|---|---|---|---|")
        for n in args.clients:
            tps = statistics.median(t for t, _ in figures[n])
            ttft = statistics.median(f for _, f in figures[n])
            print(f"| {n} | {tps:.1f} | {tps / one:.2f} | {ttft:.2f} s |")


if __name__ == "__main__":
    main()
