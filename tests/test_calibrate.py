"""calibrate.py and quantize.py --calibration_text / --imatrix: the statistics against transformers' model read
by hooks and float64 arithmetic written here, the calibrated quantization's smaller weighted error where inputs
have outlier channels, reuse of a saved file byte for byte, and the files that are refused."""
import shutil

import pytest
import torch

from conftest import K_QUANT_WIDE as WIDE, REPO, TINY_STDLIB, fails_cleanly, load_reference, one_torch_thread

import calibrate
import quantize
from checkpoint import load_state_dict, open_checkpoint
from formats import detect_format, parse_scheme
from scripts.convert_hf_checkpoint import convert_hf_checkpoint
from scripts.make_tiny_checkpoint import write_hub_checkpoint


@pytest.fixture(scope="module", autouse=True)
def one_thread_for_the_module():
    with one_torch_thread():  # the module's fixtures run models too
        yield


OUTLIERS = 4  # channels of every norm scaled up (make_tiny_checkpoint.OUTLIER_SCALE), as trained models' are
TEXT = (REPO / "model.py").read_text()[:6000]  # any text: about 2,400 of the stdlib tokenizer's tokens


def outlier_checkpoint(folder, seed):
    write_hub_checkpoint(folder, WIDE, TINY_STDLIB / "tokenizer.model", seed=seed, dtype=torch.float32, n_shards=1,
                         norm_outliers=OUTLIERS)
    convert_hf_checkpoint(folder)
    return folder / "model.pth"


@pytest.fixture(scope="module")
def outliers(tmp_path_factory):
    """(model.pth of the 256-wide checkpoint with outlier channels, the calibration text's path)."""
    text = tmp_path_factory.mktemp("text") / "calibration.txt"
    text.write_text(TEXT)
    return outlier_checkpoint(tmp_path_factory.mktemp("outliers"), seed=3), text


@pytest.fixture(scope="module")
def calibrated(outliers, tmp_path_factory):
    """{'plain', 'calibrated', 'reused'}: the q4_k_m files written without statistics, with --calibration_text, and
    with --imatrix on the file that wrote; and the statistics file."""
    path, text = outliers
    files = {}
    for kind, flags in (("plain", []), ("calibrated", ["--calibration_text", text]),
                        ("reused", ["--imatrix", calibrate.imatrix_path(path)])):
        quantize.main(["--checkpoint_path", str(path), "--format", "q4_k_m", *map(str, flags)])
        files[kind] = tmp_path_factory.mktemp(kind) / "model_q4_k_m.pth"
        shutil.move(path.with_name("model_q4_k_m.pth"), files[kind])
    files["imatrix"] = calibrate.imatrix_path(path)
    return files


# ----------------------------------------------------------------------------- the statistics

def test_statistics_are_transformers_inputs_mean_squares(make_checkpoint, tmp_path):
    """Every weight's statistics equal the mean squares, computed here in float64, of what transformers' model
    feeds that weight (hooks on its projections and experts), over the same chunks after BOS; for the experts
    over the tokens routed to each expert, the hidden state h of each expert computed here from its weights."""
    folder = make_checkpoint("gqa_top2")  # float32, 4 experts of 128, top 2; context 2048: chunks of 512
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    checkpoint = open_checkpoint(folder / "model.pth")
    stats, metadata = calibrate.calibrate(checkpoint, text)
    config = checkpoint.config

    import sentencepiece as spm
    tokenizer = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    ids = tokenizer.encode(TEXT)
    assert metadata["tokens"] == str(len(ids)) and metadata["text"] == "text.txt"
    chunks = [ids[i:i + 511] for i in range(0, len(ids), 511)]
    assert len(chunks) >= 3  # several chunks, the last a short one

    reference = load_reference(folder)
    sums = {name: torch.zeros(shape, dtype=torch.float64) for name, shape in calibrate.importance_shapes(config).items()}
    counts = {name: torch.zeros(shape[:-1], dtype=torch.float64) for name, shape in calibrate.importance_shapes(config).items()}
    margins = []

    def add(name, x, expert=None):
        x = x.reshape(-1, x.shape[-1]).double()
        if expert is None:
            sums[name] += (x * x).sum(0)
            counts[name] += x.shape[0]
        else:
            sums[name][expert] += (x * x).sum(0)
            counts[name][expert] += x.shape[0]

    def experts_hook(i, block):
        def hook(module, args):
            x, chosen = args[0].double(), args[1]  # [N, D], transformers' routing [N, K]
            probs = torch.softmax(x @ block.gate.weight.double().T, dim=-1)  # [N, E]
            top = probs.topk(config.num_activated_experts + 1, dim=-1).values
            margins.append((top[:, -2] - top[:, -1]).min().item())
            for e in range(config.num_experts):
                xe = x[(chosen == e).any(-1)]
                gate, up = (xe @ module.gate_up_proj[e].double().T).chunk(2, dim=-1)
                for w in ("w1", "w3"):
                    add(f"layers.{i}.block_sparse_moe.{w}", xe, e)
                add(f"layers.{i}.block_sparse_moe.w2", torch.nn.functional.silu(gate) * up, e)
        return hook

    hooks = []
    for i, layer in enumerate(reference.model.layers):
        hooks.append(layer.self_attn.q_proj.register_forward_pre_hook(
            lambda m, args, i=i: add(f"layers.{i}.attention.wqkv.weight", args[0])))
        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(
            lambda m, args, i=i: add(f"layers.{i}.attention.wo.weight", args[0])))
        hooks.append(layer.mlp.experts.register_forward_pre_hook(experts_hook(i, layer.mlp)))
    hooks.append(reference.lm_head.register_forward_pre_hook(lambda m, args: add("output.weight", args[0])))
    with torch.no_grad():
        for chunk in chunks:
            reference(torch.tensor([[tokenizer.bos_id()] + chunk]))
    # Both models route alike: no token's K-th and next router probabilities are within float32 rounding (a few
    # units of 2^-24 per operation, over a few layers) of each other.
    assert min(margins) > 1e-6
    assert set(stats) == set(sums)
    for name, s in sums.items():
        want = s / counts[name][..., None]
        assert (counts[name] > 0).all()  # every expert saw tokens: the means are all the file holds
        torch.testing.assert_close(stats[name].double(), want, rtol=1e-4, atol=0, msg=name)
    # The expert counts are what routing gave: K choices per token, over all experts.
    assert counts["layers.0.block_sparse_moe.w1"].sum() == config.num_activated_experts * (len(ids) + len(chunks))


# ----------------------------------------------------------------------------- quantizing with them

def weighted_errors(path, source, importance) -> dict:
    """{weight: sum over inputs j of importance_j * sum over rows (w - w stored)^2} of a quantized file."""
    stored = torch.load(path, weights_only=True)
    scheme = detect_format(stored)
    errors = {}
    for name, imp in importance.items():
        fmt = scheme.format_of(name)
        w = source[name].double()
        back = fmt.dequantize({"": stored[name]}, torch.float64)
        errors[name] = ((w - back) ** 2 * imp.double()[..., None, :]).sum().item()
    return errors


def test_calibrated_quantization_errs_less_where_the_inputs_are_large(outliers, calibrated):
    """On inputs with outlier channels, each weight's error weighted by its inputs' mean squares (the expected
    squared error of its outputs) is smaller with the statistics than without, and a quarter smaller over the
    model."""
    path, _ = outliers
    importance, _ = calibrate.load_imatrix(calibrated["imatrix"], open_checkpoint(path), load_state_dict(open_checkpoint(path)))
    source = load_state_dict(open_checkpoint(path))
    plain = weighted_errors(calibrated["plain"], source, importance)
    tuned = weighted_errors(calibrated["calibrated"], source, importance)
    worse = [name for name in plain if tuned[name] >= plain[name]]
    assert not worse, worse
    assert sum(tuned.values()) < 0.75 * sum(plain.values()), (sum(tuned.values()), sum(plain.values()))


def test_a_saved_imatrix_gives_the_same_bytes_as_calibrating_again(calibrated):
    written, reused = (torch.load(calibrated[k], weights_only=True) for k in ("calibrated", "reused"))
    assert written.keys() == reused.keys()
    assert all(torch.equal(written[name], reused[name]) for name in written)
    plain = torch.load(calibrated["plain"], weights_only=True)  # and the statistics changed something
    assert not all(torch.equal(written[name], plain[name]) for name in written)


def test_the_file_names_its_text_and_model(outliers, calibrated):
    from safetensors import safe_open
    path, text = outliers
    with safe_open(str(calibrated["imatrix"]), framework="pt") as f:
        metadata = f.metadata()
    assert metadata["text"] == text.name and int(metadata["tokens"]) > 2000
    assert metadata["model"] == calibrate.model_fingerprint(open_checkpoint(path).config, load_state_dict(open_checkpoint(path)))


# ----------------------------------------------------------------------------- refused

@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    """The same shapes, other weights: a retraining, as far as a file of statistics can tell."""
    return outlier_checkpoint(tmp_path_factory.mktemp("other"), seed=4)


@pytest.mark.parametrize("case, words", [
    ("other model", ["another model"]),
    ("other shapes", ["does not fit", "layers.0.attention.wqkv.weight"]),
    ("not statistics", ["not calibration statistics"]),
    ("missing", ["not found"]),
    ("both", ["keep one"]),
])
def test_a_mismatched_imatrix_is_one_line_and_no_file(case, words, outliers, calibrated, other_model, make_checkpoint,
                                                      tmp_path, capsys):
    imatrix, text = calibrated["imatrix"], outliers[1]
    target, extra = other_model, []
    if case == "other shapes":
        target = make_checkpoint("gqa_top2") / "model.pth"  # 64 wide
    elif case == "not statistics":
        from safetensors.torch import save_file
        imatrix = tmp_path / "foreign.safetensors"
        save_file({"x": torch.zeros(2)}, str(imatrix))
    elif case == "missing":
        imatrix = tmp_path / "nothing.safetensors"
    elif case == "both":
        extra = ["--calibration_text", text]
    before = set(target.parent.iterdir())
    fails_cleanly(quantize.main, ["--checkpoint_path", target, "--format", "int4:g32", "--imatrix", imatrix, *extra],
                  capsys, *words)
    assert set(target.parent.iterdir()) == before


def test_an_empty_calibration_text_is_refused(outliers, tmp_path, capsys):
    path, _ = outliers
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    fails_cleanly(quantize.main, ["--checkpoint_path", path, "--format", "q4_k_m", "--calibration_text", empty],
                  capsys, "empty")
    assert not path.with_name("model_q4_k_m.pth.tmp").exists()


def test_presets_name_their_files(calibrated, outliers):
    """The file's name and its detected scheme are the preset's."""
    path, _ = outliers
    assert calibrated["plain"].name == "model_q4_k_m.pth"
    scheme = detect_format(torch.load(calibrated["plain"], weights_only=True))
    assert scheme.spec == "q4_k_m" and scheme == parse_scheme("q4_k_m", open_checkpoint(path).config)
