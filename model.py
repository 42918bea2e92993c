# Mixtral in one file: config, RMSNorm, rotary embeddings, grouped-query attention with a static
# KV cache, the sparse mixture-of-experts feed-forward, and the Transformer that stacks them.
#
# Shapes in comments use: B batch, T tokens in this call, S cache length, D model width,
# H query heads, KV key/value heads, Dh head width, E experts, K experts per token, I expert width.
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from errors import UserError


@dataclass
class ModelArgs:
    block_size: int = 32768  # longest sequence the rotary table and the cache may hold
    vocab_size: int = 32000
    n_layer: int = 32
    n_head: int = 32
    dim: int = 4096
    intermediate_size: int = 14336
    n_local_heads: int = 8  # key/value heads (grouped-query attention)
    head_dim: int = 128
    rope_base: float = 1e6
    norm_eps: float = 1e-5
    num_experts: int = 8
    num_activated_experts: int = 2
    sliding_window: Optional[int] = None  # Mixtral publishes null: full causal attention
    tie_word_embeddings: bool = False

    def __post_init__(self):
        for name in ("n_layer", "n_head", "dim", "intermediate_size", "n_local_heads", "head_dim",
                     "vocab_size", "num_experts", "num_activated_experts", "block_size"):
            if getattr(self, name) <= 0:
                raise UserError(f"config: {name} must be positive, got {getattr(self, name)}")
        if self.n_head % self.n_local_heads:
            raise UserError(f"config: {self.n_head} attention heads are not a multiple of "
                             f"{self.n_local_heads} key/value heads")
        if self.num_activated_experts > self.num_experts:
            raise UserError(f"config: {self.num_activated_experts} experts per token but only "
                             f"{self.num_experts} experts")

    @classmethod
    def from_name(cls, name: str) -> "ModelArgs":
        if name not in transformer_configs:
            raise UserError(f"unknown model {name!r}; known: {', '.join(transformer_configs)}")
        return cls(**transformer_configs[name])


# Published shapes, for building a model without a checkpoint (benchmarks). Loading a checkpoint
# always reads its own config (checkpoint.py) instead.
transformer_configs = {
    "Mixtral-8x7B-v0.1": dict(block_size=32768, vocab_size=32000, n_layer=32, n_head=32, dim=4096,
                              intermediate_size=14336, n_local_heads=8, head_dim=128, rope_base=1e6,
                              norm_eps=1e-5, num_experts=8, num_activated_experts=2),
    "Mixtral-8x22B-v0.1": dict(block_size=65536, vocab_size=32768, n_layer=56, n_head=48, dim=6144,
                               intermediate_size=16384, n_local_heads=8, head_dim=128, rope_base=1e6,
                               norm_eps=1e-5, num_experts=8, num_activated_experts=2),
}
transformer_configs["Mixtral-8x7B-Instruct-v0.1"] = transformer_configs["Mixtral-8x7B-v0.1"]


def kv_cache_bytes(config: ModelArgs, batch_size: int, max_seq_length: int, dtype: torch.dtype,
                   world_size: int = 1) -> int:
    """Bytes of the KV cache Transformer.setup_caches allocates (on each of world_size tensor-parallel
    ranks): keys and values, for every layer, sequence, key/value head and position."""
    heads = config.n_local_heads // world_size
    return 2 * config.n_layer * batch_size * heads * max_seq_length * config.head_dim * dtype.itemsize


class KVCache(nn.Module):
    def __init__(self, max_batch_size, max_seq_length, n_heads, head_dim, dtype):
        super().__init__()
        cache_shape = (max_batch_size, n_heads, max_seq_length, head_dim)  # [B, KV, S, Dh]
        # Not persistent: the cache is scratch space, not part of a checkpoint.
        self.register_buffer("k_cache", torch.zeros(cache_shape, dtype=dtype), persistent=False)
        self.register_buffer("v_cache", torch.zeros(cache_shape, dtype=dtype), persistent=False)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor):
        # input_pos: [T] shared by the batch, or [B, T] per sequence; k/v: [B, KV, T, Dh]
        k_cache, v_cache = self.k_cache, self.v_cache
        B = k.size(0)
        if B < k_cache.size(0):  # a cache made for a bigger batch serves a smaller one (a last, partial batch)
            k_cache, v_cache = k_cache[:B], v_cache[:B]
        if input_pos.dim() == 1:
            k_cache[:, :, input_pos] = k
            v_cache[:, :, input_pos] = v
        else:  # each sequence writes at its own positions
            rows = torch.arange(B, device=k.device)[:, None]  # [B, 1]
            k_cache[rows, :, input_pos] = k.transpose(1, 2)  # indexed as [B, T, KV, Dh]
            v_cache[rows, :, input_pos] = v.transpose(1, 2)
        return k_cache, v_cache


class Transformer(nn.Module):
    def __init__(self, config: ModelArgs):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.max_batch_size = -1
        self.max_seq_length = -1

    def setup_caches(self, max_batch_size: int, max_seq_length: int):
        """Allocates the KV cache, in the model's own dtype, and the rotary table. The cache only grows,
        and keeps what it holds when it does (a conversation goes on in a longer cache)."""
        if max_seq_length > self.config.block_size:
            raise UserError(f"{max_seq_length} tokens exceed the model's context of {self.config.block_size}")
        if self.max_seq_length >= max_seq_length and self.max_batch_size >= max_batch_size:
            return
        max_seq_length, max_batch_size = max(max_seq_length, self.max_seq_length), max(max_batch_size, self.max_batch_size)
        self.max_seq_length, self.max_batch_size = max_seq_length, max_batch_size
        # The norms are never quantized: their dtype is the activations' in every weight format.
        weight = self.norm.weight
        for layer in self.layers:
            # The layer's own head count: under tensor parallelism a rank caches only its kv heads.
            old, layer.attention.kv_cache = layer.attention.kv_cache, KVCache(
                max_batch_size, max_seq_length, layer.attention.n_local_heads, self.config.head_dim, weight.dtype
            ).to(weight.device)
            if old is not None:
                B, _, S, _ = old.k_cache.shape
                layer.attention.kv_cache.k_cache[:B, :, :S] = old.k_cache
                layer.attention.kv_cache.v_cache[:B, :, :S] = old.v_cache
        cos, sin = precompute_rope(max_seq_length, self.config.head_dim, self.config.rope_base)
        self.register_buffer("rope_cos", cos.to(weight.device), persistent=False)
        self.register_buffer("rope_sin", sin.to(weight.device), persistent=False)

    def forward(self, idx: Tensor, input_pos: Optional[Tensor] = None) -> Tensor:
        # idx: [B, T] token ids; input_pos: their positions in the sequence, [T] for the whole batch or
        # [B, T] for sequences of a batch that stand at different lengths (prompts of different lengths).
        # Without setup_caches (training, scoring a whole text) idx is the whole sequence: positions
        # 0..T-1, and each token attends to those before it in idx.
        if self.max_seq_length > 0:
            assert input_pos is not None, "with a KV cache, say where the tokens go"
            cache_pos = torch.arange(self.max_seq_length, device=idx.device)  # [S]
            cos, sin = self.rope_cos[input_pos], self.rope_sin[input_pos]  # [T, Dh] or [B, T, Dh]
        else:
            assert input_pos is None, "positions need a KV cache: call setup_caches() first"
            input_pos = cache_pos = torch.arange(idx.size(1), device=idx.device)  # [T]
            cos, sin = (t.to(idx.device) for t in precompute_rope(idx.size(1), self.config.head_dim,
                                                                  self.config.rope_base))
        mask = input_pos[..., None] >= cache_pos  # [T, S] or [B, T, S] causal
        if self.config.sliding_window is not None:
            mask = mask & (input_pos[..., None] - cache_pos < self.config.sliding_window)
        if input_pos.dim() == 2:
            mask = mask[:, None]  # [B, 1, T, S]: the same for every head
        x = self.tok_embeddings(idx)  # [B, T, D]
        for layer in self.layers:
            x = layer(x, input_pos, cos, sin, mask)
        return self.output(self.norm(x))  # [B, T, V]


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelArgs):
        super().__init__()
        self.attention = Attention(config)
        self.block_sparse_moe = MOEFeedForward(config)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)

    def forward(self, x, input_pos, cos, sin, mask):
        h = x + self.attention(self.attention_norm(x), input_pos, cos, sin, mask)
        return h + self.block_sparse_moe(self.ffn_norm(h))


def linear(name: str, in_features: int, out_features: int) -> nn.Module:
    return nn.Linear(in_features, out_features, bias=False)


class Attention(nn.Module):
    def __init__(self, config: ModelArgs, make_linear=linear):
        # make_linear(name, in, out) makes the projections: nn.Linear here; the served model (layers.py)
        # passes one that stores each in its weight format.
        super().__init__()
        self.n_head, self.n_local_heads, self.head_dim = config.n_head, config.n_local_heads, config.head_dim
        # q, k and v in one matrix: one matmul per token instead of three.
        total_head_dim = (config.n_head + 2 * config.n_local_heads) * config.head_dim
        self.wqkv = make_linear("wqkv", config.dim, total_head_dim)
        self.wo = make_linear("wo", config.n_head * config.head_dim, config.dim)
        self.kv_cache = None

    def forward(self, x, input_pos, cos, sin, mask):
        B, T, _ = x.shape
        q_size, kv_size = self.n_head * self.head_dim, self.n_local_heads * self.head_dim
        q, k, v = self.wqkv(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(B, T, -1, self.head_dim)  # [B, T, H, Dh]
        k = k.view(B, T, -1, self.head_dim)  # [B, T, KV, Dh]
        v = v.view(B, T, -1, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, heads, T, Dh]
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(input_pos, k, v)  # [B, KV, S, Dh]
        y = self.attend(q, k, v, mask)  # [B, H, T, Dh]
        y = y.transpose(1, 2).reshape(B, T, -1)  # [B, T, H * Dh]
        return self.wo(y)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        """softmax(q k^T / sqrt(Dh), masked) v, each group of H/KV query heads sharing one key/value head.
        q: [B, H, T, Dh], k/v: [B, KV, S, Dh], mask: [T, S] or [B, 1, T, S] -> [B, H, T, Dh]"""
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


class MOEFeedForward(nn.Module):
    """Sparse mixture of experts: a router picks K of E SwiGLU experts for each token."""

    def __init__(self, config: ModelArgs):
        super().__init__()
        E, I, D = config.num_experts, config.intermediate_size, config.dim
        self.gate = nn.Linear(D, E, bias=False)  # the router
        # Each expert computes w2(silu(w1 x) * w3 x); stacked over experts, in nn.Linear's layout.
        self.w1 = nn.Parameter(torch.empty(E, I, D))
        self.w3 = nn.Parameter(torch.empty(E, I, D))
        self.w2 = nn.Parameter(torch.empty(E, D, I))
        self.num_activated_experts = config.num_activated_experts

    def forward(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        x = x.reshape(-1, D)  # [N, D], N = B * T
        weights, experts = route(self.gate, x, self.num_activated_experts)  # [N, K] each
        return self.run_experts(x, experts, weights).view(B, T, D)

    def run_experts(self, x: Tensor, experts: Tensor, weights: Tensor) -> Tensor:
        """Each token's K experts, weighted: x [N, D], experts/weights [N, K] -> [N, D]. One expert at a time
        over the tokens that chose it: the definition, written to be read (and trained: it is
        differentiable). layers.py stores the experts in other weight formats and runs the same sum
        with faster kernels (dispatch.py chooses which)."""
        y = torch.zeros_like(x)
        for e in range(self.w1.size(0)):
            token, slot = torch.where(experts == e)  # the tokens that chose expert e, and in which of their K slots
            xe = x[token]  # [n_e, D]
            h = F.silu(xe @ self.w1[e].T) * (xe @ self.w3[e].T)  # [n_e, I]: SwiGLU
            y = y.index_add(0, token, (h @ self.w2[e].T) * weights[token, slot, None])  # [N, D]
        return y


def route(gate: nn.Module, x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The router: (weights [N, K] in x's dtype, experts [N, K]) of each token x [N, D]. Softmax in
    float32 before top-k, then renormalised over the chosen K, as Mixtral was trained."""
    probs = F.softmax(gate(x).float(), dim=-1)  # [N, E]
    weights, experts = torch.topk(probs, k, dim=-1)  # [N, K]
    return (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype), experts


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in float32 whatever the model's dtype: bf16 squares lose too much.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.type_as(x)


def precompute_rope(seq_len: int, head_dim: int, base: float):
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)  # [S, Dh/2]
    # Hugging Face's rotary layout: the two halves of each head rotate together ("rotate_half"),
    # so the hub's q/k projections are used as published, with no permutation at conversion.
    emb = torch.cat((freqs, freqs), dim=-1)  # [S, Dh]
    return emb.cos(), emb.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # x: [B, T, heads, Dh], cos/sin: [T, Dh] or [B, T, Dh]; rotated in float32 for bf16/fp16 models.
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # [..., T, 1, Dh]: the same for every head
    return (xf * cos + rotated * sin).type_as(x)
