"""server.py against the real `openai` client: the shipped trained model (assets/tiny-stdlib) served once for
the module by a subprocess on 127.0.0.1, in float32 on one thread. Its greedy text is held to generation.py's
generate() for the same prompt alone, in this process; concurrent requests to the same, each; bad requests to
OpenAI's error JSON while good ones go on; a full queue to 429; a client that goes away to its slot freed; and
SIGTERM to a clean exit."""
import json
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import torch

import server as server_script
from checkpoint import load_model, load_tokenizer, open_checkpoint
from conftest import REPO, fails_cleanly
from generation import generate

SLOTS, QUEUE, CONTEXT = 8, 4, 256  # CONTEXT: the model's own (config.json's max_position_embeddings)
NAME = "tiny"
EOS = 2
# Different lengths, so that the slots stand at different positions.
PROMPTS = ["def fibonacci(n):", "import os", "class Queue:\n    def __init__(self):", "for i in range(",
           "    return", "# Copyright", "x = [", "def main():\n    parser = argparse.ArgumentParser("]


class Served:
    def __init__(self, process, log, url):
        self.process, self.log, self.url = process, log, url
        self.client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)

    def stderr(self) -> str:
        return self.log.read_text()


def start(folder, log, *launcher) -> Served:
    """server.py on the checkpoint in folder, on a free port (its log line names it), once it serves."""
    with open(log, "w") as err:
        process = subprocess.Popen(
            [sys.executable, *launcher, str(REPO / "server.py"), "--checkpoint_path", str(folder / "model.pth"),
             "--port", "0", "--threads", "1", "--precision", "float32", "--device", "cpu", "--model_name", NAME,
             "--max_batch_size", str(SLOTS), "--max_queue", str(QUEUE)], stdout=subprocess.DEVNULL, stderr=err,
            cwd=REPO)
    deadline = time.monotonic() + 300  # a first build of the CPU kernels included
    while "serving " not in log.read_text():
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)
    port = int(log.read_text().split("serving ", 1)[1].split(":", 2)[2].split(" ", 1)[0])
    return Served(process, log, f"http://127.0.0.1:{port}")


@pytest.fixture(scope="module")
def served(tiny_stdlib, tmp_path_factory):
    served = start(tiny_stdlib, tmp_path_factory.mktemp("server") / "stderr.txt")
    yield served
    if served.process.poll() is None:
        served.process.kill()
        served.process.wait()


@pytest.fixture(scope="module")
def alone(tiny_stdlib):
    """prompt, max_tokens -> (the text generate() continues it with alone, greedy, in float32, after each new
    token; at each new token, the gap between the likeliest two logits and the largest logit's size; the
    prompt's tokens)."""
    checkpoint = open_checkpoint(tiny_stdlib / "model.pth")
    model, tokenizer = load_model(checkpoint, "cpu", torch.float32), load_tokenizer(checkpoint)
    model.setup_caches(max_batch_size=1, max_seq_length=CONTEXT)

    def recorded(gaps):
        def step(model, x, input_pos, s, last=None):
            logits = model(x, input_pos)[:, -1].float()  # [1, V]
            top = logits.topk(2).values[0]
            gaps.append((float(top[0] - top[1]), float(logits.abs().max())))
            return logits.argmax(dim=-1, keepdim=True)
        return step

    def continuation(prompt: str, max_tokens: int):
        ids = [tokenizer.bos_id()] + tokenizer.encode(prompt)
        gaps, threads = [], torch.get_num_threads()
        torch.set_num_threads(1)  # as the server runs: a second thread on a busy machine stalls the first
        try:
            seq = generate(model, torch.tensor(ids, dtype=torch.int), max_tokens, temperature=0, eos_id=EOS,
                           prefill_fn=recorded(gaps), decode_fn=recorded(gaps)).tolist()
        finally:
            torch.set_num_threads(threads)
        new = seq[len(ids):]
        texts = [tokenizer.decode(ids + new[:n + 1])[len(tokenizer.decode(ids)):] for n in range(len(new))]
        return texts, gaps, len(ids)
    return continuation


def same_greedy_text(text: str, reference) -> bool:
    """The served text equals the reference's, or parts from it at a float32 near-tie: where the first of its
    tokens whose text the served one does not hold had a runner-up within float32's rounding of the logits.
    A batch's products sum in another order than one sequence's: the bound is a few hundred roundings
    (2**-23 each) of the largest logit, what reordered sums over the model's widths (at most 256) can move."""
    texts, gaps, _ = reference
    if text == texts[-1]:
        return True
    k = next(n for n, t in enumerate(texts) if not text.startswith(t.rstrip("\ufffd")))
    gap, scale = gaps[k]
    return gap <= 512 * 2 ** -23 * scale


def streamed_text(stream) -> tuple:
    """(the text of a stream of completion or chat chunks, its finish_reason, its usage)."""
    text, reason, usage = "", None, None
    for chunk in stream:
        choice = chunk.choices[0]
        text += choice.text if chunk.object == "text_completion" else (choice.delta.content or "")
        reason, usage = choice.finish_reason or reason, chunk.usage or usage
    return text, reason, usage


def test_completion_and_chat_streamed_and_whole_give_generates_greedy_text(served, alone):
    c = served.client
    assert [m.id for m in c.models.list()] == [NAME]
    assert httpx.get(f"{served.url}/health").json()["status"] == "ok"
    texts, _, prompt_tokens = alone(PROMPTS[0], 30)
    expected = texts[-1]
    whole = c.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=30, temperature=0)
    assert whole.choices[0].text == expected
    assert whole.choices[0].finish_reason == ("length" if len(texts) == 30 else "stop")
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (prompt_tokens, len(texts))
    text, reason, usage = streamed_text(c.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=30,
                                                             temperature=0, stream=True))
    assert (text, reason, usage) == (expected, whole.choices[0].finish_reason, whole.usage)
    # A plain checkpoint's chat is the user's text as it is: the completion's text for the same prompt.
    texts, _, _ = alone(PROMPTS[1], 20)
    messages = [{"role": "user", "content": PROMPTS[1]}]
    answer = c.chat.completions.create(model=NAME, messages=messages, max_tokens=20, temperature=0)
    assert answer.choices[0].message.role == "assistant" and answer.choices[0].message.content == texts[-1]
    chunks = list(c.chat.completions.create(model=NAME, messages=messages, max_tokens=20, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert streamed_text(chunks)[0] == texts[-1] and chunks[-1].usage == answer.usage


def test_stop_strings_end_the_text_before_them(served, alone):
    texts, _, _ = alone(PROMPTS[0], 30)
    stop = texts[-1].strip().split()[2]  # a word well inside the greedy text
    got = served.client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=30, temperature=0, stop=[stop])
    assert got.choices[0].text == texts[-1][:texts[-1].index(stop)] and got.choices[0].finish_reason == "stop"


def test_concurrent_streams_started_at_different_moments_each_get_their_text_alone(served, alone):
    """Eight greedy streams, one started every few steps, and a sampled one whose seed gives the same text
    as it does alone: each request's draws are its own, whatever shares its steps."""
    c, results = served.client, {}
    sampled = dict(model=NAME, prompt=PROMPTS[2], max_tokens=40, temperature=1.0, seed=7, extra_body={"top_k": 50})

    def run(i):
        time.sleep(0.02 * i)
        if i == SLOTS:
            results[i] = c.completions.create(**sampled).choices[0].text
        else:
            results[i] = streamed_text(c.completions.create(model=NAME, prompt=PROMPTS[i], max_tokens=40,
                                                            temperature=0, stream=True))
    threads = [threading.Thread(target=run, args=(i,)) for i in range(SLOTS + 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, prompt in enumerate(PROMPTS):
        text, reason, usage = results[i]
        assert same_greedy_text(text, alone(prompt, 40)), (prompt, text)
    assert c.completions.create(**sampled).choices[0].text == results[SLOTS]
    assert c.completions.create(**{**sampled, "seed": 8}).choices[0].text != results[SLOTS]


def long_streams(served, n: int) -> list:
    """n streaming requests that would run to the end of the context, opened (not read)."""
    client = httpx.Client(timeout=60)
    body = {"model": NAME, "prompt": "x", "max_tokens": CONTEXT - 3, "temperature": 0, "ignore_eos": True, "stream": True}
    streams = []
    for _ in range(n):
        request = client.build_request("POST", f"{served.url}/v1/completions", json=body)
        streams.append(client.send(request, stream=True))
    return streams


def wait_for(served, **counts):
    deadline = time.monotonic() + 30
    while True:
        health = httpx.get(f"{served.url}/health").json()
        if all(health[k] == v for k, v in counts.items()):
            return
        assert time.monotonic() < deadline, health
        time.sleep(0.01)


def test_a_full_queue_answers_429_and_clients_that_go_away_free_their_slots(served):
    streams = long_streams(served, SLOTS + QUEUE)
    wait_for(served, active=SLOTS, waiting=QUEUE)
    with pytest.raises(openai.RateLimitError) as refused:
        served.client.completions.create(model=NAME, prompt="x", max_tokens=1)
    assert refused.value.status_code == 429 and refused.value.body["code"] == "rate_limit_exceeded"
    for s in streams:
        s.close()
    wait_for(served, active=0, waiting=0)
    # Each slot was freed when its client went away, long before its max_tokens.
    gone = [int(line.split("after ")[1].split(" ")[0]) for line in served.stderr().splitlines()
            if "went away" in line]
    assert len(gone) >= SLOTS and all(n < CONTEXT - 3 for n in gone[-SLOTS:])
    results = []
    threads = [threading.Thread(target=lambda: results.append(served.client.completions.create(
        model=NAME, prompt="x", max_tokens=3, temperature=0, extra_body={"ignore_eos": True}))) for _ in range(SLOTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.usage.completion_tokens for r in results] == [3] * SLOTS


BAD = [  # (the body's fields, the param the error names)
    ({"model": "gpt-4"}, "model"),
    ({"temperature": -1}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": CONTEXT}, "max_tokens"),  # the prompt plus max_tokens beyond the context
    ({"prompt": "word " * CONTEXT}, "prompt"),
    ({"prompt": 7}, "prompt"),
    ({"top_p": 0}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"seed": 2 ** 70}, "seed"),
    ({"n": 2}, "n"),
    ({"stream": "yes"}, "stream"),
]


def test_bad_requests_get_400_with_openais_error_json_while_others_go_on(served, alone):
    c, result = served.client, {}
    good = threading.Thread(target=lambda: result.update(text=c.completions.create(
        model=NAME, prompt=PROMPTS[3], max_tokens=60, temperature=0).choices[0].text))
    good.start()
    for fields, param in BAD:
        r = httpx.post(f"{served.url}/v1/completions", json={"model": NAME, "prompt": "x", **fields})
        error = r.json()["error"]
        assert r.status_code == 400 and set(error) == {"message", "type", "param", "code"}, r.text
        assert error["param"] == param and error["type"] == "invalid_request_error", r.text
    for body, param in [([{"role": "assistant", "content": "hi"}], "messages"),
                        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "messages"),
                        ([{"role": "system", "content": "be brief"}, {"role": "user", "content": "a"}], "messages")]:
        with pytest.raises(openai.BadRequestError) as refused:  # the system one: a plain checkpoint has no place
            c.chat.completions.create(model=NAME, messages=body)
        assert refused.value.body["param"] == param
    r = httpx.post(f"{served.url}/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not JSON" in r.json()["error"]["message"]
    good.join()
    assert same_greedy_text(result["text"], alone(PROMPTS[3], 60))
    assert "Traceback" not in served.stderr()


def test_bad_flags_are_one_line_before_loading(tiny_stdlib, capsys):
    fails_cleanly(server_script.main, ["--max_batch_size", "0"], capsys, "--max_batch_size")
    fails_cleanly(server_script.main, ["--checkpoint_path", tiny_stdlib / "missing.pth"], capsys, "not found")
    import socket
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        fails_cleanly(server_script.main, ["--checkpoint_path", tiny_stdlib / "model.pth", "--port",
                                           taken.getsockname()[1]], capsys, "cannot listen", "--port")


def test_sigterm_ends_the_streams_and_exits_cleanly(served):
    """Last: it stops the module's server."""
    stream = long_streams(served, 1)[0]
    lines = stream.iter_lines()
    assert next(line for line in lines if line.startswith("data: "))  # the stream is running
    served.process.send_signal(signal.SIGTERM)
    rest = [line for line in lines if line.startswith("data: ")]
    assert "shutting down" in json.loads(rest[-1][len("data: "):])["error"]["message"]
    assert served.process.wait(timeout=30) == 0
    assert "Traceback" not in served.stderr(), served.stderr()


def test_chat_messages_of_an_instruct_checkpoint_are_mistral_commons_tokens(tokenizer):
    """The messages an Instruct checkpoint's chat endpoint is given, system message included, as the tokens
    mistral-common's v1 tokenizer writes for the same conversation."""
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
    system, user, answer, user2 = "Be brief.", "What is MoE?", "A mixture of experts.", "And a second one"
    expected = MistralTokenizer.v1().encode_chat_completion(ChatCompletionRequest(messages=[
        SystemMessage(content=system), UserMessage(content=user), AssistantMessage(content=answer),
        UserMessage(content=user2)])).tokens
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user},
                {"role": "assistant", "content": answer}, {"role": "user", "content": [{"type": "text", "text": user2}]}]
    assert server_script.chat_prompt(messages, tokenizer, instruct=True) == expected


def test_two_tensor_parallel_ranks_serve_what_one_process_does(tiny_stdlib, alone, tmp_path):
    """Under torchrun rank 0 serves and the other rank follows its plans: concurrent greedy requests get the
    text of each prompt alone. torchrun's own SIGTERM ends both ranks without a traceback from server.py."""
    served = start(tiny_stdlib, tmp_path / "stderr.txt", "-m", "torch.distributed.run", "--standalone",
                   "--nproc_per_node=2")
    try:
        results = {}
        threads = [threading.Thread(target=lambda i=i: results.update({i: served.client.completions.create(
            model=NAME, prompt=PROMPTS[i], max_tokens=20, temperature=0).choices[0].text})) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i in range(3):
            assert same_greedy_text(results[i], alone(PROMPTS[i], 20)), (PROMPTS[i], results[i])
    finally:
        served.process.send_signal(signal.SIGTERM)
        served.process.wait(timeout=60)
    assert 'server.py", line' not in served.stderr(), served.stderr()
