"""Large-M path: dequantize the weight, whole or a chunk at a time, then cuBLAS.

With chunks, one scratch buffer of ``chunk_elems`` elements is reused for every chunk (both
steps run in order on the caller's stream), so no dequantized copy of the whole weight is
alive. Nothing is kept between calls either way. Whether chunks pay is measured per shape
(see ``tuning``): the GEMMs get narrower, which often costs more than the L2 reuse saves.
"""
from __future__ import annotations

import torch

from peftlab.quant.kernels.dequant import dequantize
from peftlab.quant.kernels.weights import NF4Weight


def _chunk(total: int, other: int, chunk_elems: int | None, align: int) -> int:
    """Length along ``total`` of a chunk of about ``chunk_elems`` elements, a multiple of ``align``."""
    if chunk_elems is None or not total:
        return total
    length = max(align, chunk_elems // max(other, 1) // align * align)
    return min(total, length)


def matmul(x: torch.Tensor, weight: NF4Weight, bias: torch.Tensor | None, chunk_elems: int | None) -> torch.Tensor:
    """``x [m, k] @ W.T (+ bias)``, dequantizing ``chunk_elems`` weight elements (whole rows) at a time.

    ``chunk_elems=None`` dequantizes the whole weight once (any shape and blocksize).
    """
    if chunk_elems is None or not weight.row_aligned:
        return torch.nn.functional.linear(x, dequantize(weight, x.dtype), bias)
    rows = _chunk(weight.n, weight.k, chunk_elems, 1)
    if rows >= weight.n:
        return torch.nn.functional.linear(x, dequantize(weight, x.dtype), bias)
    out = torch.empty(x.shape[0], weight.n, dtype=x.dtype, device=x.device)
    scratch = torch.empty(rows, weight.k, dtype=x.dtype, device=x.device)
    for start in range(0, weight.n, rows):
        count = min(rows, weight.n - start)
        w = dequantize(weight, x.dtype, row_start=start, row_count=count, out=scratch[:count])
        target = out[:, start:start + count]  # a strided view cuBLAS writes in place
        if bias is None:
            torch.mm(x, w.t(), out=target)
        else:
            torch.addmm(bias[start:start + count], x, w.t(), out=target)
    return out


def matmul_grad_input(grad: torch.Tensor, weight: NF4Weight, chunk_elems: int | None) -> torch.Tensor:
    """``grad [m, n] @ W -> [m, k]``, dequantizing block-aligned column slices of W at a time.

    Column slices keep the whole reduction over n inside one GEMM, so each output element is
    rounded once, exactly as with a fully dequantized weight.
    """
    if chunk_elems is None or not weight.row_aligned:
        return grad @ dequantize(weight, grad.dtype)
    cols = _chunk(weight.k, weight.n, chunk_elems, weight.blocksize)
    if cols >= weight.k:
        return grad @ dequantize(weight, grad.dtype)
    out = torch.empty(grad.shape[0], weight.k, dtype=grad.dtype, device=grad.device)
    scratch = torch.empty(weight.n * cols, dtype=grad.dtype, device=grad.device)
    for start in range(0, weight.k, cols):
        count = min(cols, weight.k - start)
        w = dequantize(weight, grad.dtype, col_start=start, col_count=count,
                       out=scratch[:weight.n * count].view(weight.n, count))
        torch.mm(grad, w, out=out[:, start:start + count])
    return out
