"""The view of one NF4 weight that every kernel reads, checked once at the door."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from peftlab.errors import PeftlabError
from peftlab.quant.nf4 import require_tiles_fit

NESTED_BLOCKSIZE = 256  # the double-quantization blocksize fixed by the bitsandbytes format


class NF4KernelError(PeftlabError, ValueError):
    """An NF4 weight, its quantization state or an activation does not fit the kernels."""


@dataclass(frozen=True)
class NF4Weight:
    """Device tensors and sizes of a packed NF4 weight of logical shape ``[n, k]``.

    ``packed`` holds two codes per byte of the flattened row-major weight (element ``2j``
    in the high nibble), or with ``tiled`` the same bytes in the tile order of
    ``peftlab.quant.nf4.to_tiles``; ``absmax`` has one entry per ``blocksize`` elements, fp32, or
    uint8 indices into ``nested_code`` scaled by ``nested_absmax`` plus ``offset`` when nested.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    code: torch.Tensor
    nested_absmax: torch.Tensor | None
    nested_code: torch.Tensor | None
    offset: float
    blocksize: int
    n: int
    k: int
    tiled: bool = False

    @property
    def nested(self) -> bool:
        """Whether absmax is double-quantized (uint8 indices plus a second-level scale)."""
        return self.nested_absmax is not None

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def k_blocks(self) -> int:
        """Quantization blocks per weight row (meaningful when ``row_aligned``)."""
        return self.k // self.blocksize

    @property
    def row_aligned(self) -> bool:
        """True when every row is made of whole blocks: the fast tiled kernels need this."""
        return self.k % self.blocksize == 0

    def scale_args(self) -> tuple:
        """The four kernel arguments that decode a block's absmax (see ``decode.block_scales``)."""
        if self.nested:
            return self.absmax, self.nested_absmax, self.nested_code, self.offset
        # Unused pointers still need a tensor of the right device; the kernel never reads them.
        return self.absmax, self.absmax, self.absmax, 0.0

    @classmethod
    def from_state(cls, packed: torch.Tensor, state: Any) -> "NF4Weight":
        """Builds the view from a packed tensor and a ``QuantState``-like object.

        ``state`` needs ``shape``, ``blocksize``, ``absmax``, ``code`` and, when double-quantized,
        ``nested_absmax``, ``nested_code`` and ``offset`` (peftlab's ``QuantState``); ``tiled``
        (absent: False) says the bytes are in tile order.
        """
        shape = tuple(state.shape)
        if len(shape) != 2:
            raise NF4KernelError(f"NF4 weight shape must be [out_features, in_features], got {list(shape)}.")
        n, k = (int(d) for d in shape)
        blocksize = int(state.blocksize)
        if blocksize < 2 or blocksize & (blocksize - 1):
            raise NF4KernelError(f"NF4 blocksize must be a power of two >= 2, got {blocksize}.")
        if packed.dtype != torch.uint8:
            packed = packed.view(torch.uint8)  # other quant_storage dtypes hold the same bytes
        packed = packed.reshape(-1)
        numel = n * k
        if packed.numel() != (numel + 1) // 2:
            raise NF4KernelError(
                f"packed NF4 weight has {packed.numel()} bytes but shape {list(shape)} needs {(numel + 1) // 2}.")
        n_blocks = -(-numel // blocksize)
        absmax = state.absmax.reshape(-1)
        if absmax.numel() != n_blocks:
            raise NF4KernelError(
                f"quant_state.absmax has {absmax.numel()} entries but shape {list(shape)} with blocksize "
                f"{blocksize} needs {n_blocks}.")
        code = state.code.reshape(-1)
        if code.numel() != 16 or code.dtype != torch.float32:
            raise NF4KernelError(f"quant_state.code must be 16 fp32 values, got {code.numel()} {code.dtype}.")
        nested_absmax = getattr(state, "nested_absmax", None)
        nested_code = getattr(state, "nested_code", None)
        offset = 0.0
        if absmax.dtype == torch.uint8:
            if nested_absmax is None or nested_code is None:
                raise NF4KernelError("quant_state.absmax is uint8 but nested_absmax/nested_code are missing.")
            nested_blocksize = int(getattr(state, "nested_blocksize", NESTED_BLOCKSIZE))
            if nested_blocksize != NESTED_BLOCKSIZE:
                raise NF4KernelError(
                    f"quant_state.nested_blocksize must be {NESTED_BLOCKSIZE}, got {nested_blocksize}.")
            nested_absmax = nested_absmax.reshape(-1)
            nested_code = nested_code.reshape(-1)
            if nested_absmax.numel() != -(-n_blocks // NESTED_BLOCKSIZE) or nested_code.numel() != 256:
                raise NF4KernelError(
                    f"quant_state.nested_absmax must have {-(-n_blocks // NESTED_BLOCKSIZE)} entries and "
                    f"nested_code 256, got {nested_absmax.numel()} and {nested_code.numel()}.")
            offset = float(state.offset or 0.0)
        elif absmax.dtype == torch.float32:
            nested_absmax = nested_code = None
        else:
            raise NF4KernelError(f"quant_state.absmax must be float32 or uint8 (nested), got {absmax.dtype}.")
        tiled = bool(getattr(state, "tiled", False))
        if tiled:
            require_tiles_fit((n, k), blocksize, "quant_state.tiled says the NF4 bytes are in tiles", NF4KernelError)
        if code.data_ptr() % 64:
            code = code.clone()  # the kernels' codebook lookups need a 64-byte aligned table
        tensors = [packed, absmax, code] + ([nested_absmax, nested_code] if nested_absmax is not None else [])
        if any(t.device != packed.device for t in tensors):
            raise NF4KernelError("NF4 weight tensors (packed, absmax, code, nested_*) must be on one device.")
        return cls(packed, absmax, code, nested_absmax, nested_code, offset, blocksize, n, k, tiled)
