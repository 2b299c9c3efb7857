"""An adapted linear layer in one kernel: ``y = x @ W.T + bias + (x @ A.T) @ (s·B).T`` (inference).

Run as separate GEMMs, the LoRA term costs two extra launches per layer and, at many tokens, a
read-modify-write of the whole output. Here the base GEMM's program adds the low-rank product to
its accumulator before the one store. ``h = x @ A.T`` (``[tokens, r]``) is either computed in the
same K loop from the x tiles the base product already loaded (``FUSE_DOWN``: free while the
kernel streams the weight, at few tokens) or passed in, computed once outside (at many tokens,
where recomputing it for every column tile would cost tensor-core time).

Where the base GEMM is better left to cuBLAS (many tokens), ``lora_add`` adds the low-rank
product to its output in one pass instead. At still more tokens, reading x again for ``h`` and the
output twice more moves more bytes than writing and reading a merged copy of the weight, so
``lora_transient_merge`` runs the layer on ``W + s·B @ A`` made for that one call.

The rank is padded to a power of two of at least 16 (``tl.dot``'s smallest K) by masked loads, so
A and s·B need no padded copies.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from peftlab.quant.kernels.ops import launch_device


@triton.jit(do_not_specialize=["M"])
def _lora_linear_kernel(x_ptr, w_ptr, bias_ptr, a_ptr, h_ptr, b_ptr, out_ptr,
                        M, N, K, R, stride_xm, stride_wn, stride_hm, stride_om,
                        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, RP: tl.constexpr,
                        GROUP_M: tl.constexpr, FUSE_DOWN: tl.constexpr, HAS_BIAS: tl.constexpr,
                        EVEN_K: tl.constexpr):
    # Grouped order: GROUP_M row tiles sweep the column tiles together, so W tiles are reused from L2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    offs_r = tl.arange(0, RP)
    # Rows past M / N wrap around to valid ones (their results are never stored): no load masks.
    x_ptrs = x_ptr + (offs_m % M)[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + (offs_n % N)[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    a_ptrs = a_ptr + offs_r[:, None] * K + offs_k[None, :]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    h = tl.zeros((BM, RP), dtype=tl.float32)
    for k in range(tl.cdiv(K, BK)):
        if EVEN_K:
            x = tl.load(x_ptrs)
            w = tl.load(w_ptrs)
        else:
            k_ok = offs_k[None, :] < K - k * BK
            x = tl.load(x_ptrs, mask=k_ok, other=0.0)
            w = tl.load(w_ptrs, mask=k_ok, other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
        if FUSE_DOWN:
            a_ok = (offs_r[:, None] < R) & (offs_k[None, :] < K - k * BK)
            h = tl.dot(x, tl.trans(tl.load(a_ptrs, mask=a_ok, other=0.0)), h)
            a_ptrs += BK
        x_ptrs += BK
        w_ptrs += BK
    if FUSE_DOWN:
        h16 = h.to(x_ptr.dtype.element_ty)  # rounded like a separate GEMM's output would be
    else:
        h16 = tl.load(h_ptr + (offs_m % M)[:, None].to(tl.int64) * stride_hm + offs_r[None, :],
                      mask=offs_r[None, :] < R, other=0.0)
    b = tl.load(b_ptr + (offs_n % N)[:, None] * R + offs_r[None, :], mask=offs_r[None, :] < R, other=0.0)
    acc = tl.dot(h16, tl.trans(b), acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    dst = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=mask)


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a16: torch.Tensor,
                b16: torch.Tensor, config: dict) -> torch.Tensor:
    """``x [m, k] @ weight.T + bias + (x @ a16.T) @ b16.T -> [m, n]`` in ``x.dtype``.

    ``weight [n, k]`` with unit column stride; ``a16 [r, k]`` and ``b16 [n, r]`` contiguous (the
    scaling already in ``b16``); all of ``x``'s dtype and device. ``config``: ``BM``, ``BN``, ``BK``,
    ``GROUP_M``, ``FUSE_DOWN``, ``num_warps``, ``num_stages`` (see ``tuning.lora_plan``).
    """
    m, k = x.shape
    n, r = b16.shape
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    h = a16 if config["FUSE_DOWN"] else x @ a16.t()  # unused when fused (any tensor will do)
    grid = (triton.cdiv(m, config["BM"]) * triton.cdiv(n, config["BN"]),)
    with launch_device(x.device):
        _lora_linear_kernel[grid](
            x, weight, bias if bias is not None else b16, a16, h, b16, out,
            m, n, k, r, x.stride(0), weight.stride(0), h.stride(0), out.stride(0),
            BM=config["BM"], BN=config["BN"], BK=config["BK"], RP=max(16, triton.next_power_of_2(r)),
            GROUP_M=config["GROUP_M"], FUSE_DOWN=config["FUSE_DOWN"], HAS_BIAS=bias is not None,
            EVEN_K=k % config["BK"] == 0, num_warps=config["num_warps"], num_stages=config["num_stages"])
    return out


@triton.jit(do_not_specialize=["M"])
def _lora_add_kernel(src_ptr, out_ptr, h_ptr, b_ptr, M, N, R, stride_sm, stride_om, stride_hm, stride_bn, stride_br,
                     BM: tl.constexpr, BN: tl.constexpr, RP: tl.constexpr):
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
    offs_r = tl.arange(0, RP)
    h = tl.load(h_ptr + offs_m[:, None].to(tl.int64) * stride_hm + offs_r[None, :],
                mask=(offs_m[:, None] < M) & (offs_r[None, :] < R), other=0.0)
    b = tl.load(b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
                mask=(offs_n[:, None] < N) & (offs_r[None, :] < R), other=0.0)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    src = tl.load(src_ptr + offs_m[:, None].to(tl.int64) * stride_sm + offs_n[None, :], mask=mask, other=0.0)
    y = tl.dot(h, tl.trans(b), src.to(tl.float32))
    dst = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(dst, y.to(out_ptr.dtype.element_ty), mask=mask)


def lora_add(out: torch.Tensor, h: torch.Tensor, b16: torch.Tensor, config: dict,
             src: torch.Tensor | None = None) -> torch.Tensor:
    """``out = src + h @ b16.T`` (``src`` defaults to ``out``: in place), one pass over the output:
    ``out``/``src [m, n]`` and ``h [m, r]`` with unit column stride, ``b16 [n, r]`` (any strides),
    one dtype. ``config``: ``BM``, ``BN``, ``num_warps``.

    At many tokens the LoRA term's cost is this read-modify-write of the output; cuBLAS runs a
    GEMM with K = r well below memory bandwidth, this kernel near it.
    """
    m, n = out.shape
    src = out if src is None else src
    if m:
        grid = (triton.cdiv(m, config["BM"]), triton.cdiv(n, config["BN"]))
        with launch_device(out.device):
            _lora_add_kernel[grid](src, out, h, b16, m, n, b16.shape[1], src.stride(0), out.stride(0), h.stride(0),
                                   b16.stride(0), b16.stride(1), BM=config["BM"], BN=config["BN"],
                                   RP=max(16, triton.next_power_of_2(b16.shape[1])), num_warps=config["num_warps"])
    return out


def lora_transient_merge(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a16: torch.Tensor,
                         b16: torch.Tensor, config: dict) -> torch.Tensor:
    """``x @ (weight + b16 @ a16).T + bias`` through a merged weight that exists only for this call.

    ``lora_add`` writes ``weight + b16 @ a16`` into a fresh ``[n, k]`` buffer in one pass (the base
    weight is read, never changed; the result is rounded as the merged layer's is), then cuBLAS
    runs the layer on it. Pays where the tokens outnumber what the weight's extra write and read
    cost (see ``tuning.LORA_FORWARD``). ``config`` as ``lora_add``'s, over the weight's ``[n, k]``.
    """
    merged = lora_add(torch.empty_like(weight), b16, a16.t(), config, src=weight)
    return F.linear(x, merged, bias)
