"""Tensor parallelism (tp.py) on CPU: generate.py under torchrun with two gloo ranks, against one
process and transformers. Every subprocess has a timeout: a hung collective fails, never hangs."""
import copy
import json

import pytest
import torch

from conftest import CONFIGS, REPO, load_ours, load_reference, relative_error, run_script, small_random_model
from formats import parse_format
from layers import quantize_module
from kernels import cpu as cpu_kernels
from generation import generate, generate_batch
from model import KVCache, ModelArgs
from quantize import quantize_checkpoint
from tp import check_divisible, shard_attention, shard_experts

TORCHRUN = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
TIMEOUT = 300
PROMPT = "Hello, my name is"


def run_two_ranks(folder, *flags):
    result = run_script(*TORCHRUN, "generate.py", "--device", "cpu", "--checkpoint_path", folder / "model.pth",
                        "--prompt", PROMPT, "--max_new_tokens", "24", "--num_samples", "1", "--precision", "float32",
                        *flags, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def one_process_text(folder, tokenizer, temperature: float, top_k=None, seed: int = 1234, prompt=PROMPT,
                     max_new_tokens: int = 24) -> str:
    """What generate.py prints in a single process, run here: same loader, same seeding, same loop
    (a subprocess would spend most of its time importing torch)."""
    ids = torch.tensor([tokenizer.bos_id()] + tokenizer.encode(prompt), dtype=torch.int)
    model = load_ours(folder)
    torch.manual_seed(seed)
    seq = generate(model, ids, max_new_tokens, temperature=temperature, top_k=top_k, eos_id=tokenizer.eos_id())
    return tokenizer.decode(seq.tolist())


def transformers_text(folder, tokenizer) -> str:
    ids = torch.tensor([[tokenizer.bos_id()] + tokenizer.encode(PROMPT)])
    with torch.no_grad():
        out = load_reference(folder).generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                              max_new_tokens=24, pad_token_id=2)
    assert out.size(1) == ids.size(1) + 24  # no early end-of-sequence: all 24 tokens compared
    return tokenizer.decode(out[0].tolist())


def text_of(result) -> str:
    """The streamed text: all rank 0 printed on stdout (the timings go to stderr)."""
    return result.stdout.removesuffix("\n")


def shape_on_each_of_two_ranks(name: str, shape) -> list:
    """Written from the issue, not from tp.py: half of wqkv's rows (q, k and v alike), half of wo's
    input columns, half of every expert's intermediate dimension; everything else whole."""
    shape = list(shape)
    if name.endswith("attention.wqkv.weight"):
        shape[0] //= 2
    elif name.endswith(("attention.wo.weight", "block_sparse_moe.w2")):
        shape[-1] //= 2
    elif name.endswith(("block_sparse_moe.w1", "block_sparse_moe.w3")):
        shape[1] //= 2
    return shape


def test_two_ranks_greedy_text_matches_one_process_and_transformers(checkpoint, tokenizer):
    tp = run_two_ranks(checkpoint, "--temperature", "0")
    expected = transformers_text(checkpoint, tokenizer)
    assert one_process_text(checkpoint, tokenizer, temperature=0) == expected
    assert text_of(tp) == expected
    # Only rank 0 printed: the text and each timing line once.
    assert tp.stdout.count(expected) == 1 and tp.stderr.count("Average tokens/sec") == 1
    assert tp.stderr.count("Time to load model") == 1


def test_two_ranks_sample_a_batch_of_prompts_as_one_process(checkpoint, tokenizer, tmp_path):
    """Sampling draws from each rank's own generator: with the same seed every rank must pick the
    same tokens, or the ranks would feed different tokens into the next all-reduce (garbage text). A
    batch of prompts of different lengths: each sequence at its own positions on every rank."""
    prompts = [PROMPT, "The quick brown fox jumps over the lazy dog"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    tp = run_two_ranks(checkpoint, "--temperature", "1.0", "--top_k", "1000", "--seed", "7",
                       "--prompts_file", tmp_path / "prompts.txt")
    model = load_ours(checkpoint)
    model.setup_caches(max_batch_size=2, max_seq_length=256)
    torch.manual_seed(7)
    ids = [torch.tensor([tokenizer.bos_id()] + tokenizer.encode(p), dtype=torch.int) for p in prompts]
    seqs = generate_batch(model, ids, 24, temperature=1.0, top_k=1000, eos_id=tokenizer.eos_id())
    sampled = "".join(f"== line {n} ==\n{tokenizer.decode(seq.tolist())}\n" for n, seq in enumerate(seqs, 1))
    assert tp.stdout.startswith(sampled), tp.stdout
    assert tokenizer.decode(seqs[0].tolist()) != one_process_text(checkpoint, tokenizer, temperature=0)  # it did sample


def test_interactive_turns_are_read_by_rank_0_and_shared(checkpoint, tokenizer):
    """All ranks inherit torchrun's stdin: rank 0 alone reads each line and broadcasts it, so every
    rank runs the same turn and none is left waiting for a line another rank consumed. The checkpoint
    is a base one: the second line continues the text of the first on a new line, from the cache each rank kept."""
    lines = [PROMPT, "The quick brown fox"]
    result = run_script(*TORCHRUN, "generate.py", "--device", "cpu", "--checkpoint_path", checkpoint / "model.pth",
                        "--max_new_tokens", "24", "--precision", "float32", "--temperature", "0", "--interactive",
                        stdin="".join(f"{line}\n" for line in lines), timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr[-4000:]
    model = load_ours(checkpoint)
    text, answers = [tokenizer.bos_id()], []
    for n, line in enumerate(lines):  # the whole text so far, prefilled at once in one process
        # A later line as SentencePiece tokenizes a line inside a text: from its '\n' on, no space piece before it.
        inside = tokenizer.encode("x\n" + line)
        prompt = text + (tokenizer.encode(line) if n == 0 else inside[inside.index(tokenizer.piece_to_id("<0x0A>")):])
        text = generate(model, torch.tensor(prompt, dtype=torch.int), 24, temperature=0, top_k=None,
                        eos_id=tokenizer.eos_id()).tolist()
        answers.append(tokenizer.decode(text[len(prompt):]).replace("\r", "\n"))  # as run_script's text mode reads it
        text = text[:-1] if text[-1] == tokenizer.eos_id() else text  # plain text goes on after an end
    assert result.stdout == "".join(f"{answer}\n" for answer in answers)  # the answers alone, once: rank 0's
    assert result.stderr.count("What is your prompt?") == 3  # two prompts, then end of input


def test_each_rank_holds_half_of_the_sharded_weights(checkpoint, tmp_path):
    result = run_script(*TORCHRUN, REPO / "tests" / "tp_worker.py", "--checkpoint_path", checkpoint / "model.pth",
                        "--out", tmp_path, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr[-4000:]
    full = torch.load(checkpoint / "model.pth", mmap=True, weights_only=True)  # float32, as loaded
    expected = {name: shape_on_each_of_two_ranks(name, t.shape) for name, t in full.items()}
    full_bytes = sum(t.numel() * 4 for t in full.values())
    sharded_bytes = sum(t.numel() * 4 for name, t in full.items() if expected[name] != list(t.shape))
    for rank in (0, 1):
        held = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert {n: h["shape"] for n, h in held.items()} == expected
        # Storage bytes: a slice still holding its whole checkpoint tensor would count in full.
        held_bytes = sum(h["storage_bytes"] for h in held.values())
        assert held_bytes == full_bytes - sharded_bytes // 2
        print(f"rank {rank}: {held_bytes} of {full_bytes} bytes; sharded part "
              f"{(held_bytes - (full_bytes - sharded_bytes)) / sharded_bytes:.2f} of {sharded_bytes}")


def test_compiled_two_ranks_greedy_text_matches_transformers(tmp_path, tokenizer, tokenizer_path):
    """torch.compile traces the all-reduce hooks (functional collectives) into both graphs, prefill
    and decode. One layer keeps the compile short on two cores."""
    from scripts.convert_hf_checkpoint import convert_hf_checkpoint
    from scripts.make_tiny_checkpoint import write_hub_checkpoint
    write_hub_checkpoint(tmp_path, {**CONFIGS["gqa_top2"], "num_hidden_layers": 1}, tokenizer_path, dtype=torch.float32)
    convert_hf_checkpoint(tmp_path)
    tp = run_two_ranks(tmp_path, "--temperature", "0", "--compile", "--compile_prefill")
    expected = transformers_text(tmp_path, tokenizer)
    # The untimed warm-up that pays for compilation prints nothing: the text once, then one line on stderr.
    assert text_of(tp) == expected
    assert tp.stderr.count("Compilation time") == 1  # rank 0 only


def test_world_size_that_does_not_divide_kv_heads_is_refused_on_every_rank(tmp_path, tokenizer_path):
    from scripts.convert_hf_checkpoint import convert_hf_checkpoint
    from scripts.make_tiny_checkpoint import write_hub_checkpoint
    # 6 query heads and 128 expert rows split over 2 ranks; 3 key/value heads do not.
    cfg = dict(hidden_size=48, intermediate_size=128, num_hidden_layers=1, num_attention_heads=6,
               num_key_value_heads=3, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=256)
    write_hub_checkpoint(tmp_path, cfg, tokenizer_path, dtype=torch.float32)
    convert_hf_checkpoint(tmp_path)
    result = run_script(*TORCHRUN, "generate.py", "--device", "cpu", "--checkpoint_path", tmp_path / "model.pth",
                        "--max_new_tokens", "4", "--num_samples", "1", timeout=120)
    assert result.returncode != 0
    line = ("error: tensor parallelism over 2 ranks needs n_local_heads (num_key_value_heads in config.json, 3) "
            "to be a multiple of 2")
    assert result.stderr.count(line) == 1, result.stderr[-4000:]  # every rank finds it; rank 0 says it
    assert 'generate.py", line' not in result.stderr  # no traceback from a rank (torchrun adds its own)


# ----------------------------------------------------------------------------- in one process

@pytest.mark.parametrize("dim, n_head, n_local_heads, intermediate_size",
                         [("n_head", 3, 1, 64), ("n_local_heads", 6, 3, 64), ("intermediate_size", 4, 2, 65)])
def test_check_divisible_names_the_dimension(dim, n_head, n_local_heads, intermediate_size):
    config = ModelArgs(n_layer=1, dim=24, head_dim=4, vocab_size=10, num_experts=4, n_head=n_head,
                       n_local_heads=n_local_heads, intermediate_size=intermediate_size)
    with pytest.raises(ValueError, match=f"needs {dim} "):
        check_divisible(config, 2)


@pytest.mark.parametrize("fmt", ["full", "int8", "int4"])
def test_rank_shards_sum_to_the_whole_layer_and_carry_their_scales(fmt):
    """Without any process group: each rank's attention and MoE output, summed over ranks, is the
    unsharded output (what the all-reduce computes); int8 scales (one per output row) are sliced with
    their rows and kept whole where the input columns are sliced; int4 group scales follow their
    rows and their groups of inputs."""
    config, model = small_random_model(n_layer=1)
    quantize_module(model, config, parse_format(fmt))  # the modules generate.py loads (int4: groups of 32)
    attn, moe = model.layers[0].attention, model.layers[0].block_sparse_moe
    q, kv, I = 4 * 16, 2 * 16, 128
    int8, int4 = fmt == "int8", fmt == "int4"
    assert (attn.wqkv.weight.dtype == torch.int8) == int8 and (attn.wqkv.weight.dtype == torch.uint8) == int4
    assert hasattr(moe, "w2_scales") == (int8 or int4)

    shards = [copy.deepcopy(model) for _ in range(2)]  # before setup_caches, as in generate.py
    x = torch.randn(1, 5, 64)
    pos = torch.arange(5)
    model.setup_caches(1, 16)
    cos, sin, mask = model.rope_cos[pos], model.rope_sin[pos], pos[:, None] >= torch.arange(16)[None, :]
    with torch.no_grad():
        whole_attn, whole_moe = attn(x, pos, cos, sin, mask), moe(x)
    sum_attn, sum_moe = 0, 0
    for rank, shard in enumerate(shards):
        a, m = shard.layers[0].attention, shard.layers[0].block_sparse_moe
        shard_attention(a, rank, 2)
        shard_experts(m, rank, 2)
        assert (a.n_head, a.n_local_heads) == (2, 1)
        # wqkv keeps [q | k | v], each block cut by heads.
        q_rows = torch.arange(rank * q // 2, (rank + 1) * q // 2)
        k_rows = q + torch.arange(rank * kv // 2, (rank + 1) * kv // 2)
        rows = torch.cat([q_rows, k_rows, k_rows + kv])
        assert torch.equal(a.wqkv.weight, attn.wqkv.weight[rows])
        packed = 2 if int4 else 1  # int4 columns: two inputs a byte
        cols = torch.arange(rank * q // 2 // packed, (rank + 1) * q // 2 // packed)
        assert torch.equal(a.wo.weight, attn.wo.weight[:, cols])
        i_rows = torch.arange(rank * I // 2, (rank + 1) * I // 2)
        assert torch.equal(m.w1, moe.w1[:, i_rows]) and torch.equal(m.w3, moe.w3[:, i_rows])
        i_cols = torch.arange(rank * I // 2 // packed, (rank + 1) * I // 2 // packed)  # w2's stored columns
        assert torch.equal(m.w2, moe.w2[:, :, i_cols])
        if int8:
            assert torch.equal(a.wqkv.scales, attn.wqkv.scales[rows])
            assert torch.equal(a.wo.scales, attn.wo.scales)  # per output row: whole
            assert torch.equal(m.w1_scales, moe.w1_scales[:, i_rows])
            assert torch.equal(m.w3_scales, moe.w3_scales[:, i_rows])
            assert torch.equal(m.w2_scales, moe.w2_scales)
        if int4:  # [..., out, groups]: the rows' scales, and the groups of the rank's inputs
            groups = lambda cols: torch.arange(rank * cols // 64, (rank + 1) * cols // 64)  # noqa: E731
            assert torch.equal(a.wqkv.scales, attn.wqkv.scales[rows])
            assert torch.equal(a.wo.scales, attn.wo.scales[:, groups(q)])
            assert torch.equal(m.w1_scales, moe.w1_scales[:, i_rows]) and torch.equal(m.w3_scales, moe.w3_scales[:, i_rows])
            assert torch.equal(m.w2_scales, moe.w2_scales[:, :, groups(I)])
        assert torch.equal(m.gate.weight, moe.gate.weight)  # the router: whole
        shard.setup_caches(1, 16)  # sized by the rank's own kv heads
        assert shard.layers[0].attention.kv_cache.k_cache.shape == (1, 1, 16, 16)
        with torch.no_grad():
            sum_attn = sum_attn + a(x, pos, cos, sin, mask)
            sum_moe = sum_moe + m(x)
    # The quantized kernels round activations in blocks (int8: to int16 in blocks of 64 values, 2^-15
    # of a block's largest; int4: to int8 in blocks of 32, 1/254 of the largest); a rank's half of the
    # heads or of I starts blocks of its own. int8's halves of 32 and 64 values cut its blocks, so its
    # rounding differs from the whole layer's by about a step; int4's fall on block boundaries, and
    # differ by float32 summation only. Full precision sums to float32 rounding.
    tolerance = dict(rtol=1e-3, atol=1e-4) if int8 else {}
    torch.testing.assert_close(sum_attn, whole_attn, **tolerance)
    torch.testing.assert_close(sum_moe, whole_moe, **tolerance)


def test_two_ranks_of_int4_print_one_process_text_and_build_the_kernels_once(checkpoint, tokenizer, tmp_path):
    """An int4 checkpoint shards with its group scales: 2 ranks print what one int4 process prints (int8
    slices the same way, its scales by rows only: test_rank_shards_sum_to_the_whole_layer_and_carry_their_scales).
    With an empty extension cache both ranks start at once: one compiles the kernels (cpu.cpp and
    cpu_prompt.cpp) while the other waits on the cache's lock, then both load the same library and
    decode with it."""
    import shutil
    folder = tmp_path / "int4"
    shutil.copytree(checkpoint, folder)
    quantize_checkpoint(folder / "model.pth", "int4").replace(folder / "model.pth")  # int4 experts, groups of 32
    cache = tmp_path / "torch_extensions"
    tp = run_script(*TORCHRUN, "generate.py", "--device", "cpu", "--checkpoint_path", folder / "model.pth",
                    "--prompt", PROMPT, "--max_new_tokens", "24", "--num_samples", "1", "--precision", "float32",
                    "--temperature", "0", env={"TORCH_EXTENSIONS_DIR": str(cache)}, timeout=TIMEOUT)
    assert tp.returncode == 0, tp.stderr[-4000:]
    # Rank 0 names the instruction set once (a failed build would say so in a line on each rank), and either
    # built the kernels (it says so, and times the build on a line of its own) or found the other rank
    # building them and says it waits.
    isa = cpu_kernels.choose()[0][0]  # the best set, or the one MIXTRAL_CPU_ISA forces
    notes = [line for line in tp.stderr.splitlines() if "kernels" in line]
    built = [n for n in notes if n.startswith(("building the CPU kernels for", "Time to build the CPU kernels:"))]
    waited = [n for n in notes if n.startswith("waiting for another process's build")]
    assert (len(built), len(waited)) in ((2, 0), (0, 1)), tp.stderr
    assert [n for n in notes if n not in built + waited] == [
        f"CPU kernels: {isa} ({cpu_kernels.ISAS[isa][2]}); MIXTRAL_CPU_ISA={'|'.join(cpu_kernels.supported())} "
        "chooses among this CPU's"], tp.stderr
    # One compilation: ninja logs each object it builds, and a second, racing build would log it again.
    log, = cache.rglob(".ninja_log")
    built = [line.split()[3] for line in log.read_text().splitlines()[1:]]  # in the order they finished
    objects = sorted(f"{source.stem}.o" for source in cpu_kernels.SOURCES)  # one per source, once
    assert sorted(built[:-1]) == objects and built[-1] == f"mixtral_cpu_kernels_{isa}.so", built
    assert text_of(tp) == one_process_text(folder, tokenizer, temperature=0)


def test_a_wqkv_stored_in_parts_shards_each_part_by_its_heads():
    """A GGUF file's q, k and v in different types make wqkv three parts (layers.Linear rows): each rank keeps
    its heads' rows of each part, and the ranks' attention outputs sum to the whole layer's."""
    from formats import parse_scheme
    config, model = small_random_model(n_layer=1)
    scheme = parse_scheme("experts=q8_0,attention=q4_0,output=q8_0,layers.0.attention.wqkv.q=q4_0,"
                          "layers.0.attention.wqkv.k=q4_0,layers.0.attention.wqkv.v=q8_0")
    from layers import build_model
    parted = build_model(config, scheme)
    attn = parted.layers[0].attention
    assert list(attn.wqkv.formats) == ["q", "k", "v"]
    q_rows, kv_rows = 64, 32
    wqkv = model.layers[0].attention.wqkv.weight
    for part, rows in zip("qkv", wqkv.detach().split([q_rows, kv_rows, kv_rows])):
        for key, t in attn.wqkv.formats[part].quantize(rows).items():
            setattr(attn.wqkv, part if not key else f"{part}_{key}", t)
    for key, t in attn.wo.format.quantize(model.layers[0].attention.wo.weight.detach()).items():
        setattr(attn.wo, "weight" if not key else key, t)
    x, pos = torch.randn(1, 5, 64), torch.arange(5)
    parted.setup_caches(1, 16)
    cos, sin, mask = parted.rope_cos[pos], parted.rope_sin[pos], pos[:, None] >= torch.arange(16)[None, :]
    with torch.no_grad():
        whole = attn(x, pos, cos, sin, mask)
    total = 0
    for rank in range(2):
        shard = copy.deepcopy(attn)
        shard_attention(shard, rank, 2)
        assert torch.equal(shard.wqkv.q, attn.wqkv.q[rank * 32:(rank + 1) * 32])
        assert torch.equal(shard.wqkv.v, attn.wqkv.v[rank * 16:(rank + 1) * 16])
        shard.kv_cache = KVCache(1, 16, shard.n_local_heads, 16, torch.float32)  # the rank's own kv heads
        with torch.no_grad():
            total = total + shard(x, pos, cos, sin, mask)
    assert relative_error(total, whole) < 1e-5
