# Writes a small Mixtral-architecture checkpoint with random weights in the exact layout of the hub
# repo mistralai/Mixtral-8x7B-v0.1: config.json, sharded safetensors with model.safetensors.index.json,
# tokenizer.model. The demo and the tests run the real converter and generator on it; its text is
# meaningless (random weights), it shows the pipeline and the speed.
#
# The folder is written whole under a temporary name beside its place, then takes that place
# (writing.atomic_folder): a fault leaves an old folder there as it was. scripts/train_tiny.py writes
# its trained model the same way.
import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from checkpoint import config_from_hub, hub_config  # noqa: E402
from cli import HelpFormatter  # noqa: E402
from errors import UserError  # noqa: E402
from model import ModelArgs  # noqa: E402
from names import hub_tensor_shapes  # noqa: E402
from writing import atomic_folder  # noqa: E402

ASSETS = Path(__file__).resolve().parent.parent / "assets"
# What a checkpoint folder holds: the hub's files, train_tiny.py's training.json, a model card, and what
# the converter and quantize.py write beside them (derived from the weights: stale once they change) or
# leave when killed. An old folder holding only these is replaced as a whole; one holding anything else
# was not written for a checkpoint, and is refused.
CHECKPOINT_FILES = ("config.json", "model.safetensors.index.json", "*.safetensors", "tokenizer.model", "training.json",
                    "README.md", "*.pth", "*.tmp")

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


@contextlib.contextmanager
def new_checkpoint_folder(out_dir, force: bool = False):
    """Yields a folder to write a checkpoint into, which takes out_dir's place when the block ends
    (writing.atomic_folder), made (and so checked) at once. An old out_dir is replaced only if it holds a
    checkpoint's files alone, and one in the repo's assets/ (what the repo ships, and its tests and demo
    use) only with force."""
    out_dir = Path(out_dir)
    if out_dir.exists() and out_dir.resolve().is_relative_to(ASSETS) and not force:
        raise UserError(f"{out_dir} is in the repo's assets/, which ships with the repo (the demo and the tests "
                        f"use it): write elsewhere, or pass --force to replace it")
    with atomic_folder(out_dir, CHECKPOINT_FILES) as folder:
        yield folder


def write_hub_checkpoint(out_dir, config: dict, tokenizer_model, seed: int = 0, dtype=torch.bfloat16,
                         n_shards: int = 2, norm_outliers: int = 0, tensors: dict = None) -> Path:
    """The whole folder at once (new_checkpoint_folder). norm_outliers: channels 0, 1, ... of every norm
    weight scaled by OUTLIER_SCALE. tensors: the weights under their hub names instead of random ones."""
    with new_checkpoint_folder(out_dir) as folder:
        write_hub_files(folder, config, tokenizer_model, seed, dtype, n_shards, norm_outliers, tensors)
    return Path(out_dir)


def write_hub_files(out_dir: Path, config: dict, tokenizer_model, seed: int = 0, dtype=torch.bfloat16,
                    n_shards: int = 2, norm_outliers: int = 0, tensors: dict = None):
    """Writes the hub's files into the folder out_dir, as write_hub_checkpoint describes. tokenizer_model:
    the path of a tokenizer.model, or its bytes."""
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
        # Serialized here and written by Python, whose write errors are OSErrors that say what happened
        # (safetensors' own writer reports a full disk as an error of its own).
        (out_dir / shard_name).write_bytes(save(chunk, metadata={"format": "pt"}))
        for n, t in chunk.items():
            weight_map[n] = shard_name
            total_size += t.numel() * t.element_size()
    if n_shards > 1:
        index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    tokenizer = tokenizer_model if isinstance(tokenizer_model, bytes) else Path(tokenizer_model).read_bytes()
    (out_dir / "tokenizer.model").write_bytes(tokenizer)


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


def padded_tokenizer(out_path: Path, vocab_size: int) -> Path:
    """A demo tokenizer of exactly vocab_size tokens, whatever the size: trained up to 1000 (the demo text
    holds no more), then padded with unused pieces, which no text encodes to; so that generate.py, eval.py
    and server.py, which refuse a tokenizer of another size than the model's vocabulary, run on the model."""
    import sentencepiece as spm
    from gguf_file import BYTE, CONTROL, NORMAL, UNKNOWN, UNUSED, sentencepiece_model
    trained = spm.SentencePieceProcessor(model_file=str(train_demo_tokenizer(out_path, min(vocab_size, 1000))))
    n = trained.vocab_size()
    kinds = [UNKNOWN if trained.is_unknown(i) else CONTROL if trained.is_control(i) else BYTE if trained.is_byte(i)
             else UNUSED if trained.is_unused(i) else NORMAL for i in range(n)]
    pieces = [trained.id_to_piece(i) for i in range(n)] + [f"<unused_{i}>" for i in range(n, vocab_size)]
    scores = [trained.get_score(i) for i in range(n)] + [0.0] * (vocab_size - n)
    out_path.write_bytes(sentencepiece_model(pieces, scores, kinds + [UNUSED] * (vocab_size - n),
                                             dict(unk=0, bos=1, eos=2, pad=None), True, False))
    return out_path


def write_random_checkpoint(folder: Path, config: ModelArgs, dtype: torch.dtype) -> Path:
    """Any shape (scripts/benchmark.py's named ones) with random weights in the hub's layout, so that
    transformers can load it too, converted to model.pth beside it, with a tokenizer of its vocabulary's
    size. Returns the model.pth path."""
    from scripts.convert_hf_checkpoint import convert_hf_checkpoint
    folder = Path(folder)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = padded_tokenizer(Path(tmp) / "tokenizer.model", config.vocab_size)
        write_hub_checkpoint(folder, hub_config(config), tokenizer, dtype=dtype, n_shards=2)
    return convert_hf_checkpoint(folder)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Write a small random-weight Mixtral checkpoint in the hub's layout.",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--checkpoint_dir", type=Path, default=Path("checkpoints/tiny-mixtral"),
                        help="the folder to write (config.json, safetensors, tokenizer.model), as downloaded")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="a SentencePiece tokenizer.model to ship (default: train a small one)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--norm_outliers", type=int, default=0,
                        help=f"channels of every norm weight to scale by {OUTLIER_SCALE:g}, as trained models' outliers")
    args = parser.parse_args(argv)
    config = dict(TINY)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer = args.tokenizer
            if tokenizer is None:
                tokenizer = train_demo_tokenizer(Path(tmp) / "tokenizer.model", vocab_size=1000)
            elif not tokenizer.is_file():
                raise UserError(f"tokenizer {tokenizer} not found")
            import sentencepiece as spm
            config["vocab_size"] = spm.SentencePieceProcessor(model_file=str(tokenizer)).vocab_size()
            write_hub_checkpoint(args.checkpoint_dir, config, tokenizer, seed=args.seed, norm_outliers=args.norm_outliers)
    except UserError as e:
        sys.exit(f"error: {e}")
    print(f"wrote a random-weight Mixtral checkpoint to {args.checkpoint_dir}")


if __name__ == "__main__":
    main()
