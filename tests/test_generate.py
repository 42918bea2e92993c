"""generate.py: greedy text equal to transformers' generate, streaming, report lines, and bad input."""
import json
import re
import shutil

import pytest
import torch

import generate as generate_script
from conftest import fails_cleanly, load_ours, load_reference, run_script
from checkpoint import open_checkpoint
from generation import generate
from measuring import active_weight_bytes

PROMPT = "Hello, my name is"
REPORT = re.compile(r"^Time for inference 1: [\d.]+ sec total, [\d.]+ tokens/sec$", re.M)


def reference_greedy_text(folder, tokenizer, prompt_ids, max_new_tokens):
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = load_reference(folder).generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                              max_new_tokens=max_new_tokens, pad_token_id=2)
    return tokenizer.decode(out[0].tolist()), out.size(1) - ids.size(1)


def printed_text(stdout: str, sample: int = 1) -> str:
    return stdout.split(f"\nTime for inference {sample}:")[0].split("\n==========")[0]


def generate_argv(folder, *extra, prompt=PROMPT) -> list:
    return ["--checkpoint_path", folder / "model.pth", "--device", "cpu", "--prompt", prompt, *extra]


def run_generate(folder, *extra, prompt=PROMPT, **kwargs):
    return run_script("generate.py", *generate_argv(folder, *extra, prompt=prompt), **kwargs)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compile"])
def test_cli_greedy_text_equals_transformers(checkpoint, tokenizer, compiled):
    expected, _ = reference_greedy_text(checkpoint, tokenizer, [tokenizer.bos_id()] + tokenizer.encode(PROMPT), 32)
    flags = ["--compile"] if compiled else []
    result = run_generate(checkpoint, "--temperature", "0", "--precision", "float32", "--max_new_tokens", "32",
                          "--num_samples", "1", *flags)
    assert result.returncode == 0, result.stderr
    # With --compile, a warm-up sample (not timed) prints the same text first.
    assert printed_text(result.stdout) == ("\n".join([expected] * 2) if compiled else expected)
    assert expected.startswith(PROMPT) and len(expected) > len(PROMPT)
    # gpt-fast's report lines, same wording.
    assert REPORT.search(result.stdout)
    assert re.search(r"^Bandwidth achieved: [\d.]+ GB/s$", result.stdout, re.M)
    assert re.search(r"^Average tokens/sec: [\d.]+$", result.stdout, re.M)
    assert re.search(r"^Memory used: [\d.]+ GB$", result.stdout, re.M)
    if compiled:
        assert "Compilation time" in result.stderr


def main_output(capsys, folder, *extra) -> str:
    """generate.py's main in this process (no new interpreter needed): what it printed on stdout."""
    generate_script.main([str(a) for a in generate_argv(folder, *extra)])
    return capsys.readouterr().out


def test_sampling_is_seeded_and_every_sample_is_reported(checkpoint, capsys):
    args = ["--temperature", "0.9", "--top_k", "50", "--max_new_tokens", "12", "--num_samples", "2", "--seed", "7"]
    first, second = main_output(capsys, checkpoint, *args), main_output(capsys, checkpoint, *args)
    assert printed_text(first) == printed_text(second)
    assert "Time for inference 2:" in first


def test_instruct_is_told_by_the_chat_template_and_else_by_the_folder_name(checkpoint, tmp_path):
    """The Instruct format (generate.is_instruct): the checkpoint's tokenizer_config.json decides when it is
    there; a checkpoint converted without it keeps the older rule, the hub repo's name."""
    named = tmp_path / "Mixtral-8x7B-Instruct-v0.1"
    shutil.copytree(checkpoint, named)
    instruct = lambda folder: generate_script.is_instruct(open_checkpoint(folder / "model.pth"))  # noqa: E731
    assert instruct(named) and not instruct(checkpoint)
    (named / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ bos_token }}{{ messages }}"}))
    assert not instruct(named)
    (named / "tokenizer_config.json").write_text(json.dumps({"chat_template": "[INST] {{ m }} [/INST]"}))
    assert instruct(named)


def test_generate_stops_at_eos_unless_told_not_to():
    prompt = torch.tensor([1, 5, 6], dtype=torch.int)
    steps = iter([7, 2, 9, 9, 9])

    def fake_step(model, x, input_pos, temperature, top_k):  # stands in for prefill and decode
        return torch.tensor([[next(steps)]])

    seq = generate(None, prompt, 5, temperature=0, top_k=None, prefill_fn=fake_step, decode_fn=fake_step, eos_id=2)
    assert seq.tolist() == [1, 5, 6, 7, 2]
    steps = iter([7, 2, 9, 9, 9])
    seq = generate(None, prompt, 5, temperature=0, top_k=None, prefill_fn=fake_step, decode_fn=fake_step, eos_id=None)
    assert seq.tolist() == [1, 5, 6, 7, 2, 9, 9, 9]


def test_bandwidth_counts_only_the_active_experts(checkpoint):
    model = load_ours(checkpoint)
    cfg = json.loads((checkpoint / "config.json").read_text())
    D, I, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    Dh = D // cfg["num_attention_heads"]
    attention = D * (cfg["num_attention_heads"] + 2 * cfg["num_key_value_heads"]) * Dh + cfg["num_attention_heads"] * Dh * D
    experts = cfg["num_experts_per_tok"] * 3 * I * D  # only K of E experts are read per token
    per_layer = attention + experts + cfg["num_local_experts"] * D + 2 * D
    expected_params = cfg["num_hidden_layers"] * per_layer + D + V * D + D  # final norm, head, one embedding row
    assert active_weight_bytes(model) == 4 * expected_params


def test_profile_writes_a_chrome_trace(checkpoint, tmp_path, capsys):
    main_output(capsys, checkpoint, "--max_new_tokens", "4", "--num_samples", "1", "--profile", tmp_path / "trace")
    assert "traceEvents" in json.loads((tmp_path / "trace.json").read_text())


def break_folder(checkpoint, tmp_path, case):
    folder = tmp_path / "ckpt"
    shutil.copytree(checkpoint, folder)
    if case == "missing_checkpoint":
        (folder / "model.pth").unlink()
    elif case == "missing_tokenizer":
        (folder / "tokenizer.model").unlink()
    elif case == "corrupt_checkpoint":
        data = (folder / "model.pth").read_bytes()
        (folder / "model.pth").write_bytes(data[: len(data) // 2])
    elif case == "config_misfit":
        config = json.loads((folder / "config.json").read_text())
        config["hidden_size"] *= 2
        (folder / "config.json").write_text(json.dumps(config))
    elif case == "missing_config":
        (folder / "config.json").unlink()
    return folder


@pytest.mark.parametrize("case,words", [
    ("missing_checkpoint", ["model.pth", "not found"]),
    ("missing_tokenizer", ["tokenizer.model"]),
    ("corrupt_checkpoint", ["model.pth"]),
    ("config_misfit", ["config.json"]),
    ("missing_config", ["config.json"]),
])
def test_bad_checkpoint_folders(checkpoint, tmp_path, case, words, capsys):
    folder = break_folder(checkpoint, tmp_path, case)
    fails_cleanly(generate_script.main, generate_argv(folder, "--max_new_tokens", "4"), capsys, *words)


@pytest.mark.parametrize("flags,words", [
    (["--max_new_tokens", "-3"], ["--max_new_tokens"]),
    (["--temperature", "-1"], ["--temperature"]),
    (["--top_k", "0"], ["--top_k"]),
    (["--device", "cuda"], ["CUDA"]),
    (["--max_new_tokens", "2100"], ["context", "2048"]),
])
def test_bad_flags(checkpoint, flags, words, capsys):
    fails_cleanly(generate_script.main, generate_argv(checkpoint, *flags), capsys, *words)


def test_prompt_past_the_context_fails_before_any_work(checkpoint, capsys, monkeypatch):
    loads = []
    monkeypatch.setattr(generate_script, "load_model", lambda *args: loads.append(args))
    fails_cleanly(generate_script.main, generate_argv(checkpoint, "--max_new_tokens", "8", prompt="word " * 2100), capsys,
                  "prompt", "context")
    assert loads == []  # refused before loading the model
