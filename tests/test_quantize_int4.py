"""quantize.py --mode int4: the packing, the rounding against an independent float64 round-to-nearest,
the file, the model's logits against transformers with the same rounding done here, the generator on it
(greedy text against transformers), tensor-parallel slicing by whole groups, and bad input."""
import shutil

import pytest
import torch

from conftest import CONFIGS, REPO, fails_cleanly, load_reference, relative_error, run_script

import quantize
import tp
from formats import Int4
from checkpoint import load_model, open_checkpoint
from kernels import cpu as cpu_kernels
from errors import UserError
from quantize import quantize_checkpoint
from rounding import QUANTIZED_HF, reference_with_int4_weights, round_to_nearest, unpack

# Wide enough for every group size (dim 128, intermediate 256), small enough to run in a second.
WIDE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            num_local_experts=4, num_experts_per_tok=2, rope_theta=1e6, max_position_embeddings=2048)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread


@pytest.fixture(scope="module", autouse=True)
def kernels_built():
    assert cpu_kernels.available(), "the CPU kernels must build here (a C++ compiler and ninja are installed)"


@pytest.fixture(scope="module")
def wide(tmp_path_factory, tokenizer_path):
    from scripts.convert_hf_checkpoint import convert_hf_checkpoint
    from scripts.make_tiny_checkpoint import write_hub_checkpoint
    folder = tmp_path_factory.mktemp("wide")
    write_hub_checkpoint(folder, WIDE, tokenizer_path, seed=5, dtype=torch.float32, n_shards=1)
    convert_hf_checkpoint(folder)
    return folder


@pytest.fixture(scope="module")
def near_grid(wide, tmp_path_factory):
    """The wide checkpoint with each weight int4 rounds moved to within 5 % of a step of its int4 value
    (groups of 32): int4's error is then small next to the gaps between the best logits, so greedy texts
    can be compared over several steps. (On random weights the two best of 32000 logits are closer than
    int4's error from the first step.)"""
    from safetensors.torch import load_file, save_file
    from scripts.convert_hf_checkpoint import convert_hf_checkpoint
    folder = tmp_path_factory.mktemp("near-grid")
    for name in ("config.json", "tokenizer.model"):
        shutil.copy(wide / name, folder / name)
    tensors = load_file(wide / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    for name, w in tensors.items():
        if name.endswith(QUANTIZED_HF) or ".experts." in name:
            q, scale = round_to_nearest(w, 32)
            noise = 0.05 * (2 * torch.rand(q.shape, generator=g, dtype=torch.float64) - 1)
            tensors[name] = ((q + noise) * scale.repeat_interleave(32, dim=-1)).float()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    convert_hf_checkpoint(folder)
    return folder


@pytest.fixture(scope="module")
def int4_path(near_grid):
    """model_int4.g32.attn4.pth of the near-grid checkpoint, written by the CLI: int4 everywhere (the
    default keeps attention and the output head in int8: test_quantize_mixed.py)."""
    result = run_script(REPO / "quantize.py", "--checkpoint_path", near_grid / "model.pth", "--mode", "int4",
                        "--groupsize", "32", "--int4_attention", env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    path = near_grid / "model_int4.g32.attn4.pth"
    assert result.stdout.strip() == f"wrote {path}" and not path.with_name(path.name + ".tmp").exists()
    return path


# ----------------------------------------------------------------------------- packing and rounding

def test_packing_round_trips_exactly():
    """Weights that int4 holds exactly (every group has its extreme at -8 steps, power-of-two scales)
    come back bit for bit, through PyTorch's unpacking and the CPU kernel's, and pack as described."""
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-8, 8, (3, 5, 96), generator=g)
    q[..., ::32] = -8  # each group of 32 holds -8: its extreme (7 steps is less)
    scales = 2.0 ** torch.randint(-8, 0, (3, 5, 3), generator=g).float()
    w = q.float() * scales.repeat_interleave(32, dim=-1)
    t = Int4(32).quantize(w)
    expected = ((q[..., 0::2] + 8) | ((q[..., 1::2] + 8) << 4)).to(torch.uint8)
    assert torch.equal(t[""], expected) and torch.equal(t["scales"], scales)
    assert torch.equal(unpack(t[""]), q)
    assert torch.equal(cpu_kernels.ops().dequantize_int4(t[""], t["scales"], torch.float32), w)
    with cpu_kernels.turned_off():  # PyTorch's unpacking, the path of GPUs and of CPUs without a compiler
        assert torch.equal(Int4().dequantize(t, torch.float32), w)


@pytest.mark.parametrize("groupsize", Int4.GROUP_SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_weight_is_float64_round_to_nearest_of_its_group(groupsize, dtype):
    g = torch.Generator().manual_seed(groupsize)
    w = (torch.randn(2, 37, 256, generator=g) * torch.rand(2, 37, 1, generator=g)).to(dtype)
    t = Int4(groupsize).quantize(w)
    q, scale = round_to_nearest(w, groupsize)
    assert t["scales"].dtype == dtype and torch.equal(t["scales"].double(), scale)
    # The same q, except where w / scale lies within float32 rounding of a tie (.5): either side is nearest.
    ratio = w.double().unflatten(-1, (-1, groupsize)) / scale[..., None]
    near_tie = ((ratio - ratio.floor() - 0.5).abs() < 1e-5).flatten(-2)
    got = unpack(t[""])
    assert ((got == q) | near_tie).all() and (got - q).abs().max() <= 1
    # Dequantized: within half a step of w, except values clamped at 7 steps (the side opposite the
    # extreme, whose magnitude may reach 8 steps): there within one step.
    error = (Int4().dequantize(t, torch.float64) - w.double()).abs()
    step = scale.repeat_interleave(groupsize, dim=-1).abs()
    clamped = (ratio.round() > 7).flatten(-2)
    assert (error <= torch.where(clamped, 1.0, 0.5) * step * (1 + 1e-6)).all()


def test_pytorch_paths_multiply_the_dequantized_weights():
    """The paths of GPUs and of CPUs without the kernels (Int4.linear, Int4.decode_experts without a host
    sync, the grouped experts of prompts) against float64 products with the unpacked weights."""
    import torch.nn.functional as F
    from layers import dequantized_experts
    g = torch.Generator().manual_seed(3)
    fmt, E, D, I = Int4(32), 4, 64, 96
    w1, w3 = (fmt.quantize(torch.randn(E, I, D, generator=g) / D ** 0.5) for _ in range(2))
    w2 = fmt.quantize(torch.randn(E, D, I, generator=g) / I ** 0.5)
    dense = {key: t for key, t in fmt.quantize(torch.randn(40, D, generator=g)).items()}

    def exact(t):  # unpacked here, in float64
        return unpack(t[""]).double() * t["scales"].double().repeat_interleave(32, dim=-1)

    x = torch.randn(3, D, generator=g)
    experts = torch.tensor([[0, 2], [2, 1], [3, 2]])
    weights = torch.softmax(torch.randn(3, 2, generator=g), dim=-1)
    want = torch.zeros(3, D, dtype=torch.float64)
    for n in range(3):
        for e, weight in zip(experts[n].tolist(), weights[n].double()):
            h = F.silu(exact(w1)[e] @ x[n].double()) * (exact(w3)[e] @ x[n].double())
            want[n] += weight * (exact(w2)[e] @ h)
    with cpu_kernels.turned_off():
        assert relative_error(fmt.linear(x, dense), x.double() @ exact(dense).T) < 1e-6
        assert relative_error(fmt.decode_experts(x, experts, weights, w1, w3, w2), want) < 1e-6
        grouped = dequantized_experts(x, experts, weights, "int4:g32", *(list(w.values()) for w in (w1, w3, w2)))
        assert relative_error(grouped, want) < 1e-6


# ----------------------------------------------------------------------------- the file

def test_cli_writes_packed_weights_and_group_scales(near_grid, int4_path):
    source = torch.load(near_grid / "model.pth", weights_only=True)
    quantized = torch.load(int4_path, weights_only=True)
    int4_names = [n for n in source if n == "output.weight" or n.endswith(
        (".attention.wqkv.weight", ".attention.wo.weight", ".block_sparse_moe.w1", ".block_sparse_moe.w2",
         ".block_sparse_moe.w3"))]
    assert len(int4_names) == 5 * WIDE["num_hidden_layers"] + 1
    scales_name = {n: n[:-len("weight")] + "scales" if n.endswith(".weight") else n + "_scales" for n in int4_names}
    assert set(quantized) == set(source) | set(scales_name.values())
    for name, w in source.items():
        if name not in scales_name:  # router, embedding, norms: the very same tensor
            assert torch.equal(quantized[name], w), name
            continue
        packed, scales = quantized[name], quantized[scales_name[name]]
        assert packed.dtype == torch.uint8 and packed.shape == (*w.shape[:-1], w.shape[-1] // 2), name
        assert scales.dtype == w.dtype and scales.shape == (*w.shape[:-1], w.shape[-1] // 32), name
        q, scale = round_to_nearest(w, 32)  # no ties here: every w / scale is within 0.1 of an integer
        assert torch.equal(unpack(packed), q) and torch.equal(scales.double(), scale), name
    # And generate.py knows it by its content, group size included, whatever the file is called.
    shutil.copy(int4_path, near_grid / "renamed.pth")
    model = load_model(open_checkpoint(near_grid / "renamed.pth"), "cpu", torch.float32)
    assert all(isinstance(model.layers[0].attention.wqkv.format, Int4) and fmt.groupsize == 32
               for fmt in (model.output.format, model.layers[0].attention.wo.format, model.layers[1].block_sparse_moe.format))
    assert model.layers[0].block_sparse_moe.gate.weight.dtype == torch.float32  # the router stays


# ----------------------------------------------------------------------------- accuracy

@pytest.mark.parametrize("groupsize", Int4.GROUP_SIZES)
def test_int4_logits_err_as_rounding_the_weights_does(wide, groupsize, tmp_path):
    """The error int4 must give is that of transformers' model with round-to-nearest weights: ours equals
    that model where it multiplies dequantized weights (a prompt), and on the CPU kernels' decode path
    adds the rounding of activations to int8 (1/254 of a block's largest value, against the weights'
    1/16 of a group's largest): bounded by a tenth of the int4 error itself."""
    reference = load_reference(wide)
    rounded = reference_with_int4_weights(reference, groupsize)
    path = quantize_checkpoint(wide / "model.pth", f"int4:g{groupsize}:attn4")
    ours = load_model(open_checkpoint(path), "cpu", torch.float32)
    ours.setup_caches(max_batch_size=1, max_seq_length=64)
    idx = torch.randint(0, 32000, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full, want = reference(idx).logits, rounded(idx).logits
        prompt = ours(idx, torch.arange(24))
        decoded = torch.cat([ours(idx[:, :8], torch.arange(8))] +
                            [ours(idx[:, i:i + 1], torch.tensor([i])) for i in range(8, 24)], dim=1)
    int4_error = relative_error(want, full)
    print(f"int4, groups of {groupsize}: logits relative error of round-to-nearest {int4_error:.4f}; ours: "
          f"{relative_error(prompt, full):.4f} on a prompt, {relative_error(decoded[:, 8:], full[:, 8:]):.4f} decoding")
    assert int4_error > 0.01  # quantization is visible: the comparison below is not vacuous
    # A prompt: dequantized weights; a weight at a rounding tie may land on either side (one step).
    assert relative_error(prompt, want) < 1e-3
    assert relative_error(decoded[:, 8:], want[:, 8:]) < 0.1 * int4_error


# ----------------------------------------------------------------------------- generate.py

PROMPT = "Hello, my name is"


def test_int4_cli_greedy_agrees_with_transformers(near_grid, int4_path, tokenizer):
    """Our greedy text equals transformers' float32 greedy text up to the first step where transformers'
    two best logits are closer than twice the int4 error there (the largest difference of any logit of
    our int4 model from transformers', fed transformers' tokens); and equals the greedy text of
    transformers with round-to-nearest weights for much longer."""
    ids = [tokenizer.bos_id()] + tokenizer.encode(PROMPT)
    n = 16
    reference = load_reference(near_grid)
    ours = load_model(open_checkpoint(int4_path), "cpu", torch.float32)
    ours.setup_caches(max_batch_size=1, max_seq_length=64)
    with torch.no_grad():
        out = reference.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=n, pad_token_id=2)[0]
        full = reference(out[None]).logits[0, len(ids) - 1:-1]  # [n, V]: the logits of each new token
        mine = [ours(out[None, :len(ids)], torch.arange(len(ids)))[0, -1]]  # prompt, then one token at a time
        mine += [ours(out[None, i:i + 1], torch.tensor([i]))[0, -1] for i in range(len(ids), len(out) - 1)]
        err = (torch.stack(mine) - full).abs().amax(dim=-1)  # [n]
        rounded_tokens = reference_with_int4_weights(reference, 32).generate(
            torch.tensor([ids]), do_sample=False, max_new_tokens=n, pad_token_id=2)[0, len(ids):].tolist()
    top2 = full.topk(2, dim=-1).values
    close = (top2[:, 0] - top2[:, 1] < 2 * err).tolist() + [True]
    trusted = close.index(True)  # steps before the first close call
    assert trusted >= 2  # the comparison below is not vacuous
    result = run_script(REPO / "generate.py", "--checkpoint_path", int4_path, "--temperature", "0", "--precision",
                        "float32", "--max_new_tokens", str(n), "--num_samples", "1", "--device", "cpu", "--prompt",
                        PROMPT, "--ignore_eos", env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    text = result.stdout.removesuffix("\n")  # the text alone: timings go to stderr

    def agreeing(tokens):  # how many of tokens our text reproduces
        return max(k for k in range(n + 1) if text.startswith(tokenizer.decode(ids + tokens[:k]).rstrip("\ufffd")))

    reference_tokens = out[len(ids):].tolist()
    print(f"int4 greedy: {trusted} steps before a close call, {agreeing(reference_tokens)} agree with transformers, "
          f"{agreeing(rounded_tokens)} with transformers on rounded weights")
    assert agreeing(reference_tokens) >= trusted, (trusted, text)
    assert agreeing(rounded_tokens) >= 8, (text, tokenizer.decode(ids + rounded_tokens))


# ----------------------------------------------------------------------------- tensor parallel

def test_tensor_parallel_refuses_slices_that_cut_groups(make_checkpoint, tmp_path):
    """Two ranks of a checkpoint whose intermediate_size is 96 would hold 48 inputs of each w2 row:
    not whole groups of 32. Refused before any slicing, naming the dimension and the group size."""
    folder = make_checkpoint("mha_top1")
    assert CONFIGS["mha_top1"]["intermediate_size"] == 96
    path = quantize_checkpoint(folder / "model.pth", "int4:g32")
    model = load_model(open_checkpoint(path), "cpu", torch.float32)
    with pytest.raises(UserError, match=r"each rank 48 of w2's inputs \(intermediate_size\), 96, which is not a "
                                        r"whole number of int4 groups of 32"):
        tp.apply_tp(model, 0, 2)


# ----------------------------------------------------------------------------- bad input

def test_group_size_that_does_not_divide_is_one_line_and_no_file(make_checkpoint, tmp_path, capsys):
    folder = tmp_path / "ckpt"
    shutil.copytree(make_checkpoint("mha_top1"), folder)  # intermediate_size 96: not a multiple of 64
    before = sorted(folder.iterdir())
    fails_cleanly(quantize.main, ["--checkpoint_path", folder / "model.pth", "--mode", "int4", "--groupsize", "64"],
                  capsys, "int4:g64", "96", "intermediate_size")
    assert sorted(folder.iterdir()) == before


def test_int4_of_a_quantized_checkpoint_is_refused(wide, int4_path, tmp_path, capsys):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for name in ("config.json", "tokenizer.model"):
        shutil.copy(wide / name, folder / name)
    shutil.copy(int4_path, folder / "model.pth")
    int8 = quantize_checkpoint(wide / "model.pth", "int8")
    shutil.copy(int8, folder / "model_8.pth")
    capsys.readouterr()  # its progress bar
    for source in ("model.pth", "model_8.pth"):
        fails_cleanly(quantize.main, ["--checkpoint_path", folder / source, "--mode", "int4"], capsys,
                      "already quantized")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.pth", "model_8.pth", "tokenizer.model"]


def test_unknown_group_size_is_an_argparse_error(wide, capsys):
    with pytest.raises(SystemExit) as exit_:
        quantize.main(["--checkpoint_path", str(wide / "model.pth"), "--mode", "int4", "--groupsize", "48"])
    assert exit_.value.code == 2 and "invalid choice: 48" in capsys.readouterr().err
    assert not list(wide.glob("*g48*"))
