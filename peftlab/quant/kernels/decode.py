"""Triton device functions shared by every NF4 kernel: block scales and tile decoding."""
from __future__ import annotations

import os

import triton
import triton.language as tl

# Codebook lookups are gathers from a 64-byte table that L1 serves in one wavefront. They are
# issued as inline PTX that decodes four packed bytes per call. The table is 64-byte aligned
# (``NF4Weight`` guarantees it), so a value's address is the table's high word joined with
# ``(nibble << 2) | low word``: a shift, one LOP3, a register move and the load per value, where
# Triton's own gather spends a 64-bit add instead. As PTX the lookups are also invisible to the
# software pipeliner of tensor-core loops, which would otherwise turn each into an asynchronous
# 4-byte copy through shared memory. The interpreter cannot run PTX and takes the plain loads.
_PTX = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") not in ("1", "true", "True"))


def _lookup_asm(shifts: list[int]) -> str:
    """PTX: output i = table[(byte i of $4 >> nibble) & 15]; $5 and $9 are the table's low/high words."""
    lines = []
    for i, shift in enumerate(shifts):
        move = f"shl.b32 t, $4, {-shift};" if shift < 0 else f"shr.u32 t, $4, {shift};"
        lines.append(f"{move} and.b32 t, t, 60; or.b32 t, t, $5; mov.b64 a, {{t, $9}}; ld.global.nc.f32 ${i}, [a];")
    return "{ .reg .u32 t; .reg .u64 a;\n" + "\n".join(lines) + " }"


# Byte i holds element 2i in bits 8i+4..8i+7 and element 2i+1 in bits 8i..8i+3; shifting the
# nibble to bits 2..5 yields its byte offset in the fp32 table.
_HIGH_NIBBLES = tl.constexpr(_lookup_asm([2, 10, 18, 26]))
_LOW_NIBBLES = tl.constexpr(_lookup_asm([-2, 6, 14, 22]))
_CONSTRAINTS = tl.constexpr("=f,=f,=f,=f,r,r,r,r,r,r,r,r,r")


@triton.jit
def nf4_pairs(code_ptr, packed):
    """Codebook values of the high and low nibbles of uint8 ``packed`` -> two fp32 tensors."""
    if _PTX:
        address = (code_ptr + tl.zeros(packed.shape, tl.int32)).to(tl.int64, bitcast=True)
        low = (address & 0xFFFFFFFF).to(tl.int32)
        high = (address >> 32).to(tl.int32)
        hi = tl.inline_asm_elementwise(_HIGH_NIBBLES, _CONSTRAINTS, [packed, low, high],
                                       dtype=tl.float32, is_pure=True, pack=4)
        lo = tl.inline_asm_elementwise(_LOW_NIBBLES, _CONSTRAINTS, [packed, low, high],
                                       dtype=tl.float32, is_pure=True, pack=4)
    else:
        index = packed.to(tl.int32)
        hi = tl.load(code_ptr + (index >> 4))
        lo = tl.load(code_ptr + (index & 15))
    return hi, lo


@triton.jit
def scale_bytes(absmax_ptr, nested_absmax_ptr, block, mask, NESTED: tl.constexpr):
    """The raw loads behind ``block_scales``: (absmax entries, second-level scales when NESTED);
    ``mask=None`` loads without a mask."""
    if mask is None:
        q = tl.load(absmax_ptr + block)
        outer = tl.load(nested_absmax_ptr + (block >> 8)) if NESTED else q
    elif NESTED:
        q = tl.load(absmax_ptr + block, mask=mask, other=0)
        outer = tl.load(nested_absmax_ptr + (block >> 8), mask=mask, other=0.0)
    else:
        q = tl.load(absmax_ptr + block, mask=mask, other=0.0)
        outer = q
    return q, outer


@triton.jit
def decode_scales(nested_code_ptr, offset, q, outer, mask, NESTED: tl.constexpr):
    """fp32 absmax from ``scale_bytes``' loads; nested decode is ``nested_code[q] * outer + offset``
    (bitsandbytes' order), 0 where ``mask`` is false (``None``: nowhere)."""
    if NESTED:
        scale = tl.load(nested_code_ptr + q.to(tl.int32)) * outer + offset
        if mask is not None:
            scale = tl.where(mask, scale, 0.0)
    else:
        scale = q
    return scale


@triton.jit
def block_scales(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, block, mask, NESTED: tl.constexpr):
    """fp32 absmax of the quantization blocks ``block``; decodes double quantization when NESTED."""
    q, outer = scale_bytes(absmax_ptr, nested_absmax_ptr, block, mask, NESTED)
    return decode_scales(nested_code_ptr, offset, q, outer, mask, NESTED)


@triton.jit
def packed_offsets(rows, cols, k_blocks, BS: tl.constexpr, VEC: tl.constexpr, TILED: tl.constexpr):
    """Byte offsets of whole blocks' packed codes: blocks ``cols`` of weight rows ``rows``
    (broadcast to [R, NB]) -> [R, NB, BS/2], row-major or, with TILED, in tile order.

    Row-major, a block's BS/2 bytes are contiguous. Tiles (``peftlab.quant.nf4.to_tiles``) hold
    16 rows x 64 bytes each, row-major over the weight; a block of up to 64 bytes lies inside one
    tile row, a longer one starts a tile and goes on 1 KB further every 64 bytes. ``VEC`` caps
    the bytes one load instruction reads: 4 bytes decode to 8 values, which is exactly one
    16-byte vector of bf16/fp16 activations, so both tiles share one layout.
    """
    HB: tl.constexpr = BS // 2
    j = tl.arange(0, HB)
    j = j // VEC * VEC + j % VEC  # same offsets; tells the compiler only VEC bytes are contiguous
    if TILED:
        byte0 = cols.to(tl.int64) * HB
        tile = (rows // 16).to(tl.int64) * (k_blocks * HB // 64) + byte0 // 64
        start = tile * 1024 + (rows % 16) * 64 + byte0 % 64
        # a multiple of the block's bytes (or of 64): lost in the index arithmetic, needed for wide loads
        start = tl.multiple_of(start, [HB if HB <= 64 else 64] * 2)
        if HB > 64:  # runs of VEC bytes stay contiguous and aligned, which the arithmetic hides too
            j = tl.max_contiguous(tl.multiple_of(j // 64 * 1024 + j % 64, VEC), VEC)
        offsets = start[:, :, None] + j[None, None, :]
    else:
        block = rows.to(tl.int64) * k_blocks + cols
        offsets = block[:, :, None] * HB + j[None, None, :]
    return offsets


@triton.jit
def nf4_bytes(packed_ptr, rows, cols, k_blocks, mask, BS: tl.constexpr, VEC: tl.constexpr = 16,
              TILED: tl.constexpr = False):
    """Packed bytes of whole blocks (see ``packed_offsets``) -> uint8 [R, NB, BS/2]; the high
    nibble of byte j is element 2j of its block."""
    return tl.load(packed_ptr + packed_offsets(rows, cols, k_blocks, BS, VEC, TILED), mask=mask[:, :, None], other=0)


@triton.jit
def decode_codes(code_ptr, packed, BS: tl.constexpr):
    """Unscaled codebook values of ``nf4_bytes``' tile -> fp32 [R, NB, BS]."""
    hi, lo = nf4_pairs(code_ptr, packed)
    return tl.reshape(tl.join(hi, lo), (packed.shape[0], packed.shape[1], BS))


@triton.jit
def nf4_codes(packed_ptr, code_ptr, rows, cols, k_blocks, mask, BS: tl.constexpr, VEC: tl.constexpr = 16,
              TILED: tl.constexpr = False):
    """Unscaled codebook values of whole blocks (``nf4_bytes``' arguments) -> fp32 [R, NB, BS]."""
    return decode_codes(code_ptr, nf4_bytes(packed_ptr, rows, cols, k_blocks, mask, BS, VEC, TILED), BS)


@triton.jit
def dequant_tile(packed_ptr, code_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset,
                 rows, row_mask, col_block0, k_blocks,
                 NB: tl.constexpr, BS: tl.constexpr, NESTED: tl.constexpr, TILED: tl.constexpr):
    """Dequantized fp32 tile: weight rows ``rows`` [R] x columns [col_block0*BS, +NB*BS).

    Needs rows made of whole blocks (k % BS == 0); columns past the row end read as 0.
    """
    cols = col_block0 + tl.arange(0, NB)
    mask = row_mask[:, None] & (cols < k_blocks)[None, :]
    block = rows[:, None] * k_blocks + cols[None, :]
    scale = block_scales(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, block, mask, NESTED)
    codes = nf4_codes(packed_ptr, code_ptr, rows[:, None], cols[None, :], k_blocks, mask, BS, 16, TILED)
    return tl.reshape(codes * scale[:, :, None], (rows.shape[0], NB * BS))
