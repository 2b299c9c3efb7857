"""Tensor-core NF4 matmuls that dequantize weight tiles in registers and feed ``tl.dot``.

``matmul``: ``y = x @ W.T + b`` (forward). ``matmul_grad_input``: ``dx = dy @ W`` (backward for
the input; W is read in its stored row-major order, so no transposed copy exists anywhere).
Both can split the reduction over programs (``SPLIT_K``): partial fp32 tiles go to a workspace
that one small kernel sums, adds the bias to and casts, keeping the result deterministic.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from peftlab.quant.kernels.decode import dequant_tile
from peftlab.quant.kernels.weights import NF4Weight


@triton.jit(do_not_specialize=["M", "N", "k_blocks", "steps_per_split"])
def _matmul_kernel(x_ptr, packed_ptr, code_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset,
                   bias_ptr, out_ptr, M, N, K, k_blocks, stride_xm, stride_om, steps_per_split,
                   BS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, NB: tl.constexpr,
                   SPLIT_K: tl.constexpr, W_IS_A: tl.constexpr, HAS_BIAS: tl.constexpr, NESTED: tl.constexpr,
                   TILED: tl.constexpr):
    BK: tl.constexpr = NB * BS
    # Activation tiles vary fastest, so programs decoding the same weight tile run together.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    offs_m = (pid % num_m) * BM + tl.arange(0, BM)
    rows = (pid // num_m) * BN + tl.arange(0, BN)
    m_mask = offs_m < M
    row_mask = rows < N
    # W_IS_A computes the transposed tile (W @ x.T): for few activation rows the weight tile then
    # fills the MMA's wide M side and the activations its narrow N side.
    if W_IS_A:
        acc = tl.zeros((BN, BM), dtype=tl.float32)
    else:
        acc = tl.zeros((BM, BN), dtype=tl.float32)
    step0 = tl.program_id(1) * steps_per_split
    step1 = tl.minimum(step0 + steps_per_split, tl.cdiv(k_blocks, NB))
    for step in range(step0, step1):
        w = dequant_tile(packed_ptr, code_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset,
                         rows, row_mask, step * NB, k_blocks, NB, BS, NESTED, TILED).to(x_ptr.dtype.element_ty)
        kk = step * BK + tl.arange(0, BK)
        x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + kk[None, :],
                    mask=m_mask[:, None] & (kk < K)[None, :], other=0.0)
        if W_IS_A:
            acc = tl.dot(w, tl.trans(x), acc)
        else:
            acc = tl.dot(x, tl.trans(w), acc)
    if W_IS_A:
        acc = tl.trans(acc)
    mask = m_mask[:, None] & row_mask[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)[None, :]
        dst = offs_m[:, None].to(tl.int64) * stride_om + rows[None, :]
        tl.store(out_ptr + dst, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        dst = (tl.program_id(1) * M + offs_m[:, None]).to(tl.int64) * N + rows[None, :]
        tl.store(out_ptr + dst, acc, mask=mask)


@triton.jit(do_not_specialize=["M", "k_blocks", "steps_per_split"])
def _matmul_grad_input_kernel(g_ptr, packed_ptr, code_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset,
                              out_ptr, M, N, K, k_blocks, stride_gm, stride_om, steps_per_split,
                              BS: tl.constexpr, BM: tl.constexpr, BR: tl.constexpr, NB: tl.constexpr,
                              SPLIT_K: tl.constexpr, NESTED: tl.constexpr, TILED: tl.constexpr):
    # Program -> a [BM, NB*BS] tile of dx; it walks the weight's rows (the reduction) BR at a time.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    offs_m = (pid % num_m) * BM + tl.arange(0, BM)
    col_block0 = (pid // num_m) * NB
    cols = col_block0 * BS + tl.arange(0, NB * BS)
    m_mask = offs_m < M
    acc = tl.zeros((BM, NB * BS), dtype=tl.float32)
    step0 = tl.program_id(1) * steps_per_split
    step1 = tl.minimum(step0 + steps_per_split, tl.cdiv(N, BR))
    for step in range(step0, step1):
        rows = step * BR + tl.arange(0, BR)
        row_mask = rows < N
        w = dequant_tile(packed_ptr, code_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset,
                         rows, row_mask, col_block0, k_blocks, NB, BS, NESTED, TILED).to(g_ptr.dtype.element_ty)
        g = tl.load(g_ptr + offs_m[:, None].to(tl.int64) * stride_gm + rows[None, :],
                    mask=m_mask[:, None] & row_mask[None, :], other=0.0)
        acc = tl.dot(g, w, acc)
    mask = m_mask[:, None] & (cols < K)[None, :]
    if SPLIT_K == 1:
        dst = offs_m[:, None].to(tl.int64) * stride_om + cols[None, :]
        tl.store(out_ptr + dst, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        dst = (tl.program_id(1) * M + offs_m[:, None]).to(tl.int64) * K + cols[None, :]
        tl.store(out_ptr + dst, acc, mask=mask)


@triton.jit
def _split_k_sum_kernel(ws_ptr, bias_ptr, out_ptr, numel, N,
                        SPLIT_K: tl.constexpr, BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr):
    off = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = off < numel
    acc = tl.load(ws_ptr + off, mask=mask, other=0.0)
    for s in tl.static_range(1, SPLIT_K):
        acc += tl.load(ws_ptr + s * numel + off, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + off % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + off, acc.to(out_ptr.dtype.element_ty), mask=mask)


def finish_split_k(ws: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor, split_k: int) -> torch.Tensor:
    """``out = Σ ws[s] (+ bias)``: adds the fp32 partial results of a split-K launch, once per element."""
    numel, block = out.numel(), 1024
    _split_k_sum_kernel[(triton.cdiv(numel, block),)](
        ws, bias if bias is not None else out, out, numel, out.shape[1],
        SPLIT_K=split_k, BLOCK=block, HAS_BIAS=bias is not None, num_warps=4)
    return out


def _splits(steps: int, split_k: int) -> tuple[int, int]:
    """(programs along the reduction, steps each); never leaves a split without work."""
    per_split = triton.cdiv(steps, max(1, min(split_k, steps)))
    return triton.cdiv(steps, per_split), per_split


def matmul(x: torch.Tensor, weight: NF4Weight, bias: torch.Tensor | None, config: dict) -> torch.Tensor:
    """``x [m, k] @ W.T (+ bias) -> [m, n]`` with in-register dequantization; needs ``row_aligned``.

    ``config`` keys: ``BM``, ``BN``, ``NB`` (blocks per k step), ``SPLIT_K``, ``W_IS_A``,
    ``num_warps``, ``num_stages`` (see ``tuning``).
    """
    m, (n, k) = x.shape[0], (weight.n, weight.k)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    split_k, per_split = _splits(triton.cdiv(weight.k_blocks, config["NB"]), config["SPLIT_K"])
    target = out if split_k == 1 else torch.empty(split_k, m, n, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(m, config["BM"]) * triton.cdiv(n, config["BN"]), split_k)
    _matmul_kernel[grid](
        x, weight.packed, weight.code, *weight.scale_args(), bias if bias is not None else x, target,
        m, n, k, weight.k_blocks, x.stride(0), out.stride(0), per_split,
        BS=weight.blocksize, BM=config["BM"], BN=config["BN"], NB=config["NB"], SPLIT_K=split_k,
        W_IS_A=config["W_IS_A"], HAS_BIAS=bias is not None, NESTED=weight.nested, TILED=weight.tiled,
        num_warps=config["num_warps"], num_stages=config["num_stages"])
    return out if split_k == 1 else finish_split_k(target, bias, out, split_k)


def matmul_grad_input(grad: torch.Tensor, weight: NF4Weight, config: dict) -> torch.Tensor:
    """``grad [m, n] @ W -> [m, k]`` with in-register dequantization; needs ``row_aligned``.

    ``config`` keys: ``BM``, ``BR`` (weight rows per step), ``NB`` (output column blocks per
    program), ``SPLIT_K``, ``num_warps``, ``num_stages``.
    """
    m, (n, k) = grad.shape[0], (weight.n, weight.k)
    out = torch.empty(m, k, dtype=grad.dtype, device=grad.device)
    split_k, per_split = _splits(triton.cdiv(n, config["BR"]), config["SPLIT_K"])
    target = out if split_k == 1 else torch.empty(split_k, m, k, dtype=torch.float32, device=grad.device)
    grid = (triton.cdiv(m, config["BM"]) * triton.cdiv(weight.k_blocks, config["NB"]), split_k)
    _matmul_grad_input_kernel[grid](
        grad, weight.packed, weight.code, *weight.scale_args(), target,
        m, n, k, weight.k_blocks, grad.stride(0), out.stride(0), per_split,
        BS=weight.blocksize, BM=config["BM"], BR=config["BR"], NB=config["NB"], SPLIT_K=split_k,
        NESTED=weight.nested, TILED=weight.tiled, num_warps=config["num_warps"], num_stages=config["num_stages"])
    return out if split_k == 1 else finish_split_k(target, None, out, split_k)
