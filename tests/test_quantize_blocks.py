"""quantize.py writing GGUF's block types into a checkpoint, end to end: on checkpoints whose every quantized weight
already lies on the type's grid (blocks read back by the gguf package), the file holds those weights exactly, and
greedy text agrees with transformers' float32 model of the same weights."""
import pytest
import torch
from gguf import GGMLQuantizationType, quants as gguf_quants

from conftest import K_QUANT_WIDE as WIDE, TINY_STDLIB, load_reference, one_torch_thread

import quants
from checkpoint import load_model, open_checkpoint
from kernels import cpu as cpu_kernels
from quantize import quantize_checkpoint
from rounding import QUANTIZED_HF
from scripts.convert_hf_checkpoint import convert_hf_checkpoint
from scripts.make_tiny_checkpoint import write_hub_checkpoint

GGUF_TYPES = {"q8_0": GGMLQuantizationType.Q8_0, "q4_0": GGMLQuantizationType.Q4_0,
              "q4_k": GGMLQuantizationType.Q4_K, "q5_k": GGMLQuantizationType.Q5_K,
              "q6_k": GGMLQuantizationType.Q6_K}
PROMPT = "def main():\n    "


@pytest.fixture(scope="module", autouse=True)
def one_thread_for_the_module():
    with one_torch_thread():  # the module's fixtures run models too
        yield


def on_grid(name: str, w: torch.Tensor) -> torch.Tensor:
    """w moved onto the grid of block type `name`: its blocks as the gguf package reads them back, quantized and
    read back again until they no longer change (the scale searches may settle a block on a neighbouring grid
    the first times). A block the search still moves after 8 rounds (it can alternate between two grids: one
    block in 8,192 of a q5_k output head here) is set to zeros, which every type stores exactly; such blocks
    must stay rare."""
    qk = quants.BLOCKS[name][0]
    for _ in range(8):
        blocks = quants.quantize(name, w).numpy()
        back = torch.from_numpy(gguf_quants.dequantize(blocks, GGUF_TYPES[name])).reshape(w.shape).float()
        if torch.equal(back, w):
            return w
        moving = (back != w).unflatten(-1, (-1, qk)).any(-1)  # [..., blocks]
        w = back
    assert moving.float().mean() < 1e-3, f"{name}: {moving.sum()} of {moving.numel()} blocks never settle"
    return torch.where(moving.repeat_interleave(qk, dim=-1), 0.0, w)


def grid_checkpoint(folder, name: str):
    """A random hub-layout checkpoint (float32) whose attention, experts and output head lie on the grid."""
    from safetensors.torch import load_file
    write_hub_checkpoint(folder, WIDE, TINY_STDLIB / "tokenizer.model", seed=11, dtype=torch.float32, n_shards=1)
    tensors = load_file(folder / "model.safetensors")
    tensors = {k: on_grid(name, t) if k.endswith(QUANTIZED_HF) or ".experts." in k else t for k, t in tensors.items()}
    write_hub_checkpoint(folder, WIDE, TINY_STDLIB / "tokenizer.model", dtype=torch.float32, n_shards=1, tensors=tensors)
    convert_hf_checkpoint(folder)
    return folder


@pytest.mark.parametrize("name", list(GGUF_TYPES))
def test_grid_weights_are_stored_exactly_and_greedy_text_agrees_with_transformers(name, tmp_path):
    import sentencepiece as spm
    folder = grid_checkpoint(tmp_path, name)
    path = quantize_checkpoint(folder / "model.pth", f"experts={name},attention={name},output={name}")
    source = torch.load(folder / "model.pth", weights_only=True)
    stored = torch.load(path, weights_only=True)
    qk, size = quants.BLOCKS[name]
    for weight in ("layers.1.attention.wqkv.weight", "layers.0.block_sparse_moe.w2", "output.weight"):
        assert stored[weight].dtype == torch.uint8 and stored[weight].shape[-2:] == (source[weight].shape[-1] // qk, size)
        back = gguf_quants.dequantize(stored[weight].flatten(-2).numpy(), GGUF_TYPES[name])
        assert torch.equal(torch.from_numpy(back).reshape(source[weight].shape), source[weight]), weight

    tokenizer = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    ids = [tokenizer.bos_id()] + tokenizer.encode(PROMPT)
    n = 12
    reference = load_reference(folder)
    ours = load_model(open_checkpoint(path), "cpu", torch.float32)
    with torch.no_grad():
        out = reference.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=n, pad_token_id=2)[0]
        full = reference(out[None]).logits[0, len(ids) - 1:-1]  # [n, V]: the logits of each new token
    # PyTorch's path holds float32 arithmetic on the same weights: within float32's rounding of transformers'.
    # (The CPU kernels round each token's activations to int8 in blocks of 32, as llama.cpp does for these
    # types, which may flip a near tie of this random model's router: tests/test_kernels_gguf.py holds them
    # to a float64 model of that arithmetic instead.)
    with cpu_kernels.turned_off():
        trusted = greedy_agrees(ours, out, ids, full, 1e-3)
    print(f"{name}: PyTorch's path, {trusted} of {n} steps before a close call")
    assert trusted >= 6  # the comparison is not vacuous


def greedy_agrees(ours, out, ids, full, bound) -> int:
    """Ours greedy along transformers' tokens `out` (prompt ids): its logits within bound (of the largest)
    of transformers' `full`, and its choices the same up to the first step whose top two are closer than
    the error; returns how many steps that is."""
    ours.setup_caches(max_batch_size=1, max_seq_length=64)
    with torch.no_grad():
        mine = [ours(out[None, :len(ids)], torch.arange(len(ids)))[0, -1]]
        mine += [ours(out[None, i:i + 1], torch.tensor([i]))[0, -1] for i in range(len(ids), len(out) - 1)]
    mine = torch.stack(mine)
    err = (mine - full).abs().amax(dim=-1)  # [n]
    assert err.max() < bound * full.abs().max()
    top2 = full.topk(2, dim=-1).values
    close = (top2[:, 0] - top2[:, 1] < 2 * err).tolist() + [True]
    trusted = close.index(True)  # steps before the first close call
    assert mine.argmax(-1)[:trusted].tolist() == out[len(ids):len(ids) + trusted].tolist()
    return trusted
