"""Builds one instruction set's CPU kernels into the extension cache (conftest.kernels_built_together).
Usage: python tests/kernel_build.py ISA"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernels import cpu as cpu_kernels  # noqa: E402

cpu_kernels.load(sys.argv[1])
