"""Triton kernels: NF4 dequantize, small-batch GEMV, tensor-core skinny matmul (1-16 rows, codes
decoded in registers or through a shared pair table), tiled GEMM, input-gradient matmul; LoRA
inference (``lora_linear``: base and low-rank term in one kernel, ``lora_add``: the term in one pass).

The entry points load lazily, so importing this package (the dispatcher lives here) never
imports Triton: CPU-only use stays light, and without Triton ``TRITON_AVAILABLE`` is False
and callers fall back to bitsandbytes or the torch reference.

- ``nf4_matmul(x, packed, state, bias=None)``: ``x @ W.T + bias``
- ``nf4_matmul_grad_input(grad_out, packed, state)``: ``grad_out @ W``
- ``nf4_dequantize(packed, state, dtype=None)``: ``W``, bit-identical to bitsandbytes
"""
from __future__ import annotations

import importlib
import importlib.util

TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None

_EXPORTS = {"nf4_matmul": "ops", "nf4_matmul_grad_input": "ops", "nf4_dequantize": "ops",
            "NF4Weight": "weights", "NF4KernelError": "weights"}

__all__ = ["TRITON_AVAILABLE", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
