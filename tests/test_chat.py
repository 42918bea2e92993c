"""generate.py --interactive as a person uses it: the keys in a real terminal (a pty: Ctrl-C mid-answer back to
the prompt, /reset, Ctrl-D), /exit, an answer cut short kept in the conversation, a system prompt as
mistral-common writes it, plain turns on lines of their own, a line that is not UTF-8, and the per-turn
timing on stderr."""
import codecs
import contextlib
import io
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import generate as generate_script
from conftest import REPO, load_reference
from generation import Conversation

EOS = 2
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread


def instruct_folder(checkpoint, tmp_path):
    """The checkpoint as an Instruct one says so: a tokenizer_config.json with Mixtral's chat template."""
    folder = tmp_path / "instruct"
    shutil.copytree(checkpoint, folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": "[INST] {{ m }} [/INST]"}))
    return folder


def transformers_greedy(reference, ids: list, max_new_tokens: int) -> list:
    x = torch.tensor([ids])
    with torch.no_grad():
        out = reference.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=max_new_tokens,
                                 pad_token_id=EOS, eos_token_id=EOS)
    return out[0, len(ids):].tolist()


def chat(folder, stdin, monkeypatch, capsys, *flags, max_new_tokens: int = 8, interrupt_at=None) -> tuple:
    """generate.py --interactive in this process, reading stdin (a list of lines, or a stream): (stdout, the
    tokens each forward pass processed, stderr). interrupt_at: the forward passes (counted from 1) before
    which Ctrl-C arrives, as a KeyboardInterrupt."""
    tokens_per_forward = []
    real_load = generate_script.load_model

    def count(module, inputs):
        tokens_per_forward.append(inputs[0].size(1))
        if interrupt_at and len(tokens_per_forward) in interrupt_at:
            tokens_per_forward.pop()  # this pass never runs
            interrupt_at.remove(len(tokens_per_forward) + 1)
            raise KeyboardInterrupt

    def load_and_count(*args):
        model = real_load(*args)
        model.register_forward_pre_hook(count)
        return model
    monkeypatch.setattr(generate_script, "load_model", load_and_count)
    if isinstance(stdin, list):
        stdin = io.StringIO("".join(f"{line}\n" for line in stdin))
    monkeypatch.setattr(sys, "stdin", stdin)
    generate_script.main([str(a) for a in ("--checkpoint_path", folder / "model.pth", "--device", "cpu", "--precision",
                                           "float32", "--interactive", "--temperature", "0", "--max_new_tokens",
                                           max_new_tokens, *flags)])
    out, err = capsys.readouterr()
    return out, tokens_per_forward, err


def test_exit_and_reset(checkpoint, tokenizer, monkeypatch, capsys):
    """/reset: the next turn opens a new conversation (<s> again, nothing before it fed); /exit quits, and
    what follows it is never read as a prompt."""
    out, tokens_per_forward, err = chat(checkpoint, ["Hello", "/reset", "Hi", "/exit", "never sent"], monkeypatch,
                                        capsys)
    firsts = [n for n in tokens_per_forward if n > 1]  # each turn's prefill
    assert firsts == [1 + len(tokenizer.encode("Hello")), 1 + len(tokenizer.encode("Hi"))]
    assert err.count("What is your prompt?") == 4 and "(a new conversation)" in err
    assert re.search(r"^Chatting: type a message and press Enter; Ctrl-C stops an answer, /reset starts a new "
                     r"conversation, /exit or Ctrl-D quits\.$", err, re.M)
    # The answers alone on stdout, the second as to a first turn; each turn's timing, short, on stderr.
    reference = load_reference(checkpoint)
    answers = [transformers_greedy(reference, [tokenizer.bos_id()] + tokenizer.encode(text), 8)
               for text in ("Hello", "Hi")]
    assert out == "".join(tokenizer.decode(answer) + "\n" for answer in answers)
    assert len(re.findall(r"^\[\d+ tokens, [\d.]+ s to first token, [\d.]+ tokens/s\]$", err, re.M)) == 2


def test_ctrl_c_mid_answer_keeps_what_it_had(checkpoint, tokenizer, tmp_path, monkeypatch, capsys):
    """Ctrl-C before the fourth pass of the first turn (its prefill and two decode steps done: three tokens):
    the answer stops there and stays in the conversation, closed by </s> as mistral-common closes an
    assistant turn; the second turn is answered after it, as transformers answers that conversation."""
    folder = instruct_folder(checkpoint, tmp_path)
    user, user2 = "What is MoE?", "And a second one"
    out, tokens_per_forward, err = chat(folder, [user, user2], monkeypatch, capsys, interrupt_at=[4])
    first = [tokenizer.bos_id()] + tokenizer.encode(f"[INST] {user} [/INST]")
    reference = load_reference(folder)
    partial = transformers_greedy(reference, first, 3)
    assert EOS not in partial and "(stopped after 3 tokens)" in err
    conversation = first + partial + [EOS] + tokenizer.encode(f"[INST] {user2} [/INST]")
    answer2 = transformers_greedy(reference, conversation, 8)
    assert out == f"{tokenizer.decode(partial)}\n{tokenizer.decode(answer2)}\n"
    # The second turn fed what the cache lacked: the third token, </s>, the new [INST] turn.
    assert tokens_per_forward[:4] == [len(first), 1, 1, len(conversation) - len(first) - 2]


def test_ctrl_c_before_the_first_token_drops_the_turn(checkpoint, tokenizer, tmp_path, monkeypatch, capsys):
    folder = instruct_folder(checkpoint, tmp_path)
    out, tokens_per_forward, err = chat(folder, ["What is MoE?", "Hi"], monkeypatch, capsys, interrupt_at=[1])
    assert "(stopped before the first token" in err
    assert tokens_per_forward[0] == 1 + len(tokenizer.encode("[INST] Hi [/INST]"))  # a first turn: <s> again


def test_system_prompt_is_mistral_commons(tokenizer, checkpoint, tmp_path, monkeypatch, capsys):
    """Mixtral's format has no system role: mistral-common's v1 tokenizer puts the system prompt at the head of
    the first user turn; later turns do not repeat it. Spaces are kept as they are, as it keeps them."""
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
    system, user, answer, user2 = " Answer briefly. ", " What is MoE?", "A mixture of experts.", "And a second one "
    request = ChatCompletionRequest(messages=[SystemMessage(content=system), UserMessage(content=user),
                                              AssistantMessage(content=answer), UserMessage(content=user2)])
    expected = MistralTokenizer.v1().encode_chat_completion(request).tokens
    conversation = Conversation(tokenizer, True, system)
    fed = conversation.turn(user)
    answer_ids = torch.tensor(tokenizer.encode(answer) + [EOS])
    conversation.answered(fed, answer_ids)
    assert conversation.tokens + conversation.unfed + conversation.turn(user2)[1:] == expected
    # The command line's --system: the first turn's prefill is that first user turn.
    folder = instruct_folder(checkpoint, tmp_path)
    _, tokens_per_forward, _ = chat(folder, [user], monkeypatch, capsys, "--system", system, max_new_tokens=1)
    first_turn = MistralTokenizer.v1().encode_chat_completion(ChatCompletionRequest(
        messages=[SystemMessage(content=system), UserMessage(content=user)])).tokens
    assert tokens_per_forward == [len(first_turn)]


def test_plain_turns_start_on_a_new_line(checkpoint, tokenizer, monkeypatch, capsys):
    """In plain format a conversation is one text: each later turn starts a new line of it (it was glued to the
    previous answer's last word), tokenized as SentencePiece tokenizes a line inside a text."""
    user, user2 = "def f(x):", "import os"
    out, tokens_per_forward, _ = chat(checkpoint, [user, user2], monkeypatch, capsys)
    reference = load_reference(checkpoint)
    first = [tokenizer.bos_id()] + tokenizer.encode(user)
    answer = transformers_greedy(reference, first, 8)
    assert EOS not in answer
    # The new line as SentencePiece tokenizes a line inside a text: '\n', 'import' (no space piece before either).
    inside = tokenizer.encode("x\n" + user2)
    conversation = first + answer + inside[inside.index(tokenizer.piece_to_id("<0x0A>")):]
    assert tokenizer.decode(conversation[1:]) == tokenizer.decode(first[1:] + answer) + "\n" + user2
    answer2 = transformers_greedy(reference, conversation, 8)
    assert out.endswith(tokenizer.decode(answer2) + "\n")
    assert tokens_per_forward[8] == len(conversation) - len(first) - len(answer) + 1  # the answer's last token on


def test_a_line_that_is_not_utf8_is_named_and_not_sent(checkpoint, tokenizer, monkeypatch, capsys):
    """A Latin-1 line on stdin was a UnicodeDecodeError traceback; now a note, and the chat goes on."""
    stdin = io.TextIOWrapper(io.BytesIO(b"caf\xe9\nHello\n"), encoding="utf-8")
    _, tokens_per_forward, err = chat(checkpoint, stdin, monkeypatch, capsys)
    assert re.search(r"^note: that line is not UTF-8 text \(byte 0xe9 at character 4\).*not sent$", err, re.M)
    assert [n for n in tokens_per_forward if n > 1] == [1 + len(tokenizer.encode("Hello"))]


# ----------------------------------------------------------------------------- a real terminal

class Terminal:
    """generate.py in a pseudo-terminal, as its controlling terminal: what is typed reaches it as from a
    keyboard, Ctrl-C and Ctrl-D through the terminal's line discipline."""

    def __init__(self, *args):
        import pty
        self.master, slave = pty.openpty()
        self.process = subprocess.Popen([sys.executable, *map(str, args)], cwd=REPO, stdin=slave, stdout=slave,
                                        stderr=slave, preexec_fn=self.take_terminal,
                                        env={**os.environ, "MIXTRAL_NO_CPU_KERNELS": "1", "PYTHONUNBUFFERED": "1"})
        os.close(slave)
        self.seen, self.decoder = "", codecs.getincrementaldecoder("utf-8")(errors="replace")

    @staticmethod
    def take_terminal():
        import fcntl
        import termios
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    def type(self, keys: str):
        os.write(self.master, keys.encode())

    def wait_for(self, pattern: str, after: int = 0, timeout: float = 120) -> int:
        """Reads until the output after position `after` matches; returns where the match ends."""
        deadline = time.monotonic() + timeout
        while True:
            found = re.compile(pattern, re.S).search(self.seen, after)
            if found:
                return found.end()
            chunk = b""
            if select.select([self.master], [], [], 0.5)[0]:
                with contextlib.suppress(OSError):  # EIO: the process has ended and its output is all read
                    chunk = os.read(self.master, 65536)
            self.seen += self.decoder.decode(chunk).replace("\r\n", "\n")
            assert chunk or (time.monotonic() < deadline and self.process.poll() is None), self.seen[-3000:]

    def close(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        os.close(self.master)


def test_keys_in_a_terminal(checkpoint):
    """Ctrl-C while an answer streams stops it and gives the prompt back; /reset starts a new conversation;
    Ctrl-D quits with status 0 and the summary."""
    terminal = Terminal("generate.py", "--checkpoint_path", checkpoint / "model.pth", "--device", "cpu",
                        "--interactive", "--temperature", "0", "--max_new_tokens", "1900", "--ignore_eos",
                        "--threads", "1")
    try:
        at = terminal.wait_for(r"Ctrl-D quits\.\nWhat is your prompt\? ")
        terminal.type("Hello there\n")
        at = terminal.wait_for(r"Hello there\n.{40}", at)  # the echo, then the answer streaming
        terminal.type("\x03")
        at = terminal.wait_for(r"\(stopped after \d+ tokens\)\nWhat is your prompt\? ", at)
        terminal.type("/reset\n")
        at = terminal.wait_for(r"\(a new conversation\)\nWhat is your prompt\? ", at)
        terminal.type("\x04")
        terminal.wait_for(r"Average tokens/sec: .*Memory used", at)
        assert terminal.process.wait(timeout=60) == 0
        assert "Traceback" not in terminal.seen and "error:" not in terminal.seen
    finally:
        terminal.close()
