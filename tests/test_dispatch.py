"""dispatch.py: the path each step takes, with the CPU kernels and without; and that it decides only."""
import torch

import dispatch
from formats import Blocks, FullPrecision, Int4, Int8
from kernels import cpu as cpu_kernels


def test_the_path_of_each_step():
    """The names dispatch.py gives each shape, with the CPU kernels and without."""
    D = 64
    one, prompt = torch.randn(1, 1, D), torch.randn(1, dispatch.CPU_KERNEL_MAX_TOKENS + 1, D)
    kernels = cpu_kernels.available()
    for fmt in (FullPrecision(), Int8(), Int4(), Blocks("q4_k")):
        assert dispatch.linear_path(fmt, one) == ("cpu kernel" if kernels else "decode")
        # Many tokens: quantized weights read in place by the prompt kernels, rows of whole steps of 32 values.
        assert dispatch.linear_path(fmt, prompt) == ("cpu prompt kernel" if kernels and fmt.quantized else "prompt")
        assert dispatch.linear_path(fmt, prompt[..., :40]) == "prompt"
        with cpu_kernels.turned_off():
            assert dispatch.linear_path(fmt, one) == "decode"
            assert dispatch.linear_path(fmt, prompt) == "prompt"
        x, few = torch.randn(1, D), torch.tensor([[0, 1]])
        assert dispatch.experts_path(fmt, x, few, 8, 96) == ("cpu kernel" if kernels else "decode")
        with cpu_kernels.turned_off():
            assert dispatch.experts_path(fmt, x, few, 8, 96) == "decode"  # 2 expert matrices of 8
        other = Int4() if fmt != Int4() else Int8()  # w2 in another format (a GGUF file's mix)
        assert dispatch.experts_path(fmt, x, few, 8, 96, other) == ("cpu kernel, one by one" if kernels else "decode")
        many = torch.randint(0, 8, (dispatch.CPU_KERNEL_MAX_TOKENS + 1, 2))
        x = torch.randn(many.shape[0], D)  # float32: never slow, so full precision has its grouped matmul
        pytorchs = "grouped" if fmt == FullPrecision() else "one by one"
        assert dispatch.experts_path(fmt, x, many, 8, 96) == ("cpu prompt kernel" if kernels and fmt.quantized else pytorchs)
        assert dispatch.experts_path(fmt, x, many, 8, 80) == pytorchs
        # w2 in another format: the prompt kernels take one for w1 and w3 and one for w2.
        assert dispatch.experts_path(fmt, x, many, 8, 96, down=other) == (
            "cpu prompt kernel" if kernels and fmt.quantized else "one by one")
        with cpu_kernels.turned_off():
            assert dispatch.experts_path(fmt, x, many, 8, 96) == pytorchs
    # One new token: the attention kernel for heads of whole vectors of 16 values, else PyTorch's written-out path.
    assert dispatch.attention_path(torch.randn(1, 4, 1, 16)) == ("cpu kernel" if kernels else "decode")
    assert dispatch.attention_path(torch.randn(1, 4, 1, 24)) == "decode"
    with cpu_kernels.turned_off():
        assert dispatch.attention_path(torch.randn(1, 4, 1, 16)) == "decode"
    assert dispatch.attention_path(torch.randn(1, 4, 2, 16)) == "sdpa"


