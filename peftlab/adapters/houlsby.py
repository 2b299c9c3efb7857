"""Bottleneck adapters (Houlsby et al. 2019) and their feed-forward-only variant ("pfeiffer").

Each adapter maps a sublayer's output ``h`` to ``h + up(act(down(h)))``. The up-projection starts
at zero, so the wrapped model equals the base model exactly at init. Houlsby places one adapter
after the attention output projection and one after the feed-forward output projection of every
block, before the residual add (and before BERT's LayerNorm), and also trains the LayerNorms;
"pfeiffer" keeps only the feed-forward adapter. The adapter is a nonlinearity, so it cannot be
merged into the base weights.

Where the hook sits, per family (the output of the sublayer's output projection):

============  ==========================  ======================  =====================================
family        attention adapter after     FFN adapter after       what follows the projection
============  ==========================  ======================  =====================================
BERT/RoBERTa  ``attention.output.dense``  ``output.dense``        dropout, then LayerNorm(h + x) (post-LN)
GPT-2         ``attn.c_proj``             ``mlp.c_proj``          dropout, then the block adds x (pre-LN)
Llama/Mistral ``self_attn.o_proj``        ``mlp.down_proj``       the block adds x (pre-RMSNorm, no dropout)
/Qwen2
============  ==========================  ======================  =====================================

Hooking the projection gives the paper's placement (sublayer output, before the skip connection)
in every family, because every family has that projection while not all have a dropout module
after it. Where a dropout follows (BERT, GPT-2) the adapter runs before it instead of after: the
same function at inference; in training the dropout also covers the adapter's contribution.

Placement is found from structure, not from a table of names: in every block of the model's
outermost ``nn.ModuleList`` of blocks, each submodule named like ``*attn*``/``*attention*`` is an
attention sublayer whose last linear layer is its output projection, and the last linear layer
outside the attention sublayers is the feed-forward output projection; both must produce the
model's hidden size. ``attention_modules``/``ffn_modules`` name the modules where this fails.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .. import registry, targeting
from ..errors import ConfigError, TargetError
from ..targeting import is_under
from . import sites
from .base import (
    Adapter,
    AdapterConfig,
    check_choice,
    module_key,
    module_path,
)
from .copies import TrainableCopies, resolve_copies
from .layout import block_layouts, is_norm

ACTIVATIONS = {"swish": nn.SiLU, "relu": nn.ReLU, "gelu": nn.GELU}
INITS = ("zeros", "random")


# --- config ----------------------------------------------------------------------------------
@dataclass
class BottleneckConfig(AdapterConfig):
    """Options shared by ``houlsby`` and ``pfeiffer``.

    Args:
        reduction_factor: bottleneck size = sublayer width // reduction_factor (AdapterHub's preset: 16).
        bottleneck_size: a fixed bottleneck size instead (overrides ``reduction_factor``).
        activation: ``"swish"`` (SiLU), ``"relu"`` or ``"gelu"``.
        init: ``"zeros"`` (up-projection zero: the model equals the base at init) or ``"random"``
            (up-projection random too, so the adapter acts at once; for tests).
        init_std: std of the truncated-normal down-projection (and of ``"random"`` up-projections).
        train_layer_norms: also train the LayerNorms/RMSNorms of the adapted blocks and those outside
            every block (embedding and final norms), as trainable copies that stand in for the base norms
            while the adapter is live (the base norms never change). Houlsby's default is ``True`` (the
            paper trains them), Pfeiffer's ``False``.
        ffn_modules: the feed-forward output projections to adapt, as module names/suffixes (list) or a
            regex (string); ``None`` finds them from the model's structure.
        layers: block indices to adapt: ``3``, ``"0-3,8"`` or ``[0, 1]``; ``None`` adapts every block.
        modules_to_save: modules trained in full and saved with the adapter. ``None`` means the
            classification head of ``*ForSequenceClassification``-style models; ``[]`` means none.
    """

    reduction_factor: float = 16
    bottleneck_size: int | None = None
    activation: str = "swish"
    init: str = "zeros"
    init_std: float = 0.01
    train_layer_norms: bool = True
    ffn_modules: str | list[str] | None = None
    layers: int | str | list[int | str] | None = None
    modules_to_save: list[str] | None = None

    def validate(self) -> None:
        name = self.method
        rf = self.reduction_factor
        if isinstance(rf, bool) or not isinstance(rf, (int, float)) or rf <= 0:
            raise ConfigError(f"{name} config field 'reduction_factor' is {rf!r}; it must be a positive number.")
        size = self.bottleneck_size
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ConfigError(f"{name} config field 'bottleneck_size' is {size!r}; it must be a positive integer "
                              "or None (then reduction_factor sets it).")
        check_choice(self.activation, "activation", tuple(ACTIVATIONS), name)
        check_choice(self.init, "init", INITS, name)
        if not isinstance(self.init_std, (int, float)) or self.init_std <= 0:
            raise ConfigError(f"{name} config field 'init_std' is {self.init_std!r}; it must be a positive number.")
        for field in ("ffn_modules", "attention_modules"):
            value = getattr(self, field, None)
            if isinstance(value, (list, tuple)) and not value:
                raise ConfigError(f"{name} config field '{field}' is empty; name at least one module, or use None "
                                  "to find them from the model's structure.")
        targeting.parse_layers(self.layers)

    def size_for(self, width: int) -> int:
        """The bottleneck size for a sublayer of ``width`` features."""
        return self.bottleneck_size or int(width // self.reduction_factor)


@dataclass
class HoulsbyConfig(BottleneckConfig):
    """Houlsby adapters: after the attention and the feed-forward sublayers (see :class:`BottleneckConfig`).

    Args:
        attention_modules: the attention output projections to adapt (names/suffixes or a regex);
            ``None`` finds them from the model's structure.
    """

    method = "houlsby"

    attention_modules: str | list[str] | None = None


@dataclass
class PfeifferConfig(BottleneckConfig):
    """The Pfeiffer variant: one adapter per block, after the feed-forward sublayer, with AdapterHub's
    preset (reduction factor 16, ReLU, LayerNorms frozen). It sits exactly where Houlsby's feed-forward
    adapter sits; AdapterHub's own Pfeiffer block also rearranges the residual and the original
    LayerNorm around the adapter, which a hook on the projection does not do."""

    method = "pfeiffer"

    activation: str = "relu"
    train_layer_norms: bool = False


# --- the adapter -----------------------------------------------------------------------------
class Bottleneck(nn.Module):
    """``h + up(act(down(h)))`` on one sublayer output; fp32 weights, computed in the output's dtype."""

    def __init__(self, width: int, size: int, activation: str, init: str, init_std: float, device: torch.device):
        super().__init__()
        self.down = nn.Linear(width, size, device=device, dtype=torch.float32)
        self.up = nn.Linear(size, width, device=device, dtype=torch.float32)
        self.act = ACTIVATIONS[activation]()
        with torch.no_grad():
            nn.init.trunc_normal_(self.down.weight, std=init_std, a=-2 * init_std, b=2 * init_std)
            self.down.bias.zero_()
            self.up.bias.zero_()
            if init == "random":
                nn.init.trunc_normal_(self.up.weight, std=init_std, a=-2 * init_std, b=2 * init_std)
            else:
                self.up.weight.zero_()

    def transform(self, out: torch.Tensor) -> torch.Tensor:
        dtype = out.dtype
        h = self.act(F.linear(out, self.down.weight.to(dtype), self.down.bias.to(dtype)))
        return out + F.linear(h, self.up.weight.to(dtype), self.up.bias.to(dtype))


class BottleneckAdapter(Adapter):
    """Bottleneck adapters on chosen sublayer outputs, plus optionally trained norms and heads."""

    sublayers: ClassVar[tuple[str, ...]] = ()  # "attention" and/or "ffn": where a subclass places adapters
    part_kinds = {"bottlenecks": "bottleneck", "norms": "layer_norm", "copies": "modules_to_save"}
    not_mergeable_because = ("its bottleneck x + up(act(down(x))) is a nonlinearity that no change of the base "
                             "weights can express")

    def __init__(self, name: str, config: BottleneckConfig):
        super().__init__(name, config)
        self.bottlenecks = nn.ModuleDict()
        self.norms = TrainableCopies()
        self.copies = TrainableCopies()

    def paths(self) -> list[str]:
        return [module_path(k) for k in self.bottlenecks]

    # --- attaching ---------------------------------------------------------------------------
    def inject(self, model: nn.Module, strict: bool = True) -> None:
        cfg: BottleneckConfig = self.config
        for path in resolve_copies(model, cfg.modules_to_save, strict):
            self.copies.add(model, path, self)
        for path in self._sites(model, strict):
            module = model.get_submodule(path)
            width = targeting.linear_features(module)[1]
            size = cfg.size_for(width)
            if size < 1:
                raise ConfigError(f"{self.method}: reduction_factor {cfg.reduction_factor} leaves no bottleneck for "
                                  f"'{path}' ({width} features); use a smaller reduction_factor or set "
                                  "bottleneck_size.")
            weights = Bottleneck(width, size, cfg.activation, cfg.init, cfg.init_std, module.weight.device)
            self.bottlenecks[module_key(path)] = weights
            sites.add_transform(module, path, self, weights.transform)
        if cfg.train_layer_norms:
            for path in self._norm_paths(model):
                self.norms.add(model, path, self)

    def _sites(self, model: nn.Module, strict: bool) -> list[str]:
        cfg = self.config
        chosen: list[str] = []
        for kind in self.sublayers:
            explicit = getattr(cfg, f"{kind}_modules")
            if explicit is not None:
                chosen += targeting.resolve_targets(model, explicit, layers=cfg.layers, skip_under=self.copies.paths(),
                                                    strict=strict, what=f"{self.method} {kind}_modules")
            else:
                chosen += self._discover(model, kind)
        order = {name: i for i, (name, _) in enumerate(model.named_modules())}
        return sorted(set(chosen), key=order.__getitem__)

    def _discover(self, model: nn.Module, kind: str) -> list[str]:
        cfg = self.config
        model_name = type(model).__name__
        layouts = block_layouts(model)
        if not layouts:
            raise TargetError(f"{self.method}: cannot place the {kind} adapters in {model_name}: it has no "
                              "nn.ModuleList of blocks holding linear layers; name the modules with "
                              f"{kind}_modules=[...].")
        wanted = targeting.parse_layers(cfg.layers)
        if wanted is not None:
            indices = sorted({lay.index for lay in layouts})
            layouts = [lay for lay in layouts if lay.index in wanted]
            if not layouts:
                raise TargetError(f"{self.method}: layers {wanted} select none of the blocks of {model_name} "
                                  f"(their indices are {indices[0]}-{indices[-1]}).")
        hidden = getattr(getattr(model, "config", None), "hidden_size", None)
        found: list[str] = []
        for lay in layouts:
            if kind == "attention":
                candidates = lay.attention_outputs
                looked_for = "a submodule named like '*attn*' or '*attention*' holding linear layers"
            else:
                candidates = [lay.ffn_output] if lay.ffn_output else []
                looked_for = "a linear layer outside its attention submodules"
            if not candidates:
                raise TargetError(f"{self.method}: cannot place the {kind} adapter in block '{lay.path}' of "
                                  f"{model_name}: looked for {looked_for} and found none; name the modules with "
                                  f"{kind}_modules=[...].")
            for path in candidates:
                width = targeting.linear_features(model.get_submodule(path))[1]
                if hidden is not None and width != hidden:
                    raise TargetError(f"{self.method}: cannot place the {kind} adapter in block '{lay.path}' of "
                                      f"{model_name}: its candidate output projection '{path}' has {width} output "
                                      f"features, not the hidden size {hidden}; name the modules with "
                                      f"{kind}_modules=[...].")
            found += candidates
        return found

    def _norm_paths(self, model: nn.Module) -> list[str]:
        wanted = targeting.parse_layers(self.config.layers)
        paths = []
        for name, module in model.named_modules():
            if not is_norm(module) or next(module.parameters(recurse=False), None) is None:
                continue
            if is_under(name, self.copies.paths()):
                continue
            index = targeting.layer_index(name)
            if wanted is None or index is None or index in wanted:
                paths.append(name)
        return paths

    def remove(self, model: nn.Module) -> None:
        for path in self.paths():
            sites.detach(model.get_submodule(path), self)
        self.norms.remove(model, self)
        self.copies.remove(model, self)

    # --- checkpoints (peftlab's own format) --------------------------------------------------
    def tensor_targets(self, model: nn.Module) -> dict[str, tuple[torch.Tensor, str]]:
        """Saved key -> (the live tensor it is read from and loaded into, a description)."""
        targets = {}
        for path in self.paths():
            weights = self.bottlenecks[module_key(path)]
            for name, param in weights.named_parameters():
                targets[f"{path}.adapter.{name}"] = (param.detach(), f"adapter {name} after '{path}'")
        for name, value in self.norms.trained_tensors(model, merged=False).items():
            targets[name] = (value, f"trained norm '{name}'")
        for name, value in self.copies.trained_tensors(model, merged=False).items():
            targets[name] = (value, f"'{name}' (modules_to_save)")
        return targets

@registry.register
class Houlsby(BottleneckAdapter):
    """Houlsby adapters: after the attention and the feed-forward output projections of every block."""

    method = "houlsby"
    config_cls = HoulsbyConfig
    sublayers = ("attention", "ffn")


@registry.register
class Pfeiffer(BottleneckAdapter):
    """The Pfeiffer variant: after the feed-forward output projection of every block."""

    method = "pfeiffer"
    config_cls = PfeifferConfig
    sublayers = ("ffn",)


