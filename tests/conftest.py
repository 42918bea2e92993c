"""Shared fixtures: small random-weight Mixtral checkpoints in the exact hub layout, converted by the
real converter, and the reference implementation (Hugging Face transformers) loaded from the same files."""
import contextlib
import os
import signal
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

# tests/test_triton.py runs the GPU kernels on CPU tensors through Triton's interpreter. Triton reads
# TRITON_INTERPRET whenever @triton.jit decorates a function: its own library's (tl.max, tl.cdiv, ...)
# when triton is first imported, which torch._dynamo's import does (so in every session, before any
# test runs), and kernels/triton_moe.py's when test_triton imports it; and again in modules the
# interpreter imports as it runs them. So triton is imported here with the variable set for that import
# only, and test_triton sets it again for its own tests. No other test, and no process a test starts,
# sees it (the CPU paths never import the kernels).
with pytest.MonkeyPatch.context() as patch:
    patch.setenv("TRITON_INTERPRET", "1")
    try:
        import triton  # noqa: F401
    except ImportError:  # no triton: test_triton fails on its own, the other tests never need it
        pass

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# A run started in the background by a non-interactive shell inherits SIGINT ignored, and so would every child
# it starts: the tests that press Ctrl-C in a child (a terminal's, or a process's own SIGINT) need the default
# that an interactive terminal gives. A handled signal is reset to its default in a child; an ignored one is not.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# The README's commands run end to end (minutes of subprocesses): collected only when asked, as CI does.
README_TESTS_VARIABLE = "MIXTRAL_README_TESTS"
collect_ignore = [] if os.environ.get(README_TESTS_VARIABLE, "") not in ("", "0") else ["test_readme.py"]

from scripts.convert_hf_checkpoint import convert_hf_checkpoint  # noqa: E402
from scripts.make_tiny_checkpoint import write_hub_checkpoint  # noqa: E402

import fake_hub  # noqa: E402

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
    """make_checkpoint(name) -> folder with the hub files and the converted model.pth (cached). The seed
    comes from the name, so a checkpoint's weights do not depend on which test made it first."""
    made = {}

    def make(name: str, dtype=torch.float32, n_shards: int = 2) -> Path:
        key = (name, dtype, n_shards)
        if key not in made:
            folder = tmp_path_factory.mktemp(f"{name}-{str(dtype)[6:]}-{n_shards}")
            write_hub_checkpoint(folder, CONFIGS[name], tokenizer_path, seed=zlib.crc32(name.encode()), dtype=dtype, n_shards=n_shards)
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
    from checkpoint import load_model, open_checkpoint
    model = load_model(open_checkpoint(folder / "model.pth"), "cpu", dtype)
    model.setup_caches(max_batch_size=1, max_seq_length=max_seq_length)
    return model


def small_random_model(n_layer: int) -> tuple:
    """(config, model.py's Transformer) of a small shape (64 wide, 4 experts of 128, 64 tokens), seeded, each
    weight Gaussian with rows of unit scale (1/sqrt of the inputs), for tests of a model built in memory."""
    from model import ModelArgs, Transformer
    torch.manual_seed(0)
    config = ModelArgs(n_layer=n_layer, dim=64, n_head=4, n_local_heads=2, head_dim=16, intermediate_size=128,
                       num_experts=4, num_activated_experts=2, vocab_size=64, block_size=64)
    model = Transformer(config)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    return config, model


@contextlib.contextmanager
def one_torch_thread():
    """One torch thread in this process within: on a shared 2-core machine a second OpenMP thread that is
    descheduled stalls every op (decoding measured an order of magnitude slower), and the test models are
    small. Modules whose fixtures run models too hold it for the module (an autouse fixture of their own)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    with one_torch_thread():
        yield


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.float() - ref.float()).norm() / ref.float().norm()).item()


def fails_cleanly(main, argv, capsys, *words) -> str:
    """A script's main(argv), in this process (bad input needs no new interpreter): it must exit
    non-zero with one line on stderr, starting with 'error:' and naming each of words. Returns it."""
    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in argv])
    code = exit_.value.code
    err = capsys.readouterr().err + (f"{code}\n" if isinstance(code, str) else "")  # sys.exit("...") prints on exit
    assert code not in (0, None), err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and "%|" not in line]  # not tqdm's bars
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def run_script(*args, timeout=600, env=None, stdin=None, cwd=REPO, preexec_fn=None):
    """Runs a repo script as a user would, in a fresh process (preexec_fn: run in it first, e.g. to set
    a resource limit)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=full_env, input=stdin, preexec_fn=preexec_fn)


@pytest.fixture(scope="session")
def hub():
    """tests/fake_hub.py's stand-in for the Hugging Face Hub on 127.0.0.1; tests add repos to hub.repos."""
    with fake_hub.serving() as server:
        yield server


# ----------------------------------------------------------------------------- the shipped trained model
# assets/tiny-stdlib (scripts/train_tiny.py): its hub-layout files copied and converted once per session.
TINY_STDLIB = REPO / "assets" / "tiny-stdlib"
# A small checkpoint whose rows are all 256 inputs, as the K-quants' blocks need, with the shipped model's
# vocabulary (2048 pieces: a small output head) and a context of 256 (calibration reads chunks of it).
K_QUANT_WIDE = dict(hidden_size=256, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, rope_theta=1e4,
                    max_position_embeddings=256, vocab_size=2048)


@pytest.fixture(scope="session")
def tiny_stdlib(tmp_path_factory):
    """A folder with the shipped checkpoint's config.json, model.safetensors, tokenizer.model and the
    model.pth the real converter writes from them."""
    import shutil
    folder = tmp_path_factory.mktemp("tiny-stdlib")
    for name in ("config.json", "model.safetensors", "tokenizer.model"):
        shutil.copy(TINY_STDLIB / name, folder / name)
    convert_hf_checkpoint(folder)
    return folder
