"""Add an fp32 delta to a weight in place so that it can be taken out again bit for bit.

Merging rounds ``w + delta`` to the weight's dtype; subtracting ``delta`` again does not, in
general, give back ``w`` (HF PEFT drifts a little with every merge/unmerge cycle in bf16).
We keep the rounding residual instead: right after merging we compute what unmerging will
produce and store, per element, how many representable values it lies from the original
(an int8 "step" count, in an integer order of the floats that runs across zero). The rare
elements further than 127 steps away (tiny weights next to a large delta) keep their original
value outright. When the round trip is already exact nothing is stored. Unmerging recomputes
the same subtraction and applies the steps, which restores every bit in any float dtype.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import AdapterStateError, MergeError

_INT = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32, torch.float64: torch.int64}


@dataclass
class Residual:
    """What an unmerge needs besides the delta."""

    device: torch.device
    steps: torch.Tensor | None = None  # int8 per element: original minus unmerge result, in float order
    exact_at: torch.Tensor | None = None  # flat indices whose step count does not fit int8
    exact_values: torch.Tensor | None = None  # the original values at those indices


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _subtract(merged: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    return (merged.to(_acc_dtype(merged.dtype)) - delta).to(merged.dtype)


def _sign_bit(dtype: torch.dtype) -> int:
    return 1 << (torch.finfo(dtype).bits - 1)


def _to_order(t: torch.Tensor) -> torch.Tensor:
    """Map floats to int64 so that neighbouring values differ by 1 (-0.0 -> -1, +0.0 -> 0)."""
    bits = t.contiguous().view(_INT[t.dtype]).to(torch.int64)
    return torch.where(bits >= 0, bits, -(bits & (_sign_bit(t.dtype) - 1)) - 1)


def _from_order(order: torch.Tensor, dtype: torch.dtype, shape: torch.Size) -> torch.Tensor:
    bits = torch.where(order >= 0, order, -(order + 1) - _sign_bit(dtype))
    return bits.to(_INT[dtype]).view(dtype).view(shape)


def add_delta_(weight: torch.Tensor, delta: torch.Tensor, where: str) -> Residual:
    """``weight += delta`` in place (rounded once, from fp32); returns what :func:`remove_delta_` needs.

    Raises :class:`MergeError` naming ``where`` if the result would be non-finite where the weight was finite.
    """
    if weight.dtype not in _INT:
        raise MergeError(f"cannot merge into '{where}': its weight dtype {weight.dtype} is not a float type.")
    if delta.shape != weight.shape:
        raise MergeError(
            f"cannot merge into '{where}': delta shape {list(delta.shape)} != weight shape {list(weight.shape)}."
        )
    delta = delta.to(device=weight.device, dtype=_acc_dtype(weight.dtype))
    merged = (weight.to(delta.dtype) + delta).to(weight.dtype)
    bad = ~torch.isfinite(merged) & torch.isfinite(weight)
    if bad.any():
        raise MergeError(
            f"merging into '{where}' would create {int(bad.sum())} non-finite weight(s) (dtype {weight.dtype}); "
            "the adapter or its scaling is too large for this dtype, so nothing was merged."
        )
    steps = _to_order(weight) - _to_order(_subtract(merged, delta))
    residual = Residual(weight.device)
    if steps.any():
        far = (steps.abs() > 127).flatten()
        if far.any():
            residual.exact_at = far.nonzero().squeeze(1)
            residual.exact_values = weight.flatten()[residual.exact_at].clone()
        residual.steps = steps.clamp(-127, 127).to(torch.int8)
    weight.copy_(merged)
    return residual


def remove_delta_(weight: torch.Tensor, delta: torch.Tensor, residual: Residual, where: str) -> None:
    """Undo :func:`add_delta_` exactly: afterwards ``weight`` has the bits it had before the merge."""
    if weight.device != residual.device:
        raise AdapterStateError(
            f"'{where}' moved from {residual.device} to {weight.device} while merged; "
            "unmerge before moving the model so that the round trip stays exact."
        )
    delta = delta.to(device=weight.device, dtype=_acc_dtype(weight.dtype))
    restored = _subtract(weight, delta)
    if residual.steps is not None:
        restored = _from_order(_to_order(restored) + residual.steps, weight.dtype, weight.shape)
    if residual.exact_at is not None:
        restored.view(-1)[residual.exact_at] = residual.exact_values
    weight.copy_(restored)


def merge_into(module: nn.Module, delta: torch.Tensor, where: str) -> Residual | None:
    """Merge a delta (in the layout of ``module.weight``) into a base module.

    Modules with their own storage (e.g. 4-bit layers) implement ``merge_delta``/``unmerge_delta``.
    """
    custom = getattr(module, "merge_delta", None)
    if custom is not None:
        return custom(delta)
    with torch.no_grad():
        return add_delta_(module.weight.data, delta, where)


def unmerge_from(module: nn.Module, delta: torch.Tensor, residual: Residual | None, where: str) -> None:
    """Undo :func:`merge_into` bit for bit."""
    custom = getattr(module, "unmerge_delta", None)
    if custom is not None:
        custom(delta, residual)
        return
    with torch.no_grad():
        remove_delta_(module.weight.data, delta, residual, where)
