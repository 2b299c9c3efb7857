"""Prefix tuning (Li & Liang 2021): trainable key/value vectors prepended in every attention layer.

Every self-attention layer attends to ``prefix_length`` extra key/value vectors per key/value head
(``num_key_value_heads x head_dim`` wide, so grouped-query attention models get prefixes of their
real key/value width). Real tokens keep their positions and attend to the whole prefix, padded
batches included; ``prefix_attention`` explains the mechanism and what is refused.

Training goes through a reparametrisation MLP by default, ``Embedding(P, d) -> Linear -> tanh ->
Linear`` to ``num_layers * 2 * kv_width`` numbers per prefix position, which the paper found much
more stable than training the vectors directly; ``reparametrize=False`` trains them directly. The
MLP is folded into the plain prefix tensor when saving (or by :meth:`PrefixTuning.fold`); a loaded
adapter has no MLP and trains the vectors directly if asked to.

Checkpoints use HF PEFT's prefix-tuning format: one tensor ``prompt_embeddings`` of shape
``[num_virtual_tokens, num_layers * 2 * token_dim]`` (per position: layer-major, keys before values,
then heads, then head_dim), plus trained copies such as a classification head under
``base_model.<module>.<param>``. HF PEFT places real tokens at positions ``P..P+n-1`` while
peftlab keeps ``0..n-1``, so with position-dependent models the two agree exactly only when PEFT's
run is given positions shifted by ``P``; loading a PEFT-written adapter warns about this.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import registry
from ..errors import CheckpointError, ConfigError
from . import prefix_attention
from .base import (
    Adapter,
    AdapterConfig,
    name_or_path_of,
    saved_metadata,
    task_type_of,
    warn_if_newer,
)
from .copies import TrainableCopies, resolve_copies
from .prefix_attention import KVLayout, PrefixUnsupportedError

FORMAT_VERSION = 1
PEFT_TYPE = "PREFIX_TUNING"
TABLE_KEY = "prompt_embeddings"
COPY_PREFIX = "base_model."  # HF PEFT's key prefix for trained module copies of prompt-learning adapters
_SAVED_KEYS = {"peft_type", "task_type", "base_model_name_or_path", "num_virtual_tokens", "token_dim",
               "num_attention_heads", "num_layers", "num_transformer_submodules", "encoder_hidden_size",
               "prefix_projection", "inference_mode", "modules_to_save", "peftlab", "auto_mapping", "peft_version",
               "revision", "init_weights"}


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


@dataclass
class PrefixTuningConfig(AdapterConfig):
    """Prefix tuning options.

    Args:
        prefix_length: number of virtual tokens ``P`` (key/value vectors per layer and head).
        reparametrize: train through the MLP (folded away when saving); ``False`` trains the vectors directly.
        bottleneck: hidden width of the reparametrisation MLP.
        embedding_dim: width of the virtual-token embeddings fed to the MLP; ``None`` uses the model's hidden size.
        modules_to_save: modules trained in full and saved with the adapter. ``None`` means the
            classification head of ``*ForSequenceClassification``-style models; ``[]`` means none.
        num_layers / kv_heads / head_dim: when set (filled from saved adapters), the model must have
            exactly this key/value layout.
        task_type / base_model_name_or_path: recorded in the saved config (filled from the model if unset).
    """

    method = "prefix"

    prefix_length: int = 30
    reparametrize: bool = True
    bottleneck: int = 512
    embedding_dim: int | None = None
    modules_to_save: list[str] | None = None
    num_layers: int | None = None
    kv_heads: int | None = None
    head_dim: int | None = None
    task_type: str | None = None
    base_model_name_or_path: str | None = None

    def validate(self) -> None:
        for name in ("prefix_length", "bottleneck"):
            if not _positive_int(getattr(self, name)):
                raise ConfigError(f"prefix config field '{name}' is {getattr(self, name)!r}; it must be a positive "
                                  "integer.")
        for name in ("embedding_dim", "num_layers", "kv_heads", "head_dim"):
            value = getattr(self, name)
            if value is not None and not _positive_int(value):
                raise ConfigError(f"prefix config field '{name}' is {value!r}; it must be a positive integer or None.")
        if not isinstance(self.reparametrize, bool):
            raise ConfigError(f"prefix config field 'reparametrize' is {self.reparametrize!r}; it must be true or "
                              "false.")
        if self.modules_to_save is not None and (
                not isinstance(self.modules_to_save, list) or not all(isinstance(m, str) for m in self.modules_to_save)):
            raise ConfigError(f"prefix config field 'modules_to_save' is {self.modules_to_save!r}; it must be a list "
                              "of module names or None.")

    def check_layout(self, layout: KVLayout, model: nn.Module) -> None:
        """Raise if the recorded key/value layout (if any) differs from the model's."""
        for name in ("num_layers", "kv_heads", "head_dim"):
            wanted, actual = getattr(self, name), getattr(layout, name)
            if wanted is not None and wanted != actual:
                raise ConfigError(f"prefix adapter was made for {name}={wanted}, but {type(model).__name__} has "
                                  f"{name}={actual}; it belongs to a different model.")


class PrefixTable(nn.Module):
    """The prefix trained directly: ``[P, num_layers * 2 * kv_heads * head_dim]`` in HF PEFT's layout."""

    def __init__(self, table: torch.Tensor, layout: KVLayout):
        super().__init__()
        self.layout = layout
        self.table = nn.Parameter(table)

    def layer_rows(self, layer: int) -> torch.Tensor:
        """``[P, 2 * kv_heads * head_dim]``: this layer's keys then values."""
        width = self.layout.layer_width
        return self.table[:, layer * width:(layer + 1) * width]

    def full_table(self) -> torch.Tensor:
        return self.table


class PrefixMLP(nn.Module):
    """The reparametrisation ``up(tanh(down(embedding)))`` producing the prefix table."""

    def __init__(self, length: int, embedding_dim: int, bottleneck: int, layout: KVLayout, device: torch.device):
        super().__init__()
        self.layout = layout
        self.embedding = nn.Embedding(length, embedding_dim, device=device)
        self.down = nn.Linear(embedding_dim, bottleneck, device=device)
        self.up = nn.Linear(bottleneck, layout.width, device=device)

    def _hidden(self) -> torch.Tensor:
        return torch.tanh(self.down(self.embedding.weight))

    def layer_rows(self, layer: int) -> torch.Tensor:
        # Only this layer's rows of ``up``: each attention call computes its own slice, so nothing is
        # cached between calls and a checkpointed layer recomputes the very same ops.
        width = self.layout.layer_width
        rows = slice(layer * width, (layer + 1) * width)
        return F.linear(self._hidden(), self.up.weight[rows], self.up.bias[rows])

    def full_table(self) -> torch.Tensor:
        # Layer by layer, exactly as the forward computes it, so a folded prefix reproduces it bit for bit
        return torch.cat([self.layer_rows(layer) for layer in range(self.layout.num_layers)], dim=1)


@registry.register
class PrefixTuning(Adapter):
    """A prefix-tuning adapter on one model."""

    method = "prefix"
    config_cls = PrefixTuningConfig
    peft_type = PEFT_TYPE
    format_version = FORMAT_VERSION
    part_kinds = {"prefix": "prefix", "copies": "modules_to_save"}
    mergeable = False
    not_mergeable_because = ("prefix tuning adds key/value vectors to every attention layer, which no change of "
                             "the base weights can express")

    def __init__(self, name: str, config: PrefixTuningConfig):
        super().__init__(name, config)
        self.prefix: PrefixTable | PrefixMLP | None = None
        self.copies = TrainableCopies()
        self._paths: list[str] = []

    # --- attaching ---------------------------------------------------------------------------
    def inject(self, model: nn.Module, strict: bool = True) -> None:
        cfg: PrefixTuningConfig = self.config
        prefix_attention.check_model(model)
        layout = prefix_attention.kv_layout(model)
        cfg.check_layout(layout, model)
        paths = prefix_attention.attention_modules(model, layout)
        device = next(model.get_submodule(paths[0]).parameters(), torch.empty(0)).device  # where K/V are made
        if cfg.reparametrize:
            embedding_dim = cfg.embedding_dim or prefix_attention.text_config(model).hidden_size
            self.prefix = PrefixMLP(cfg.prefix_length, embedding_dim, cfg.bottleneck, layout, device)
        else:
            self.prefix = PrefixTable(torch.randn(cfg.prefix_length, layout.width, device=device), layout)
        for path in resolve_copies(model, cfg.modules_to_save, strict):
            self.copies.add(model, path, self)
        for path in paths:
            prefix_attention.attach(model.get_submodule(path), path, self)
            self._paths.append(path)

    def remove(self, model: nn.Module) -> None:
        for path in self._paths:
            prefix_attention.detach(model.get_submodule(path), self)
        self._paths = []
        self.copies.remove(model, self)

    def layer_prefix(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's prefix keys and values, each ``[kv_heads, P, head_dim]`` (fp32, differentiable)."""
        return self.prefix.layout.split(self.prefix.layer_rows(layer))

    def prefix_table(self) -> torch.Tensor:
        """The whole prefix ``[P, num_layers * 2 * kv_heads * head_dim]`` in HF PEFT's layout (no gradient)."""
        with torch.no_grad():
            return self.prefix.full_table().detach().float()

    def fold(self) -> None:
        """Replace the reparametrisation MLP by the prefix it computes (cheaper inference; same outputs).

        Optimizers holding the MLP's parameters must be rebuilt afterwards.
        """
        if isinstance(self.prefix, PrefixMLP):
            trainable = any(p.requires_grad for p in self.prefix.parameters())
            self.prefix = PrefixTable(self.prefix_table().clone(), self.prefix.layout)
            self.prefix.table.requires_grad_(trainable)

    # --- checkpoints (HF PEFT's prefix-tuning format) ----------------------------------------
    def checkpoint_config(self, model: nn.Module) -> dict[str, Any]:
        cfg: PrefixTuningConfig = self.config
        layout = self.prefix.layout
        return {
            "peft_type": PEFT_TYPE,
            "task_type": cfg.task_type or task_type_of(model),
            "base_model_name_or_path": cfg.base_model_name_or_path or name_or_path_of(model),
            "num_virtual_tokens": cfg.prefix_length,
            "token_dim": layout.kv_heads * layout.head_dim,
            "num_attention_heads": layout.kv_heads,
            "num_layers": layout.num_layers,
            "num_transformer_submodules": 1,
            "encoder_hidden_size": cfg.bottleneck,
            "prefix_projection": False,  # the saved tensor is the prefix itself, with any MLP folded in
            "inference_mode": True,
            "modules_to_save": self.copies.paths() or None,
            "peftlab": saved_metadata(self.method, self.format_version),
        }

    def checkpoint_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        tensors = {TABLE_KEY: self.prefix_table()}
        for name, value in self.copies.trained_tensors(model, merged=False).items():
            tensors[COPY_PREFIX + name] = value
        return tensors

    def load_checkpoint_tensors(self, model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
        remaining = dict(tensors)
        layout = self.prefix.layout
        expected = (self.config.prefix_length, layout.width)
        if TABLE_KEY not in remaining:
            raise CheckpointError(f"{source}: tensor '{TABLE_KEY}' (the prefix) is missing.")
        table = remaining.pop(TABLE_KEY)
        if tuple(table.shape) != expected:
            raise CheckpointError(
                f"{source}: '{TABLE_KEY}' has shape {list(table.shape)}, but the base model needs {list(expected)} "
                f"({expected[0]} virtual tokens x {layout.num_layers} layers x 2 x {layout.kv_heads} key/value heads "
                f"x head_dim {layout.head_dim}); the adapter was made for a different model or config.")
        trainable = any(p.requires_grad for p in self.prefix.parameters())
        device = next(self.prefix.parameters()).device
        self.prefix = PrefixTable(table.to(device=device, dtype=torch.float32).clone(), layout)
        self.prefix.table.requires_grad_(trainable)
        for name, value in self.copies.trained_tensors(model, merged=False).items():
            key = COPY_PREFIX + name
            if key not in remaining:
                raise CheckpointError(f"{source}: tensor '{key}' (trained copy of '{name}') is missing.")
            saved = remaining.pop(key)
            if saved.shape != value.shape:
                raise CheckpointError(f"{source}: '{key}' has shape {list(saved.shape)}, but the base model needs "
                                      f"{list(value.shape)}; the adapter was made for a different model or config.")
            self.copies.load_tensor(model, name, saved.to(value.device, value.dtype))
        if remaining:
            key = sorted(remaining)[0]
            raise CheckpointError(f"{source}: tensor '{key}' is neither the prefix nor a module this adapter "
                                  "trains; the adapter was saved for a different model or config.")

    @classmethod
    def config_from_checkpoint(cls, saved: dict[str, Any], source: str) -> PrefixTuningConfig:
        """Read a peftlab or HF PEFT prefix-tuning ``adapter_config.json`` (the prefix is always folded)."""
        submodules = saved.get("num_transformer_submodules", 1)
        if submodules != 1:
            raise ConfigError(f"{source}: num_transformer_submodules is {submodules!r}; it was saved for an "
                              "encoder-decoder model, which peftlab's prefix tuning does not support.")
        if saved.get("num_virtual_tokens") is None:
            raise ConfigError(f"{source}: 'num_virtual_tokens' is missing; it gives the prefix length.")
        unknown = sorted(k for k in saved if k not in _SAVED_KEYS and saved[k] not in (None, False, {}, []))
        if unknown:
            warnings.warn(f"{source}: ignoring unknown key(s) {unknown}.", stacklevel=3)
        meta = saved.get("peftlab")
        if not isinstance(meta, dict):
            warnings.warn(f"{source}: HF PEFT places real tokens after the prefix (positions P..P+n-1); peftlab keeps "
                          "positions 0..n-1, so outputs of position-dependent models differ from PEFT's.",
                          stacklevel=3)
        else:
            warn_if_newer(saved, source, FORMAT_VERSION)
        kv_heads, token_dim = saved.get("num_attention_heads"), saved.get("token_dim")
        head_dim = token_dim // kv_heads if _positive_int(kv_heads) and _positive_int(token_dim) else None
        values = {
            "prefix_length": saved["num_virtual_tokens"],
            "reparametrize": False,
            "modules_to_save": list(saved.get("modules_to_save") or []),  # PEFT's null means none
            "num_layers": saved.get("num_layers"),
            "kv_heads": kv_heads,
            "head_dim": head_dim,
            "task_type": saved.get("task_type"),
            "base_model_name_or_path": saved.get("base_model_name_or_path"),
        }
        if _positive_int(saved.get("encoder_hidden_size")):
            values["bottleneck"] = saved["encoder_hidden_size"]
        try:
            return PrefixTuningConfig(**values)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None



__all__ = ["PrefixTuning", "PrefixTuningConfig", "PrefixUnsupportedError"]
