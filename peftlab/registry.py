"""Method name -> adapter class. A method registers itself once; nothing else branches on names.

Third-party methods call :func:`register` on their own ``Adapter`` subclass.
"""
from __future__ import annotations

import difflib
from typing import TYPE_CHECKING, Any

from .errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from .adapters.base import Adapter, AdapterConfig

_BY_NAME: dict[str, type[Adapter]] = {}
_BY_PEFT_TYPE: dict[str, type[Adapter]] = {}


def register(adapter_cls: type[Adapter]) -> type[Adapter]:
    """Register an ``Adapter`` subclass under ``adapter_cls.method`` (usable as a decorator)."""
    name = adapter_cls.method
    if name in _BY_NAME and _BY_NAME[name] is not adapter_cls:
        raise ConfigError(f"method name '{name}' is already registered by {_BY_NAME[name].__qualname__}.")
    _BY_NAME[name] = adapter_cls
    if adapter_cls.peft_type:
        _BY_PEFT_TYPE[adapter_cls.peft_type] = adapter_cls
    return adapter_cls


def names() -> list[str]:
    """All registered method names, sorted."""
    _load_builtin()
    return sorted(_BY_NAME)


def get(name: str) -> type[Adapter]:
    """The adapter class registered as ``name``; the error suggests the nearest valid name."""
    _load_builtin()
    if name in _BY_NAME:
        return _BY_NAME[name]
    near = difflib.get_close_matches(name, _BY_NAME, n=1)
    hint = f" Did you mean '{near[0]}'?" if near else ""
    raise ConfigError(f"unknown method '{name}'; valid methods: {', '.join(sorted(_BY_NAME))}.{hint}")


def for_config(config: AdapterConfig) -> type[Adapter]:
    """The adapter class that implements ``config``."""
    cls = get(config.method)
    if not isinstance(config, cls.config_cls):
        raise ConfigError(f"config {type(config).__name__} does not belong to method '{config.method}'.")
    return cls


def for_saved_config(saved: dict[str, Any], source: str) -> type[Adapter]:
    """The adapter class that reads a saved ``adapter_config.json`` (peftlab's or HF PEFT's)."""
    _load_builtin()
    meta = saved.get("peftlab")
    if isinstance(meta, dict) and "method" in meta:
        return get(str(meta["method"]))
    peft_type = saved.get("peft_type")
    if peft_type is None:
        raise ConfigError(f"{source}: neither 'peftlab.method' nor 'peft_type' is set, so the method is unknown.")
    if peft_type not in _BY_PEFT_TYPE:
        raise ConfigError(
            f"{source}: peft_type '{peft_type}' is not supported; peftlab reads {', '.join(sorted(_BY_PEFT_TYPE))}."
        )
    return _BY_PEFT_TYPE[peft_type]


def _load_builtin() -> None:
    """Import the built-in methods so that they register themselves."""
    from . import adapters  # noqa: F401
