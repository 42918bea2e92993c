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
from model import ModelArgs, UserError, json_entry, read_json_object  # noqa: E402
from writing import atomic_file, check_replaceable  # noqa: E402


def hub_tensor_shapes(config: ModelArgs) -> dict:
    """Name -> shape of every tensor of a Mixtral checkpoint on the hub."""
    D, I, V, E = config.dim, config.intermediate_size, config.vocab_size, config.num_experts
    q_size, kv_size = config.n_head * config.head_dim, config.n_local_heads * config.head_dim
    shapes = {"model.embed_tokens.weight": (V, D)}
    for i in range(config.n_layer):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (D,)
        shapes[p + "self_attn.q_proj.weight"] = (q_size, D)
        shapes[p + "self_attn.k_proj.weight"] = (kv_size, D)
        shapes[p + "self_attn.v_proj.weight"] = (kv_size, D)
        shapes[p + "self_attn.o_proj.weight"] = (D, q_size)
        shapes[p + "post_attention_layernorm.weight"] = (D,)
        shapes[p + "block_sparse_moe.gate.weight"] = (E, D)
        for e in range(E):
            shapes[p + f"block_sparse_moe.experts.{e}.w1.weight"] = (I, D)
            shapes[p + f"block_sparse_moe.experts.{e}.w2.weight"] = (D, I)
            shapes[p + f"block_sparse_moe.experts.{e}.w3.weight"] = (I, D)
    shapes["model.norm.weight"] = (D,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, D)
    return shapes


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


def open_shard(path: Path):
    if not path.is_file():
        raise UserError(f"shard {path} listed in the index is missing; download the checkpoint again")
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error types for bad headers and short files
        raise UserError(f"{path} is not a readable safetensors file ({e}); download it again")


def check_values(name: str, tensor: torch.Tensor, path: Path):
    """Refuses weights no model can run: integer ones (a quantized export, which this converter does not
    read) and NaN or Inf (a damaged file: one makes every later activation NaN). Checked as each tensor
    is read, so a bad one stops the run before the rest is converted."""
    if not tensor.is_floating_point():
        raise UserError(f"tensor {name} in {path} holds {str(tensor.dtype).removeprefix('torch.')} values, not "
                        f"floating point: the converter reads float weights (bfloat16, float16, float32), not a "
                        f"quantized export")
    bad = ~torch.isfinite(tensor)
    if bad.any():
        raise UserError(f"tensor {name} in {path} holds {int(bad.sum())} NaN or Inf values: the file is damaged; "
                        f"download it again")


def convert_hf_checkpoint(checkpoint_dir: Path, output_name: str = "model.pth") -> Path:
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise UserError(f"{checkpoint_dir} is not a folder: download the checkpoint first")
    output = checkpoint_dir / output_name
    check_replaceable(output)  # up front: the whole model is read before it is written
    config = ModelArgs.from_json(checkpoint_dir / "config.json")
    expected = hub_tensor_shapes(config)
    files = find_weight_files(checkpoint_dir)
    missing = [n for n in expected if n not in files]
    if missing:
        raise UserError(f"tensor {missing[0]} is missing from the checkpoint "
                              f"({len(missing)} missing): config.json does not fit these weights")
    unexpected = [n for n in files if n not in expected]
    if unexpected:
        raise UserError(f"tensor {unexpected[0]} is not part of the model config.json describes "
                              f"({len(unexpected)} unexpected): config.json does not fit these weights")

    def read(name: str) -> torch.Tensor:
        # Open the shard per tensor: its mapping is dropped right after the copy, so the pages read
        # never pile up in this process's memory beside the converted tensors.
        with open_shard(files[name]) as shard:
            try:
                tensor = shard.get_tensor(name)
            except Exception as e:
                raise UserError(f"could not read {name} from {files[name]} ({e}); the file may be truncated")
        if tuple(tensor.shape) != expected[name]:
            raise UserError(f"tensor {name} has shape {tuple(tensor.shape)} but config.json implies "
                                  f"{expected[name]}: config.json does not fit these weights")
        check_values(name, tensor, files[name])
        return tensor

    state_dict = {"tok_embeddings.weight": read("model.embed_tokens.weight")}
    for i in tqdm(range(config.n_layer), desc="converting layers", unit="layer"):
        hf, ours = f"model.layers.{i}.", f"layers.{i}."
        state_dict[ours + "attention.wqkv.weight"] = torch.cat(
            [read(hf + f"self_attn.{p}_proj.weight") for p in "qkv"])
        state_dict[ours + "attention.wo.weight"] = read(hf + "self_attn.o_proj.weight")
        state_dict[ours + "attention_norm.weight"] = read(hf + "input_layernorm.weight")
        state_dict[ours + "ffn_norm.weight"] = read(hf + "post_attention_layernorm.weight")
        moe = hf + "block_sparse_moe."
        state_dict[ours + "block_sparse_moe.gate.weight"] = read(moe + "gate.weight")
        for w in ("w1", "w2", "w3"):
            state_dict[ours + f"block_sparse_moe.{w}"] = torch.stack(
                [read(moe + f"experts.{e}.{w}.weight") for e in range(config.num_experts)])
    state_dict["norm.weight"] = read("model.norm.weight")
    state_dict["output.weight"] = read("model.embed_tokens.weight" if config.tie_word_embeddings
                                       else "lm_head.weight")

    with atomic_file(output, sum(t.nbytes for t in state_dict.values())) as f:
        torch.save(state_dict, f)
    return output


def main(argv=None):
    parser = argparse.ArgumentParser(description="Convert a Hugging Face Mixtral checkpoint to model.pth.")
    parser.add_argument("--checkpoint_dir", type=Path, default=Path("checkpoints/mistralai/Mixtral-8x7B-v0.1"))
    args = parser.parse_args(argv)
    try:
        output = convert_hf_checkpoint(args.checkpoint_dir)
    except UserError as e:
        sys.exit(f"error: {e}")
    except OSError as e:  # disk full, permissions
        sys.exit(f"error: could not write into {args.checkpoint_dir}: {e.strerror or e}")
    if not (args.checkpoint_dir / "tokenizer.model").is_file():
        print(f"warning: no tokenizer.model in {args.checkpoint_dir}; generate.py will need one", file=sys.stderr)
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
