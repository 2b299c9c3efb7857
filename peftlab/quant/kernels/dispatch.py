"""The one door every NF4 matmul goes through: picks a backend by device.

CUDA: peftlab's Triton kernels when Triton is installed; else bitsandbytes when it is installed
with a working CUDA library; else the torch reference. CPU and anything else: the torch
reference. Every backend implements the same three functions:

- ``linear(x, layer)``: ``x @ W.T + bias`` in ``x.dtype`` (x is already in the compute dtype);
- ``grad_input(grad_out, layer)``: ``grad_out @ W`` in ``grad_out.dtype``;
- ``dequantize(layer, dtype)``: ``W`` as ``[out_features, in_features]`` in ``dtype``.

``layer`` is an :class:`~peftlab.quant.linear4bit.NF4Linear`: ``layer.weight`` (packed uint8),
``layer.quant_state`` (:class:`~peftlab.quant.nf4.QuantState`) and ``layer.bias``.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from .. import nf4
from .weights import NF4Weight


class Backend(NamedTuple):
    """A named set of NF4 kernels."""

    name: str
    linear: Callable
    grad_input: Callable
    dequantize: Callable


def _bias(layer, dtype: torch.dtype) -> torch.Tensor | None:
    return None if layer.bias is None else layer.bias.to(dtype)


# ----------------------------------------------------------------------------- torch reference
def _torch_dequantize(layer, dtype: torch.dtype) -> torch.Tensor:
    return nf4.dequantize_nf4(layer.weight, layer.quant_state, dtype)


def _torch_linear(x: torch.Tensor, layer) -> torch.Tensor:
    return F.linear(x, _torch_dequantize(layer, x.dtype), _bias(layer, x.dtype))


def _torch_grad_input(grad_out: torch.Tensor, layer) -> torch.Tensor:
    return grad_out @ _torch_dequantize(layer, grad_out.dtype)


TORCH = Backend("torch", _torch_linear, _torch_grad_input, _torch_dequantize)


# ----------------------------------------------------------------------------- bitsandbytes (CUDA)
@functools.cache
def bitsandbytes_cuda_available() -> bool:
    """True when bitsandbytes imports and loaded its CUDA library."""
    try:
        import bitsandbytes  # noqa: F401
        from bitsandbytes.cextension import ErrorHandlerMockBNBNativeLibrary, lib
    except Exception:  # any import failure means "not usable", never a crash at dispatch time
        return False
    return torch.cuda.is_available() and not isinstance(lib, ErrorHandlerMockBNBNativeLibrary)


def _bnb_state(layer):
    """bitsandbytes' QuantState for ``layer``, cached until its tensors move or change."""
    from bitsandbytes.functional import QuantState as BnbQuantState

    key = (layer.weight.data_ptr(), layer.absmax.data_ptr(), layer.offset)
    cached = layer.__dict__.get("_bnb_quant_state")
    if cached is not None and cached[0] == key:
        return cached[1]
    state = layer.quant_state
    nested = None
    if state.double_quant:
        nested = BnbQuantState(absmax=state.nested_absmax, code=state.nested_code,
                               blocksize=state.nested_blocksize, dtype=torch.float32)
    bnb_state = BnbQuantState(
        absmax=state.absmax, shape=torch.Size(state.shape), code=state.code, blocksize=state.blocksize,
        quant_type="nf4", dtype=state.dtype, state2=nested,
        offset=None if nested is None else torch.tensor(state.offset, device=state.absmax.device),
    )
    layer.__dict__["_bnb_quant_state"] = (key, bnb_state)
    return bnb_state


def _bnb_dequantize(layer, dtype: torch.dtype) -> torch.Tensor:
    from bitsandbytes.functional import dequantize_4bit

    return dequantize_4bit(layer.row_major_weight(), _bnb_state(layer)).to(dtype)


def _bnb_linear(x: torch.Tensor, layer) -> torch.Tensor:
    import bitsandbytes as bnb

    # A layer is tiled only where the Triton kernels run; here only when a caller picks this backend.
    weight = layer.row_major_weight()
    return bnb.matmul_4bit(x, weight, quant_state=_bnb_state(layer), bias=_bias(layer, x.dtype))


def _bnb_grad_input(grad_out: torch.Tensor, layer) -> torch.Tensor:
    return grad_out @ _bnb_dequantize(layer, grad_out.dtype)


BITSANDBYTES = Backend("bitsandbytes", _bnb_linear, _bnb_grad_input, _bnb_dequantize)


# ----------------------------------------------------------------------------- Triton (CUDA)
@functools.cache
def triton_cuda_available() -> bool:
    """True when a CUDA GPU is present and the Triton kernels import."""
    if not torch.cuda.is_available():
        return False
    try:
        from . import ops  # noqa: F401  (imports Triton and defines the kernels)
    except Exception:  # no or broken Triton means "not usable", never a crash at dispatch time
        return False
    return True


def _kernel_weight(layer):
    """The layer's checked ``NF4Weight`` view, kept on the layer until its tensors change.

    Building and checking the view takes longer than launching a kernel, and a training step
    asks for it three times per layer.
    """
    tensors = (layer.weight, layer.absmax, layer.quant_map, layer.nested_absmax, layer.nested_quant_map)
    key = tuple(None if t is None else (t.data_ptr(), t.device) for t in tensors) + (layer.offset, layer.tiled)
    cached = layer.__dict__.get("_nf4_kernel_weight")
    if cached is None or cached[0] != key:
        cached = (key, NF4Weight.from_state(layer.weight, layer.quant_state))
        layer.__dict__["_nf4_kernel_weight"] = cached
    return cached[1]


def _triton_linear(x: torch.Tensor, layer) -> torch.Tensor:
    from .ops import matmul

    return matmul(x, _kernel_weight(layer), _bias(layer, x.dtype))


def _triton_grad_input(grad_out: torch.Tensor, layer) -> torch.Tensor:
    from .ops import matmul_grad_input

    return matmul_grad_input(grad_out, _kernel_weight(layer))


def _triton_dequantize(layer, dtype: torch.dtype) -> torch.Tensor:
    from .ops import nf4_dequantize

    return nf4_dequantize(layer.weight, layer.quant_state, dtype)


TRITON = Backend("triton", _triton_linear, _triton_grad_input, _triton_dequantize)


# ----------------------------------------------------------------------------- selection
def backend_for(device: torch.device) -> Backend:
    """The backend that runs NF4 ops for tensors on ``device``."""
    if device.type == "cuda":
        if triton_cuda_available():
            return TRITON
        if bitsandbytes_cuda_available():
            return BITSANDBYTES
    return TORCH


def prefers_tiles(device: torch.device) -> bool:
    """Whether NF4 weights on ``device`` are best held in tiles (``peftlab.quant.nf4.to_tiles``):
    where the Triton kernels run, whose small-batch reads are measured faster from tiles."""
    return device.type == "cuda" and backend_for(device) is TRITON


def nf4_linear(x: torch.Tensor, layer) -> torch.Tensor:
    """``x @ W.T + bias`` for an NF4Linear ``layer``; ``x`` is in the layer's compute dtype."""
    return backend_for(x.device).linear(x, layer)


def nf4_linear_grad_input(grad_out: torch.Tensor, layer) -> torch.Tensor:
    """``grad_out @ W``: the input gradient of :func:`nf4_linear`."""
    return backend_for(grad_out.device).grad_input(grad_out, layer)


def nf4_dequantize(layer, dtype: torch.dtype) -> torch.Tensor:
    """The layer's weight ``[out_features, in_features]`` in ``dtype``."""
    return backend_for(layer.weight.device).dequantize(layer, dtype)
