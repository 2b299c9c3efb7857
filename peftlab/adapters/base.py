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

from ..errors import CheckpointError, ConfigError, MergeError


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
    format_version: ClassVar[int] = 1  # of the saved adapter_config.json / tensors
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

    # --- checkpoints (peftlab's own format by default; methods sharing a peer's format override) ---
    def tensor_targets(self, model: nn.Module) -> dict[str, tuple[torch.Tensor, str]]:
        """``saved key -> (tensor, what it is)`` for everything the adapter saves and loads."""
        raise NotImplementedError

    def checkpoint_config(self, model: nn.Module) -> dict[str, Any]:
        """The JSON written as ``adapter_config.json``."""
        return {**self.config.to_dict(), "peftlab": saved_metadata(self.method, self.format_version)}

    def checkpoint_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The tensors written to ``adapter_model.safetensors``, under the format's key names."""
        return {key: tensor for key, (tensor, _) in self.tensor_targets(model).items()}

    def load_checkpoint_tensors(self, model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
        """Load tensors written by :meth:`checkpoint_tensors` (or by the peer library sharing the format)."""
        load_checked(self.tensor_targets(model), tensors, source)

    @classmethod
    def config_from_checkpoint(cls, saved: dict[str, Any], source: str) -> AdapterConfig:
        """Read a saved ``adapter_config.json``: unknown keys and newer formats warn, invalid values name the file."""
        warn_if_newer(saved, source, cls.format_version)
        try:
            return cls.config_cls.from_dict({k: v for k, v in saved.items() if k != "peftlab"}, source)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None

    # --- training --------------------------------------------------------------------------
    def set_trainable(self, trainable: bool) -> None:
        """Make all of the adapter's own parameters trainable or frozen."""
        for p in self.parameters():
            p.requires_grad_(trainable)

    part_kinds: ClassVar[dict[str, str]] = {}  # own submodule name -> kind shown in summaries

    def parameter_kinds(self) -> dict[str, str]:
        """Map each own parameter name (as in ``named_parameters``) to a short kind for summaries."""
        return {n: self.part_kinds.get(n.split(".", 1)[0], self.method) for n, _ in self.named_parameters()}


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


def warn_if_newer(saved: dict[str, Any], source: str, format_version: int) -> None:
    """Warn when a saved config comes from a newer peftlab format than this reader knows."""
    meta = saved.get("peftlab")
    written = meta.get("format_version") if isinstance(meta, dict) else None
    if isinstance(written, int) and written > format_version:
        warnings.warn(f"{source}: written by a newer peftlab (format {written}); reading the fields "
                      f"format {format_version} knows.", stacklevel=3)


def load_checked(targets: dict[str, tuple[torch.Tensor, str]], tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy each saved tensor into its target ``key -> (tensor, description)``.

    Missing tensors, shape mismatches (naming the module and both shapes) and tensors no target
    takes are errors.
    """
    remaining = dict(tensors)
    with torch.no_grad():
        for key, (target, what) in targets.items():
            if key not in remaining:
                raise CheckpointError(f"{source}: tensor '{key}' ({what}) is missing.")
            value = remaining.pop(key)
            if tuple(value.shape) != tuple(target.shape):
                raise CheckpointError(f"{source}: {what} has shape {list(value.shape)}, but the base model needs "
                                      f"{list(target.shape)}; the adapter was made for a different model or config.")
            target.copy_(value)
    if remaining:
        raise CheckpointError(f"{source}: tensor '{sorted(remaining)[0]}' does not belong to any module this adapter "
                              "adapts; the adapter was saved for a different model or config.")


_TASK_TYPES = (("ForCausalLM", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS"),
               ("ForTokenClassification", "TOKEN_CLS"), ("ForQuestionAnswering", "QUESTION_ANS"),
               ("ForConditionalGeneration", "SEQ_2_SEQ_LM"))


def task_type_of(model: nn.Module) -> str | None:
    """HF PEFT's task type for a model (needed by PEFT to apply some adapter kinds)."""
    name = type(model).__name__
    task = next((task for suffix, task in _TASK_TYPES if name.endswith(suffix)), None)
    if task is None and callable(getattr(model, "can_generate", None)) and model.can_generate():
        task = "CAUSAL_LM"  # causal LMs not named *ForCausalLM, such as GPT2LMHeadModel
    return task


def name_or_path_of(model: nn.Module) -> str | None:
    """Where the model was loaded from, as transformers recorded it."""
    return getattr(getattr(model, "config", None), "_name_or_path", None) or None
