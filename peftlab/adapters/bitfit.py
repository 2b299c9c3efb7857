"""BitFit (Ben-Zaken et al. 2022): train only bias terms.

The biases train as fp32 offsets added to the module outputs (see ``bias``), so the base biases
stay intact until the adapter is merged, and merge/unmerge are bit-exact. Which biases train:
all of them, named groups that map onto every architecture's own module names through the block
structure (see ``layout.block_layouts``), or module names/suffixes. Linear layers without a bias
(Llama's) can be given zero-initialised ones with ``add_missing``: merging creates a real bias
parameter, unmerging removes it again. Saved adapters hold the fp32 offsets, not full biases, so a
round trip through disk is exact in any base dtype.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .. import registry, targeting
from ..errors import ConfigError, TargetError
from ..targeting import is_under
from .base import Adapter, AdapterConfig
from .bias import BiasOffsets, bias_on_last_dim, has_bias
from .copies import TrainableCopies, resolve_copies
from .layout import BlockLayout, block_layouts



def _named(paths: list[str], pattern: str) -> list[str]:
    return [p for p in paths if re.fullmatch(pattern, p.rsplit(".", 1)[-1], re.IGNORECASE)]


# group name -> the modules of one block whose biases it trains
GROUPS: dict[str, Callable[[BlockLayout], list[str]]] = {
    "query": lambda lay: _named(lay.attention_inputs, r"q|query|q_proj|q_lin|wq|query_proj"),
    "key": lambda lay: _named(lay.attention_inputs, r"k|key|k_proj|k_lin|wk|key_proj"),
    "value": lambda lay: _named(lay.attention_inputs, r"v|value|v_proj|v_lin|wv|value_proj"),
    "attention_input": lambda lay: lay.attention_inputs,  # q/k/v, fused ones (GPT-2's c_attn) included
    "attention_output": lambda lay: lay.attention_outputs,
    "ffn_intermediate": lambda lay: lay.ffn_inputs,
    "ffn_output": lambda lay: [lay.ffn_output] if lay.ffn_output else [],
    "norm": lambda lay: lay.norms,
}


@dataclass
class BitFitConfig(AdapterConfig):
    """BitFit options.

    Args:
        biases: ``"all"`` (every bias outside ``modules_to_save``), or a list of group names and module
            names/suffixes. Groups, per transformer block: ``query``, ``key``, ``value``, ``attention_input``
            (all attention input projections, fused ones included), ``attention_output``,
            ``ffn_intermediate`` (up/gate/fc1), ``ffn_output``, ``norm``. The paper's small subset is
            ``["query", "ffn_intermediate"]``.
        add_missing: give selected linear layers that have no bias a zero-initialised one (with
            ``"all"``: every linear layer but the output head and classifier). Merging creates it as a
            real ``bias`` parameter; unmerging removes it.
        modules_to_save: modules trained in full and saved with the adapter. ``None`` means the
            classification head of ``*ForSequenceClassification``-style models; ``[]`` means none.
    """

    method = "bitfit"

    biases: str | list[str] = "all"
    add_missing: bool = False
    modules_to_save: list[str] | None = None

    def validate(self) -> None:
        valid = f"use 'all' or a list of group names ({', '.join(GROUPS)}) and module names/suffixes"
        if isinstance(self.biases, str):
            if self.biases != "all":
                raise ConfigError(f"bitfit config field 'biases' is {self.biases!r}; {valid}.")
        elif (not isinstance(self.biases, (list, tuple)) or not self.biases
              or not all(isinstance(e, str) and e for e in self.biases)):
            raise ConfigError(f"bitfit config field 'biases' is {self.biases!r}; {valid}.")
        if not isinstance(self.add_missing, bool):
            raise ConfigError(f"bitfit config field 'add_missing' is {self.add_missing!r}; it must be true or false.")


@registry.register
class BitFit(Adapter):
    """A BitFit adapter on one model."""

    method = "bitfit"
    config_cls = BitFitConfig
    part_kinds = {"biases": "bias", "copies": "modules_to_save"}
    mergeable = True
    zero_when_untrained = True  # it saves bias offsets, which start at zero

    def __init__(self, name: str, config: BitFitConfig):
        super().__init__(name, config)
        self.biases = BiasOffsets()
        self.copies = TrainableCopies()
        self._trainable_before_merge = True

    # --- attaching ---------------------------------------------------------------------------
    def inject(self, model: nn.Module, strict: bool = True) -> None:
        cfg: BitFitConfig = self.config
        for path in resolve_copies(model, cfg.modules_to_save, strict):
            self.copies.add(model, path, self)
        paths = self._all_paths(model) if cfg.biases == "all" else self._chosen_paths(model, strict)
        for path in paths:
            self.biases.add(model, path, self)

    def _candidates(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        return [(n, m) for n, m in model.named_modules() if n and not is_under(n, self.copies.paths())]

    def _all_paths(self, model: nn.Module) -> list[str]:
        modules = self._candidates(model)
        paths = [n for n, m in modules if has_bias(m) and bias_on_last_dim(m)]
        skipped = [f"'{n}' ({type(m).__name__})" for n, m in modules if has_bias(m) and not bias_on_last_dim(m)]
        if skipped:
            warnings.warn(f"bitfit: leaving out the biases of {len(skipped)} module(s) whose bias is not added along "
                          f"the last dimension, e.g. {skipped[0]}.", stacklevel=4)
        if self.config.add_missing:
            heads = targeting.head_modules(model)
            paths += [n for n, m in modules if targeting.is_linear(m) and not has_bias(m) and n not in heads]
        if not paths:
            hint = ("" if self.config.add_missing else
                    "; set add_missing=True to give its linear layers zero-initialised biases")
            raise TargetError(f"bitfit: {type(model).__name__} has no bias parameters to train{hint}.")
        order = {name: i for i, (name, _) in enumerate(modules)}
        return sorted(paths, key=order.__getitem__)

    def _chosen_paths(self, model: nn.Module, strict: bool) -> list[str]:
        modules = self._candidates(model)
        layouts: list[BlockLayout] | None = None
        chosen: set[str] = set()
        for entry in self.config.biases:
            if entry in GROUPS:
                layouts = block_layouts(model) if layouts is None else layouts
                found = self._group_paths(model, entry, layouts, strict)
            else:
                found = [n for n, _ in modules if n == entry or n.endswith("." + entry)]
                if not found and strict:
                    raise TargetError(f"bitfit biases entry {entry!r} is neither a group ({', '.join(GROUPS)}) nor a "
                                      f"module of {type(model).__name__}; its modules with biases end in: "
                                      f"{', '.join(_suffixes(modules)) or '(none)'}.")
            for path in found:
                self._check_bias(model, path, entry)
            chosen.update(found)
        return [n for n, _ in modules if n in chosen]

    def _group_paths(self, model: nn.Module, group: str, layouts: list[BlockLayout], strict: bool) -> list[str]:
        model_name = type(model).__name__
        if not layouts:
            raise TargetError(f"bitfit group '{group}' needs the transformer blocks of {model_name}, but it has no "
                              "nn.ModuleList of blocks holding linear layers; name the modules instead.")
        found = [p for lay in layouts for p in GROUPS[group](lay) if not is_under(p, self.copies.paths())]
        if not found and strict:
            inputs = sorted({p.rsplit(".", 1)[-1] for lay in layouts for p in lay.attention_inputs})
            hint = (f"; its attention input projections are {inputs} (a fused query/key/value projection has no "
                    "separate bias per part: use 'attention_input')") if group in ("query", "key", "value") else ""
            raise TargetError(f"bitfit group '{group}' matches no module of {model_name}{hint}.")
        return found

    def _check_bias(self, model: nn.Module, path: str, entry: str) -> None:
        module = model.get_submodule(path)
        kind = type(module).__name__
        if has_bias(module):
            if not bias_on_last_dim(module):
                raise TargetError(f"bitfit: the bias of '{path}' ({kind}, from {entry!r}) is not added along the "
                                  "last dimension, which bias offsets need; leave it out.")
            return
        if not targeting.is_linear(module):
            raise TargetError(f"bitfit: '{path}' ({kind}, from {entry!r}) has no bias, and only linear layers can be "
                              "given one; leave it out.")
        if not self.config.add_missing:
            raise TargetError(f"bitfit: '{path}' ({kind}, from {entry!r}) has no bias in {type(model).__name__}; set "
                              "add_missing=True to add a zero-initialised one, or choose modules that have biases.")

    def remove(self, model: nn.Module) -> None:
        self.biases.remove(model, self)
        self.copies.remove(model, self)

    # --- merging -----------------------------------------------------------------------------
    def merge(self, model: nn.Module) -> None:
        if self.merged:
            return
        self.biases.merge(model)  # all or nothing
        self.copies.swap_storage(model)
        self._trainable_before_merge = any(p.requires_grad for p in self.parameters())
        self.set_trainable(False)  # merged biases must not train: unmerge subtracts the same offsets
        self.merged = True

    def unmerge(self, model: nn.Module) -> None:
        if not self.merged:
            return
        self.copies.swap_storage(model)
        self.biases.unmerge(model)
        self.set_trainable(self._trainable_before_merge)
        self.merged = False

    # --- checkpoints (peftlab's own format) --------------------------------------------------
    def tensor_targets(self, model: nn.Module) -> dict[str, tuple[torch.Tensor, str]]:
        targets = {f"{path}.bias_offset": (offset.delta.detach(), f"bias offset of '{path}'")
                   for path, offset in zip(self.biases.paths(), self.biases.offsets.values())}
        for name, value in self.copies.trained_tensors(model, self.merged).items():
            targets[name] = (value, f"'{name}' (modules_to_save)")
        return targets

def _suffixes(modules: list[tuple[str, nn.Module]]) -> list[str]:
    return sorted({n.rsplit(".", 1)[-1] for n, m in modules if has_bias(m)})
