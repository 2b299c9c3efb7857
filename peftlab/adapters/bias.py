"""Trainable bias offsets kept apart from the base biases (LoRA's bias modes, BitFit).

Training ``b + delta`` instead of ``b`` in place leaves the base model intact, so adapters can be
switched, disabled and deleted; the gradient with respect to ``delta`` is exactly that of ``b``.
The offset is added to the module's output, which equals adding it to the bias for every module
whose bias is added along the last dimension (Linear, Conv1D, LayerNorm, NF4Linear, ...).
"""
from __future__ import annotations

import torch
from torch import nn

from . import exact, sites
from .base import Adapter, module_key, module_path


class BiasOffset(nn.Module):
    """A trainable fp32 offset for one module's bias."""

    def __init__(self, bias: torch.Tensor):
        super().__init__()
        self.delta = nn.Parameter(torch.zeros(bias.shape, dtype=torch.float32, device=bias.device))

    def term(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return self.delta.to(out.dtype)


class BiasOffsets(nn.Module):
    """The bias offsets of one adapter, keyed by module path."""

    def __init__(self):
        super().__init__()
        self.offsets = nn.ModuleDict()
        self._residuals: dict[str, exact.Residual] = {}

    def paths(self) -> list[str]:
        return [module_path(k) for k in self.offsets]

    def add(self, model: nn.Module, path: str, adapter: Adapter) -> None:
        module = model.get_submodule(path)
        offset = BiasOffset(module.bias)
        self.offsets[module_key(path)] = offset
        sites.add_term(module, path, adapter, offset.term)

    def remove(self, model: nn.Module, adapter: Adapter) -> None:
        for path in self.paths():
            sites.detach(model.get_submodule(path), adapter)

    def merge(self, model: nn.Module) -> None:
        for path in self.paths():
            delta = self.offsets[module_key(path)].delta.detach()
            with torch.no_grad():
                self._residuals[path] = exact.add_delta_(model.get_submodule(path).bias.data, delta, path)

    def unmerge(self, model: nn.Module) -> None:
        for path in reversed(self.paths()):
            delta = self.offsets[module_key(path)].delta.detach()
            with torch.no_grad():
                exact.remove_delta_(model.get_submodule(path).bias.data, delta, self._residuals.pop(path), path)

    def full_bias(self, model: nn.Module, path: str, merged: bool) -> torch.Tensor:
        """The bias the adapter trains (base + offset), in the base bias dtype."""
        bias = model.get_submodule(path).bias.detach()
        if merged:
            return bias.clone()
        return (bias.float() + self.offsets[module_key(path)].delta.detach()).to(bias.dtype)

    def set_full_bias(self, model: nn.Module, path: str, value: torch.Tensor) -> None:
        """Load a full bias value (as HF PEFT saves it) as an offset to the base bias."""
        bias = model.get_submodule(path).bias.detach()
        with torch.no_grad():
            self.offsets[module_key(path)].delta.copy_(value.to(bias.device).float() - bias.float())
