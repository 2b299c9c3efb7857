"""GEMV for a handful of activation rows: ``y = x @ W.T + b`` on CUDA cores, streaming packed NF4.

Nothing is dequantized to memory. One activation row (decoding) has its own persistent kernel,
``gemv_row``: each program loads the activation row once, keeps it in registers, and walks weight
rows ``pid, pid + programs, ...``, so a weight row costs one 16-byte load per thread, its
codebook lookups and one reduction; with about eight programs per SM enough rows are in flight
to keep HBM busy. A row longer than the chunk one program holds is split along K into fp32
partial sums that a second small kernel adds.

Several activation rows go through ``gemv``: a program computes BN outputs of one activation row:
it walks BN weight rows, decodes NB blocks per step in registers, multiplies by x, and applies
each block's absmax once per block (after the in-block sum), not per element. Weight and
activation tiles are loaded in one layout (4 packed bytes and 8 activations per thread), so
they meet without shuffles, and each activation load serves BN weight rows.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from peftlab.quant.kernels.decode import (
    block_scales,
    decode_codes,
    decode_scales,
    nf4_bytes,
    nf4_codes,
    scale_bytes,
)
from peftlab.quant.kernels.gemm import finish_split_k
from peftlab.quant.kernels.weights import NF4KernelError, NF4Weight


@triton.jit(do_not_specialize=["M", "N", "k_blocks"])
def _gemv_kernel(x_ptr, packed_ptr, code_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, bias_ptr,
                 out_ptr, M, N, k_blocks, stride_xm, stride_om,
                 BS: tl.constexpr, BN: tl.constexpr, NB: tl.constexpr, VEC: tl.constexpr,
                 HAS_BIAS: tl.constexpr, NESTED: tl.constexpr, TILED: tl.constexpr):
    # Activation rows vary fastest, so programs reading the same weight rows run together (L2 reuse).
    pid = tl.program_id(0)
    m = pid % M
    rows = (pid // M) * BN + tl.arange(0, BN)
    row_mask = rows < N
    x_row = x_ptr + m.to(tl.int64) * stride_xm
    acc = tl.zeros((BN, NB), dtype=tl.float32)
    for col_block0 in range(0, k_blocks, NB):
        cols = col_block0 + tl.arange(0, NB)
        col_mask = (cols < k_blocks)[None, :]
        mask = row_mask[:, None] & col_mask
        block = rows[:, None] * k_blocks + cols[None, :]
        codes = nf4_codes(packed_ptr, code_ptr, rows[:, None], cols[None, :], k_blocks, mask, BS, VEC, TILED)
        # Loaded as a [1, NB, BS] tile, x gets the weight tile's layout: each thread converts its
        # activations once and reuses them for its BN rows, with no exchange between threads.
        x = tl.load(x_row + (cols[:, None] * BS + tl.arange(0, BS)[None, :])[None, :, :],
                    mask=col_mask[:, :, None], other=0.0)
        partial = tl.sum(codes * x.to(tl.float32), axis=2)
        acc += partial * block_scales(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, block, mask, NESTED)
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(bias_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + m.to(tl.int64) * stride_om + rows, y.to(out_ptr.dtype.element_ty), mask=row_mask)


def gemv(x: torch.Tensor, weight: NF4Weight, bias: torch.Tensor | None, config: dict) -> torch.Tensor:
    """``x [m, k] @ W.T (+ bias) -> [m, n]`` for small m; needs ``weight.row_aligned``.

    ``config``: ``BN`` rows per program, ``NB`` blocks per step, ``VEC`` packed bytes per load,
    ``num_warps`` (see ``tuning``).
    """
    m = x.shape[0]
    out = torch.empty(m, weight.n, dtype=x.dtype, device=x.device)
    bn = config.get("BN", 1)
    _gemv_kernel[(m * triton.cdiv(weight.n, bn),)](
        x, weight.packed, weight.code, *weight.scale_args(), bias if bias is not None else x, out,
        m, weight.n, weight.k_blocks, x.stride(0), out.stride(0),
        BS=weight.blocksize, BN=bn, NB=config["NB"], VEC=config.get("VEC", 4), HAS_BIAS=bias is not None,
        NESTED=weight.nested, TILED=weight.tiled, num_warps=config["num_warps"])
    return out


@triton.jit
def _row_fetch(packed_ptr, absmax_ptr, nested_absmax_ptr, row, cols, k_blocks,
               BS: tl.constexpr, VEC: tl.constexpr, NESTED: tl.constexpr, TILED: tl.constexpr):
    """The loads for weight row ``row`` over the blocks ``cols``: packed bytes, scale loads."""
    mask = (cols < k_blocks)[None, :]
    q, outer = scale_bytes(absmax_ptr, nested_absmax_ptr, row * k_blocks + cols[None, :], mask, NESTED)
    return nf4_bytes(packed_ptr, row, cols[None, :], k_blocks, mask, BS, VEC, TILED), q, outer


@triton.jit
def _row_dot(code_ptr, nested_code_ptr, offset, packed, q, outer, cols, x, k_blocks,
             BS: tl.constexpr, NESTED: tl.constexpr):
    """Σ over one row's fetched blocks: dequantized weight · ``x`` [1, KP, BS]."""
    scale = decode_scales(nested_code_ptr, offset, q, outer, (cols < k_blocks)[None, :], NESTED)
    return tl.sum(tl.sum(tl.sum(decode_codes(code_ptr, packed, BS) * x, axis=2) * scale, axis=1), axis=0)


@triton.jit
def _load_x(x_ptr, cols, k_blocks, BS: tl.constexpr):
    mask = (cols < k_blocks)[None, :, None]
    offs = (cols[:, None] * BS + tl.arange(0, BS)[None, :])[None, :, :]
    return tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit(do_not_specialize=["N", "k_blocks"])
def _row_kernel(x_ptr, packed_ptr, code_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, bias_ptr,
                out_ptr, N, k_blocks, BS: tl.constexpr, CHUNK: tl.constexpr, VEC: tl.constexpr,
                HAS_BIAS: tl.constexpr, NESTED: tl.constexpr, TILED: tl.constexpr):
    # Grid axis 1 splits K into chunks of CHUNK blocks, so a long row still fits in registers;
    # each chunk writes its own fp32 partial row of ``out`` (summed afterwards) unless there is one.
    # The loads of a program's next row are issued before its current row is decoded, so two rows
    # per program are in flight and decoding overlaps the memory latency instead of following it
    # (measured never slower than fetching after the decode: kernels-gemv-prefetch-h100.json).
    chunk = tl.program_id(1)
    step = tl.num_programs(0)
    cols = chunk * CHUNK + tl.arange(0, CHUNK)
    x = _load_x(x_ptr, cols, k_blocks, BS)
    target = out_ptr + chunk.to(tl.int64) * N
    row = tl.program_id(0)
    packed, q, outer = _row_fetch(packed_ptr, absmax_ptr, nested_absmax_ptr, row, cols, k_blocks, BS, VEC, NESTED,
                                  TILED)
    for _ in range(row, N, step):
        # The last fetch of a program re-reads a valid row (clamped) rather than branching.
        ahead = tl.minimum(row + step, N - 1)
        packed_ahead, q_ahead, outer_ahead = _row_fetch(packed_ptr, absmax_ptr, nested_absmax_ptr, ahead, cols,
                                                        k_blocks, BS, VEC, NESTED, TILED)
        y = _row_dot(code_ptr, nested_code_ptr, offset, packed, q, outer, cols, x, k_blocks, BS, NESTED)
        if HAS_BIAS:
            y += tl.load(bias_ptr + row).to(tl.float32)
        tl.store(target + row, y.to(target.dtype.element_ty))
        packed, q, outer, row = packed_ahead, q_ahead, outer_ahead, row + step


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def gemv_row(x: torch.Tensor, weight: NF4Weight, bias: torch.Tensor | None, config: dict) -> torch.Tensor:
    """``x [1, k] @ W.T (+ bias) -> [1, n]``; needs ``weight.row_aligned``.

    ``config``: ``PROGRAMS_PER_SM``, ``CHUNK_BLOCKS`` (quantization blocks of K one program keeps
    in registers; longer rows are split and their partial sums added), ``VEC`` packed bytes per
    load, ``num_warps`` (see ``tuning``).
    """
    if x.shape[0] != 1:
        raise NF4KernelError(f"gemv_row takes one activation row, got {x.shape[0]}.")
    out = torch.empty(1, weight.n, dtype=x.dtype, device=x.device)
    chunk = min(config.get("CHUNK_BLOCKS", 64), triton.next_power_of_2(weight.k_blocks))
    split = triton.cdiv(weight.k_blocks, chunk)
    target = out if split == 1 else torch.empty(split, 1, weight.n, dtype=torch.float32, device=x.device)
    programs = min(weight.n, max(1, _sm_count(x.device) * config["PROGRAMS_PER_SM"] // split))
    _row_kernel[(programs, split)](
        x, weight.packed, weight.code, *weight.scale_args(), bias if bias is not None else x, target,
        weight.n, weight.k_blocks, BS=weight.blocksize, CHUNK=chunk, VEC=config.get("VEC", 16),
        HAS_BIAS=bias is not None and split == 1, NESTED=weight.nested, TILED=weight.tiled,
        num_warps=config["num_warps"])
    return out if split == 1 else finish_split_k(target, bias, out, split)
