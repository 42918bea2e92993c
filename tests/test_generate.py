"""generate.py: greedy text equal to transformers' generate, alone on stdout, streaming, report lines on stderr,
and bad input."""
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
REPORT = re.compile(r"^Time for inference 1: [\d.]+ sec total, [\d.]+ sec to first token \((\d+) prompt tokens\), "
                    r"then (\d+) tokens at [\d.]+ tokens/sec, \d+ CPU threads?$", re.M)


def reference_greedy_text(folder, tokenizer, prompt_ids, max_new_tokens):
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = load_reference(folder).generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                              max_new_tokens=max_new_tokens, pad_token_id=2)
    return tokenizer.decode(out[0].tolist()), out.size(1) - ids.size(1)


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
    # The text alone on stdout (`generate.py ... > out.txt` keeps just that); with --compile, the warm-up
    # prints nothing.
    assert result.stdout == expected + "\n"
    assert expected.startswith(PROMPT) and len(expected) > len(PROMPT)
    # gpt-fast's report lines, on stderr: the prefill (the first new token) apart from the 31 decoded tokens.
    prompt_tokens, decoded = REPORT.search(result.stderr).groups()
    assert (int(prompt_tokens), int(decoded)) == (1 + len(tokenizer.encode(PROMPT)), 31)
    assert re.search(r"^Bandwidth achieved: [\d.]+ GB/s$", result.stderr, re.M)
    assert re.search(r"^Average tokens/sec: [\d.]+$", result.stderr, re.M)
    assert re.search(r"^Memory used: [\d.]+ GB \(the process's peak resident memory; the model's weights: [\d.]+ MB\)$",
                     result.stderr, re.M)
    if compiled:  # one line when compiling starts, then its time
        assert re.search(r"^compiling with torch.compile .*\nCompilation time: [\d.]+ seconds$", result.stderr, re.M)


def main_output(capsys, folder, *extra) -> tuple:
    """generate.py's main in this process (no new interpreter needed): (what it printed on stdout, on stderr)."""
    generate_script.main([str(a) for a in generate_argv(folder, *extra)])
    captured = capsys.readouterr()
    return captured.out, captured.err


def test_sampling_is_seeded_and_every_sample_is_reported(checkpoint, capsys):
    args = ["--temperature", "0.9", "--top_k", "50", "--max_new_tokens", "12", "--num_samples", "2", "--seed", "7"]
    (first, err), (second, _) = main_output(capsys, checkpoint, *args), main_output(capsys, checkpoint, *args)
    assert first == second and len(first.splitlines()) >= 2 and first.startswith(PROMPT)
    assert "Time for inference 2:" in err


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

    def fake_step(model, x, input_pos, sampling):  # stands in for prefill and decode
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
    elif case == "hub_safetensors_renamed":  # the hub's weights under our name
        (folder / "model.pth").unlink()
        shutil.copy(folder / "model-00001-of-00002.safetensors", folder / "model.pth")
    return folder


@pytest.mark.parametrize("case,words", [
    ("missing_checkpoint", ["model.pth", "not found"]),
    ("missing_tokenizer", ["tokenizer.model"]),
    ("corrupt_checkpoint", ["model.pth"]),
    ("config_misfit", ["config.json"]),
    ("missing_config", ["config.json"]),
    ("hub_safetensors_renamed", ["Hugging Face checkpoint",
                                 "python scripts/convert_hf_checkpoint.py --checkpoint_dir"]),
])
def test_bad_checkpoint_folders(checkpoint, tmp_path, case, words, capsys):
    folder = break_folder(checkpoint, tmp_path, case)
    fails_cleanly(generate_script.main, generate_argv(folder, "--max_new_tokens", "4"), capsys, *words)


@pytest.mark.parametrize("flags,words", [
    (["--max_new_tokens", "-3"], ["--max_new_tokens"]),
    (["--temperature", "-1"], ["--temperature"]),
    (["--top_k", "-1"], ["--top_k", "0 for no limit"]),
    (["--top_p", "0"], ["--top_p"]),
    (["--top_p", "1.5"], ["--top_p"]),
    (["--min_p", "-0.1"], ["--min_p"]),
    (["--repetition_penalty", "0"], ["--repetition_penalty"]),
    (["--stop", ""], ["--stop"]),
    (["--threads", "0"], ["--threads"]),
    (["--seed", str(2 ** 64)], ["--seed", "64 bits"]),
    (["--system", "Be brief."], ["--system", "instruct"]),  # this checkpoint's format is plain text
    (["--device", "cuda"], ["CUDA"]),
    (["--max_new_tokens", "2100"], ["context", "2048"]),
])
def test_bad_flags(checkpoint, flags, words, capsys, monkeypatch):
    loads = []
    monkeypatch.setattr(generate_script, "load_model", lambda *args: loads.append(args))
    fails_cleanly(generate_script.main, generate_argv(checkpoint, *flags), capsys, *words)
    assert loads == []  # refused before loading the model


def test_hub_checkpoints_are_named_with_the_command_that_converts_them(checkpoint, capsys):
    """The hub's files given where model.pth goes: its safetensors, or their folder without a model.pth."""
    for path, folder in ((checkpoint / "model-00001-of-00002.safetensors", checkpoint),
                         (checkpoint / "model.safetensors.index.json", checkpoint)):
        fails_cleanly(generate_script.main, ["--checkpoint_path", path, "--device", "cpu"], capsys, "Hugging Face",
                      f"python scripts/convert_hf_checkpoint.py --checkpoint_dir {folder}")


def test_top_k_0_is_no_limit(checkpoint, tokenizer, capsys):
    """As in llama.cpp and transformers, --top_k 0 is no limit: the draws of generation with no top-k at all
    (test_sampling holds that distribution to transformers'); --top_k 1 is greedy."""
    args = ["--temperature", "1.0", "--max_new_tokens", "8", "--num_samples", "1", "--seed", "3"]
    off, _ = main_output(capsys, checkpoint, *args, "--top_k", "0")
    narrow, _ = main_output(capsys, checkpoint, *args, "--top_k", "1")
    greedy, _ = main_output(capsys, checkpoint, *args, "--temperature", "0")
    model = load_ours(checkpoint, torch.bfloat16)
    torch.manual_seed(3)
    ids = torch.tensor([tokenizer.bos_id()] + tokenizer.encode(PROMPT), dtype=torch.int)
    unlimited = generate(model, ids, 8, temperature=1.0, top_k=None, eos_id=tokenizer.eos_id())
    assert off == tokenizer.decode(unlimited.tolist()) + "\n" and narrow == greedy != off
