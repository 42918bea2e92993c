"""model.py against transformers' MixtralForCausalLM on the same random hub-layout checkpoints: as the pure
reference (no cache, training) and as the model generate.py serves."""
import pytest
import torch
import torch.nn.functional as F

from checkpoint import load_state_dict, open_checkpoint
from conftest import CONFIGS, REPO, load_ours, load_reference, relative_error, run_script
from model import ModelArgs, Transformer, transformer_configs

TOL = 1e-4


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prompt_logits_match_transformers(make_checkpoint, name):
    folder = make_checkpoint(name)
    ref_model, ours = load_reference(folder), load_ours(folder)
    idx = torch.randint(0, 32000, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = ref_model(idx).logits
        out = ours(idx, torch.arange(idx.size(1)))
    assert relative_error(out, ref) < TOL


@pytest.mark.parametrize("name", list(CONFIGS))
def test_token_by_token_through_kv_cache_matches_transformers(make_checkpoint, name):
    folder = make_checkpoint(name)
    ref_model, ours = load_reference(folder), load_ours(folder)
    idx = torch.randint(0, 32000, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = ref_model(idx).logits
        # A prompt of 8 tokens, then the rest one at a time from the cache.
        steps = [ours(idx[:, :8], torch.arange(8))]
        steps += [ours(idx[:, i:i + 1], torch.tensor([i])) for i in range(8, idx.size(1))]
    assert relative_error(torch.cat(steps, dim=1), ref) < TOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precisions_run_end_to_end_near_float32(checkpoint, dtype):
    ref_model = load_reference(checkpoint)
    ours = load_ours(checkpoint, dtype=dtype)
    assert ours.layers[0].attention.kv_cache.k_cache.dtype == dtype
    idx = torch.randint(0, 32000, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = ref_model(idx).logits
        out = ours(idx, torch.arange(16))
        step = ours(idx[:, -1:], torch.tensor([16]))
    assert out.dtype == dtype and torch.isfinite(step).all()
    assert relative_error(out, ref) < 5e-2


def test_sliding_window_matches_transformers(tmp_path, tokenizer_path):
    from scripts.convert_hf_checkpoint import convert_hf_checkpoint
    from scripts.make_tiny_checkpoint import write_hub_checkpoint
    write_hub_checkpoint(tmp_path, {**CONFIGS["gqa_top2"], "sliding_window": 6}, tokenizer_path, dtype=torch.float32)
    convert_hf_checkpoint(tmp_path)
    ref_model, ours = load_reference(tmp_path), load_ours(tmp_path)
    idx = torch.randint(0, 32000, (1, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = ref_model(idx).logits
        full = ours(idx, torch.arange(20))
    assert relative_error(full, ref) < TOL


def test_long_prompt_matches_transformers_with_bounded_memory(tmp_path, tokenizer_path):
    """A 1200-token prompt through a model whose experts are large enough that gathering a copy of
    the chosen experts' weights per token (T*K*3*I*D floats, ~7.5 GB here) would blow up memory."""
    from scripts.convert_hf_checkpoint import convert_hf_checkpoint
    from scripts.make_tiny_checkpoint import write_hub_checkpoint
    cfg = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=1, num_attention_heads=4,
               num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=4096)
    write_hub_checkpoint(tmp_path, cfg, tokenizer_path, dtype=torch.float32)
    convert_hf_checkpoint(tmp_path)
    T = 1200
    idx = torch.randint(0, 32000, (1, T), generator=torch.Generator().manual_seed(4))
    torch.save(idx, tmp_path / "idx.pt")
    # Measure peak memory in a fresh process: the test process's own peak is polluted by other tests.
    result = run_script(REPO / "tests" / "memory_worker.py", "prefill", tmp_path / "model.pth", tmp_path / "idx.pt",
                        tmp_path / "logits.pt")
    assert result.returncode == 0, result.stderr
    before_kib, after_kib = map(int, result.stdout.split())
    # Activations for 1200 tokens (logits alone are 150 MB); a per-token gather would need ~7.5 GB.
    assert (after_kib - before_kib) * 1024 < 1.0e9
    with torch.no_grad():
        ref = load_reference(tmp_path)(idx).logits
    assert relative_error(torch.load(tmp_path / "logits.pt"), ref) < TOL


def test_known_shapes_match_published_parameter_counts():
    # Mixtral 8x7B has 46.7B parameters and 8x22B 141B (Mistral AI's announcements).
    def n_params(name):
        with torch.device("meta"):
            return sum(p.numel() for p in Transformer(ModelArgs.from_name(name)).parameters())
    assert abs(n_params("Mixtral-8x7B-v0.1") / 46.7e9 - 1) < 0.01
    assert abs(n_params("Mixtral-8x22B-v0.1") / 141e9 - 1) < 0.01
    assert transformer_configs["Mixtral-8x7B-Instruct-v0.1"] == transformer_configs["Mixtral-8x7B-v0.1"]


@pytest.fixture(scope="module")
def reference_pair(checkpoint):
    loaded = open_checkpoint(checkpoint / "model.pth")
    ours = Transformer(loaded.config)  # model.py alone: no format, no kernels, no cache
    ours.load_state_dict(load_state_dict(loaded))
    return ours, load_reference(checkpoint)


def test_the_reference_without_a_cache_matches_transformers(reference_pair):
    ours, ref = reference_pair
    idx = torch.randint(0, ours.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert relative_error(ours(idx), ref(idx).logits) < 1e-5


def test_the_reference_trains_with_transformers_gradients(reference_pair):
    """A training step's gradients, through every layer and the experts' loop, equal transformers'."""
    ours, ref = reference_pair
    idx = torch.randint(0, ours.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(2))
    for model, logits in ((ours, lambda: ours(idx[:, :-1])), (ref, lambda: ref(idx[:, :-1]).logits)):
        model.zero_grad()
        F.cross_entropy(logits().flatten(0, 1), idx[:, 1:].flatten()).backward()
    pairs = [(ours.tok_embeddings.weight, ref.model.embed_tokens.weight), (ours.output.weight, ref.lm_head.weight),
             (ours.layers[0].block_sparse_moe.gate.weight, ref.model.layers[0].mlp.gate.weight)]
    for mine, theirs in pairs:
        assert theirs.grad is not None and theirs.grad.norm() > 0
        assert relative_error(mine.grad, theirs.grad) < 1e-4
    expert_grads = [p.grad for p in ours.layers[0].block_sparse_moe.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in expert_grads)
