# The served model: model.py's Transformer with its linear layers and experts stored in weight formats
# (formats.py), and each heavy operation run by the code dispatch.py names for the step:
#   Linear.forward            a linear layer's weight times x     LINEAR_PATHS[dispatch.linear_path()]
#   MOEFeedForward.forward    each token's K experts, weighted     EXPERTS_PATHS[dispatch.experts_path()]
#   Attention.attend          attention over the KV cache          ATTENTION_PATHS[dispatch.attention_path()]
# The code a path names is a format's own PyTorch expression, a hand-written kernel (kernels/cpu.cpp,
# kernels/triton_moe.py), or one of the PyTorch paths below that serve every format. Routing
# (model.route), attention's structure and the residual stream are model.py's, for every format.
#
# Shapes in comments: N tokens, D model width, E experts, K experts per token, I expert width.
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

import dispatch
import model as reference
from errors import UserError
from formats import FullPrecision, Scheme, WeightFormat, chosen_experts, parse_format, part_of, scheme_of, stored_name
from kernels import cpu as cpu_kernels
from model import ModelArgs, Transformer


# ----------------------------------------------------------------------------- modules

class FormattedWeights(nn.Module):
    """A module whose weights are stored in formats, each its own: a weight's tensors are buffers named by
    stored_name (buffers, not parameters: int8 cannot require grad, and nothing trains here)."""

    def add_weight(self, name: str, fmt: WeightFormat, shape: tuple, dtype: torch.dtype):
        layout = fmt.layout(shape, dtype)
        self.formats = {**getattr(self, "formats", {}), name: fmt}
        self.keys = {**getattr(self, "keys", {}), name: tuple(layout)}
        for key, (shape_, dtype_) in layout.items():
            self.register_buffer(stored_name(name, key), torch.empty(shape_, dtype=dtype_))

    def weight_tensors(self, name: str) -> dict:
        return {key: getattr(self, stored_name(name, key)) for key in self.keys[name]}


class Linear(FormattedWeights):
    """nn.Linear without bias, its weight [out, in] stored in a format; or its rows stored in parts, each in
    its own format (rows: [(name, format, rows)]: a GGUF file's q, k and v projections may differ)."""

    def __init__(self, fmt: WeightFormat, in_features: int, out_features: int, dtype: torch.dtype = torch.float32,
                 rows: list = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        for name, fmt_, n in rows or [("weight", fmt, out_features)]:
            self.add_weight(name, fmt_, (n, in_features), dtype)

    @property
    def format(self) -> WeightFormat:
        """The weight's format (its first part's, when stored in parts)."""
        return next(iter(self.formats.values()))

    def forward(self, x: Tensor) -> Tensor:
        if len(self.formats) == 1:
            return linear(self.format, x, self.weight_tensors(next(iter(self.formats))))
        return torch.cat([linear(fmt, x, self.weight_tensors(name)) for name, fmt in self.formats.items()], dim=-1)


class MOEFeedForward(FormattedWeights):
    """model.MOEFeedForward's routing (model.route) over experts stored in formats: the gate and up projections
    (w1, w3) in one, the down projection (w2) in its own. The router stays in full precision in every format:
    its few weights decide which experts run."""

    def __init__(self, fmt: WeightFormat, config: ModelArgs, dtype: torch.dtype = torch.float32,
                 down: WeightFormat = None):
        super().__init__()
        E, I, D = config.num_experts, config.intermediate_size, config.dim
        self.gate = Linear(FullPrecision(), D, E, dtype)
        for name, shape in (("w1", (E, I, D)), ("w3", (E, I, D)), ("w2", (E, D, I))):
            self.add_weight(name, down or fmt if name == "w2" else fmt, shape, dtype)
        self.num_activated_experts = config.num_activated_experts

    @property
    def format(self) -> WeightFormat:
        return self.formats["w1"]

    def forward(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        x = x.reshape(-1, D)  # [N, D], N = B * T
        weights, experts = reference.route(self.gate, x, self.num_activated_experts)  # [N, K] each
        w1, w3, w2 = (self.weight_tensors(name) for name in ("w1", "w3", "w2"))
        return run_experts(self.format, x, experts, weights, w1, w3, w2, self.formats["w2"]).view(B, T, D)


class Attention(reference.Attention):
    """model.Attention with wqkv and wo stored in formats, attending on dispatch.py's path."""

    def __init__(self, fmt: WeightFormat, config: ModelArgs, dtype: torch.dtype = torch.float32,
                 wo: WeightFormat = None, qkv: tuple = None):
        # qkv: the q, k and v rows' formats, where they differ (then wqkv is stored in three parts)
        rows = None
        if qkv is not None:
            q_size, kv_size = config.n_head * config.head_dim, config.n_local_heads * config.head_dim
            rows = list(zip("qkv", qkv, (q_size, kv_size, kv_size)))
        super().__init__(config, make_linear=lambda name, inputs, outputs: Linear(
            wo or fmt if name == "wo" else fmt, inputs, outputs, dtype, rows=rows if name == "wqkv" else None))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        return ATTENTION_PATHS[dispatch.attention_path(q)](q, k, v, mask)


def build_model(config: ModelArgs, fmt, dtype: torch.dtype = torch.float32) -> Transformer:
    """A Transformer with its linear layers and experts in `fmt`, a format or a Scheme (a format per weight).
    Tensors are made on the current default device: inside `with torch.device("meta")` they cost nothing
    until loaded with load_state_dict(assign=True)."""
    scheme = Scheme.of(fmt)
    model = Transformer(config)
    for i, layer in enumerate(model.layers):
        of = lambda name: scheme.format_of(f"layers.{i}.{name}")  # noqa: E731
        if of("block_sparse_moe.w1") != of("block_sparse_moe.w3"):
            raise UserError(f"layer {i}'s experts hold w1 in {of('block_sparse_moe.w1').spec} and w3 in "
                            f"{of('block_sparse_moe.w3').spec}: an expert's gate and up projections share a format")
        qkv = tuple(of(f"attention.wqkv.{p}") for p in "qkv")
        layer.attention = Attention(of("attention.wqkv.weight"), config, dtype, wo=of("attention.wo.weight"),
                                    qkv=qkv if len(set(qkv)) > 1 else None)
        layer.block_sparse_moe = MOEFeedForward(of("block_sparse_moe.w1"), config, dtype,
                                                down=of("block_sparse_moe.w2"))
    model.output = Linear(scheme.format_of("output.weight"), config.dim, config.vocab_size, dtype)
    return model


def model_scheme(model: Transformer) -> Scheme:
    """The formats a built model holds its weights in."""
    return scheme_of({f"{prefix}.{name}": fmt for prefix, module in model.named_modules()
                      if isinstance(module, FormattedWeights) for name, fmt in module.formats.items()
                      if part_of(f"{prefix}.{name}")})


def stored_weights(config: ModelArgs, fmt) -> dict:
    """Each weight that `fmt` (a format or a Scheme) quantizes: its full-precision checkpoint name ->
    (its format, {key: name of the tensor that stores that part}), e.g.
    'output.weight' -> (Int8, {'': 'output.weight', 'scales': 'output.scales'})."""
    with torch.device("meta"):
        model = build_model(config, fmt)
    return {f"{prefix}.{weight}": (fmt, {key: f"{prefix}.{stored_name(weight, key)}" for key in module.keys[weight]})
            for prefix, module in model.named_modules() if isinstance(module, FormattedWeights)
            for weight, fmt in module.formats.items() if fmt.quantized}


@torch.no_grad()
def quantize_module(module: nn.Module, config: ModelArgs, fmt, layer: int = 0) -> nn.Module:
    """What quantize.py does to a checkpoint, done to a model in memory (scripts/benchmark.py): the
    TransformerBlock (number `layer`) or whole Transformer `module`, in full precision (model.py's own
    modules or FullPrecision ones), gets its linear layers and experts stored in `fmt` (a format or a Scheme),
    in place."""
    scheme = Scheme.of(fmt)

    def converted(old: nn.Module, new: FormattedWeights) -> FormattedWeights:
        for name, fmt in new.formats.items():
            stored = getattr(old, "formats", {}).get(name, FullPrecision())
            if stored.quantized:  # its tensors are codes, not weights: quantizing them again would be nonsense
                raise UserError(f"the model is already quantized ({stored.spec}); quantize a full-precision "
                                f"checkpoint (model.pth) instead")
            w = getattr(old, name).detach()
            for key, t in fmt.quantize(w).items():
                setattr(new, stored_name(name, key), t)
        return new

    def linear_in(old, fmt):
        if isinstance(old, Linear) and old.format == fmt:
            return old
        with torch.device("meta"):
            new = Linear(fmt, old.in_features, old.out_features, old.weight.dtype)
        return converted(old, new)

    def experts_in(old, fmt, down):
        if isinstance(old, MOEFeedForward) and old.formats == {"w1": fmt, "w3": fmt, "w2": down}:
            return old
        with torch.device("meta"):
            new = MOEFeedForward(fmt, config, old.w1.dtype, down=down)
        new.gate = linear_in(old.gate, FullPrecision())
        return converted(old, new)

    def attention_in(old, fmt, wo):
        new = old
        if not isinstance(old, Attention):  # model.Attention: layers.Attention attends on dispatch's path
            with torch.device("meta"):
                new = Attention(fmt, config, wo=wo)
            new.kv_cache = old.kv_cache  # the one attribute that is state, not config
        new.wqkv, new.wo = linear_in(old.wqkv, fmt), linear_in(old.wo, wo)
        return new

    blocks = enumerate(module.layers) if isinstance(module, Transformer) else [(layer, module)]
    for i, block in blocks:
        of = lambda name: scheme.format_of(f"layers.{i}.{name}")  # noqa: E731
        block.attention = attention_in(block.attention, of("attention.wqkv.weight"), of("attention.wo.weight"))
        block.block_sparse_moe = experts_in(block.block_sparse_moe, of("block_sparse_moe.w1"), of("block_sparse_moe.w2"))
    if isinstance(module, Transformer):
        module.output = linear_in(module.output, scheme.format_of("output.weight"))
    return module


# ----------------------------------------------------------------------------- linear layers

def linear(fmt: WeightFormat, x: Tensor, t: dict) -> Tensor:
    """x [..., in] times the weight stored in t (fmt's tensors): [..., out]."""
    return LINEAR_PATHS[dispatch.linear_path(fmt, x)](fmt, x, t)


def cpu_kernel_linear(fmt: WeightFormat, x: Tensor, t: dict) -> Tensor:
    y = cpu_kernels.ops().linear(x.reshape(-1, x.shape[-1]), fmt.kernel_weight(t), t.get("scales"), fmt.name)
    return y.view(*x.shape[:-1], -1)


def triton_linear(fmt: WeightFormat, x: Tensor, t: dict) -> Tensor:
    from kernels import triton_moe  # noqa: F401  registers torch.ops.mixtral_triton (CUDA users only import triton)
    y = torch.ops.mixtral_triton.linear(x.reshape(-1, x.shape[-1]), fmt.kernel_weight(t), t.get("scales"), fmt.name)
    return y.view(*x.shape[:-1], -1)


def cpu_prompt_linear(fmt: WeightFormat, x: Tensor, t: dict) -> Tensor:
    y = cpu_kernels.ops().prompt_linear(x.reshape(-1, x.shape[-1]), fmt.kernel_weight(t), t.get("scales"), fmt.name)
    return y.view(*x.shape[:-1], -1)


def dequantized(fmt: WeightFormat, t: dict, dtype: torch.dtype) -> Tensor:
    """The weight fmt stores in t, in full precision: through the CPU kernels' one pass where
    dispatch.dequantize_path says so, else the format's own PyTorch expression."""
    if dispatch.dequantize_path(fmt, t[""], dtype) == "cpu kernel":
        return getattr(cpu_kernels.ops(), f"dequantize_{fmt.name}")(t[""], t["scales"], dtype)
    return fmt.dequantize(t, dtype)


def prompt_linear(fmt: WeightFormat, x: Tensor, t: dict) -> Tensor:
    """Many tokens on a CPU, compute-bound: full-precision weights as they are, quantized ones as a
    full-precision copy in the matmul dtype."""
    if not fmt.quantized:
        return F.linear(x, t[""])
    dtype = dispatch.matmul_dtype(x)
    return F.linear(x.to(dtype), dequantized(fmt, t, dtype)).to(x.dtype)


LINEAR_PATHS = {
    "cpu kernel": cpu_kernel_linear,
    "triton": triton_linear,
    "cpu prompt kernel": cpu_prompt_linear,
    "decode": lambda fmt, x, t: fmt.decode_linear(x, t),
    "prompt": prompt_linear,
    "device": lambda fmt, x, t: fmt.linear(x, t),
}


# ----------------------------------------------------------------------------- experts

def run_experts(fmt: WeightFormat, x: Tensor, experts: Tensor, weights: Tensor, w1: dict, w3: dict, w2: dict,
                down: WeightFormat = None) -> Tensor:
    """Each token's chosen experts: x [N, D], experts/weights [N, K] -> [N, D]; w1 and w3 stored in fmt, w2 in
    down (fmt when None)."""
    down = down or fmt
    path = dispatch.experts_path(fmt, x, experts, w1[""].size(0), w1[""].size(1), down)
    return EXPERTS_PATHS[path](fmt, x, experts, weights, w1, w3, w2, down)


def cpu_kernel_experts(fmt, x, experts, weights, w1, w3, w2, down=None):
    w1, w3, w2 = ({"": fmt.kernel_weight(w), "scales": w.get("scales")} for w in (w1, w3, w2))
    return cpu_kernels.ops().moe(x, experts, weights, w1[""], w3[""], w2[""], w1["scales"], w3["scales"],
                                 w2["scales"], fmt.name)


def cpu_kernel_mixed_experts(fmt, x, experts, weights, w1, w3, w2, down=None):
    return kernel_experts_one_by_one(x, experts, weights, fmt.spec, *(list(w.values()) for w in (w1, w3, w2)),
                                     down.spec)


# The CPU kernels' moe op takes one format for w1, w3 and w2; a GGUF file's mix (Q4_K_M: q6_k down projections
# in some layers) gives w2 another. Then each chosen expert's three matrices go through the linear kernel, each
# read in place in its own format: a call per matrix instead of one per layer, against reading every chosen
# expert back to floats first. A custom op, so that its host-side loop stays out of the compiled graph.
@torch.library.custom_op("mixtral::kernel_experts_one_by_one", mutates_args=())
def kernel_experts_one_by_one(x: Tensor, experts: Tensor, weights: Tensor, spec: str, w1: list[Tensor],
                              w3: list[Tensor], w2: list[Tensor], down_spec: str) -> Tensor:
    """x [N, D], experts/weights [N, K] -> [N, D]; spec: w1's and w3's format, down_spec: w2's; w1/w3/w2: their
    tensors in their layout's order."""
    fmt, down = parse_format(spec), parse_format(down_spec)
    ops = cpu_kernels.ops()

    def linear(f: WeightFormat, w: list, e: int, v: Tensor) -> Tensor:
        t = {key: stored[e] for key, stored in zip(f.layout((1, 1), x.dtype), w)}
        return ops.linear(v, f.kernel_weight(t), t.get("scales"), f.name)

    out = torch.zeros_like(x)
    for e in experts.unique().tolist():  # host sync: a few tokens' experts
        rows, k = (experts == e).nonzero(as_tuple=True)
        xs = x[rows]  # [n_e, D]
        h = F.silu(linear(fmt, w1, e, xs)) * linear(fmt, w3, e, xs)  # [n_e, I]
        out.index_add_(0, rows, linear(down, w2, e, h) * weights[rows, k, None])
    return out


@kernel_experts_one_by_one.register_fake
def _(x, experts, weights, spec, w1, w3, w2, down_spec):
    return torch.empty_like(x)


def cpu_prompt_experts(fmt, x, experts, weights, w1, w3, w2, down=None):
    down = down or fmt
    return cpu_kernels.ops().prompt_moe(x, experts, weights, fmt.kernel_weight(w1), fmt.kernel_weight(w3),
                                        down.kernel_weight(w2), w1.get("scales"), w3.get("scales"),
                                        w2.get("scales"), fmt.name, down.name)


def triton_experts(fmt, x, experts, weights, w1, w3, w2, down=None):
    from kernels import triton_moe  # noqa: F401
    return torch.ops.mixtral_triton.moe(x, experts, weights, fmt.kernel_weight(w1), fmt.kernel_weight(w3),
                                        fmt.kernel_weight(w2), w1.get("scales"), w3.get("scales"),
                                        w2.get("scales"), fmt.name)


def decode_experts(fmt, x, experts, weights, w1, w3, w2, down=None):
    """A few tokens' experts: the format's own expression, or, where the down projections are in another
    format, each weight's chosen experts read back in its own (no host sync) and multiplied."""
    if down in (None, fmt):
        return fmt.decode_experts(x, experts, weights, w1, w3, w2)
    chosen = lambda f, w: f.dequantize({key: t[experts] for key, t in w.items()}, x.dtype)  # noqa: E731
    return chosen_experts(x, weights, chosen(fmt, w1), chosen(fmt, w3), chosen(down, w2))


def sort_by_expert(experts: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """The (token, expert) pairs of experts [N, K] sorted by expert: order [N*K] (positions in
    experts.flatten()), the token of each sorted pair [N*K], and each expert's count of pairs [E].
    All stay on the device: no host sync."""
    flat_experts = experts.flatten()  # [N*K]
    order = flat_experts.argsort(stable=True)  # pairs sorted by expert
    counts = torch.zeros(num_experts, dtype=torch.int32, device=experts.device).scatter_add_(
        0, flat_experts, torch.ones_like(flat_experts, dtype=torch.int32))
    return order, order // experts.size(1), counts


@torch.library.custom_op("mixtral::grouped_experts", mutates_args=())
def grouped_experts(x: Tensor, experts: Tensor, weights: Tensor, w1: Tensor, w3: Tensor, w2: Tensor) -> Tensor:
    """Runs each expert once over the tokens routed to it, in one grouped matmul per weight.
    x: [N, D], experts/weights: [N, K] -> [N, D].

    Gathering w1[experts] per token would copy N*K expert matrices (gigabytes for a long prompt);
    sorting the (token, expert) pairs by expert instead lets one grouped matmul read every expert's
    weights in place. The group sizes stay on the device: no host sync.
    A custom op, so torch.compile treats it as one opaque kernel: torch._grouped_mm runs any float
    dtype eagerly, but its tracing rule accepts bf16 only.
    """
    order, token_of_pair, counts = sort_by_expert(experts, w1.shape[0])
    xs = x[token_of_pair]  # [N*K, D]
    offsets = counts.cumsum(0, dtype=torch.int32)  # [E] end of each expert's group
    h = F.silu(torch._grouped_mm(xs, w1.transpose(1, 2), offs=offsets)) \
        * torch._grouped_mm(xs, w3.transpose(1, 2), offs=offsets)  # [N*K, I]
    ys = torch._grouped_mm(h, w2.transpose(1, 2), offs=offsets)  # [N*K, D]
    ys = ys * weights.flatten()[order, None]
    return torch.zeros_like(x).index_add_(0, token_of_pair, ys)  # [N, D]


@grouped_experts.register_fake
def _(x, experts, weights, w1, w3, w2):
    return torch.empty_like(x)


# A custom op is opaque to torch.compile: its body runs as ordinary eager code inside a compiled graph
# (also under --compile_prefill), so it may read the group sizes on the host and take each expert's
# weights as a view. That costs nothing on CPU and one sync per layer on a GPU (fine for prefill).
@torch.library.custom_op("mixtral::dequantized_experts", mutates_args=())
def dequantized_experts(x: Tensor, experts: Tensor, weights: Tensor, spec: str, w1: list[Tensor],
                        w3: list[Tensor], w2: list[Tensor], down_spec: str = "") -> Tensor:
    """Each expert that some token chose runs once over its tokens, its weights read back in the matmul
    dtype (dispatch.matmul_dtype) one matrix at a time: a prompt's matmuls are compute-bound, so one pass
    of conversion is cheap next to them. Serves the formats without a grouped matmul (quantized ones),
    and full precision where half-precision matmuls are slow. spec: w1's and w3's format (parse_format),
    down_spec: w2's (spec when empty); w1/w3/w2: their tensors in their layout's order. x [N, D],
    experts/weights [N, K] -> [N, D]."""
    fmt = parse_format(spec)
    down = parse_format(down_spec or spec)
    order, token_of_pair, counts = sort_by_expert(experts, w1[0].shape[0])
    counts = counts.tolist()  # host sync
    xs = x[token_of_pair]  # [N*K, D]

    def weight(fmt: WeightFormat, w: list, e: int, dtype: torch.dtype) -> Tensor:
        return dequantized(fmt, {key: t[e] for key, t in zip(fmt.layout((1, 1), x.dtype), w)}, dtype)

    ys = []
    for e, xs_e in enumerate(xs.split(counts)):  # xs_e [count_e, D]
        if not counts[e]:
            continue
        # A full-precision expert with few tokens keeps its dtype: converting would cost more than it saves.
        keep = not fmt.quantized and not down.quantized and counts[e] < dispatch.MIN_ROWS_TO_CONVERT
        dtype = x.dtype if keep else dispatch.matmul_dtype(x)
        xd = xs_e.to(dtype)  # each converted matrix is freed as soon as its matmul returns
        h = F.silu(F.linear(xd, weight(fmt, w1, e, dtype))) * F.linear(xd, weight(fmt, w3, e, dtype))  # [count_e, I]
        ys.append(F.linear(h, weight(down, w2, e, dtype)).to(x.dtype))  # [count_e, D]
    ys = torch.cat(ys) * weights.flatten()[order, None]  # [N*K, D]
    return torch.zeros_like(x).index_add_(0, token_of_pair, ys)  # [N, D]


@dequantized_experts.register_fake
def _(x, experts, weights, spec, w1, w3, w2, down_spec=""):
    return torch.empty_like(x)


EXPERTS_PATHS = {
    "cpu kernel": cpu_kernel_experts,
    "cpu kernel, one by one": cpu_kernel_mixed_experts,
    "triton": triton_experts,
    "cpu prompt kernel": cpu_prompt_experts,
    "decode": decode_experts,
    "grouped": lambda fmt, x, experts, weights, w1, w3, w2, down=None: grouped_experts(
        x, experts, weights, w1[""], w3[""], w2[""]),
    "one by one": lambda fmt, x, experts, weights, w1, w3, w2, down=None: dequantized_experts(
        x, experts, weights, fmt.spec, *(list(w.values()) for w in (w1, w3, w2)), (down or fmt).spec),
}


# ----------------------------------------------------------------------------- attention

def decode_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """One new token's attention over the cache, written out so that torch.compile fuses it into the
    decode step. q: [B, H, T, Dh], k/v: [B, KV, S, Dh], mask: [T, S] or [B, 1, T, S] -> [B, H, T, Dh]"""
    B, H, T, Dh = q.shape
    KV = k.shape[1]
    qg = q.reshape(B, KV, H // KV * T, Dh).float()  # [B, KV, H/KV, Dh]: the query heads sharing each kv head
    scores = (qg @ k.float().transpose(-1, -2)) * Dh ** -0.5  # [B, KV, H/KV, S]
    scores = scores.masked_fill(~mask, float("-inf"))
    y = scores.softmax(dim=-1) @ v.float()  # [B, KV, H/KV, Dh]
    return y.to(q.dtype).view(B, H, T, Dh)


def cpu_kernel_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """decode_attention's arithmetic in kernels/cpu.cpp, the cache read in place. q [B, H, 1, Dh], k/v
    [B, KV, S, Dh], mask [1, S] or [B, 1, 1, S] -> [B, H, 1, Dh]"""
    B, H, _, Dh = q.shape
    y = cpu_kernels.ops().attention(q.reshape(B, H, Dh), k, v, mask.reshape(-1, k.shape[2]), Dh ** -0.5)
    return y.view(B, H, 1, Dh)


ATTENTION_PATHS = {
    "cpu kernel": cpu_kernel_attention,
    "decode": decode_attention,
    "sdpa": lambda q, k, v, mask: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True),
}
