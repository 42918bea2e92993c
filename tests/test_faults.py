"""Faults a user meets (issue 22): a full disk, a file-size limit, SIGTERM and SIGHUP while a checkpoint
is written, a closed stdout, devices this torch cannot use, wrong-typed config values, requests beyond
memory or context. Each must end with one line and a non-zero exit (a closed pipe: quietly), never a
traceback, a silently wrong result or a half-written file."""
import json

import generate as generate_script
from conftest import fails_cleanly
from scripts.convert_hf_checkpoint import main as convert_main


def linked_folder(checkpoint, tmp_path, *names, config_changes=None):
    """A checkpoint folder of links to the test checkpoint's files (nothing copied), with config.json
    changed as asked."""
    folder = tmp_path / "ckpt"
    folder.mkdir(parents=True)
    for name in names:
        (folder / name).symlink_to(checkpoint / name)
    config = json.loads((checkpoint / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **(config_changes or {})}))
    return folder


def argv(folder, *extra):
    return ["--checkpoint_path", folder / "model.pth", "--device", "cpu", "--num_samples", "1", *extra]


def leftovers(folder) -> list:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# ----------------------------------------------------------------------------- config.json and the index

def test_wrong_typed_config_values_are_named_by_converter_and_loader(checkpoint, tmp_path, capsys):
    for key, value in (("hidden_size", "256"), ("num_local_experts", None)):
        folder = linked_folder(checkpoint, tmp_path / key, "model.pth", "tokenizer.model", config_changes={key: value})
        expected = (str(folder / "config.json"), key, json.dumps(value))
        fails_cleanly(convert_main, ["--checkpoint_dir", folder], capsys, *expected)
        fails_cleanly(generate_script.main, argv(folder), capsys, *expected)
    folder = linked_folder(checkpoint, tmp_path / "index")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": [1, 2]}))
    fails_cleanly(convert_main, ["--checkpoint_dir", folder], capsys, "model.safetensors.index.json", "weight_map",
                  "[1, 2]")
    assert leftovers(folder) == [] and not (folder / "model.pth").exists()