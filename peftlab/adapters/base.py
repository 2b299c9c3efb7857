"""The small protocol every method implements.

A method is a config dataclass plus an :class:`Adapter` subclass. One ``Adapter`` instance is one
named adapter on one model: it owns its parameters (it is an ``nn.Module`` kept by the
``PeftModel``) and attaches itself to the base model through forward hooks (see ``sites``).
Methods receive the base model as an argument instead of keeping references to its modules, so
an adapter never registers base modules as its own children.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import ConfigError, MergeError


@dataclasses.dataclass
class AdapterConfig:
    """Base class of method configs. Subclasses are dataclasses and set ``method``."""

    method: ClassVar[str] = ""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first invalid field."""

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-friendly field values."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> AdapterConfig:
        """Build a config from a dict, ignoring unknown keys with one warning that names them."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            warnings.warn(f"{source}: ignoring unknown key(s) {unknown} for method '{cls.method}'.", stacklevel=2)
        return cls(**{k: v for k, v in data.items() if k in fields})


def check_choice(value: Any, field: str, choices: tuple, method: str) -> None:
    """Raise a ConfigError if ``value`` is not one of ``choices``."""
    if value not in choices:
        valid = ", ".join(repr(c) for c in choices)
        raise ConfigError(f"{method} config field '{field}' is {value!r}; valid values: {valid}.")


class Adapter(nn.Module):
    """One named adapter of one method, attached to one base model.

    Subclasses set the class attributes and implement ``inject``/``remove`` and the checkpoint
    methods; mergeable methods also implement ``merge``/``unmerge``.
    """

    method: ClassVar[str] = ""
    config_cls: ClassVar[type[AdapterConfig]] = AdapterConfig
    peft_type: ClassVar[str | None] = None  # HF PEFT's name for the format, when we share it
    mergeable: ClassVar[bool] = False
    not_mergeable_because: ClassVar[str] = "this method does not support merging"
    zero_when_untrained: ClassVar[bool] = False  # an untrained adapter saves as all zeros (e.g. bias offsets)

    def __init__(self, name: str, config: AdapterConfig):
        super().__init__()
        self.adapter_name = name
        self.config = config
        self.active = False
        self.merged = False

    @property
    def live(self) -> bool:
        """Whether the adapter's hooks act on the forward pass right now."""
        return self.active and not self.merged

    # --- attaching -------------------------------------------------------------------------
    def inject(self, model: nn.Module, strict: bool = True) -> None:
        """Create the adapter's parameters for ``model`` and attach them to it.

        ``strict=False`` (used when reading saved configs) tolerates target entries that match nothing.
        Must leave no trace if it raises after :meth:`remove` is called.
        """
        raise NotImplementedError

    def remove(self, model: nn.Module) -> None:
        """Detach from ``model``; afterwards the base model is exactly as before ``inject``."""
        raise NotImplementedError

    # --- merging ---------------------------------------------------------------------------
    def merge(self, model: nn.Module) -> None:
        """Fold the adapter into the base weights (exactly undoable by :meth:`unmerge`)."""
        raise MergeError(f"adapter '{self.adapter_name}' ({self.method}) cannot be merged: {self.not_mergeable_because}.")

    def unmerge(self, model: nn.Module) -> None:
        """Take the adapter out of the base weights again, restoring them bit for bit."""
        raise MergeError(f"adapter '{self.adapter_name}' ({self.method}) cannot be merged or unmerged.")

    # --- checkpoints -----------------------------------------------------------------------
    def checkpoint_config(self, model: nn.Module) -> dict[str, Any]:
        """The JSON written as ``adapter_config.json``."""
        raise NotImplementedError

    def checkpoint_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The tensors written to ``adapter_model.safetensors``, under the format's key names."""
        raise NotImplementedError

    def load_checkpoint_tensors(self, model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
        """Load tensors written by :meth:`checkpoint_tensors` (or by the peer library sharing the format)."""
        raise NotImplementedError

    @classmethod
    def config_from_checkpoint(cls, saved: dict[str, Any], source: str) -> AdapterConfig:
        """Read a saved ``adapter_config.json`` back into a config."""
        return cls.config_cls.from_dict({k: v for k, v in saved.items() if k != "peftlab"}, source)

    # --- training --------------------------------------------------------------------------
    def set_trainable(self, trainable: bool) -> None:
        """Make all of the adapter's own parameters trainable or frozen."""
        for p in self.parameters():
            p.requires_grad_(trainable)

    def parameter_kinds(self) -> dict[str, str]:
        """Map each own parameter name (as in ``named_parameters``) to a short kind for summaries."""
        return {n: self.method for n, _ in self.named_parameters()}


def saved_metadata(method: str, format_version: int) -> dict[str, Any]:
    """The ``peftlab`` block every saved adapter_config.json carries."""
    from .. import __version__

    return {"method": method, "format_version": format_version, "version": __version__}


def module_key(path: str) -> str:
    """A module path as a key of an ``nn.ModuleDict`` (which forbids dots)."""
    return path.replace(".", "/")


def module_path(key: str) -> str:
    """Inverse of :func:`module_key`."""
    return key.replace("/", ".")
