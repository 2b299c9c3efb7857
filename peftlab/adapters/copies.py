"""Whole modules trained in full by one adapter (``modules_to_save``, e.g. a classification head).

The adapter owns a trainable copy; while it is live the copy's parameters stand in for the
module's own during that module's forward (a pointer swap, no extra compute), so the base model's
parameters and state-dict keys never change. Merging swaps the tensors' storage, which is exact.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import TargetError
from ..targeting import classification_head, is_under
from . import sites
from .base import Adapter, module_key, module_path


class TrainableCopies(nn.Module):
    """The trainable module copies of one adapter, keyed by module path."""

    def __init__(self):
        super().__init__()
        self.copies = nn.ModuleDict()

    def paths(self) -> list[str]:
        return [module_path(k) for k in self.copies]

    def add(self, model: nn.Module, path: str, adapter: Adapter) -> None:
        original = model.get_submodule(path)
        _refuse_tied(model, path, original)
        clone = sites.clone_without_sites(original)
        clone.requires_grad_(True)
        self.copies[module_key(path)] = clone
        for sub, (orig_sub, clone_sub) in self._pairs(original, clone, path):
            own = dict(clone_sub.named_parameters(recurse=False))
            if own:
                sites.add_swap(orig_sub, sub, adapter, own)

    @staticmethod
    def _pairs(original: nn.Module, clone: nn.Module, path: str):
        clones = dict(clone.named_modules())
        for name, orig_sub in original.named_modules():
            yield (f"{path}.{name}" if name else path), (orig_sub, clones[name])

    def _param_pairs(self, model: nn.Module):
        for path in self.paths():
            original = model.get_submodule(path)
            clone = self.copies[module_key(path)]
            clone_params = dict(clone.named_parameters())
            for name, param in original.named_parameters():
                yield f"{path}.{name}", param, clone_params[name]

    def remove(self, model: nn.Module, adapter: Adapter) -> None:
        for path in self.paths():
            for _, (orig_sub, _) in self._pairs(model.get_submodule(path), self.copies[module_key(path)], path):
                sites.detach(orig_sub, adapter)

    def swap_storage(self, model: nn.Module) -> None:
        """Exchange the data of originals and copies (merge and unmerge are both this)."""
        with torch.no_grad():
            for _, original, clone in self._param_pairs(model):
                original.data, clone.data = clone.data, original.data

    def trained_tensors(self, model: nn.Module, merged: bool) -> dict[str, torch.Tensor]:
        """``full parameter name -> trained value``, wherever the trained value currently lives."""
        return {name: (original if merged else clone).detach()
                for name, original, clone in self._param_pairs(model)}

    def load_tensor(self, model: nn.Module, name: str, value: torch.Tensor) -> None:
        for full, _, clone in self._param_pairs(model):
            if full == name:
                with torch.no_grad():
                    clone.copy_(value)
                return
        raise KeyError(name)


def _refuse_tied(model: nn.Module, path: str, original: nn.Module) -> None:
    """A trained copy cannot stay tied to a weight outside it (e.g. GPT-2's embedding and lm_head):
    unmerged, only this module would use the copy; merged, every module sharing the weight would."""
    own = {id(p) for p in original.parameters()}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in own and not is_under(name.rsplit(".", 1)[0], [path]):
            raise TargetError(f"modules_to_save entry '{path}' shares its weight with '{name}' (tied weights); a "
                              "trained copy cannot keep the tie: untie them first (e.g. tie_word_embeddings=False "
                              "and a cloned output weight) or adapt the module with a method that keeps it frozen.")


def resolve_copies(model: nn.Module, entries: list[str] | None, strict: bool) -> list[str]:
    """Module names for ``modules_to_save`` (outermost matches only; PEFT's saved lists may repeat names
    or name heads of other architectures, which ``strict=False`` tolerates)."""
    if entries is None:
        return classification_head(model)
    names = [n for n, _ in model.named_modules() if n]
    found: list[str] = []
    for entry in entries:
        matches = [n for n in names if n == entry or n.endswith("." + entry)]
        if not matches and strict:
            top = ", ".join(n for n, _ in model.named_children())
            raise TargetError(f"modules_to_save entry {entry!r} matches no module of {type(model).__name__}; "
                              f"its top-level modules are: {top}.")
        found.extend(m for m in matches if not is_under(m, found))
    return found
