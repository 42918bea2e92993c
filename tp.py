# Tensor parallelism under torchrun: each of N ranks holds 1/N of every attention layer (a slice of
# the heads) and 1/N of every expert (a slice of its intermediate dimension). A rank's attention and
# MoE outputs are then partial sums, and one all-reduce after each block adds them up. Embeddings,
# norms, the router and the output layer are small next to the experts and stay whole on every rank.
#
#   torchrun --standalone --nproc_per_node=N generate.py ...   (NCCL on GPUs, gloo with --device cpu)
#
# Shapes in comments: N ranks, H query heads, KV key/value heads, Dh head width, D model width,
# E experts, I expert width.
import os
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed import _functional_collectives as funcol

from errors import UserError
from formats import stored_name
from layers import Attention, FormattedWeights, MOEFeedForward
from model import ModelArgs, Transformer


def maybe_init_dist(device: str) -> Optional[int]:
    """Joins the process group when torchrun started this process and returns its rank; None when
    running alone (no RANK/WORLD_SIZE, or a world of one: nothing to shard)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if world_size < 2:
        return None
    on_gpu = device.startswith("cuda")
    if on_gpu:
        torch.cuda.set_device(rank_device(device))
    dist.init_process_group("nccl" if on_gpu else "gloo", rank=rank, world_size=world_size)
    return rank


def rank_device(device: str) -> str:
    """Each process drives the GPU of its local rank on its node; CPU ranks share the CPU."""
    return f"cuda:{int(os.environ['LOCAL_RANK'])}" if device.startswith("cuda") else device


def broadcast_from_rank0(obj):
    """Rank 0's obj on every rank: for input only rank 0 reads (every rank shares torchrun's stdin)."""
    objs = [obj]
    dist.broadcast_object_list(objs, src=0)
    return objs[0]


def check_divisible(config: ModelArgs, world_size: int):
    """Every rank must hold whole heads and an equal share of I: refuse, naming the dimension."""
    for name, hf_name, size in (("n_head", "num_attention_heads", config.n_head),
                                ("n_local_heads", "num_key_value_heads", config.n_local_heads),
                                ("intermediate_size", "intermediate_size", config.intermediate_size)):
        if size % world_size:
            raise UserError(f"tensor parallelism over {world_size} ranks needs {name} ({hf_name} in config.json, "
                             f"{size}) to be a multiple of {world_size}; use a world size that divides it")


def check_whole_groups(model: Transformer, world_size: int):
    """Weights sliced along their inputs (wo by heads, w2 by I) must leave each rank whole groups of a
    grouped format (int4, the block types), each in its own format: refuse otherwise, naming the dimension
    and the group size."""
    config = model.config
    for layer in model.layers:
        for what, inputs, fmt in (
                ("wo's inputs (num_attention_heads * head_dim)", config.n_head * config.head_dim, layer.attention.wo.format),
                ("w2's inputs (intermediate_size)", config.intermediate_size, layer.block_sparse_moe.formats["w2"])):
            problem = fmt.row_problem(inputs // world_size)
            if problem:
                raise UserError(f"tensor parallelism over {world_size} ranks gives each rank {inputs // world_size} "
                                f"of {what}, {inputs}, which {problem}; use fewer ranks or a checkpoint quantized "
                                f"with smaller groups")


def _chunk(t: torch.Tensor, axis: int, rank: int, world_size: int) -> torch.Tensor:
    """This rank's contiguous 1/N of t along axis, copied out: from an mmapped checkpoint only the
    pages of that slice are read, and nothing keeps the whole tensor alive."""
    return t.chunk(world_size, axis)[rank].clone(memory_format=torch.contiguous_format)


def _slice_weight(module: FormattedWeights, name: str, axis: int, take):
    """Replaces weight `name` of module (axis -2: its output rows, -1: its input columns) by
    take(tensor, axis), and each companion tensor of its format (int8 and int4 scales) by its matching slice."""
    for key in module.keys[name]:
        stored_axis = module.formats[name].stored_axis(key, axis)
        if stored_axis is not None:
            attribute = stored_name(name, key)
            setattr(module, attribute, take(getattr(module, attribute), stored_axis))


@torch.no_grad()
def shard_attention(attn: Attention, rank: int, world_size: int):
    """Rank r holds query heads [r*H/N, (r+1)*H/N) and the key/value heads they read,
    [r*KV/N, (r+1)*KV/N) (the same GQA grouping, since H/N = (KV/N) * H/KV): those rows of each of
    wqkv's q, k and v blocks (and of its scales), and the matching input columns of wo. Its wo
    output is a partial sum over its heads; wo's int8 scales (one per output row) stay whole, its int4
    group scales go with their inputs."""
    q_size, kv_size = attn.n_head * attn.head_dim, attn.n_local_heads * attn.head_dim

    def own_rows(t, axis):  # (H + 2*KV) * Dh rows -> (H + 2*KV) / N * Dh rows, still [q | k | v]
        return torch.cat([_chunk(part, axis, rank, world_size) for part in t.split([q_size, kv_size, kv_size], axis)], axis)

    if "weight" in attn.wqkv.formats:
        _slice_weight(attn.wqkv, "weight", -2, own_rows)
    else:  # stored in parts (a GGUF file's q, k and v in different formats): each part's own heads
        for part in "qkv":
            _slice_weight(attn.wqkv, part, -2, lambda t, axis: _chunk(t, axis, rank, world_size))
    _slice_weight(attn.wo, "weight", -1, lambda t, axis: _chunk(t, axis, rank, world_size))  # [D, H*Dh] -> [D, H/N * Dh]
    # The forward splits q/k/v and sizes the KV cache by these counts.
    attn.n_head //= world_size
    attn.n_local_heads //= world_size


@torch.no_grad()
def shard_experts(moe: MOEFeedForward, rank: int, world_size: int):
    """Rank r holds rows [r*I/N, (r+1)*I/N) of every expert's intermediate dimension: those rows of
    w1 and w3 (and their scales) and the matching input columns of w2. SwiGLU acts row by row of I,
    so the output is a partial sum over its rows; w2's int8 scales stay whole, its int4 group scales go
    with their inputs. The router stays whole: every rank sends each token to the same experts."""
    take = lambda t, axis: _chunk(t, axis, rank, world_size)  # noqa: E731
    for name, axis in (("w1", -2), ("w3", -2), ("w2", -1)):  # w1/w3 [E, I, D] -> [E, I/N, D]; w2 [E, D, I] -> [E, D, I/N]
        _slice_weight(moe, name, axis, take)


def all_reduce_output(module: nn.Module):
    """Sums the ranks' partial outputs after module runs. The functional all-reduce returns a new
    tensor instead of writing in place, so torch.compile traces it into the graph."""
    module.register_forward_hook(lambda _module, _inputs, output: funcol.all_reduce(output, "sum", dist.group.WORLD))


def apply_tp(model: Transformer, rank: int, world_size: int):
    """Shards model (built by layers.build_model, in any weight format) in place for this rank:
    call it on the mmapped weights, before moving the model to its device, so that each rank only
    ever reads and holds its own slices."""
    check_divisible(model.config, world_size)
    check_whole_groups(model, world_size)
    for layer in model.layers:
        shard_attention(layer.attention, rank, world_size)
        shard_experts(layer.block_sparse_moe, rank, world_size)
        all_reduce_output(layer.attention)
        all_reduce_output(layer.block_sparse_moe)
