"""checkpoint.py: config.json read into ModelArgs and written back, the one table between the hub's tensor
names and ours (checked against transformers' own MixtralForCausalLM), and opening a checkpoint."""
import pytest
import torch

from checkpoint import config_from_hub, hub_config, open_checkpoint
from names import from_hub, hub_tensor_shapes, tensor_shapes, to_hub
from conftest import CONFIGS
from errors import UserError
from model import Transformer


def test_config_reads_both_rope_spellings():
    base = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, vocab_size=100,
                max_position_embeddings=64)
    assert config_from_hub({**base, "rope_theta": 1e4}).rope_base == 1e4
    assert config_from_hub({**base, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}).rope_base == 5e5
    assert config_from_hub(base).head_dim == 16
    assert config_from_hub({**base, "head_dim": 32}).head_dim == 32
    with pytest.raises(ValueError, match="num_local_experts"):
        config_from_hub({k: v for k, v in base.items() if k != "num_local_experts"})


@pytest.mark.parametrize("name", list(CONFIGS))
def test_hub_names_and_shapes_are_what_transformers_reads(name, tmp_path, tokenizer_path):
    """A hub-layout folder written from the table's hub side loads into transformers' MixtralForCausalLM with
    no tensor missing, unexpected or of another shape; our side is what model.py's Transformer holds."""
    from transformers import MixtralForCausalLM
    from scripts.make_tiny_checkpoint import write_hub_checkpoint
    cfg = {**CONFIGS[name], "vocab_size": 128}
    config = config_from_hub(cfg)
    write_hub_checkpoint(tmp_path, cfg, tokenizer_path, dtype=torch.float32, n_shards=1)
    _, info = MixtralForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    with torch.device("meta"):
        ours = {n: tuple(t.shape) for n, t in Transformer(config).state_dict().items()}
    assert tensor_shapes(config) == ours


def test_to_hub_and_back_is_the_identity():
    """The converter's direction (from_hub) undoes train_tiny.py's (to_hub), tensor for tensor."""
    config = config_from_hub({**CONFIGS["gqa_top2"], "vocab_size": 50})
    g = torch.Generator().manual_seed(0)
    ours = {n: torch.randn(shape, generator=g) for n, shape in tensor_shapes(config).items()}
    hub = to_hub(ours, config)
    assert {n: tuple(t.shape) for n, t in hub.items()} == hub_tensor_shapes(config)
    back = from_hub(hub.__getitem__, config)
    assert back.keys() == ours.keys() and all(torch.equal(back[n], ours[n]) for n in ours)


def test_hub_config_reads_back():
    config = config_from_hub({**CONFIGS["rope_params"], "vocab_size": 77})
    assert config_from_hub(hub_config(config)) == config


def test_opening_a_checkpoint_checks_the_file_first(tmp_path):
    """A folder or a missing file is named as such, before config.json beside it is looked for."""
    with pytest.raises(UserError, match="is a folder"):
        open_checkpoint(tmp_path)
    with pytest.raises(UserError, match="not found: download and convert"):
        open_checkpoint(tmp_path / "model.pth")
    (tmp_path / "model.pth").write_bytes(b"")
    (tmp_path / "config.json").mkdir()
    with pytest.raises(UserError, match="config.json is a folder"):
        open_checkpoint(tmp_path / "model.pth")
