"""One pair of forward hooks per adapted base module, shared by every adapter that touches it.

Hooks (rather than replacing modules) keep the base model's module tree and state-dict keys
untouched, compose with accelerate's own hooks, and vanish without a trace on removal.
Contributions run in a fixed order whatever order adapters were added in:
  1. parameter swaps (a live adapter's trainable copy stands in for the module's parameters),
  2. additive terms computed from the module input (LoRA, bias deltas),
  3. output transforms (bottleneck adapters, applied after every additive term).
"""
from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from ..errors import AdapterStateError

if TYPE_CHECKING:  # pragma: no cover
    from .base import Adapter

Additive = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (module input, module output) -> term
Transform = Callable[[torch.Tensor], torch.Tensor]  # module output -> new output

_ATTR = "_peftlab_site"


class Site:
    """The hooks peftlab keeps on one module, and the adapters' contributions there."""

    def __init__(self, module: nn.Module, name: str):
        self.name = name
        self.additive: list[tuple[Adapter, Additive]] = []
        self.transforms: list[tuple[Adapter, Transform]] = []
        self.swaps: list[tuple[Adapter, dict[str, nn.Parameter]]] = []
        self._stash: dict[str, nn.Parameter] | None = None
        self._pre = None
        self._post = module.register_forward_hook(self._after, with_kwargs=True)

    def _before(self, module: nn.Module, args):
        self._restore(module)  # a forward that raised last time left its swap in place
        live = [params for adapter, params in self.swaps if adapter.live]
        if not live:
            return None
        if len(live) > 1:
            names = [a.adapter_name for a, _ in self.swaps if a.live]
            raise AdapterStateError(
                f"module '{self.name}' has trainable copies in active adapters {names}; activate only one of them."
            )
        self._stash = {n: module._parameters[n] for n in live[0]}
        module._parameters.update(live[0])
        return None

    def _restore(self, module: nn.Module) -> None:
        if self._stash is not None:
            module._parameters.update(self._stash)
            self._stash = None

    def _after(self, module: nn.Module, args, kwargs, output):
        self._restore(module)
        if self.additive:
            x = args[0] if args else next(iter(kwargs.values()))
            for adapter, term in self.additive:
                if adapter.live:
                    output = output + term(x, output)
        for adapter, transform in self.transforms:
            if adapter.live:
                output = transform(output)
        return output

    def _sync_pre_hook(self, module: nn.Module) -> None:
        if self.swaps and self._pre is None:
            self._pre = module.register_forward_pre_hook(self._before)
        elif not self.swaps and self._pre is not None:
            self._pre.remove()
            self._pre = None

    def empty(self) -> bool:
        return not (self.additive or self.transforms or self.swaps)

    def remove_hooks(self) -> None:
        self._post.remove()
        if self._pre is not None:
            self._pre.remove()


def site_of(module: nn.Module, name: str) -> Site:
    """The module's site, created (with its hooks) on first use."""
    site = module.__dict__.get(_ATTR)
    if site is None:
        site = Site(module, name)
        module.__dict__[_ATTR] = site
    return site


def add_term(module: nn.Module, name: str, adapter: Adapter, term: Additive) -> None:
    """Add ``term(input, output)`` to the module's output while ``adapter`` is live."""
    site_of(module, name).additive.append((adapter, term))


def add_transform(module: nn.Module, name: str, adapter: Adapter, transform: Transform) -> None:
    """Replace the module's output by ``transform(output)`` while ``adapter`` is live."""
    site_of(module, name).transforms.append((adapter, transform))


def add_swap(module: nn.Module, name: str, adapter: Adapter, params: dict[str, nn.Parameter]) -> None:
    """Use ``params`` in place of the module's own parameters of those names while ``adapter`` is live."""
    site = site_of(module, name)
    site.swaps.append((adapter, params))
    site._sync_pre_hook(module)


def detach(module: nn.Module, adapter: Adapter) -> None:
    """Remove every contribution of ``adapter`` from ``module``; drop the hooks once none is left."""
    site = module.__dict__.get(_ATTR)
    if site is None:
        return
    site.additive = [(a, f) for a, f in site.additive if a is not adapter]
    site.transforms = [(a, f) for a, f in site.transforms if a is not adapter]
    site.swaps = [(a, p) for a, p in site.swaps if a is not adapter]
    site._sync_pre_hook(module)
    if site.empty():
        site.remove_hooks()
        del module.__dict__[_ATTR]


def clone_without_sites(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` without peftlab's hooks, so other adapters' contributions on it (and
    their parameters) are neither copied nor duplicated into the clone."""
    memo: dict[int, object] = {}
    for sub in module.modules():
        site = sub.__dict__.get(_ATTR)
        if site is not None:
            memo[id(site)] = site  # keep sites shared during the copy, then drop them from the clone
    clone = copy.deepcopy(module, memo)
    for sub in clone.modules():
        site = sub.__dict__.pop(_ATTR, None)
        if site is None:
            continue
        for hooks in (sub._forward_hooks, sub._forward_pre_hooks):
            for key in [k for k, hook in hooks.items() if getattr(hook, "__self__", None) is site]:
                del hooks[key]
                sub._forward_hooks_with_kwargs.pop(key, None)
                sub._forward_hooks_always_called.pop(key, None)
    return clone
