# Converts a Hugging Face Mixtral checkpoint (the hub's sharded safetensors) into one model.pth in
# this repo's layout: q/k/v fused into wqkv, each layer's experts stacked into w1/w2/w3 tensors.
# The folder's config.json stays beside model.pth: the loader reads the shapes from it.
import argparse
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from checkpoint import check_tensors, check_values, json_entry, read_config, read_json_object  # noqa: E402
from cli import HelpFormatter, one_line_errors  # noqa: E402
from errors import UserError  # noqa: E402
from names import from_hub, hub_tensor_shapes  # noqa: E402
from writing import atomic_file, check_replaceable  # noqa: E402


def find_weight_files(checkpoint_dir: Path) -> dict:
    """Tensor name -> the safetensors file that holds it."""
    index = checkpoint_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json_entry(read_json_object(index, "download the checkpoint"), "weight_map", "object", index)
        return {name: checkpoint_dir / json_entry(weight_map, name, "text", index) for name in weight_map}
    single = checkpoint_dir / "model.safetensors"
    if single.is_file():
        with open_shard(single) as f:
            return {name: single for name in f.keys()}
    raise UserError(f"no model.safetensors.index.json or model.safetensors in {checkpoint_dir}: "
                          f"run scripts/download.py --repo_id <repo> first")


def stored_shapes(files: dict) -> dict:
    """Tensor name -> its shape, from the headers of the safetensors files that hold them."""
    shapes = {}
    for path in set(files.values()):
        with open_shard(path) as shard:
            shapes.update({name: tuple(shard.get_slice(name).get_shape()) for name in shard.keys()})
    return {name: shapes.get(name) for name in files}


def open_shard(path: Path):
    if path.exists() and not path.is_file():  # a folder, a FIFO, a device: safetensors reads only files
        raise UserError(f"shard {path} listed in the index is not a regular file; put the downloaded shard there")
    if not path.is_file():
        raise UserError(f"shard {path} listed in the index is missing; download the checkpoint again")
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error types for bad headers and short files
        raise UserError(f"{path} is not a readable safetensors file ({e}); download it again")


def convert_hf_checkpoint(checkpoint_dir: Path, output_name: str = "model.pth") -> Path:
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise UserError(f"{checkpoint_dir} is not a folder: download the checkpoint first")
    output = checkpoint_dir / output_name
    check_replaceable(output)  # up front: the whole model is read before it is written
    config = read_config(checkpoint_dir / "config.json")
    files = find_weight_files(checkpoint_dir)
    check_tensors(stored_shapes(files), hub_tensor_shapes(config), str(checkpoint_dir))
    progress = tqdm(total=len(files), desc="converting", unit="tensor")

    def read(name: str) -> torch.Tensor:
        # Open the shard per tensor: its mapping is dropped right after the copy, so the pages read
        # never pile up in this process's memory beside the converted tensors.
        with open_shard(files[name]) as shard:
            try:
                tensor = shard.get_tensor(name)
            except Exception as e:
                raise UserError(f"could not read {name} from {files[name]} ({e}); the file may be truncated")
        check_values(name, tensor, files[name])
        progress.update()
        return tensor

    with progress:
        state_dict = from_hub(read, config)

    with atomic_file(output, sum(t.nbytes for t in state_dict.values())) as f:
        torch.save(state_dict, f)
    return output


def main(argv=None):
    parser = argparse.ArgumentParser(description="Convert a Hugging Face Mixtral checkpoint to model.pth.",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--checkpoint_dir", type=Path, default=Path("checkpoints/mistralai/Mixtral-8x7B-v0.1"),
                        help="the folder scripts/download.py wrote (config.json, safetensors, tokenizer.model); "
                             "model.pth is written into it")
    args = parser.parse_args(argv)
    with one_line_errors():
        try:
            output = convert_hf_checkpoint(args.checkpoint_dir)
        except OSError as e:  # disk full, permissions
            raise UserError(f"could not write into {args.checkpoint_dir}: {e.strerror or e}")
    if not (args.checkpoint_dir / "tokenizer.model").is_file():
        print(f"warning: no tokenizer.model in {args.checkpoint_dir}; generate.py will need one", file=sys.stderr)
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
