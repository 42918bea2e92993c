"""scripts/convert_hf_checkpoint.py on hub-layout checkpoints: content, layouts, and bad input."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import CONFIGS, REPO, fails_cleanly, load_ours, load_reference, relative_error, run_script
from scripts.convert_hf_checkpoint import main as convert_main
from scripts.make_tiny_checkpoint import write_hub_checkpoint

SCRIPT = "scripts/convert_hf_checkpoint.py"


def hub_tensors(folder):
    tensors = {}
    for shard in folder.glob("*.safetensors"):
        tensors.update(load_file(shard))
    return tensors


def test_converted_tensors_are_the_hub_tensors_rearranged(checkpoint):
    hub = hub_tensors(checkpoint)
    ours = torch.load(checkpoint / "model.pth", weights_only=True)
    p = "model.layers.1."
    wqkv = ours["layers.1.attention.wqkv.weight"]
    assert torch.equal(wqkv, torch.cat([hub[p + f"self_attn.{x}_proj.weight"] for x in "qkv"]))
    for w in ("w1", "w2", "w3"):
        for e in range(CONFIGS["gqa_top2"]["num_local_experts"]):
            assert torch.equal(ours[f"layers.1.block_sparse_moe.{w}"][e], hub[p + f"block_sparse_moe.experts.{e}.{w}.weight"])
    assert torch.equal(ours["output.weight"], hub["lm_head.weight"])
    # Every hub tensor's values went somewhere: the element counts add up.
    assert sum(t.numel() for t in ours.values()) == sum(t.numel() for t in hub.values())


def test_bf16_checkpoint_keeps_bf16_and_single_file_layout_works(make_checkpoint):
    folder = make_checkpoint("mha_top1", dtype=torch.bfloat16, n_shards=1)
    assert (folder / "model.safetensors").is_file() and not (folder / "model.safetensors.index.json").exists()
    ours = torch.load(folder / "model.pth", weights_only=True)
    assert all(t.dtype == torch.bfloat16 for t in ours.values())
    # The same bf16 values in float32 give transformers' float32 logits.
    idx = torch.arange(100, 120)[None]
    with torch.no_grad():
        ref = load_reference(folder)(idx).logits
        out = load_ours(folder)(idx, torch.arange(20))
    assert relative_error(out, ref) < 1e-4


def copy_hub_files(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        if f.name != "model.pth":
            shutil.copy(f, dst / f.name)
    return dst


def test_cli_writes_model_pth(checkpoint, tmp_path):
    folder = copy_hub_files(checkpoint, tmp_path / "ckpt")
    result = run_script(SCRIPT, "--checkpoint_dir", folder)
    assert result.returncode == 0, result.stderr
    assert torch.equal(torch.load(folder / "model.pth", weights_only=True)["norm.weight"],
                       torch.load(checkpoint / "model.pth", weights_only=True)["norm.weight"])
    assert not list(folder.glob("*.tmp"))


def test_config_that_does_not_fit_names_the_tensor(checkpoint, tmp_path, capsys):
    folder = copy_hub_files(checkpoint, tmp_path / "ckpt")
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] *= 2
    (folder / "config.json").write_text(json.dumps(config))
    fails_cleanly(convert_main, ["--checkpoint_dir", folder], capsys, "block_sparse_moe.experts.0.w1.weight", "config.json")
    assert not (folder / "model.pth").exists() and not list(folder.glob("*.tmp"))


def test_more_layers_in_config_than_in_weights(checkpoint, tmp_path, capsys):
    folder = copy_hub_files(checkpoint, tmp_path / "ckpt")
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] += 1
    (folder / "config.json").write_text(json.dumps(config))
    fails_cleanly(convert_main, ["--checkpoint_dir", folder], capsys, "missing")


def test_truncated_shard(checkpoint, tmp_path, capsys):
    folder = copy_hub_files(checkpoint, tmp_path / "ckpt")
    shard = folder / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1000])
    fails_cleanly(convert_main, ["--checkpoint_dir", folder], capsys, "model-00002-of-00002.safetensors")
    assert not (folder / "model.pth").exists() and not list(folder.glob("*.tmp"))


@pytest.mark.parametrize("case", ["empty", "missing_folder", "no_config", "bad_json"])
def test_bad_folders(checkpoint, tmp_path, case, capsys):
    folder = tmp_path / "ckpt"
    if case == "empty":
        folder.mkdir()
    elif case == "no_config":
        copy_hub_files(checkpoint, folder)
        (folder / "config.json").unlink()
    elif case == "bad_json":
        copy_hub_files(checkpoint, folder)
        (folder / "config.json").write_text("{not json")
    fails_cleanly(convert_main, ["--checkpoint_dir", folder], capsys)
    assert not (folder / "model.pth").exists()


def test_peak_memory_stays_near_one_copy_of_the_weights(tmp_path, tokenizer_path):
    """The real checkpoint is 93 GB: conversion must not hold the shards' pages and the converted
    tensors at once. Measured in a fresh process, from after imports to the end of conversion."""
    cfg = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, num_local_experts=8)
    write_hub_checkpoint(tmp_path, cfg, tokenizer_path, dtype=torch.float32, n_shards=3)
    size = sum(f.stat().st_size for f in tmp_path.glob("*.safetensors"))
    result = run_script(REPO / "tests" / "memory_worker.py", "convert", tmp_path)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.split()[-1]) < 1.3 * size


def rewrite_shard_tensor(folder, name, change):
    """Replaces tensor `name` in the folder's shard that holds it by change(tensor)."""
    from safetensors.torch import save_file
    for shard in folder.glob("*.safetensors"):
        tensors = load_file(shard)
        if name in tensors:
            tensors[name] = change(tensors[name])
            save_file(tensors, str(shard), metadata={"format": "pt"})
            return
    raise AssertionError(f"no shard holds {name}")


@pytest.mark.parametrize("dtype", [torch.int32, torch.int8, torch.bool])
def test_integer_source_weights_are_refused_naming_the_tensor(checkpoint, tmp_path, capsys, dtype):
    """An integer (or boolean) tensor in the source was converted as it is: a model.pth no loader can
    run, with exit 0."""
    folder = copy_hub_files(checkpoint, tmp_path / "ckpt")
    name = "model.layers.1.block_sparse_moe.experts.2.w3.weight"
    rewrite_shard_tensor(folder, name, lambda t: t.to(dtype))
    fails_cleanly(convert_main, ["--checkpoint_dir", folder], capsys, name, str(dtype).removeprefix("torch."))
    assert not (folder / "model.pth").exists() and not list(folder.glob("*.tmp"))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("name", ["model.layers.0.input_layernorm.weight", "lm_head.weight"])
def test_non_finite_source_weights_are_refused_naming_the_tensor(checkpoint, tmp_path, capsys, value, name):
    """One NaN or Inf anywhere makes every later activation NaN: a damaged download, refused as each
    tensor is read (before the rest is converted), naming it."""
    folder = copy_hub_files(checkpoint, tmp_path / "ckpt")

    def poison(t):
        t = t.clone()
        t.view(-1)[t.numel() // 2] = value
        return t
    rewrite_shard_tensor(folder, name, poison)
    line = fails_cleanly(convert_main, ["--checkpoint_dir", folder], capsys, name, "1 ")
    assert "NaN" in line and "Inf" in line
    assert not (folder / "model.pth").exists() and not list(folder.glob("*.tmp"))


def test_a_read_only_output_is_refused_before_anything_is_read(checkpoint, tmp_path, capsys, monkeypatch):
    """The real conversion reads 93 GB before it writes: a read-only model.pth is refused up front."""
    import stat
    import scripts.convert_hf_checkpoint as converter
    folder = copy_hub_files(checkpoint, tmp_path / "ckpt")
    (folder / "model.pth").write_bytes(b"keep")
    (folder / "model.pth").chmod(stat.S_IRUSR)
    opened = []
    monkeypatch.setattr(converter, "open_shard", lambda path: opened.append(path))
    fails_cleanly(convert_main, ["--checkpoint_dir", folder], capsys, str(folder / "model.pth"), "read-only")
    assert opened == [] and (folder / "model.pth").read_bytes() == b"keep"
