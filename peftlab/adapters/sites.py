"""One pair of forward hooks per adapted base module, shared by every adapter that touches it.

Hooks (rather than replacing modules) keep the base model's module tree and state-dict keys
untouched, compose with accelerate's own hooks, and vanish without a trace on removal.
Contributions run in a fixed order whatever order adapters were added in:
  1. parameter swaps (a live adapter's trainable copy stands in for the module's parameters),
  2. updates that add a term computed from the module input (LoRA, bias offsets),
  3. output transforms (bottleneck adapters, applied after every update).
The hooks are registered only while some contribution is live (``refresh``), so a module whose
adapters are all merged or switched off runs at exactly its base speed.

An update may also offer a fused forward (LoRA's one-kernel inference path): while it is live,
the site stands in for the module's ``forward`` on that instance; each call either computes base
output plus term at once (and the after-hook skips that update) or, when the fused path does not
apply (training, CPU, ...), runs the module's own forward. A module whose ``forward`` someone else
already replaced on the instance (accelerate's offload hooks) keeps it and takes the plain path.
"""
from __future__ import annotations

import copy
import functools
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from ..errors import AdapterStateError

if TYPE_CHECKING:  # pragma: no cover
    from .base import Adapter

Update = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (module input, output) -> output + term
Transform = Callable[[torch.Tensor], torch.Tensor]  # module output -> new output
FusedForward = Callable[[nn.Module, torch.Tensor], "torch.Tensor | None"]  # (module, input) -> output or None

_ATTR = "_peftlab_site"


class Site:
    """The hooks peftlab keeps on one module, and the adapters' contributions there."""

    def __init__(self, name: str):
        self.name = name
        self.updates: list[tuple[Adapter, Update]] = []
        self.transforms: list[tuple[Adapter, Transform]] = []
        self.swaps: list[tuple[Adapter, dict[str, nn.Parameter]]] = []
        self.fused: list[tuple[Adapter, Update, FusedForward]] = []
        self._stash: dict[str, nn.Parameter] | None = None
        self._fused_by: Update | None = None  # the update whose term the running forward already added
        self._pre = None
        self._post = None

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

    def _forward(self, module: nn.Module, *args, **kwargs):
        """Stands in for ``module.forward`` while a fused update is live (see the module docstring)."""
        self._fused_by = None
        if len(args) == 1 and not kwargs:
            for adapter, update, fused in self.fused:
                if adapter.live:
                    output = fused(module, args[0])
                    if output is not None:
                        self._fused_by = update
                        return output
                    break
        return type(module).forward(module, *args, **kwargs)

    def _after(self, module: nn.Module, args, kwargs, output):
        self._restore(module)
        done, self._fused_by = self._fused_by, None
        if self.updates:
            x = args[0] if args else next(iter(kwargs.values()))
            for adapter, update in self.updates:
                if adapter.live and update is not done:
                    output = update(x, output)
        for adapter, transform in self.transforms:
            if adapter.live:
                output = transform(output)
        return output

    def refresh(self, module: nn.Module) -> None:
        """Register the hooks while some contribution is live, and only then."""
        live = any(adapter.live for adapter, _ in self.updates + self.transforms + self.swaps)
        if live and self._post is None:
            self._post = module.register_forward_hook(self._after, with_kwargs=True)
        elif not live and self._post is not None:
            self._post.remove()
            self._post = None
        needs_pre = live and any(adapter.live for adapter, _ in self.swaps)
        if needs_pre and self._pre is None:
            self._pre = module.register_forward_pre_hook(self._before)
        elif not needs_pre and self._pre is not None:
            self._pre.remove()
            self._pre = None
        self._refresh_forward(module, live and any(adapter.live for adapter, _, _ in self.fused))

    def _refresh_forward(self, module: nn.Module, wanted: bool) -> None:
        current = module.__dict__.get("forward")
        ours = _is_site_forward(current)
        if wanted and current is None:
            module.forward = functools.partial(self._forward, module)
        elif not wanted and ours:
            del module.forward

    def empty(self) -> bool:
        return not (self.updates or self.transforms or self.swaps)


def site_of(module: nn.Module, name: str) -> Site:
    """The module's site, created on first use (its hooks follow with :func:`refresh`)."""
    site = module.__dict__.get(_ATTR)
    if site is None:
        site = Site(name)
        module.__dict__[_ATTR] = site
    return site


def refresh(model: nn.Module) -> None:
    """Bring every site's hooks in line with which adapters are live (after any switch, merge or removal)."""
    for module in model.modules():
        site = module.__dict__.get(_ATTR)
        if site is not None:
            site.refresh(module)


def add_update(module: nn.Module, name: str, adapter: Adapter, update: Update) -> None:
    """While ``adapter`` is live, replace the module's output by ``update(input, output)`` (output plus a term)."""
    site_of(module, name).updates.append((adapter, update))


def add_fused_forward(module: nn.Module, adapter: Adapter, update: Update, fused: FusedForward) -> None:
    """Offer ``fused(module, x)`` -> base output plus ``update``'s term (or None to decline) for that update."""
    site = module.__dict__[_ATTR]
    site.fused.append((adapter, update, fused))


def _is_site_forward(forward) -> bool:
    method = getattr(forward, "func", None)
    return isinstance(getattr(method, "__self__", None), Site) and method.__func__ is Site._forward


def add_transform(module: nn.Module, name: str, adapter: Adapter, transform: Transform) -> None:
    """Replace the module's output by ``transform(output)`` while ``adapter`` is live."""
    site_of(module, name).transforms.append((adapter, transform))


def add_swap(module: nn.Module, name: str, adapter: Adapter, params: dict[str, nn.Parameter]) -> None:
    """Use ``params`` in place of the module's own parameters of those names while ``adapter`` is live."""
    site_of(module, name).swaps.append((adapter, params))


def detach(module: nn.Module, adapter: Adapter) -> None:
    """Remove every contribution of ``adapter`` from ``module``; drop the hooks once none is left."""
    site = module.__dict__.get(_ATTR)
    if site is None:
        return
    site.updates = [(a, f) for a, f in site.updates if a is not adapter]
    site.transforms = [(a, f) for a, f in site.transforms if a is not adapter]
    site.swaps = [(a, p) for a, p in site.swaps if a is not adapter]
    site.fused = [entry for entry in site.fused if entry[0] is not adapter]
    site.refresh(module)
    if site.empty():
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
        if _is_site_forward(sub.__dict__.get("forward")):
            del sub.forward
        for hooks in (sub._forward_hooks, sub._forward_pre_hooks):
            for key in [k for k, hook in hooks.items() if getattr(hook, "__self__", None) is site]:
                del hooks[key]
                sub._forward_hooks_with_kwargs.pop(key, None)
                sub._forward_hooks_always_called.pop(key, None)
    return clone
