"""Shared fixtures: small random-weight Mixtral checkpoints in the exact hub layout, converted by the
real converter, and the reference implementation (Hugging Face transformers) loaded from the same files."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scripts.convert_hf_checkpoint import convert_hf_checkpoint  # noqa: E402
from scripts.make_tiny_checkpoint import write_hub_checkpoint  # noqa: E402

# Small shapes that still exercise every branch the issue names: grouped-query attention (kv < heads)
# and plain multi-head (kv == heads), top-1 and top-2 routing, several layers, both rope bases.
CONFIGS = {
    "gqa_top2": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                     num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, rope_theta=1e6,
                     max_position_embeddings=2048),
    "mha_top1": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=4, num_local_experts=4, num_experts_per_tok=1, rope_theta=1e4,
                     max_position_embeddings=2048),
    # transformers 5 spelling of the rope base, and head_dim given explicitly.
    "rope_params": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=1, num_local_experts=8, num_experts_per_tok=2, head_dim=32,
                        rope_parameters={"rope_type": "default", "rope_theta": 5e5},
                        max_position_embeddings=2048),
}


def mixtral_tokenizer_path() -> Path:
    """The real Mixtral SentencePiece tokenizer (32000 pieces), as shipped inside mistral-common."""
    import mistral_common
    return Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"


@pytest.fixture(scope="session")
def tokenizer_path():
    return mixtral_tokenizer_path()


@pytest.fixture(scope="session")
def tokenizer(tokenizer_path):
    import sentencepiece as spm
    return spm.SentencePieceProcessor(model_file=str(tokenizer_path))


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory, tokenizer_path):
    """make_checkpoint(name) -> folder with the hub files and the converted model.pth (cached)."""
    made = {}

    def make(name: str, dtype=torch.float32, n_shards: int = 2) -> Path:
        key = (name, dtype, n_shards)
        if key not in made:
            folder = tmp_path_factory.mktemp(f"{name}-{str(dtype)[6:]}-{n_shards}")
            write_hub_checkpoint(folder, CONFIGS[name], tokenizer_path, seed=len(made), dtype=dtype, n_shards=n_shards)
            convert_hf_checkpoint(folder)
            made[key] = folder
        return made[key]

    return make


@pytest.fixture(scope="session")
def checkpoint(make_checkpoint):
    """The default test checkpoint: GQA, top-2 routing, float32 weights."""
    return make_checkpoint("gqa_top2")


def load_reference(folder: Path):
    """transformers' MixtralForCausalLM read from the hub-layout files, in float32."""
    from transformers import MixtralForCausalLM
    return MixtralForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def load_ours(folder: Path, dtype=torch.float32, max_seq_length: int = 256):
    from generate import load_model
    model = load_model(folder / "model.pth", "cpu", dtype)
    model.setup_caches(max_batch_size=1, max_seq_length=max_seq_length)
    return model


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.float() - ref.float()).norm() / ref.float().norm()).item()


def run_script(*args, timeout=600, env=None, stdin=None, cwd=REPO):
    """Runs a repo script as a user would, in a fresh process."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=full_env, input=stdin)
