"""LoRA (Hu et al. 2021): ``h = W x + (alpha / r) * B A x`` on chosen linear layers.

A is ``[r, in]`` (kaiming-uniform or gaussian), B is ``[out, r]`` (zeros), so the wrapped model
equals the base at init. A and B are kept in fp32 and cast to the activation dtype in forward;
merge deltas are computed in fp32 and merged exactly undoably (see ``exact``). Checkpoints use
HF PEFT's format, so either library loads the other's LoRA adapters.
"""
from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from .. import registry, targeting
from ..quant.kernels.dispatch import triton_cuda_available
from ..quant.kernels.tuning import lora_plan
from ..errors import CheckpointError, ConfigError, TargetError
from . import exact, sites
from .base import (
    Adapter,
    AdapterConfig,
    check_choice,
    module_key,
    module_path,
    name_or_path_of,
    saved_metadata,
    task_type_of,
    warn_if_newer,
)
from .bias import BiasOffsets, bias_on_last_dim
from .copies import TrainableCopies, resolve_copies
from .lora_term import LoraTerm, generation

FORMAT_VERSION = 1
PEFT_PREFIX = "base_model.model."
INITS = ("kaiming", "gaussian", "random")
BIAS_MODES = ("none", "all", "lora_only")
_FUSED_DTYPES = (torch.bfloat16, torch.float16)


@dataclass
class LoraConfig(AdapterConfig):
    """LoRA options.

    Args:
        r: rank of the update.
        alpha: scaling numerator; the update is scaled by ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA).
        dropout: dropout on the adapter's input path (inactive in eval mode).
        target_modules: ``"all-linear"`` (every Linear/Conv1D except output head and classifier), a list
            of module names or suffixes (``["q_proj", "v_proj"]``), or a regex string matching whole names.
        exclude_modules: names/suffixes (list) or a regex (string) to leave out.
        layers: block indices to adapt: ``3``, ``"0-3,8"`` or ``[0, 1]``; ``None`` adapts every block.
        layers_pattern: name of the block list (e.g. ``"layers"``, ``"h"``) when it cannot be inferred.
        bias: ``"none"``, ``"lora_only"`` (train the biases of adapted layers) or ``"all"`` (every bias).
        fan_in_fan_out: weight stored ``[in, out]``; ``None`` detects it (GPT-2's Conv1D).
        use_rslora: rank-stabilised scaling ``alpha / sqrt(r)``.
        init: ``"kaiming"`` (A kaiming-uniform, B zero), ``"gaussian"`` (A ~ N(0, 1/r), B zero) or
            ``"random"`` (B random too: the model changes at init; for tests).
        modules_to_save: modules trained in full and saved with the adapter. ``None`` means the
            classification head of ``*ForSequenceClassification``-style models; ``[]`` means none.
        rank_pattern / alpha_pattern: per-module r / alpha, keyed by a regex matched against the end of
            module names (HF PEFT's rule), e.g. ``{"q_proj": 16}``.
        task_type / base_model_name_or_path: recorded in the saved config (filled from the model if unset).
    """

    method = "lora"

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"
    exclude_modules: str | list[str] | None = None
    layers: int | str | list[int | str] | None = None
    layers_pattern: str | list[str] | None = None
    bias: str = "none"
    fan_in_fan_out: bool | None = None
    use_rslora: bool = False
    init: str = "kaiming"
    modules_to_save: list[str] | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    task_type: str | None = None
    base_model_name_or_path: str | None = None

    def validate(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise ConfigError(f"lora config field 'r' is {self.r!r}; it must be a positive integer.")
        if not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise ConfigError(f"lora config field 'alpha' is {self.alpha!r}; it must be a positive number.")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"lora config field 'dropout' is {self.dropout!r}; it must be in [0, 1).")
        check_choice(self.bias, "bias", BIAS_MODES, "lora")
        check_choice(self.init, "init", INITS, "lora")
        if isinstance(self.target_modules, (list, tuple)) and not self.target_modules:
            raise ConfigError("lora config field 'target_modules' is empty; name at least one module or use 'all-linear'.")
        for key, value in self.rank_pattern.items():
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"lora config field 'rank_pattern[{key!r}]' is {value!r}; it must be a positive integer.")
        for key, value in self.alpha_pattern.items():
            if not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"lora config field 'alpha_pattern[{key!r}]' is {value!r}; it must be positive.")
        targeting.parse_layers(self.layers)

    def rank_for(self, path: str) -> int:
        return _pattern_value(self.rank_pattern, path, self.r)

    def scaling_for(self, path: str) -> float:
        alpha, r = _pattern_value(self.alpha_pattern, path, self.alpha), self.rank_for(path)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def _pattern_value(pattern: dict[str, Any], path: str, default: Any) -> Any:
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


class LoraWeights(nn.Module):
    """The A/B pair of one adapted layer."""

    def __init__(self, in_features: int, out_features: int, r: int, scaling: float, dropout: float,
                 fan_in_fan_out: bool, init: str, device: torch.device):
        super().__init__()
        self.scaling = scaling
        self.fan_in_fan_out = fan_in_fan_out
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, device=device, dtype=torch.float32))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self._cast: tuple[tuple, tuple[torch.Tensor, torch.Tensor]] | None = None  # 16-bit copies of A and s·B, see _weights
        with torch.no_grad():
            if init == "gaussian":
                nn.init.normal_(self.lora_A, std=1 / r)
            else:
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            if init == "random":
                nn.init.normal_(self.lora_B, std=1 / r)

    def _weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """A and scaling*B in the activation dtype, without autograd history; remade only when the
        fp32 weights may have changed (see ``lora_term``), not on every forward."""
        a, b = self.lora_A, self.lora_B
        key = (dtype, a._version, b._version, a.data_ptr(), b.data_ptr(), torch.is_inference_mode_enabled(),
               generation())
        if self._cast is None or self._cast[0] != key:
            with torch.no_grad():
                self._cast = (key, (a.to(dtype), (b * self.scaling).to(dtype)))
        return self._cast[1]

    def update(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The layer output plus the adapter's term for input ``x``."""
        a, b = self.lora_A, self.lora_B
        x = self.dropout(x) if self.dropout is not None else x
        if out.dtype != x.dtype or not out.is_contiguous():  # e.g. autocast: plain ops, autograd through the casts
            h = F.linear(x, a.to(x.dtype))
            return out + F.linear(h, (b * self.scaling).to(h.dtype)).to(out.dtype)
        a16, b16 = self._weights(x.dtype)
        if torch.is_grad_enabled() and (x.requires_grad or out.requires_grad or a.requires_grad or b.requires_grad):
            return LoraTerm.apply(x, out, a, b, a16, b16, self.scaling)
        # No autograd graph: add into the base output in place (it is a fresh tensor of the base layer).
        h = F.linear(x, a16)
        out2, h2 = out.view(-1, out.shape[-1]), h.view(-1, h.shape[-1])
        kind, config = _inference_plan(x, *out2.shape)
        if kind == "add":
            from ..quant.kernels.lora_linear import lora_add

            lora_add(out2, h2, b16, config)
        else:
            out2.addmm_(h2, b16.t())
        return out

    def fused_forward(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """``module(x)`` plus this term in one Triton kernel (few tokens) or through a merged weight
        made for the call (many tokens), or None where neither applies.

        It applies without autograd, to a plain ``nn.Linear`` on CUDA in bf16/fp16, at the shapes
        where ``tuning.LORA_FORWARD`` measured it fastest.
        """
        weight, bias = module.weight, module.bias
        if torch.is_grad_enabled() and any(t.requires_grad for t in (x, weight, self.lora_A, self.lora_B)):
            return None  # checked first: training declines here, at the least host cost
        if (type(module) is not nn.Linear or weight.dtype != x.dtype or weight.stride(-1) != 1
                or (bias is not None and bias.dtype != x.dtype)):
            return None
        if self.dropout is not None and self.dropout.training:
            return None
        x2 = x.reshape(-1, x.shape[-1])
        kind, config = _inference_plan(x, x2.shape[0], weight.shape[0])
        if kind not in ("fused", "merge"):
            return None
        from ..quant.kernels.lora_linear import lora_linear, lora_transient_merge

        a16, b16 = self._weights(x.dtype)
        if kind == "merge":
            out = lora_transient_merge(x2, weight, bias, a16, b16, config)
        else:
            out = lora_linear(x2 if x2.stride(-1) == 1 else x2.contiguous(), weight, bias, a16, b16, config)
        return out.view(*x.shape[:-1], out.shape[-1])

    def delta(self) -> torch.Tensor:
        """The fp32 weight update, in the layout of the base layer's weight."""
        d = (self.lora_B.detach().float() @ self.lora_A.detach().float()) * self.scaling
        return d.T if self.fan_in_fan_out else d


@registry.register
class Lora(Adapter):
    """A LoRA adapter on one model."""

    method = "lora"
    config_cls = LoraConfig
    peft_type = "LORA"
    format_version = FORMAT_VERSION
    part_kinds = {"layers": "lora", "biases": "bias", "copies": "modules_to_save"}
    mergeable = True

    def __init__(self, name: str, config: LoraConfig):
        super().__init__(name, config)
        self.layers = nn.ModuleDict()
        self.biases = BiasOffsets()
        self.copies = TrainableCopies()
        self._residuals: dict[str, exact.Residual | None] = {}
        self._trainable_before_merge = True

    def paths(self) -> list[str]:
        return [module_path(k) for k in self.layers]

    # --- attaching ---------------------------------------------------------------------------
    def inject(self, model: nn.Module, strict: bool = True) -> None:
        cfg: LoraConfig = self.config
        for path in resolve_copies(model, cfg.modules_to_save, strict):
            self.copies.add(model, path, self)
        targets = targeting.resolve_targets(
            model, cfg.target_modules, exclude=cfg.exclude_modules, layers=cfg.layers,
            layers_pattern=cfg.layers_pattern, skip_under=self.copies.paths(), strict=strict)
        for path in targets:
            module = model.get_submodule(path)
            in_f, out_f = targeting.linear_features(module)
            weights = LoraWeights(in_f, out_f, cfg.rank_for(path), cfg.scaling_for(path), cfg.dropout,
                                  self._fan_in_fan_out(module, path), cfg.init, _device_of(module))
            self.layers[module_key(path)] = weights
            update = weights.update  # one bound method: the site recognises the update it fused by identity
            sites.add_update(module, path, self, update)
            sites.add_fused_forward(module, self, update, weights.fused_forward)
        for path in self._bias_paths(model, targets):
            self.biases.add(model, path, self)

    def _fan_in_fan_out(self, module: nn.Module, path: str) -> bool:
        actual = isinstance(module, Conv1D)
        wanted = self.config.fan_in_fan_out
        if wanted is not None and wanted != actual:
            warnings.warn(f"lora: fan_in_fan_out={wanted} does not fit '{path}' ({type(module).__name__}); "
                          f"using {actual}.", stacklevel=3)
        return actual

    def _bias_paths(self, model: nn.Module, targets: list[str]) -> list[str]:
        if self.config.bias == "none":
            return []
        candidates = targets if self.config.bias == "lora_only" else [
            name for name, m in model.named_modules() if name and not targeting.is_under(name, self.copies.paths())]
        paths = []
        for name in candidates:
            module = model.get_submodule(name)
            bias = getattr(module, "bias", None)
            if isinstance(bias, nn.Parameter) and bias_on_last_dim(module):
                paths.append(name)
        return paths

    def remove(self, model: nn.Module) -> None:
        for path in self.paths():
            sites.detach(model.get_submodule(path), self)
        self.biases.remove(model, self)
        self.copies.remove(model, self)

    # --- merging -----------------------------------------------------------------------------
    def merge(self, model: nn.Module) -> None:
        if self.merged:
            return
        done: list[str] = []
        try:
            for path in self.paths():
                delta = self.layers[module_key(path)].delta()
                self._residuals[path] = exact.merge_into(model.get_submodule(path), delta, path)
                done.append(path)
            self.biases.merge(model)
        except Exception:
            for path in reversed(done):  # nothing stays half-merged
                self._unmerge_layer(model, path)
            raise
        self.copies.swap_storage(model)
        self._trainable_before_merge = any(p.requires_grad for p in self.parameters())
        self.set_trainable(False)  # merged weights must not train: unmerge recomputes the same delta
        self.merged = True

    def _unmerge_layer(self, model: nn.Module, path: str) -> None:
        delta = self.layers[module_key(path)].delta()
        exact.unmerge_from(model.get_submodule(path), delta, self._residuals.pop(path), path)

    def unmerge(self, model: nn.Module) -> None:
        if not self.merged:
            return
        self.copies.swap_storage(model)
        self.biases.unmerge(model)
        for path in reversed(self.paths()):
            self._unmerge_layer(model, path)
        self.set_trainable(self._trainable_before_merge)
        self.merged = False

    # --- checkpoints (HF PEFT format) --------------------------------------------------------
    def checkpoint_config(self, model: nn.Module) -> dict[str, Any]:
        cfg: LoraConfig = self.config
        modules = [model.get_submodule(p) for p in self.paths()]
        return {
            "peft_type": "LORA",
            "task_type": cfg.task_type or task_type_of(model),
            "base_model_name_or_path": cfg.base_model_name_or_path or name_or_path_of(model),
            "r": cfg.r,
            "lora_alpha": cfg.alpha,
            "lora_dropout": cfg.dropout,
            "target_modules": _compact_targets(model, self.paths(), self.copies.paths()),
            "exclude_modules": None,
            "layers_to_transform": None,
            "layers_pattern": None,
            "bias": cfg.bias,
            "fan_in_fan_out": any(isinstance(m, Conv1D) for m in modules),
            "use_rslora": cfg.use_rslora,
            "init_lora_weights": {"kaiming": True, "gaussian": "gaussian", "random": False}[cfg.init],
            "modules_to_save": self.copies.paths() or None,
            "rank_pattern": dict(cfg.rank_pattern),
            "alpha_pattern": dict(cfg.alpha_pattern),
            "use_dora": False,
            "inference_mode": True,
            "peftlab": saved_metadata(self.method, self.format_version),
        }

    def _bias_key(self, path: str) -> str:
        inner = ".base_layer.bias" if module_key(path) in self.layers else ".bias"
        return PEFT_PREFIX + path + inner

    def checkpoint_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        tensors = {}
        for path in self.paths():
            weights = self.layers[module_key(path)]
            tensors[f"{PEFT_PREFIX}{path}.lora_A.weight"] = weights.lora_A.detach()
            tensors[f"{PEFT_PREFIX}{path}.lora_B.weight"] = weights.lora_B.detach()
        for path in self.biases.paths():
            tensors[self._bias_key(path)] = self.biases.full_bias(model, path, self.merged)
        for name, value in self.copies.trained_tensors(model, self.merged).items():
            tensors[PEFT_PREFIX + name] = value
        return tensors

    def load_checkpoint_tensors(self, model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
        remaining = {(k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k): v for k, v in tensors.items()}
        # HF PEFT with bias="all" also saves its wrapper's internal duplicates of modules_to_save biases
        internal = tuple(f"{p}.{inner}." for p in self.copies.paths() for inner in ("modules_to_save", "original_module"))
        remaining = {k: v for k, v in remaining.items() if not k.startswith(internal)}

        def take(name: str, shape: tuple[int, ...], what: str) -> torch.Tensor:
            if name not in remaining:
                raise CheckpointError(f"{source}: tensor '{PEFT_PREFIX}{name}' ({what}) is missing.")
            value = remaining.pop(name)
            if tuple(value.shape) != tuple(shape):
                raise CheckpointError(f"{source}: {what} has shape {list(value.shape)}, but the base model "
                                      f"needs {list(shape)}; the adapter was made for a different model or config.")
            return value

        with torch.no_grad():
            for path in self.paths():
                weights = self.layers[module_key(path)]
                for attr in ("lora_A", "lora_B"):
                    param = getattr(weights, attr)
                    param.copy_(take(f"{path}.{attr}.weight", param.shape, f"{attr} of '{path}'"))
            for path in self.biases.paths():
                shape = model.get_submodule(path).bias.shape
                name = next((n for n in (f"{path}.base_layer.bias", f"{path}.bias") if n in remaining), f"{path}.bias")
                self.biases.set_full_bias(model, path, take(name, shape, f"bias of '{path}'"))
            for name, value in self.copies.trained_tensors(model, merged=False).items():
                self.copies.load_tensor(model, name, take(name, value.shape, f"'{name}' (modules_to_save)"))
        if remaining:
            key = sorted(remaining)[0]
            if "lora_magnitude_vector" in key or "lora_embedding" in key:
                raise CheckpointError(f"{source}: tensor '{key}' belongs to a LoRA variant peftlab does not "
                                      "support (DoRA or LoRA on embeddings).")
            raise CheckpointError(f"{source}: tensor '{key}' does not belong to any module this adapter targets; "
                                  "the adapter was saved for a different model or config.")

    @classmethod
    def config_from_checkpoint(cls, saved: dict[str, Any], source: str) -> LoraConfig:
        return lora_config_from_peft(saved, source)



# --- helpers ---------------------------------------------------------------------------------
def _inference_plan(x: torch.Tensor, tokens: int, n: int) -> tuple[str, dict | None]:
    """How the no-autograd LoRA term runs for input ``x [..., k]`` and ``n`` output features:
    ``"fused"``/``"add"`` (Triton), ``"merge"`` (a merged weight for the call; see
    ``tuning.LORA_FORWARD``) or ``"separate"`` (plain GEMMs)."""
    if x.device.type != "cuda" or x.dtype not in _FUSED_DTYPES or not triton_cuda_available():
        return "separate", None
    kind, config = lora_plan(tokens, n, x.shape[-1])
    if kind in ("add", "merge") and not torch.cuda.is_current_stream_capturing():
        # These save GPU time, but a Triton launch costs the host more than a cuBLAS one:
        # eagerly run forwards are host-bound there (benchmarks/NOTES-e2e.md, §6, §9).
        return "separate", None
    return kind, config


def _device_of(module: nn.Module) -> torch.device:
    for tensor in module.parameters(recurse=False):
        return tensor.device
    return torch.device("cpu")






def _compact_targets(model: nn.Module, paths: list[str], skip_under: list[str]) -> list[str]:
    """Suffixes that select exactly ``paths`` when they do, else the full names."""
    suffixes = sorted({p.rsplit(".", 1)[-1] for p in paths})
    try:
        same = targeting.resolve_targets(model, suffixes, skip_under=skip_under) == paths
    except TargetError:
        same = False
    return suffixes if same else list(paths)








# --- reading HF PEFT's adapter_config.json ---------------------------------------------------
_PEFT_RENAMED = {"lora_alpha": "alpha", "lora_dropout": "dropout", "layers_to_transform": "layers"}
_PEFT_KEPT = ("r", "target_modules", "exclude_modules", "layers_pattern", "bias", "fan_in_fan_out", "use_rslora",
              "modules_to_save", "rank_pattern", "alpha_pattern", "task_type", "base_model_name_or_path")
_PEFT_NO_EFFECT = {"peft_type", "auto_mapping", "peft_version", "megatron_core", "inference_mode",
                   "qalora_group_size", "revision", "peftlab", "init_lora_weights"}
_PEFT_UNSUPPORTED = {
    "use_dora": "DoRA", "lora_bias": "LoRA bias vectors (lora_bias)", "layer_replication": "layer replication",
    "target_parameters": "LoRA on parameters (target_parameters)", "trainable_token_indices": "trainable tokens",
    "use_qalora": "QA-LoRA", "megatron_config": "Megatron layers", "alora_invocation_tokens": "activated LoRA",
    "arrow_config": "Arrow routing", "use_bdlora": "BD-LoRA",
}
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq")


def lora_config_from_peft(saved: dict[str, Any], source: str) -> LoraConfig:
    """Read an HF PEFT (or peftlab) LoRA ``adapter_config.json``."""
    for key, feature in _PEFT_UNSUPPORTED.items():
        if saved.get(key):
            raise ConfigError(f"{source}: the adapter uses {feature} ('{key}'), which peftlab does not support.")
    init = saved.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        raise ConfigError(f"{source}: init_lora_weights={init!r} rewrites the base weights; save the adapter from "
                          "PEFT with path_initial_model_for_weight_conversion to get a plain LoRA adapter.")
    values: dict[str, Any] = {new: saved[old] for old, new in _PEFT_RENAMED.items() if saved.get(old) is not None}
    values.update({key: saved[key] for key in _PEFT_KEPT if saved.get(key) is not None})
    values["init"] = "gaussian" if init == "gaussian" else "kaiming"
    if isinstance(values.get("target_modules"), (set, tuple)):
        values["target_modules"] = sorted(values["target_modules"])
    if values.get("modules_to_save") is None:
        values["modules_to_save"] = []  # an explicit "none" in PEFT's format
    ignorable = _PEFT_NO_EFFECT | set(_PEFT_RENAMED) | set(_PEFT_KEPT) | set(_PEFT_UNSUPPORTED)
    unknown = sorted(k for k in saved if k not in ignorable and saved[k] not in (None, False, {}, []))
    if unknown:
        warnings.warn(f"{source}: ignoring unknown key(s) {unknown}.", stacklevel=3)
    warn_if_newer(saved, source, FORMAT_VERSION)
    try:
        return LoraConfig(**values)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
