"""GGUF's block types for the kernel tests: random valid blocks, and the weights they hold in float64 as the
gguf package (the format's own reader) dequantizes them; and weights to quantize, for the quantizers' tests."""
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

TYPES = {"q8_0": GGMLQuantizationType.Q8_0, "q4_0": GGMLQuantizationType.Q4_0, "q4_k": GGMLQuantizationType.Q4_K,
         "q5_k": GGMLQuantizationType.Q5_K, "q6_k": GGMLQuantizationType.Q6_K}
# Where each block keeps its fp16 scale d and, for the K-quants with mins, dmin (ggml-common.h), and the
# largest |q * sub-block scale| of its values, to give the weights a magnitude of about 1 / sqrt(K).
D_AT = {"q8_0": 0, "q4_0": 0, "q4_k": 0, "q5_k": 0, "q6_k": 208}
DMIN_AT = {"q4_k": 2, "q5_k": 2}
LARGEST = {"q8_0": 128, "q4_0": 8, "q4_k": 15 * 63, "q5_k": 31 * 63, "q6_k": 32 * 128}


def block_size(fmt: str) -> tuple:
    """(values, bytes) of a block of type fmt, as the gguf package gives them."""
    return GGML_QUANT_SIZES[TYPES[fmt]]


def random_blocks(fmt: str, shape: tuple, g: torch.Generator) -> torch.Tensor:
    """Valid blocks for weights of `shape` [..., rows, K], uint8 [..., rows, K / values * bytes]: random
    bytes (every q, sub-block scale and min the format can hold), then random finite fp16 d (and dmin)
    of either sign, of moderate size."""
    values, nbytes = block_size(fmt)
    *rows, K = shape
    blocks = torch.randint(0, 256, (*rows, K // values, nbytes), dtype=torch.uint8, generator=g)
    for at in (D_AT[fmt], DMIN_AT.get(fmt)):
        if at is not None:
            size = (torch.rand(*rows, K // values, generator=g) + 1) / (2 * LARGEST[fmt] * K ** 0.5)
            sign = torch.randint(0, 2, size.shape, generator=g) * 2 - 1
            blocks[..., at:at + 2] = (size * sign).to(torch.float16).unsqueeze(-1).view(torch.uint8)
    return blocks.flatten(-2)


def exact(fmt: str, blocks: torch.Tensor) -> tuple:
    """The weights in float64 from the gguf package's dequantization, and the magnitudes of the two parts
    of a K-quant's weight: |d * sc * q| and |dmin * m| (the weights' own magnitudes for the other types).
    gguf computes d * sc * q - dmin * m in float32, which rounds; each part alone is exact (d's 11 bits
    times q's and sc's at most 13), so they are dequantized apart, from copies whose dmin, or d, is
    zeroed."""
    def weights(b):
        return torch.from_numpy(dequantize(b.numpy(), TYPES[fmt])).double()
    if fmt not in DMIN_AT:
        w = weights(blocks)
        return w, w.abs()
    nbytes = block_size(fmt)[1]
    parts = []
    for zeroed in (DMIN_AT[fmt], D_AT[fmt]):
        b = blocks.unflatten(-1, (-1, nbytes)).clone()
        b[..., zeroed:zeroed + 2] = 0
        parts.append(weights(b.flatten(-2)))
    return parts[0] + parts[1], parts[0].abs() + parts[1].abs()


def outlier_rows(seed, rows=32, n=2048):
    """Gaussian rows whose few outlier input channels are 4 times wider, with an importance that is
    log-normal (as activations' mean squares are) and 100 times larger on those channels."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, n, generator=g)
    outliers = torch.randperm(n, generator=g)[:n // 64]
    w[:, outliers] *= 4
    importance = torch.randn(n, generator=g).exp()
    importance[outliers] *= 100
    return w, importance
