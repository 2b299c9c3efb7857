"""Adapter folders on disk: ``adapter_config.json`` + ``adapter_model.safetensors``.

Reads only JSON and safetensors (never pickle). Every write goes to a temporary file in the same
folder and is renamed into place, so a crash never leaves a half-written file; the weights are
written before the config, which a reader opens first.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import CheckpointError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "pytorch_model.bin")


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    """Write ``data`` as indented JSON, atomically."""
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    _atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_tensors(path: str | Path, tensors: dict[str, torch.Tensor], what: str) -> None:
    """Write tensors as safetensors, atomically; refuses empty or all-zero sets (e.g. unsharded ZeRO-3 stubs)."""
    if not tensors:
        raise CheckpointError(f"refusing to save {what}: it has no tensors.")
    empty = sorted(k for k, t in tensors.items() if t.numel() == 0)
    if empty:
        raise CheckpointError(f"refusing to save {what}: tensor '{empty[0]}' is empty (a sharded or offloaded "
                              "parameter that was never gathered?).")
    if all(not t.any() for t in tensors.values()):
        raise CheckpointError(f"refusing to save {what}: every tensor is all zeros, which no trained or "
                              "initialised adapter is (a sharded parameter that was never gathered?).")
    plain = {k: t.detach().to("cpu", copy=True).contiguous() for k, t in tensors.items()}  # own storage each
    _atomic_write(Path(path), lambda tmp: save_file(plain, tmp, metadata={"format": "pt"}))


def read_json(path: str | Path) -> dict[str, Any]:
    """Read a JSON object; errors name the file and, for bad JSON, the line and column."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist.") from None
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} cannot be read: {err}.") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}, line {err.lineno}, column {err.colno}: invalid JSON ({err.msg}).") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, not {type(data).__name__}.")
    return data


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file; a truncated or corrupted file gives a clear error."""
    path = Path(path)
    if not path.is_file():
        pickled = [name for name in PICKLE_NAMES if (path.parent / name).is_file()]
        if pickled:
            raise CheckpointError(f"{path.parent} holds only {pickled[0]}, a pickle file peftlab never loads (it can "
                                  "run code); re-save the adapter as safetensors.")
        raise CheckpointError(f"{path} does not exist.")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path} is truncated or corrupted ({err}); save the adapter again.") from None


def adapter_folder(path: str | Path) -> Path:
    """Check that ``path`` is an adapter folder; the error lists adapters found in subfolders."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a folder; expected a folder with {CONFIG_NAME} and {WEIGHTS_NAME}.")
    if not (path / CONFIG_NAME).is_file():
        subs = sorted(p.name for p in path.iterdir() if (p / CONFIG_NAME).is_file())
        hint = f"; it holds adapters in subfolders {subs}: pass one of those" if subs else ""
        raise CheckpointError(f"{path} has no {CONFIG_NAME}{hint}.")
    return path


def save_adapter_files(folder: str | Path, config: dict[str, Any], tensors: dict[str, torch.Tensor],
                       what: str) -> None:
    """Write one adapter folder (weights first, then config)."""
    folder = Path(folder)
    write_tensors(folder / WEIGHTS_NAME, tensors, what)
    write_json(folder / CONFIG_NAME, config)


def load_adapter_files(folder: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read one adapter folder: its config dict and its tensors."""
    folder = adapter_folder(folder)
    return read_json(folder / CONFIG_NAME), read_tensors(folder / WEIGHTS_NAME)
