"""Trainable bias offsets kept apart from the base biases (LoRA's bias modes, BitFit).

Training ``b + delta`` instead of ``b`` in place leaves the base model intact, so adapters can be
switched, disabled and deleted; the gradient with respect to ``delta`` is exactly that of ``b``.
The offset is added to the module's output, which equals adding it to the bias for every module
whose bias is added along the last dimension (Linear, Conv1D, LayerNorm, NF4Linear, ...).

A linear layer without a bias can take an offset too: it acts as a zero-initialised bias, and
merging it creates a real ``bias`` parameter, which unmerging removes again.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import targeting
from . import exact, sites
from .base import Adapter, module_key, module_path


def bias_on_last_dim(module: nn.Module) -> bool:
    """Whether adding to the module's output equals adding to its bias (the bias runs along the last dim)."""
    return targeting.is_linear(module) or type(module).__name__.endswith("LayerNorm")


def has_bias(module: nn.Module) -> bool:
    """Whether the module has a bias parameter (not a buffer that happens to be called ``bias``)."""
    return isinstance(getattr(module, "bias", None), nn.Parameter)


class BiasOffset(nn.Module):
    """A trainable fp32 offset for one module's bias."""

    def __init__(self, size: int, device: torch.device):
        super().__init__()
        self.delta = nn.Parameter(torch.zeros(size, dtype=torch.float32, device=device))

    def update(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return out + self.delta.to(out.dtype)


def _new_bias_dtype(module: nn.Module) -> torch.dtype:
    weight = module.weight
    return weight.dtype if weight.is_floating_point() else getattr(module, "weight_dtype", torch.float32)


class BiasOffsets(nn.Module):
    """The bias offsets of one adapter, keyed by module path."""

    def __init__(self):
        super().__init__()
        self.offsets = nn.ModuleDict()
        self._residuals: dict[str, exact.Residual] = {}
        self._created: dict[str, bool] = {}  # path -> whether merging created the bias ("bias" was registered as None)

    def paths(self) -> list[str]:
        return [module_path(k) for k in self.offsets]

    def add(self, model: nn.Module, path: str, adapter: Adapter) -> None:
        """Attach an offset to the module's bias; a linear layer without a bias gets a zero-initialised one."""
        module = model.get_submodule(path)
        if has_bias(module):
            offset = BiasOffset(module.bias.shape[0], module.bias.device)
        elif targeting.is_linear(module):
            offset = BiasOffset(targeting.linear_features(module)[1], module.weight.device)
        else:
            raise ValueError(f"'{path}' ({type(module).__name__}) has no bias and is not a linear layer.")
        self.offsets[module_key(path)] = offset
        sites.add_update(module, path, adapter, offset.update)

    def remove(self, model: nn.Module, adapter: Adapter) -> None:
        for path in self.paths():
            sites.detach(model.get_submodule(path), adapter)

    def merge(self, model: nn.Module) -> None:
        """Add every offset to its bias (creating missing biases); all or nothing."""
        done: list[str] = []
        try:
            for path in self.paths():
                self._merge_one(model, path)
                done.append(path)
        except BaseException:
            for path in reversed(done):
                self._unmerge_one(model, path)
            raise

    def unmerge(self, model: nn.Module) -> None:
        for path in reversed(self.paths()):
            self._unmerge_one(model, path)

    def _merge_one(self, model: nn.Module, path: str) -> None:
        module = model.get_submodule(path)
        delta = self.offsets[module_key(path)].delta.detach()
        if not has_bias(module):  # decided now, not at inject: another adapter may have created it meanwhile
            self._created[path] = "bias" in module._parameters
            module.bias = nn.Parameter(delta.to(_new_bias_dtype(module)), requires_grad=False)
            return
        with torch.no_grad():
            self._residuals[path] = exact.add_delta_(module.bias.data, delta, path)

    def _unmerge_one(self, model: nn.Module, path: str) -> None:
        module = model.get_submodule(path)
        if path in self._created:
            if self._created.pop(path):
                module._parameters["bias"] = None  # registered as None, as nn.Linear(bias=False) does
            else:
                del module._parameters["bias"]
                module.__dict__["bias"] = None
            return
        delta = self.offsets[module_key(path)].delta.detach()
        with torch.no_grad():
            exact.remove_delta_(module.bias.data, delta, self._residuals.pop(path), path)

    def full_bias(self, model: nn.Module, path: str, merged: bool) -> torch.Tensor:
        """The bias the adapter trains (base + offset), in the base bias dtype."""
        module = model.get_submodule(path)
        if merged:
            return module.bias.detach().clone()
        delta = self.offsets[module_key(path)].delta.detach()
        if not has_bias(module):
            return delta.to(_new_bias_dtype(module))
        bias = module.bias.detach()
        return (bias.float() + delta).to(bias.dtype)

    def set_full_bias(self, model: nn.Module, path: str, value: torch.Tensor) -> None:
        """Load a full bias value (as HF PEFT saves it) as an offset to the base bias."""
        module = model.get_submodule(path)
        delta = self.offsets[module_key(path)].delta
        base = module.bias.detach().float() if has_bias(module) else torch.zeros_like(delta)
        with torch.no_grad():
            delta.copy_(value.to(delta.device).float() - base.to(delta.device))
