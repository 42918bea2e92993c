"""model.py against transformers' MixtralForCausalLM on the same random hub-layout checkpoints."""
import pytest
import torch
import torch.nn.functional as F

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


@pytest.mark.parametrize("float32_path", [False, True])
def test_prompt_experts_in_bf16_match_a_float64_loop(monkeypatch, float32_path):
    """A prompt's full-precision experts in bf16: the grouped matmul, and (on CPUs whose half-precision
    matmuls are slow) each expert one by one in float32, against each token's experts computed one by one
    in float64. Expert 0 and 1 get many tokens (converted), 2 and 3 a few (left in bf16): both branches of
    the float32 path run."""
    import dispatch
    from formats import FullPrecision
    assert not dispatch.half_matmul_is_slow(torch.float32)  # float32 models are never converted
    monkeypatch.setattr(dispatch, "half_matmul_is_slow", lambda dtype: float32_path)
    g = torch.Generator().manual_seed(3)
    E, I, D, N = 4, 48, 32, 20
    w1, w3 = (torch.randn(E, I, D, generator=g) / D ** 0.5 for _ in range(2))
    w2 = torch.randn(E, D, I, generator=g) / I ** 0.5
    x = torch.randn(N, D, generator=g)
    experts = torch.stack([torch.zeros(N, dtype=torch.long), torch.tensor([1] * 15 + [2] * 3 + [3] * 2)], dim=1)
    weights = torch.softmax(torch.randn(N, 2, generator=g), dim=-1)
    bf16 = [t.to(torch.bfloat16) for t in (x, weights, w1, w3, w2)]
    fmt, (w1, w3, w2) = FullPrecision(), ({"": w} for w in bf16[2:])
    assert dispatch.experts_path(fmt, bf16[0], experts, E, I) == ("one by one" if float32_path else "grouped")
    out = dispatch.run_experts(fmt, bf16[0], experts, bf16[1], w1, w3, w2)
    x, weights, w1, w3, w2 = (t.double() for t in bf16)  # the same rounded inputs, exact arithmetic
    ref = torch.stack([sum(weights[n, k] * w2[e] @ (F.silu(w1[e] @ x[n]) * (w3[e] @ x[n]))
                           for k, e in enumerate(experts[n].tolist())) for n in range(N)])
    assert out.dtype == torch.bfloat16
    assert relative_error(out, ref) < 1e-2  # bf16 rounding of the output and of h


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


def test_config_reads_both_rope_spellings():
    base = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, vocab_size=100,
                max_position_embeddings=64)
    assert ModelArgs.from_hf_config({**base, "rope_theta": 1e4}).rope_base == 1e4
    assert ModelArgs.from_hf_config({**base, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}).rope_base == 5e5
    assert ModelArgs.from_hf_config(base).head_dim == 16
    assert ModelArgs.from_hf_config({**base, "head_dim": 32}).head_dim == 32
    with pytest.raises(ValueError, match="num_local_experts"):
        ModelArgs.from_hf_config({k: v for k, v in base.items() if k != "num_local_experts"})


def test_known_shapes_match_published_parameter_counts():
    # Mixtral 8x7B has 46.7B parameters and 8x22B 141B (Mistral AI's announcements).
    def n_params(name):
        with torch.device("meta"):
            return sum(p.numel() for p in Transformer(ModelArgs.from_name(name)).parameters())
    assert abs(n_params("Mixtral-8x7B-v0.1") / 46.7e9 - 1) < 0.01
    assert abs(n_params("Mixtral-8x22B-v0.1") / 141e9 - 1) < 0.01
    assert transformer_configs["Mixtral-8x7B-Instruct-v0.1"] == transformer_configs["Mixtral-8x7B-v0.1"]
