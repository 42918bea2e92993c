"""Batched generation (--batch_size, --prompts_file) and the conversation of --interactive: each sequence of a
batch against transformers' greedy output for its prompt alone, the chat format against mistral-common, and
the tokens each forward pass of a conversation processes."""
import io
import json
import re
import shutil
import sys

import pytest
import torch

import generate as generate_script
from conftest import fails_cleanly, load_ours, load_reference
from generation import Sampling, generate, generate_batch, prefill, user_turn
from measuring import counting_expert_reads

# Different lengths (a blank line between them: labels are line numbers of the file).
PROMPTS = ["Hello, my name is", "", "The quick brown fox jumps over the lazy dog", "Hi"]
EOS = 2


def argv(folder, *extra) -> list:
    flags = ["--checkpoint_path", folder / "model.pth", "--device", "cpu", "--precision", "float32", *extra]
    return [str(a) for a in flags]


def labelled_outputs(stdout: str) -> dict:
    """{label: text} of a batch's printout: '== label ==' and the sequence's text below it."""
    return dict(re.findall(r"^== (.+?) ==\n(.*?)(?=\n== |\n\Z)", stdout, re.S | re.M))


def transformers_greedy(reference, ids: list, max_new_tokens: int) -> list:
    """transformers' greedy continuation of one sequence alone: the new tokens, up to its first </s>."""
    x = torch.tensor([ids])
    with torch.no_grad():
        out = reference.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=max_new_tokens,
                                 pad_token_id=EOS, eos_token_id=EOS)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compile"])
def test_batch_of_different_prompts_equals_each_prompt_alone(checkpoint, tokenizer, tmp_path, capsys, compiled):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(PROMPTS) + "\n")
    generate_script.main(argv(checkpoint, "--prompts_file", prompts_file, "--temperature", "0", "--max_new_tokens", "10",
                              *(["--compile"] if compiled else [])))
    out, err = capsys.readouterr()
    printed = labelled_outputs(out)
    assert list(printed) == ["line 1", "line 3", "line 4"]  # input order, by line number, blank line skipped
    reference, ours = load_reference(checkpoint), load_ours(checkpoint)
    for label, prompt in zip(printed, [p for p in PROMPTS if p]):
        ids = [tokenizer.bos_id()] + tokenizer.encode(prompt)
        expected = tokenizer.decode(ids + transformers_greedy(reference, ids, 10))
        alone = generate(ours, torch.tensor(ids, dtype=torch.int), 10, temperature=0, top_k=None, eos_id=EOS)
        assert printed[label] == expected == tokenizer.decode(alone.tolist())
    assert out == "".join(f"== {label} ==\n{text}\n" for label, text in printed.items())  # nothing else on stdout
    assert re.search(r"^Time for inference 1: [\d.]+ sec total, [\d.]+ sec to first token \(\d+ prompt tokens\), then "
                     r"\d+ tokens at [\d.]+ tokens/sec summed over 3 sequences, \d+ CPU threads?$", err, re.M)
    assert re.search(r"^Bandwidth achieved: [\d.]+ GB/s \([\d.e-]+ GB read per step: [\d.]+ of 4 experts per layer",
                     err, re.M)


def test_batch_size_copies_are_identical_greedy_and_differ_seeded_when_sampling(checkpoint, capsys):
    def copies(*flags) -> list:
        generate_script.main(argv(checkpoint, "--batch_size", "3", "--num_samples", "1", "--max_new_tokens", "8", *flags))
        printed = labelled_outputs(capsys.readouterr().out)
        assert list(printed) == ["sequence 1", "sequence 2", "sequence 3"]
        return list(printed.values())

    greedy = copies("--temperature", "0")
    assert len(set(greedy)) == 1
    sampled = copies("--temperature", "1.0", "--top_k", "1000", "--seed", "7")
    assert len(set(sampled)) == 3 and greedy[0] not in sampled
    assert copies("--temperature", "1.0", "--top_k", "1000", "--seed", "7") == sampled  # seeded


def test_each_sequence_stops_at_its_own_end_of_sequence_token():
    """Fake steps stand in for the model: sequence 0 ends at its second token, sequence 1 runs on."""
    steps = iter([[7, 8], [EOS, 9], [5, 9], [5, EOS], [5, 9]])

    def fake_step(model, x, input_pos, sampling, last=None):
        return torch.tensor(next(steps))[:, None]

    prompts = [torch.tensor([1, 5, 6], dtype=torch.int), torch.tensor([1, 4], dtype=torch.int)]
    seqs = generate_batch(None, prompts, 5, temperature=0, top_k=None, prefill_fn=fake_step, decode_fn=fake_step,
                          eos_id=EOS)
    assert [s.tolist() for s in seqs] == [[1, 5, 6, 7, EOS], [1, 4, 8, 9, 9, EOS]]
    assert next(steps) == [5, 9]  # and the batch stopped once both had ended


def test_expert_reads_counted_are_the_distinct_experts_transformers_routes_to(checkpoint):
    """The bandwidth line's count: one decode step of 3 sequences, against the distinct top-K experts of
    transformers' router logits for those 3 tokens, layer by layer."""
    model = load_ours(checkpoint)
    model.setup_caches(max_batch_size=3, max_seq_length=256)
    torch.manual_seed(0)
    prompts = torch.randint(3, 32000, (3, 5), dtype=torch.int)
    with torch.no_grad(), counting_expert_reads(model) as counts:
        first = prefill(model, prompts, torch.arange(5), Sampling())  # [3, 1], greedy
        counts.reset()
        model(first.int(), torch.tensor([5]))
        read = counts.read()
    with torch.no_grad():
        config = json.loads((checkpoint / "config.json").read_text())
        reference = load_reference(checkpoint)
        router_logits = reference(torch.cat([prompts, first], 1).long(), output_router_logits=True).router_logits
    expected = sum(logits.view(3, 6, -1)[:, -1].topk(config["num_experts_per_tok"]).indices.unique().numel()
                   for logits in router_logits)
    assert read == expected
    # Counting stops on leaving: no hook and no count left on the model.
    assert all(not layer.block_sparse_moe.gate._forward_hooks for layer in model.layers)
    assert not any("expert_reads" in name for name, _ in model.named_buffers())
    assert config["num_hidden_layers"] * config["num_experts_per_tok"] < expected  # the 3 tokens did not all agree


# ----------------------------------------------------------------------------- the conversation

def mistral_framing(tokenizer, turns: list) -> list:
    """A conversation's tokens as the issue states Mixtral's format: <s> once, each user turn encoded on its
    own as '[INST] {text} [/INST]', each assistant turn as its tokens followed by </s>. turns: user texts
    and assistant token lists, alternating."""
    ids = [tokenizer.bos_id()]
    for i, turn in enumerate(turns):
        ids += tokenizer.encode(f"[INST] {turn} [/INST]") if i % 2 == 0 else turn + [tokenizer.eos_id()]
    return ids


def test_chat_framing_is_mistral_commons(tokenizer):
    from mistral_common.protocol.instruct.messages import AssistantMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
    user, answer, user2 = "What is MoE?", "A mixture of experts.", "And a second one"
    request = ChatCompletionRequest(messages=[UserMessage(content=user), AssistantMessage(content=answer),
                                              UserMessage(content=user2)])
    expected = MistralTokenizer.v1().encode_chat_completion(request).tokens
    assert mistral_framing(tokenizer, [user, tokenizer.encode(answer), user2]) == expected
    # generate.py's user turns are the same tokens.
    answer_ids = tokenizer.encode(answer) + [tokenizer.eos_id()]
    assert user_turn(tokenizer, user, True) + answer_ids + user_turn(tokenizer, user2, True, first=False) == expected


def instruct_folder(checkpoint, tmp_path, **config_changes):
    """The checkpoint as an Instruct one says so: a tokenizer_config.json with Mixtral's chat template."""
    folder = tmp_path / "instruct"
    shutil.copytree(checkpoint, folder)
    template = "{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    if config_changes:
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, **config_changes}))
    return folder


def chat(folder, lines: list, monkeypatch, capsys, *flags, max_new_tokens: int = 8) -> tuple:
    """generate.py --interactive on stdin lines, in this process: (what it printed on stdout, the number of
    tokens each forward pass of the model processed, what it printed on stderr)."""
    tokens_per_forward = []
    real_load = generate_script.load_model

    def load_and_count(*args):
        model = real_load(*args)
        model.register_forward_pre_hook(lambda module, inputs: tokens_per_forward.append(inputs[0].size(1)))
        return model
    monkeypatch.setattr(generate_script, "load_model", load_and_count)
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(f"{line}\n" for line in lines)))
    generate_script.main(argv(folder, "--interactive", "--temperature", "0", "--max_new_tokens", max_new_tokens, *flags))
    captured = capsys.readouterr()
    assert captured.err.count("What is your prompt?") == len(lines) + 1  # then end of input
    return captured.out, tokens_per_forward, captured.err


def test_chat_keeps_the_conversation_and_feeds_only_new_tokens(checkpoint, tokenizer, tmp_path, monkeypatch, capsys):
    folder = instruct_folder(checkpoint, tmp_path)
    user, user2 = "What is MoE?", "And a second one"
    out, tokens_per_forward, _ = chat(folder, [user, user2], monkeypatch, capsys)
    reference = load_reference(folder)
    first = mistral_framing(tokenizer, [user])
    answer = transformers_greedy(reference, first, 8)
    answer_text = answer[:-1] if answer[-1:] == [EOS] else answer
    conversation = mistral_framing(tokenizer, [user, answer_text, user2])
    answer2 = transformers_greedy(reference, conversation, 8)
    assert out == f"{tokenizer.decode(answer)}\n{tokenizer.decode(answer2)}\n"  # the answers alone on stdout
    assert answer2 != transformers_greedy(reference, first[:1] + conversation[len(first) + len(answer_text) + 1:], 8)
    # Turn 1: its prompt, then one token per step. Turn 2: only what the cache lacked (the answer's last token,
    # </s>, the new [INST] turn), then one token per step; no token of the conversation processed twice.
    turn2 = len(conversation) - len(first) - len(answer) + 1
    assert tokens_per_forward == [len(first)] + [1] * (len(answer) - 1) + [turn2] + [1] * (len(answer2) - 1)


def test_chat_past_the_context_starts_a_new_conversation(checkpoint, tokenizer, tmp_path, monkeypatch, capsys):
    user, user2 = "What is MoE?", "And a second one"
    first, alone = mistral_framing(tokenizer, [user]), mistral_framing(tokenizer, [user2])
    # Room for either turn with its answer, not for both.
    folder = instruct_folder(checkpoint, tmp_path, max_position_embeddings=len(first) + len(alone) + 8)
    out, tokens_per_forward, err = chat(folder, [user, user2], monkeypatch, capsys, max_new_tokens=8)
    assert err.count("starting a new one") == 1
    assert out.endswith("\n" + tokenizer.decode(transformers_greedy(load_reference(folder), alone, 8)) + "\n")
    assert tokens_per_forward.count(len(alone)) == 1  # the second turn, prefilled as a new conversation


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("case,words", [
    ("empty", ["--prompts_file", "holds no prompt"]),
    ("missing", ["--prompts_file", "not found"]),
    ("directory", ["--prompts_file", "is a folder"]),
    ("not_text", ["--prompts_file", "is not UTF-8 text"]),
    ("past_the_context", ["line 2 of", "context", "2048"]),
])
def test_bad_prompts_files(checkpoint, tmp_path, capsys, monkeypatch, case, words):
    loads = []
    monkeypatch.setattr(generate_script, "load_model", lambda *args: loads.append(args))
    path = tmp_path / "prompts.txt"
    if case == "empty":
        path.write_text("\n  \n")
    elif case == "directory":
        path.mkdir()
    elif case == "not_text":
        path.write_bytes(b"\xff\xfe\x00 prompt\n")
    elif case == "past_the_context":
        path.write_text("Hello\n" + "word " * 2100 + "\n")
    fails_cleanly(generate_script.main, argv(checkpoint, "--prompts_file", path), capsys, *words)
    assert loads == []  # refused before loading the model


@pytest.mark.parametrize("flags,words", [
    (["--batch_size", "0"], ["--batch_size", "at least 1"]),
    (["--interactive", "--batch_size", "2"], ["--interactive", "--batch_size"]),
])
def test_bad_batch_flags(checkpoint, capsys, flags, words):
    fails_cleanly(generate_script.main, argv(checkpoint, *flags), capsys, *words)


@pytest.mark.parametrize("flag,instruct", [("auto", True), ("plain", False)])
def test_chat_format_flag_overrides_the_checkpoint(checkpoint, tokenizer, tmp_path, monkeypatch, capsys, flag,
                                                   instruct):
    folder = instruct_folder(checkpoint, tmp_path)
    _, tokens_per_forward, _ = chat(folder, ["What is MoE?"], monkeypatch, capsys, "--chat_format", flag,
                                    max_new_tokens=1)
    plain = [tokenizer.bos_id()] + tokenizer.encode("What is MoE?")
    framed = mistral_framing(tokenizer, ["What is MoE?"]) if instruct else plain
    assert tokens_per_forward == [len(framed)]


def test_int8_linear_of_more_than_8_tokens_compiles_in_one_graph():
    """A decode step of a batch above dispatch.CPU_KERNEL_MAX_TOKENS takes int8's PyTorch path, which asks
    whether half-precision matmuls are slow: a constant at tracing time, not a graph break."""
    from formats import parse_format
    from layers import Linear
    torch.manual_seed(0)
    layer = Linear(parse_format("int8"), 32, 16)
    for key, t in parse_format("int8").quantize(torch.randn(16, 32)).items():
        setattr(layer, "weight" if not key else key, t)
    x = torch.randn(9, 32)  # [tokens, in]
    torch.testing.assert_close(torch.compile(layer, fullgraph=True)(x), layer(x))
