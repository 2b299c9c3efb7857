"""Public entry points of the Triton NF4 kernels; each picks its kernel from ``tuning``'s tables."""
from __future__ import annotations

import contextlib
from typing import Any

import torch

from peftlab.quant.kernels import chunked, gemm, skinny
from peftlab.quant.kernels.dequant import dequantize
from peftlab.quant.kernels.gemv import gemv, gemv_row
from peftlab.quant.kernels.tuning import GEMV_FALLBACK, blocks_per_step, forward_plan, gpu_family, grad_input_plan
from peftlab.quant.kernels.weights import NF4KernelError, NF4Weight

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _as_rows(t: torch.Tensor, width: int, name: str, weight: NF4Weight) -> torch.Tensor:
    """``t [..., width]`` as a 2-D tensor with unit column stride, after checking dtype and device."""
    if t.shape[-1] != width:
        raise NF4KernelError(f"{name} has last dimension {t.shape[-1]} but the NF4 weight "
                             f"[{weight.n}, {weight.k}] needs {width}.")
    if t.dtype not in _DTYPES:
        raise NF4KernelError(f"{name} dtype must be bfloat16, float16 or float32, got {t.dtype}.")
    if t.device != weight.device:
        raise NF4KernelError(f"{name} is on {t.device} but the NF4 weight is on {weight.device}.")
    rows = t.reshape(-1, width)
    return rows if rows.stride(-1) == 1 or width == 1 else rows.contiguous()


def launch_device(device: torch.device):
    """Makes ``device`` current while kernels launch (Triton launches on the current GPU)."""
    if device.type != "cuda" or device.index is None or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def nf4_matmul(x: torch.Tensor, packed: torch.Tensor, state: Any, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` for an NF4 weight ``W [n, k]``; ``x [..., k]`` bf16/fp16/fp32 -> ``[..., n]``.

    Few rows stream the packed weight through a GEMV or decode it in registers for tensor-core
    ``mma`` (``skinny``), mid sizes dequantize tiles inside a
    tensor-core kernel, large ones dequantize the weight (whole or in chunks, the next chunk
    while cuBLAS multiplies the current one) for cuBLAS;
    ``tuning`` holds the measured choice per shape.
    """
    return matmul(x, NF4Weight.from_state(packed, state), bias)


def matmul(x: torch.Tensor, weight: NF4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`nf4_matmul` on an already checked weight view."""
    x2 = _as_rows(x, weight.k, "x", weight)
    if bias is not None:
        bias = bias.to(device=x.device, dtype=x.dtype).contiguous()
    kind, config = forward_plan(x2.shape[0], weight.n, weight.k, weight.blocksize, x.dtype, gpu_family(x.device))
    with launch_device(x.device):
        if x2.shape[0] == 0:
            out = x2.new_empty(0, weight.n)
        elif kind == "gemv1" and weight.row_aligned:
            out = gemv_row(x2, weight, bias, config)
        elif kind == "gemv" and weight.row_aligned:
            out = gemv(x2, weight, bias, config)
        elif kind == "mma" and skinny.supports(x2, weight):
            out = skinny.matmul(x2, weight, bias, config)
        elif kind == "mma" and weight.row_aligned:
            out = gemv(x2, weight, bias, blocks_per_step(GEMV_FALLBACK, weight.blocksize))
        elif kind == "fused" and weight.row_aligned:
            out = gemm.matmul(x2, weight, bias, config)
        else:
            out = chunked.matmul(x2, weight, bias, *chunked.plan_chunks(kind, config, weight))
    return out.reshape(*x.shape[:-1], weight.n)


def nf4_matmul_grad_input(grad_out: torch.Tensor, packed: torch.Tensor, state: Any) -> torch.Tensor:
    """``grad_out @ W``: the input gradient of ``x @ W.T``; ``[..., n] -> [..., k]``.

    No dequantized copy of the whole weight stays alive: small batches decode tiles in the
    kernel, large ones go through block-aligned column chunks and one scratch buffer.
    """
    return matmul_grad_input(grad_out, NF4Weight.from_state(packed, state))


def matmul_grad_input(grad_out: torch.Tensor, weight: NF4Weight) -> torch.Tensor:
    """:func:`nf4_matmul_grad_input` on an already checked weight view."""
    g2 = _as_rows(grad_out, weight.n, "grad_out", weight)
    kind, config = grad_input_plan(g2.shape[0], weight.n, weight.k, weight.blocksize, grad_out.dtype)
    with launch_device(grad_out.device):
        if g2.shape[0] == 0:
            out = g2.new_empty(0, weight.k)
        elif kind == "fused" and weight.row_aligned:
            out = gemm.matmul_grad_input(g2, weight, config)
        else:
            out = chunked.matmul_grad_input(g2, weight, *chunked.plan_chunks(kind, config, weight))
    return out.reshape(*grad_out.shape[:-1], weight.k)


def nf4_dequantize(packed: torch.Tensor, state: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The full weight ``[n, k]`` in ``dtype`` (default: ``state.dtype``), bit-identical to bitsandbytes."""
    weight = NF4Weight.from_state(packed, state)
    dtype = dtype or getattr(state, "dtype", None) or torch.bfloat16
    if dtype not in _DTYPES:
        raise NF4KernelError(f"dequantize dtype must be bfloat16, float16 or float32, got {dtype}.")
    with launch_device(weight.device):
        return dequantize(weight, dtype)
