"""Large-M path: dequantize the weight, whole or a chunk at a time, then cuBLAS.

With chunks, scratch buffers of ``chunk_elems`` elements are reused for every chunk, so no
dequantized copy of the whole weight is alive. ``overlap`` dequantizes the next chunk on a side
stream into a second buffer while cuBLAS multiplies the current one on a high-priority stream:
the memory-bound dequantize then fills the SMs a GEMM leaves idle instead of adding to its time.
Nothing is kept between calls. Whether chunks (and which kind) pay is measured per shape (see
``tuning``).
"""
from __future__ import annotations

from typing import Callable

import torch

from peftlab.quant.kernels.dequant import dequantize
from peftlab.quant.kernels.weights import NF4Weight

# On CUDA, chunks of output rows are multiples of this, so every output column slice starts
# 16-byte aligned and fills whole cuBLAS tiles (unaligned slices fall back to kernels ~3x slower).
ROW_ALIGN = 128

_chunk_streams: dict[torch.device, tuple[torch.cuda.Stream, torch.cuda.Stream]] = {}


def _chunk(total: int, other: int, chunk_elems: int | None, align: int) -> int:
    """Length along ``total`` of a chunk of about ``chunk_elems`` elements, a multiple of ``align``."""
    if chunk_elems is None or not total:
        return total
    length = max(align, chunk_elems // max(other, 1) // align * align)
    return min(total, length)


def overlap_pays(weight: NF4Weight, chunk_elems: int) -> bool:
    """Whether an ``overlap`` plan runs as such: only while a CUDA graph is captured (eagerly its
    streams and events cost more host time than it saves: a QLoRA training step of the 1.1B
    Llama fell from 15.0k to 11.7k tokens/s) and for weights of two or more whole chunks (with
    fewer, the exposed first dequantize and short GEMMs ate the gain)."""
    return (weight.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
            and weight.n * weight.k >= 2 * chunk_elems)


def plan_chunks(kind: str, config: int | None, weight: NF4Weight) -> tuple[int | None, bool]:
    """``(chunk_elems, overlap)`` for a ``chunked`` or ``overlap`` plan of ``tuning`` (another kind:
    the whole weight); an ``overlap`` plan that does not pay here runs on the whole weight."""
    if kind == "overlap":
        return (config, True) if overlap_pays(weight, config) else (None, False)
    return (config if kind == "chunked" else None), False


def _streams_for(device: torch.device) -> tuple[torch.cuda.Stream, torch.cuda.Stream]:
    """``(fill, gemm)`` streams: dequantization at the default (lowest) priority, GEMMs at a high one.

    cuBLAS's large GEMMs are persistent kernels that hold every SM they use, so a dequantize runs
    beside one only on the SMs its last partial wave leaves idle. At equal priority the rest of
    that dequantize then competes with the next GEMM for the SMs; at high priority the GEMM's
    blocks go first (M=4096, 4096x11008: 509.0 -> 490.2 us; 14336x4096: 674.0 -> 653.4 us).
    """
    if device not in _chunk_streams:
        _chunk_streams[device] = (torch.cuda.Stream(device), torch.cuda.Stream(device, priority=-1))
    return _chunk_streams[device]


def _run_chunks(starts: list[int], buffers: list[torch.Tensor], fill: Callable, use: Callable) -> None:
    """``use(start, fill(start, buffer))`` for every chunk start, in order.

    With two buffers on a CUDA device, chunk i+1 is filled on one side stream while chunk i is
    used on another (see ``_streams_for``); events order each fill after the last use of its
    buffer and each use after its fill, and the caller's stream waits for both streams at the
    end, so it (and the caching allocator, which frees ``buffers`` on it) sees the work as its
    own. Also under CUDA-graph capture, where the events become graph edges and the streams'
    priorities are kept.
    """
    if len(buffers) < 2 or buffers[0].device.type != "cuda":
        for start in starts:
            use(start, fill(start, buffers[0]))
        return
    main = torch.cuda.current_stream(buffers[0].device)
    fill_stream, gemm_stream = _streams_for(buffers[0].device)
    fill_stream.wait_stream(main)
    gemm_stream.wait_stream(main)
    last_use: list[torch.cuda.Event | None] = [None, None]

    def fill_on_side(i: int):
        with torch.cuda.stream(fill_stream):
            if last_use[i % 2] is not None:
                fill_stream.wait_event(last_use[i % 2])
            piece = fill(starts[i], buffers[i % 2])
            filled = torch.cuda.Event()
            filled.record(fill_stream)
        return piece, filled

    pending = fill_on_side(0)
    for i, start in enumerate(starts):
        piece, filled = pending
        gemm_stream.wait_event(filled)
        with torch.cuda.stream(gemm_stream):
            use(start, piece)
            used = torch.cuda.Event()
            used.record(gemm_stream)
        last_use[i % 2] = used
        if i + 1 < len(starts):  # queued after this GEMM, so eagerly it cannot start before it either
            pending = fill_on_side(i + 1)
    main.wait_stream(gemm_stream)
    main.wait_stream(fill_stream)


def matmul(x: torch.Tensor, weight: NF4Weight, bias: torch.Tensor | None, chunk_elems: int | None,
           overlap: bool = False) -> torch.Tensor:
    """``x [m, k] @ W.T (+ bias)``, dequantizing ``chunk_elems`` weight elements (whole rows) at a time.

    ``chunk_elems=None`` dequantizes the whole weight once (any shape and blocksize); ``overlap``
    dequantizes the next chunk while the current one is multiplied (CUDA; two scratch buffers).
    """
    if chunk_elems is None or not weight.row_aligned:
        return torch.nn.functional.linear(x, dequantize(weight, x.dtype), bias)
    rows = _chunk(weight.n, weight.k, chunk_elems, ROW_ALIGN if x.is_cuda else 1)
    if rows >= weight.n:
        return torch.nn.functional.linear(x, dequantize(weight, x.dtype), bias)
    out = torch.empty(x.shape[0], weight.n, dtype=x.dtype, device=x.device)
    buffers = [torch.empty(rows, weight.k, dtype=x.dtype, device=x.device) for _ in range(1 + overlap)]

    def fill(start: int, scratch: torch.Tensor) -> torch.Tensor:
        count = min(rows, weight.n - start)
        return dequantize(weight, x.dtype, row_start=start, row_count=count, out=scratch[:count])

    def use(start: int, w: torch.Tensor) -> None:
        target = out[:, start:start + w.shape[0]]  # a strided view cuBLAS writes in place
        if bias is None:
            torch.mm(x, w.t(), out=target)
        else:
            torch.addmm(bias[start:start + w.shape[0]], x, w.t(), out=target)

    _run_chunks(list(range(0, weight.n, rows)), buffers, fill, use)
    return out


def matmul_grad_input(grad: torch.Tensor, weight: NF4Weight, chunk_elems: int | None,
                      overlap: bool = False) -> torch.Tensor:
    """``grad [m, n] @ W -> [m, k]``, dequantizing block-aligned column slices of W at a time.

    Column slices keep the whole reduction over n inside one GEMM, so each output element is
    rounded once, exactly as with a fully dequantized weight. ``overlap`` as in :func:`matmul`.
    """
    if chunk_elems is None or not weight.row_aligned:
        return grad @ dequantize(weight, grad.dtype)
    cols = _chunk(weight.k, weight.n, chunk_elems, weight.blocksize)
    if cols >= weight.k:
        return grad @ dequantize(weight, grad.dtype)
    out = torch.empty(grad.shape[0], weight.k, dtype=grad.dtype, device=grad.device)
    buffers = [torch.empty(weight.n * cols, dtype=grad.dtype, device=grad.device) for _ in range(1 + overlap)]

    def fill(start: int, scratch: torch.Tensor) -> torch.Tensor:
        count = min(cols, weight.k - start)
        return dequantize(weight, grad.dtype, col_start=start, col_count=count,
                          out=scratch[:weight.n * count].view(weight.n, count))

    def use(start: int, w: torch.Tensor) -> None:
        torch.mm(grad, w, out=out[:, start:start + w.shape[1]])

    _run_chunks(list(range(0, weight.k, cols)), buffers, fill, use)
    return out
