"""eval.py: its perplexity against exp of transformers' loss over the same chunks, its KL divergence and
top-1 agreement against figures computed here from transformers' logits in float64 (unquantized and with
the int4 rounding done here), a model against itself, int8 against int4, the CLI's JSON line, and bad input."""
import json
import math
import shutil

import pytest
import torch

from conftest import REPO, fails_cleanly, load_reference, run_script
from rounding import reference_with_int4_weights

import eval as eval_script
from quantize import quantize_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread

# 43 tokens: chunks of 16, 16 and 11, the last shorter. Every chunk is more than 8 tokens, so that all
# of them take the prompt path (dequantized weights, as the rounded transformers model below computes).
TEXT = ("Mixtral is a sparse mixture of experts: a router sends each token to two of its eight experts, "
        "so that a token reads a quarter of the expert weights. Quantized weights trade accuracy for speed.")
CONTEXT = 16
# float32 holds the loss (about ln 32000 = 10.4 nats on random weights) to 2^-24 of its value. transformers
# computes it in float32 (a log-sum-exp over 32000 logits, a mean over a chunk's tokens), and the two models'
# logits come from float32 matmuls summed in orders that differ between implementations and between CPUs
# (AVX2, AVX-512, AMX): each adds errors of a few units in the last place of the loss (measured: 0.4, and
# 0.01 between the two models' logits scored in float64). 64 of them: a relative 4e-6 of the perplexity per
# nat of loss, 4e-5 here; and exp turns an absolute error of the mean loss into that relative error.
LOSS_ULPS = 64


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(TEXT)
    return path


@pytest.fixture(scope="module")
def folder(make_checkpoint, tmp_path_factory):
    """A private copy of the default float32 test checkpoint, for the quantized files written beside it."""
    copy = tmp_path_factory.mktemp("eval") / "gqa_top2"
    shutil.copytree(make_checkpoint("gqa_top2"), copy)  # the hub files too: transformers reads them
    return copy


def evaluate(capsys, checkpoint_path, text_file, *flags) -> dict:
    """eval.py's main in this process, in float32 on the CPU: the JSON object of its last stdout line."""
    eval_script.main([str(a) for a in ("--checkpoint_path", checkpoint_path, "--text", text_file, "--context", CONTEXT,
                                       "--precision", "float32", "--device", "cpu", *flags)])
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def chunk_inputs(tokenizer, context: int) -> list:
    """[BOS] + each chunk of `context` tokens of TEXT, as the issue defines them, written out here: [1, T + 1]."""
    ids = tokenizer.encode(TEXT)
    return [torch.tensor([[tokenizer.bos_id()] + ids[start:start + context]]) for start in range(0, len(ids), context)]


def transformers_perplexity(model, tokenizer, context: int) -> float:
    """exp of transformers' own loss (the mean over a chunk's tokens), weighted by each chunk's tokens."""
    with torch.no_grad():
        losses = [(model(x, labels=x).loss.item(), x.size(1) - 1) for x in chunk_inputs(tokenizer, context)]
    return math.exp(sum(loss * n for loss, n in losses) / sum(n for _, n in losses))


def transformers_log_probs(model, tokenizer) -> torch.Tensor:
    """Next-token log-probabilities of every scored token, from transformers' logits in float64: [N, V]."""
    with torch.no_grad():
        return torch.cat([torch.log_softmax(model(x).logits[0, :-1].double(), dim=-1)
                          for x in chunk_inputs(tokenizer, CONTEXT)])


# ----------------------------------------------------------------------------- perplexity

@pytest.mark.parametrize("name", ["gqa_top2", "mha_top1"])
def test_perplexity_is_exp_of_transformers_loss_over_the_same_chunks(make_checkpoint, name, text_file, tokenizer,
                                                                      capsys):
    checkpoint = make_checkpoint(name)
    n = len(tokenizer.encode(TEXT))
    assert n % CONTEXT and n > 2 * CONTEXT  # two whole chunks and a shorter last one
    result = evaluate(capsys, checkpoint / "model.pth", text_file)
    reference = load_reference(checkpoint)
    expected = transformers_perplexity(reference, tokenizer, CONTEXT)
    tolerance = LOSS_ULPS * 2 ** -24 * math.log(expected)
    assert result["tokens"] == n and set(result) == {"perplexity", "tokens"}
    assert abs(math.log(result["perplexity"]) - math.log(expected)) < tolerance
    # The chunking matters at this tolerance: one chunk of all the tokens scores otherwise.
    assert abs(math.log(transformers_perplexity(reference, tokenizer, n)) - math.log(expected)) > 10 * tolerance


def test_model_against_itself_is_kl_0_and_full_agreement(folder, text_file, capsys):
    result = evaluate(capsys, folder / "model.pth", text_file, "--reference_path", folder / "model.pth")
    assert result["kl_mean"] == result["kl_median"] == result["kl_p99"] == result["kl_max"] == 0
    assert result["top1_agreement"] == 1 and result["reference_perplexity"] == result["perplexity"]


# ----------------------------------------------------------------------------- KL divergence

def test_kl_of_int4_matches_float64_figures_from_transformers(folder, text_file, tokenizer, capsys):
    """The all-int4 checkpoint against its source: eval.py's KL statistics and top-1 agreement against
    the same figures computed here, in float64, from transformers' model and transformers' model with
    every int4 weight rounded as int4 rounds it (which our prompt path equals to 1e-3 of the logits)."""
    path = quantize_checkpoint(folder / "model.pth", "int4:g32:attn4")
    result = evaluate(capsys, path, text_file, "--reference_path", folder / "model.pth")
    reference = load_reference(folder)
    full = transformers_log_probs(reference, tokenizer)  # [N, V]
    rounded = transformers_log_probs(reference_with_int4_weights(reference, 32), tokenizer)
    kl = (full.exp() * (full - rounded)).sum(dim=-1)  # [N]
    expected = dict(kl_mean=kl.mean(), kl_median=kl.quantile(0.5), kl_p99=kl.quantile(0.99), kl_max=kl.max())
    print({key: f"{result[key]:.6f} (transformers {value:.6f})" for key, value in expected.items()})
    # Float32 logits (rounding 1e-7 of them) against float64 ones: 1e-4 of the figures is plenty (measured:
    # 1e-8), and tight enough to tell the direction of the divergence, as the last line checks.
    for key, value in expected.items():
        assert result[key] == pytest.approx(value.item(), rel=1e-4), key
    reversed_kl = (rounded.exp() * (rounded - full)).sum(dim=-1).mean().item()  # KL(model || reference)
    assert result["kl_mean"] != pytest.approx(reversed_kl, rel=2e-4)
    agreement = (full.argmax(dim=-1) == rounded.argmax(dim=-1)).double().mean().item()
    assert abs(result["top1_agreement"] - agreement) <= 1 / kl.numel()  # at most one token's argmax on a near-tie
    assert kl.mean() > 1e-3  # int4 visibly moves the distributions: the comparison is not vacuous


def test_kl_of_int8_is_below_int4_and_both_above_0(folder, text_file, capsys):
    """int8, int4 with int8 attention and head (quantize.py's default int4), and int4 everywhere, against
    the float32 source: more rounding, more divergence."""
    kl = {}
    for label, path in (("int8", quantize_checkpoint(folder / "model.pth", "int8")),
                        ("int4", quantize_checkpoint(folder / "model.pth", "int4:g32")),
                        ("int4 everywhere", quantize_checkpoint(folder / "model.pth", "int4:g32:attn4"))):
        kl[label] = evaluate(capsys, path, text_file, "--reference_path", folder / "model.pth")["kl_mean"]
    print(kl)
    assert 0 < kl["int8"] < kl["int4"] < kl["int4 everywhere"]


# ----------------------------------------------------------------------------- the CLI

def test_cli_prints_a_table_and_ends_with_the_json_line(folder, text_file):
    result = run_script(REPO / "eval.py", "--checkpoint_path", folder / "model.pth", "--text", text_file,
                        "--reference_path", folder / "model.pth", "--context", CONTEXT, "--device", "cpu",
                        env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    *table, last = result.stdout.strip().splitlines()
    figures = json.loads(last)
    assert set(figures) == {"perplexity", "tokens", "reference_perplexity", "kl_mean", "kl_median", "kl_p99", "kl_max",
                            "top1_agreement"}
    assert f"{figures['perplexity']:.4f}" in "\n".join(table) and "100.00 %" in "\n".join(table)
    # the progress bar counts the 3 chunks as they are scored (the text is read as it goes: no total ahead)
    assert "chunks: 3chunk" in result.stderr


def test_help_states_the_convention(capsys):
    with pytest.raises(SystemExit):
        eval_script.parse_args(["--help"])
    assert "the first predicted from BOS alone" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("case", ["missing text", "empty text", "context 1", "context past the block size",
                                  "another model"])
def test_bad_input_is_one_line(case, make_checkpoint, folder, text_file, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n")
    argv = {"missing text": ["--text", tmp_path / "nothing.txt"],
            "empty text": ["--text", empty],
            "context 1": ["--text", text_file, "--context", 1],
            "context past the block size": ["--text", text_file, "--context", 2049],
            "another model": ["--text", text_file, "--reference_path", make_checkpoint("mha_top1") / "model.pth"]}[case]
    words = {"missing text": ["nothing.txt", "not found"], "empty text": ["empty"], "context 1": ["--context", "2"],
             "context past the block size": ["2049", "2048"],
             "another model": ["--reference_path", "n_layer 2", "has 3"]}[case]
    fails_cleanly(eval_script.main, ["--checkpoint_path", folder / "model.pth", "--device", "cpu", *argv], capsys, *words)


def test_default_context_is_512_or_the_models_if_shorter(folder, text_file, tmp_path, capsys):
    """The shipped tiny model's context is 256 tokens: the default of 512 failed on it. Without --context, a
    model with 20 positions scores chunks of 20 (43 tokens: 20, 20 and 3), and this one, of 2048, chunks of 512."""
    short = tmp_path / "short"
    short.mkdir()
    for name in ("model.pth", "tokenizer.model"):
        (short / name).symlink_to(folder / name)
    config = json.loads((folder / "config.json").read_text())
    (short / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 20}))
    for path, context in ((short / "model.pth", 20), (folder / "model.pth", 512)):
        eval_script.main([str(a) for a in ("--checkpoint_path", path, "--text", text_file, "--precision", "float32",
                                           "--device", "cpu")])
        out, err = capsys.readouterr()
        assert f"tokens in chunks of {context}," in out and json.loads(out.splitlines()[-1])["tokens"] == 43
        assert ("chunks: 3chunk" if context == 20 else "chunks: 1chunk") in err  # the progress bar over the chunks


# ----------------------------------------------------------------------------- scored as llama-perplexity scores

def llama_cpp_inputs(tokenizer, context: int) -> list:
    """llama-perplexity's chunks, written out here from its convention: BOS and the text's tokens, cut into whole
    chunks of `context` (the rest dropped), each chunk's first token replaced by BOS: [1, context] each."""
    tokens = [tokenizer.bos_id()] + tokenizer.encode(TEXT)
    whole = len(tokens) // context * context
    return [torch.tensor([[tokenizer.bos_id()] + tokens[s + 1:s + context]]) for s in range(0, whole, context)]


def test_like_llama_cpp_scores_the_second_half_of_its_chunks(folder, text_file, tokenizer, capsys):
    """scripts/eval_like_llama_cpp.py on the all-int4 checkpoint: its perplexity, the reference's and the KL mean
    are those computed here in float64 from transformers' logits (the int4 rounding done here) over the
    predictions llama-perplexity scores: positions context/2 .. context - 2 of each whole chunk."""
    from scripts import eval_like_llama_cpp
    path = quantize_checkpoint(folder / "model.pth", "int4:g32:attn4")
    eval_like_llama_cpp.main([str(a) for a in (path, "--reference_path", folder / "model.pth", "--text", text_file,
                                               "--context", CONTEXT, "--precision", "float32")])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    models = load_reference(folder), reference_with_int4_weights(load_reference(folder), 32)
    first = CONTEXT // 2
    with torch.no_grad():
        full, rounded = (torch.cat([torch.log_softmax(m(x).logits[0, first:-1].double(), dim=-1)
                                    for x in llama_cpp_inputs(tokenizer, CONTEXT)]) for m in models)  # [N, V]
    targets = torch.cat([x[0, first + 1:] for x in llama_cpp_inputs(tokenizer, CONTEXT)])  # [N]
    assert result["tokens"] == targets.numel() == 2 * (CONTEXT // 2 - 1)  # 44 tokens with BOS: two whole chunks
    # Float32 logits against float64 ones: as test_kl_of_int4_matches_float64_figures_from_transformers.
    for key, log_probs in (("reference_perplexity", full), ("perplexity", rounded)):
        nll = -log_probs.gather(-1, targets[:, None]).mean().item()
        assert abs(math.log(result[key]) - nll) < LOSS_ULPS * 2 ** -24 * nll, key
    kl = (full.exp() * (full - rounded)).sum(dim=-1)
    assert result["kl_mean"] == pytest.approx(kl.mean().item(), rel=1e-4) and kl.mean() > 1e-3
