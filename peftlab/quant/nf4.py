"""NF4 blockwise 4-bit quantization in plain PyTorch, bit-compatible with bitsandbytes.

Format (bitsandbytes 0.50): the row-major flattened ``[out, in]`` weight is cut into blocks of
``blocksize`` values; each block is scaled by its absolute maximum and every value is replaced by
the index of the nearest of 16 NormalFloat levels. Two indices share a byte, the even element in
the high nibble. With double quantization the fp32 block scales are themselves stored as 8 bits:
their mean (``offset``) is subtracted and the rest is quantized with bitsandbytes' signed dynamic
8-bit map in blocks of 256 scales.

The arithmetic below reproduces bitsandbytes' CPU path operation by operation so that packed bytes
and scales are bit-identical, and it runs unchanged on CUDA tensors.

On a GPU the packed bytes may instead be held in tiles (``to_tiles``): the same bytes reordered so
that each 16-row x 128-column piece of the weight is 1 KB of contiguous memory, the unit a warp of
the small-batch kernels reads per step. ``QuantState.tiled`` records the order; the serialized
format is always the row-major one above.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from peftlab.errors import PeftlabError

__all__ = [
    "NF4_CODE",
    "DYNAMIC_CODE",
    "VALID_BLOCKSIZES",
    "NESTED_BLOCKSIZE",
    "NF4FormatError",
    "QuantState",
    "create_dynamic_map",
    "quantize_nf4",
    "dequantize_nf4",
    "decode_absmax",
    "unpack_codes",
    "TILE_ROWS",
    "TILE_COLS",
    "tiles_fit",
    "require_tiles_fit",
    "to_tiles",
    "from_tiles",
    "in_tiles",
]


class NF4FormatError(PeftlabError, ValueError):
    """Raised when a tensor or quantization state cannot be (de)quantized as NF4."""


# Normal-quantile levels, normalised by their maximum (QLoRA; bitsandbytes `get_4bit_type("nf4")`).
NF4_CODE = torch.tensor(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=torch.float32,
)
# Decision boundaries: a scaled value equal to a midpoint goes to the lower level.
_NF4_MIDPOINTS = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2

VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# bitsandbytes guards the reciprocal of an all-zero block with this floor.
_TINY = 1e-38


def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """Return the sorted fp32 "dynamic" 8-bit code of Dettmers (2015) as bitsandbytes builds it.

    Each exponent level ``e`` (a power of ten) holds the midpoints of an even split of [0.1, 1];
    level ``i`` has ``2**i`` fractions (twice as many when unsigned), mirrored for the negative
    half. Zero and 1.0 complete the table; unused slots are zero-filled up to ``2**total_bits``.
    """
    fraction_bits = total_bits - 1 if signed else total_bits
    linear_items = 2 ** (total_bits - 1 - max_exponent_bits) - 1
    values: list[float] = []

    def add_level(exponent: int, n_fractions: int) -> None:
        edges = torch.linspace(0.1, 1, n_fractions + 1, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0
        level = (10.0 ** exponent) * means  # fp32 product, as in the reference
        values.extend(level.tolist())
        if signed:
            values.extend((-(10.0 ** exponent) * means).tolist())

    for i in range(max_exponent_bits):
        add_level(i - (max_exponent_bits - 1), 2 ** (i + fraction_bits - max_exponent_bits))
    if linear_items > 0:
        # Items with an all-zero exponent are spread over the largest level, 10**0.
        add_level(0, linear_items)
    values += [0.0, 1.0]
    if len(values) > 2**total_bits:
        raise NF4FormatError(f"dynamic map with {max_exponent_bits} exponent bits does not fit {total_bits} bits")
    values += [0.0] * (2**total_bits - len(values))
    return torch.tensor(sorted(values), dtype=torch.float32)


DYNAMIC_CODE = create_dynamic_map()


def _dynamic_lookup_table(code: torch.Tensor, size: int = 65536) -> torch.Tensor:
    """Nearest-code table over ``size`` evenly spaced points of [-1, 1].

    bitsandbytes' CPU blockwise 8-bit quantizer (used for the nested absmax) snaps each scaled value
    to the nearest of these grid points and reads the code from this table, rather than searching
    the code exactly; reproducing the grid is what makes the nested bytes identical.
    """
    grid = (torch.arange(size, dtype=torch.float32) * 2.0) / float(size - 1) - 1.0
    midpoints = 0.5 * (code[:-1] + code[1:])
    # Number of midpoints strictly below the grid point = index of the chosen code.
    return torch.searchsorted(midpoints, grid, side="left").to(torch.uint8)


_DYNAMIC_LUT = _dynamic_lookup_table(DYNAMIC_CODE)


@dataclass
class QuantState:
    """Everything besides the packed codes that is needed to dequantize an NF4 tensor.

    ``absmax`` holds one fp32 scale per block, or one uint8 code per block when double-quantized;
    then ``nested_absmax`` (fp32, one per ``nested_blocksize`` blocks), ``nested_code`` (the 256
    dynamic levels) and ``offset`` (the mean that was subtracted) decode it.
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    blocksize: int
    absmax: torch.Tensor
    code: torch.Tensor
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    nested_blocksize: int = NESTED_BLOCKSIZE
    offset: float | None = None
    tiled: bool = False  # packed bytes in the tile order of ``to_tiles`` rather than row-major

    @property
    def double_quant(self) -> bool:
        """Whether the block scales are themselves 8-bit quantized."""
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        """Number of elements of the original tensor."""
        return math.prod(int(d) for d in self.shape)

    def to(self, device: torch.device | str, copy: bool = False) -> "QuantState":
        """This state with every tensor on ``device`` (tensors copied even there when ``copy``)."""
        move = lambda t: None if t is None else t.to(device, copy=copy)  # noqa: E731
        return replace(self, absmax=move(self.absmax), code=move(self.code),
                       nested_absmax=move(self.nested_absmax), nested_code=move(self.nested_code))


def _check_blocksize(blocksize: int, name: str) -> None:
    if blocksize not in VALID_BLOCKSIZES:
        raise NF4FormatError(
            f"{name}: blocksize {blocksize!r} is not supported; use a power of two from 32 to 4096 "
            f"({', '.join(map(str, VALID_BLOCKSIZES))})."
        )


def _blockwise_absmax(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Max |x| of each block of ``flat`` (fp32); the last block may be shorter."""
    n_full = flat.numel() // blocksize * blocksize
    absmax = flat[:n_full].view(-1, blocksize).abs().amax(dim=1)
    if n_full < flat.numel():
        absmax = torch.cat([absmax, flat[n_full:].abs().amax().reshape(1)])
    return absmax


def _scale_nf4(flat: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """``flat / absmax`` per block, clamped to [-1, 1], exactly as bitsandbytes rounds it.

    Full blocks are multiplied by the fp32 reciprocal; the trailing partial block is divided —
    the two differ in the last bit for some values, and bitsandbytes does exactly this.
    """
    n_full = flat.numel() // blocksize * blocksize
    safe = absmax.clamp(min=_TINY)
    n_blocks_full = n_full // blocksize
    scaled = flat[:n_full].view(-1, blocksize) * torch.reciprocal(safe[:n_blocks_full]).unsqueeze(1)
    scaled = scaled.reshape(-1)
    if n_full < flat.numel():
        scaled = torch.cat([scaled, flat[n_full:] / safe[-1]])
    return scaled.clamp_(-1.0, 1.0)


def _quantize_nested(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """8-bit double quantization of the fp32 block scales -> (codes uint8, nested_absmax, offset)."""
    # The mean is taken on the CPU so that the offset (and with it every byte) is the same whether
    # the weight was quantized on the CPU or on a GPU; it is a small vector.
    offset = absmax.detach().to("cpu").mean()
    centered = absmax - offset.to(absmax.device)
    nested_absmax = _blockwise_absmax(centered, NESTED_BLOCKSIZE)
    n = centered.numel()
    pad = (-n) % NESTED_BLOCKSIZE
    blocks = torch.nn.functional.pad(centered, (0, pad)).view(-1, NESTED_BLOCKSIZE)
    # The CPU reference multiplies every block (also the last) by the reciprocal of its max.
    zero = nested_absmax == 0
    inverse = torch.reciprocal(nested_absmax.masked_fill(zero, 1.0))
    scaled = (blocks * inverse.unsqueeze(1)).reshape(-1)[:n].clamp(-1.0, 1.0)
    grid_index = ((scaled + 1.0) * 0.5 * 65535.0 + 0.5).to(torch.int32)
    codes = _DYNAMIC_LUT.to(absmax.device).index_select(0, grid_index)
    # An all-zero block of scales stores code 0 (its max is 0, so it decodes to 0 anyway).
    codes = codes.masked_fill(zero.repeat_interleave(NESTED_BLOCKSIZE)[:n], 0)
    return codes, nested_absmax, float(offset)


def quantize_nf4(
    weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True, *, name: str = "weight"
) -> tuple[torch.Tensor, QuantState]:
    """Quantize ``weight`` to NF4 -> (packed uint8 ``[numel // 2, 1]``, :class:`QuantState`).

    Bit-identical to ``bitsandbytes.functional.quantize_4bit(weight, quant_type="nf4",
    blocksize=blocksize, compress_statistics=double_quant)`` on the CPU, and the same bytes on any
    device (bitsandbytes' CUDA kernels differ only on all-zero blocks, stored as 0x00 instead of
    0x77; both decode to zero). ``name`` labels error messages.
    """
    if not isinstance(weight, torch.Tensor):
        raise NF4FormatError(f"{name}: expected a torch.Tensor to quantize, got {type(weight).__name__}.")
    if weight.dtype not in _SUPPORTED_DTYPES:
        raise NF4FormatError(
            f"{name}: cannot quantize a {weight.dtype} tensor to NF4; it must be float32, float16 or bfloat16."
        )
    _check_blocksize(blocksize, name)
    if weight.numel() == 0 or weight.numel() % 2:
        raise NF4FormatError(
            f"{name}: NF4 packs two values per byte, so the tensor needs an even, non-zero number of "
            f"elements; shape {tuple(weight.shape)} has {weight.numel()}."
        )
    flat = weight.detach().reshape(-1).float()
    absmax = _blockwise_absmax(flat, blocksize)
    codes = torch.bucketize(_scale_nf4(flat, absmax, blocksize), _NF4_MIDPOINTS.to(flat.device), out_int32=True)
    codes = codes.to(torch.uint8)
    packed = ((codes[0::2] << 4) | codes[1::2]).unsqueeze(1)

    state = QuantState(shape=tuple(weight.shape), dtype=weight.dtype, blocksize=blocksize,
                       absmax=absmax, code=NF4_CODE.to(flat.device))
    if double_quant:
        q, nested_absmax, offset = _quantize_nested(absmax)
        state = replace(state, absmax=q, nested_absmax=nested_absmax,
                        nested_code=DYNAMIC_CODE.to(flat.device), offset=offset)
    return packed, state


def decode_absmax(state: QuantState) -> torch.Tensor:
    """The fp32 per-block scales of ``state`` (decoding the 8-bit nested form when present)."""
    if not state.double_quant:
        return state.absmax.float()
    if state.offset is None or state.nested_code is None:
        raise NF4FormatError("double-quantized state needs both `offset` and `nested_code`.")
    n = state.absmax.numel()
    scales = state.nested_absmax.repeat_interleave(state.nested_blocksize)[:n]
    # Multiply, then add the offset as a separate rounding step, as bitsandbytes does.
    return state.nested_code.index_select(0, state.absmax.int()) * scales + state.offset


def _packed_bytes(packed: torch.Tensor) -> torch.Tensor:
    """``packed`` as a flat uint8 tensor (other storage dtypes reinterpret the same bytes)."""
    flat = packed.reshape(-1)
    return flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)


def unpack_codes(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """The 4-bit codes (uint8, one per element, length ``numel``) from packed bytes."""
    flat = _packed_bytes(packed)
    return torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1)[:numel]


def dequantize_nf4(packed: torch.Tensor, state: QuantState, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Rebuild the weight: ``NF4[code] * absmax`` in fp32, cast to ``dtype`` (default ``state.dtype``)."""
    numel = state.numel
    n_bytes = packed.numel() * packed.element_size()
    if n_bytes != (numel + 1) // 2:
        raise NF4FormatError(
            f"packed NF4 data has {n_bytes} bytes but the state's shape {tuple(state.shape)} needs "
            f"{(numel + 1) // 2}."
        )
    absmax = decode_absmax(state)
    if state.tiled:
        packed = from_tiles(packed, state.shape)
    n_blocks = -(-numel // state.blocksize)
    if absmax.numel() != n_blocks:
        raise NF4FormatError(
            f"absmax has {absmax.numel()} entries but shape {tuple(state.shape)} with blocksize "
            f"{state.blocksize} needs {n_blocks}."
        )
    # One gather per byte: row b of `pairs` holds the values of its high and low nibble.
    code = state.code.float()
    byte = torch.arange(256, device=code.device)
    pairs = torch.stack([code[byte >> 4], code[byte & 0xF]], dim=1)
    flat = _packed_bytes(packed)
    values = pairs.index_select(0, flat.int()).reshape(-1)[:numel]  # (advanced indexing is far slower)
    pad = n_blocks * state.blocksize - numel
    if pad:
        values = torch.nn.functional.pad(values, (0, pad))
    values = values.view(n_blocks, state.blocksize) * absmax.unsqueeze(1)
    return values.reshape(-1)[:numel].to(dtype or state.dtype).view(state.shape)


# ----------------------------------------------------------------------------- tiled byte order
TILE_ROWS = 16  # weight rows of a tile: the rows one tensor-core warp owns
TILE_COLS = 128  # weight columns of a tile: one step of a warp, 64 packed bytes per row


def tiles_fit(shape: tuple[int, ...], blocksize: int) -> bool:
    """Whether a ``[out, in]`` weight can be held in tiles: whole tiles, rows of whole blocks."""
    if len(shape) != 2:
        return False
    rows, cols = (int(d) for d in shape)
    return rows % TILE_ROWS == 0 and cols % TILE_COLS == 0 and cols % blocksize == 0


def require_tiles_fit(shape: tuple[int, ...], blocksize: int, where: str,
                      error: type[Exception] = NF4FormatError) -> None:
    """Raises ``error``, naming ``where``, unless :func:`tiles_fit` holds."""
    if not tiles_fit(shape, blocksize):
        raise error(f"{where}: a weight of shape {list(shape)} and blocksize {blocksize} cannot be held in "
                    f"tiles; rows must be a multiple of {TILE_ROWS} and columns of {TILE_COLS} and of the "
                    f"blocksize.")


def _tile_view(shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    rows, cols = (int(d) for d in shape)
    return rows // TILE_ROWS, TILE_ROWS, cols // TILE_COLS, TILE_COLS // 2


def to_tiles(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Row-major packed bytes of a ``shape`` weight -> tile order, as a new flat uint8 tensor.

    Byte ``j`` of row ``r`` moves to tile ``(r // 16, j // 64)`` (tiles row-major over the weight),
    row ``r % 16`` of it, byte ``j % 64``; needs :func:`tiles_fit`.
    """
    flat = _packed_bytes(packed)
    return flat.view(_tile_view(shape)).permute(0, 2, 1, 3).contiguous().view(-1)


def from_tiles(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The inverse of :func:`to_tiles`: tile-ordered bytes -> a new flat row-major uint8 tensor."""
    flat = _packed_bytes(packed)
    groups, rows, tiles, width = _tile_view(shape)
    return flat.view(groups, tiles, rows, width).permute(0, 2, 1, 3).contiguous().view(-1)


def in_tiles(packed: torch.Tensor, state: QuantState) -> tuple[torch.Tensor, QuantState]:
    """The same weight with its bytes in tile order and a state that says so (needs :func:`tiles_fit`)."""
    if state.tiled:
        return packed, state
    require_tiles_fit(tuple(state.shape), state.blocksize, "in_tiles")
    return to_tiles(packed, tuple(state.shape)), replace(state, tiled=True)
