"""Dequantize an NF4 weight (or a block-aligned piece of it) to bf16/fp16/fp32 on the GPU."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from peftlab.quant.kernels.decode import block_scales, nf4_codes
from peftlab.quant.kernels.tuning import DEQUANT_CONFIG, dequant_blocks_per_program
from peftlab.quant.kernels.weights import NF4KernelError, NF4Weight


@triton.jit(do_not_specialize=["n_blocks", "sub_k_blocks", "k_blocks", "row0", "col_block0"])
def _dequant_blocks_kernel(packed_ptr, code_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, out_ptr,
                           n_blocks, sub_k_blocks, k_blocks, row0, col_block0, out_stride,
                           BS: tl.constexpr, NB: tl.constexpr, NESTED: tl.constexpr, TILED: tl.constexpr,
                           TILE_ORDER: tl.constexpr):
    # Program -> NB consecutive blocks of the sub-matrix: row-major over its blocks, or with
    # TILE_ORDER in the order tiles store them (16 rows of 128 // BS blocks each, tiles row-major),
    # so that a program reads contiguous bytes of a tiled weight.
    b = tl.program_id(0) * NB + tl.arange(0, NB)
    valid = b < n_blocks
    if TILE_ORDER:
        PER_ROW: tl.constexpr = 128 // BS
        tile, within = b // (16 * PER_ROW), b % (16 * PER_ROW)
        tiles_per_row = sub_k_blocks // PER_ROW
        r = tile // tiles_per_row * 16 + within // PER_ROW
        c = tile % tiles_per_row * PER_ROW + within % PER_ROW
    else:
        r = b // sub_k_blocks
        c = b - r * sub_k_blocks
    rows, cols = (row0 + r)[:, None], (col_block0 + c)[:, None]
    mask = valid[:, None]
    scale = block_scales(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, rows * k_blocks + cols, mask, NESTED)
    codes = nf4_codes(packed_ptr, code_ptr, rows, cols, k_blocks, mask, BS, 16, TILED)
    values = tl.reshape(codes * scale[:, :, None], (NB, BS))
    dst = (r.to(tl.int64) * out_stride + c * BS)[:, None] + tl.arange(0, BS)[None, :]
    tl.store(out_ptr + dst, values.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dequant_flat_kernel(packed_ptr, code_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, out_ptr,
                         numel, BS: tl.constexpr, BLOCK: tl.constexpr, NESTED: tl.constexpr):
    # Any shape: one element per lane, blocks may straddle rows and the last block may be partial.
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = e < numel
    byte = tl.load(packed_ptr + (e >> 1), mask=mask, other=0).to(tl.int32)
    nibble = tl.where((e & 1) == 0, byte >> 4, byte & 15)
    scale = block_scales(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, e // BS, mask, NESTED)
    value = tl.load(code_ptr + nibble) * scale
    tl.store(out_ptr + e, value.to(out_ptr.dtype.element_ty), mask=mask)


def dequantize(weight: NF4Weight, dtype: torch.dtype = torch.bfloat16, *, row_start: int = 0,
               row_count: int | None = None, col_start: int = 0, col_count: int | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantizes ``weight[row_start:+row_count, col_start:+col_count]`` to ``dtype``.

    The whole weight works for any shape and blocksize. A piece needs rows made of whole
    blocks and block-aligned columns (``col_start``, ``col_count`` multiples of the blocksize,
    or reaching the row end). ``out`` (``[rows, cols]``, unit column stride, any row stride)
    is filled in place, so a caller can reuse one scratch buffer; values match bitsandbytes'
    ``dequantize_4bit`` bit for bit.
    """
    rows = weight.n - row_start if row_count is None else row_count
    cols = weight.k - col_start if col_count is None else col_count
    if out is None:
        out = torch.empty(rows, cols, dtype=dtype, device=weight.device)
    if tuple(out.shape) != (rows, cols) or (cols > 1 and out.stride(1) != 1):
        raise NF4KernelError(f"dequantize out= must be a [{rows}, {cols}] tensor with unit column stride, "
                             f"got shape {list(out.shape)} strides {list(out.stride())}.")
    if rows == 0 or cols == 0:
        return out
    bs = weight.blocksize
    whole = row_start == 0 and col_start == 0 and rows == weight.n and cols == weight.k
    if whole and not weight.row_aligned:
        if not out.is_contiguous():
            raise NF4KernelError("dequantize out= must be contiguous when in_features is not a multiple "
                                 f"of the blocksize ({weight.k} vs {bs}).")
        numel = weight.n * weight.k
        block = DEQUANT_CONFIG["flat_block"]
        _dequant_flat_kernel[(triton.cdiv(numel, block),)](
            weight.packed, weight.code, *weight.scale_args(), out, numel,
            BS=bs, BLOCK=block, NESTED=weight.nested, num_warps=4, enable_fp_fusion=False)
        return out
    if not weight.row_aligned or col_start % bs or (cols % bs and col_start + cols != weight.k):
        raise NF4KernelError(
            f"dequantize of a piece needs in_features ({weight.k}) and the column range "
            f"[{col_start}, {col_start + cols}) aligned to the blocksize {bs}.")
    if not (0 <= row_start and row_start + rows <= weight.n and 0 <= col_start and col_start + cols <= weight.k):
        raise NF4KernelError(f"dequantize range rows [{row_start}, {row_start + rows}) x cols "
                             f"[{col_start}, {col_start + cols}) lies outside the weight {weight.n}x{weight.k}.")
    sub_k_blocks = cols // bs
    n_blocks = rows * sub_k_blocks
    nb = dequant_blocks_per_program(bs)
    # whole tiles of at most 64-byte blocks: walk them in storage order
    per_row = 128 // bs
    tile_order = (weight.tiled and bs <= 128 and row_start % 16 == 0 and rows % 16 == 0
                  and (col_start // bs) % per_row == 0 and sub_k_blocks % per_row == 0)
    _dequant_blocks_kernel[(triton.cdiv(n_blocks, nb),)](
        weight.packed, weight.code, *weight.scale_args(), out,
        n_blocks, sub_k_blocks, weight.k_blocks, row_start, col_start // bs, out.stride(0),
        BS=bs, NB=nb, NESTED=weight.nested, TILED=weight.tiled, TILE_ORDER=tile_order,
        num_warps=DEQUANT_CONFIG["num_warps"], enable_fp_fusion=False)
    return out
