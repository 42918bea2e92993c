# Writes a small Mixtral-architecture checkpoint with random weights in the exact layout of the hub
# repo mistralai/Mixtral-8x7B-v0.1: config.json, sharded safetensors with model.safetensors.index.json,
# tokenizer.model. The demo and the tests run the real converter and generator on it; its text is
# meaningless (random weights), it shows the pipeline and the speed.
import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from checkpoint import config_from_hub, hub_config  # noqa: E402
from names import hub_tensor_shapes  # noqa: E402
from model import ModelArgs  # noqa: E402

# Mixtral-8x7B-v0.1's own config.json, as published.
MIXTRAL_CONFIG = {
    "architectures": ["MixtralForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 32768,
    "model_type": "mixtral",
    "num_attention_heads": 32,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "num_local_experts": 8,
    "output_router_logits": False,
    "rms_norm_eps": 1e-05,
    "rope_theta": 1e6,
    "router_aux_loss_coef": 0.02,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.36.0.dev0",
    "use_cache": True,
    "vocab_size": 32000,
}

# Small enough to build in a second; grouped-query attention (16 heads, 8 kv heads as in Mixtral)
# and top-2 of 8 experts, with every sharded dimension divisible by 8 tensor-parallel ranks.
TINY = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=16,
            num_key_value_heads=8, max_position_embeddings=4096)


# Trained models have outlier channels: a few dimensions of the residual stream, the same in every
# layer, that the norms scale far above the others (LLM.int8(), Dettmers et al. 2022). --norm_outliers
# scales that many channels of every norm weight by this factor, so that the weights reading them
# (attention, experts, output head) see inputs where those columns' rounding errors weigh the most.
OUTLIER_SCALE = 20.0


def is_norm(name: str) -> bool:
    return name.endswith("layernorm.weight") or name == "model.norm.weight"


def random_tensor(name: str, shape, generator) -> torch.Tensor:
    if is_norm(name):
        return 1.0 + 0.1 * torch.randn(shape, generator=generator)
    if name == "model.embed_tokens.weight":
        return torch.randn(shape, generator=generator)
    # 1/sqrt(fan_in) keeps activations O(1) through the layers, so logits are well separated and
    # greedy decoding is not decided by rounding noise.
    return torch.randn(shape, generator=generator) / shape[-1] ** 0.5


def write_hub_checkpoint(out_dir, config: dict, tokenizer_model, seed: int = 0,
                         dtype=torch.bfloat16, n_shards: int = 2, norm_outliers: int = 0,
                         tensors: dict = None) -> Path:
    """norm_outliers: channels 0, 1, ... of every norm weight scaled by OUTLIER_SCALE. tensors: the
    weights under their hub names (scripts/train_tiny.py's trained ones) instead of random ones."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = {**MIXTRAL_CONFIG, **config, "torch_dtype": str(dtype).removeprefix("torch.")}
    if "rope_parameters" in config:  # transformers 5 spelling: the base lives only there
        cfg.pop("rope_theta")
    generator = torch.Generator().manual_seed(seed)
    shapes = hub_tensor_shapes(config_from_hub(cfg))
    if tensors is None:
        tensors = {name: random_tensor(name, shape, generator) for name, shape in shapes.items()}
    else:
        assert {n: tuple(t.shape) for n, t in tensors.items()} == shapes, "tensors do not fit the config"
        tensors = {name: tensors[name].detach().clone() for name in shapes}  # the hub's order
    for name, t in tensors.items():
        if is_norm(name):
            t[:norm_outliers] *= OUTLIER_SCALE
    tensors = {name: t.to(dtype) for name, t in tensors.items()}
    # Tensors in order over the shards, as on the hub, where one layer's tensors may straddle two shards.
    names = list(tensors)
    per_shard = -(-len(names) // n_shards)
    weight_map, total_size = {}, 0
    for s in range(n_shards):
        shard_name = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors" if n_shards > 1 else "model.safetensors"
        chunk = {n: tensors[n].contiguous() for n in names[s * per_shard:(s + 1) * per_shard]}
        save_file(chunk, str(out_dir / shard_name), metadata={"format": "pt"})
        for n, t in chunk.items():
            weight_map[n] = shard_name
            total_size += t.numel() * t.element_size()
    if n_shards > 1:
        index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out_dir / "tokenizer.model").write_bytes(Path(tokenizer_model).read_bytes())
    return out_dir


def train_demo_tokenizer(out_path: Path, vocab_size: int) -> Path:
    """A small SentencePiece BPE model, so that the demo needs no download. Byte fallback makes
    every string encodable; ids 0/1/2 are <unk>/<s>/</s> as in Mixtral's tokenizer."""
    import sentencepiece as spm
    text = Path(__file__).resolve().parent.parent.joinpath("model.py").read_text()  # any English-ish text will do
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text(text + "\nHello, my name is Mixtral. The quick brown fox jumps over the lazy dog.\n")
        spm.SentencePieceTrainer.train(
            input=str(corpus), model_prefix=str(Path(tmp) / "sp"), vocab_size=vocab_size,
            model_type="bpe", byte_fallback=True, hard_vocab_limit=False, num_threads=1,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
        out_path.write_bytes((Path(tmp) / "sp.model").read_bytes())
    return out_path


def write_random_checkpoint(folder: Path, config: ModelArgs, dtype: torch.dtype) -> Path:
    """Any shape (scripts/benchmark.py's named ones) with random weights in the hub's layout, so that
    transformers can load it too, converted to model.pth beside it. Returns the model.pth path."""
    from scripts.convert_hf_checkpoint import convert_hf_checkpoint
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:  # a tokenizer the folder ships; benchmarks never read it
        tokenizer = train_demo_tokenizer(Path(tmp) / "tokenizer.model", vocab_size=1000)
        write_hub_checkpoint(folder, hub_config(config), tokenizer, dtype=dtype, n_shards=2)
    return convert_hf_checkpoint(folder)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Write a small random-weight Mixtral checkpoint in the hub's layout.")
    parser.add_argument("--checkpoint_dir", type=Path, default=Path("checkpoints/tiny-mixtral"))
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="a SentencePiece tokenizer.model to ship (default: train a small one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--norm_outliers", type=int, default=0,
                        help=f"channels of every norm weight to scale by {OUTLIER_SCALE:g}, as trained models' outliers")
    args = parser.parse_args(argv)
    config = dict(TINY)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = args.tokenizer
        if tokenizer is None:
            tokenizer = train_demo_tokenizer(Path(tmp) / "tokenizer.model", vocab_size=1000)
        elif not tokenizer.is_file():
            sys.exit(f"error: tokenizer {tokenizer} not found")
        import sentencepiece as spm
        config["vocab_size"] = spm.SentencePieceProcessor(model_file=str(tokenizer)).vocab_size()
        write_hub_checkpoint(args.checkpoint_dir, config, tokenizer, seed=args.seed, norm_outliers=args.norm_outliers)
    print(f"wrote a random-weight Mixtral checkpoint to {args.checkpoint_dir}")


if __name__ == "__main__":
    main()
