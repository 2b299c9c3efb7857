"""Adapter folders on disk: ``adapter_config.json`` + ``adapter_model.safetensors``.

Reads only JSON and safetensors (never pickle). Every write goes to a temporary file in the same
folder and is renamed into place, so a crash never leaves a half-written file; the weights are
written before the config, which a reader opens first.
"""
from __future__ import annotations

import json
import os
import tempfile
import warnings
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


def write_tensors(path: str | Path, tensors: dict[str, torch.Tensor], what: str, zeros_ok: bool = False) -> None:
    """Write tensors as safetensors, atomically.

    Refuses empty tensors and, unless ``zeros_ok``, sets that are all zeros: both are what sharded
    parameters look like when they were never gathered (e.g. under ZeRO-3 or FSDP).
    """
    if not tensors:
        raise CheckpointError(f"refusing to save {what}: it has no tensors.")
    empty = sorted(k for k, t in tensors.items() if t.numel() == 0)
    if empty:
        raise CheckpointError(f"refusing to save {what}: tensor '{empty[0]}' is empty (a sharded or offloaded "
                              "parameter that was never gathered?).")
    if all(not t.any() for t in tensors.values()):
        if not zeros_ok:
            raise CheckpointError(f"refusing to save {what}: every tensor is all zeros, which no trained or "
                                  "initialised adapter of this method is (a sharded parameter that was never "
                                  "gathered?).")
        warnings.warn(f"saving {what}: every tensor is zero, so it has not been trained yet.", stacklevel=3)
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
                       what: str, zeros_ok: bool = False) -> None:
    """Write one adapter folder (weights first, then config)."""
    folder = Path(folder)
    write_tensors(folder / WEIGHTS_NAME, tensors, what, zeros_ok)
    write_json(folder / CONFIG_NAME, config)


def load_adapter_files(folder: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read one adapter folder: its config dict and its tensors."""
    folder = adapter_folder(folder)
    return read_json(folder / CONFIG_NAME), read_tensors(folder / WEIGHTS_NAME)


# --- nested state (optimizer, scheduler, RNG) as JSON + safetensors, never pickle ----------------
_TENSOR_REF = "__tensor__"


def _split_tree(tree: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    if isinstance(tree, torch.Tensor):
        tensors[path] = tree
        return {_TENSOR_REF: path}
    if isinstance(tree, dict):
        if any(not isinstance(k, (str, int)) for k in tree):
            raise CheckpointError(f"cannot save state at '{path}': dict keys must be str or int.")
        return {"__dict__": [[k, _split_tree(v, tensors, f"{path}/{k}")] for k, v in tree.items()]}
    if isinstance(tree, (list, tuple)):
        items = [_split_tree(v, tensors, f"{path}/{i}") for i, v in enumerate(tree)]
        return {"__tuple__": items} if isinstance(tree, tuple) else items
    if tree is None or isinstance(tree, (bool, int, float, str)):
        return tree
    raise CheckpointError(f"cannot save state at '{path}': {type(tree).__name__} is not JSON or a tensor.")


def _join_tree(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(tree, list):
        return [_join_tree(v, tensors) for v in tree]
    if isinstance(tree, dict):
        if _TENSOR_REF in tree:
            return tensors[tree[_TENSOR_REF]]
        if "__tuple__" in tree:
            return tuple(_join_tree(v, tensors) for v in tree["__tuple__"])
        return {k: _join_tree(v, tensors) for k, v in tree["__dict__"]}
    return tree


def save_state(folder: str | Path, name: str, state: Any) -> None:
    """Save a nested state (dicts, lists, tuples, numbers, strings, tensors) as ``name.json`` + ``name.safetensors``."""
    folder = Path(folder)
    tensors: dict[str, torch.Tensor] = {}
    structure = _split_tree(state, tensors, name)
    if tensors:
        plain = {k: t.detach().to("cpu", copy=True).contiguous() for k, t in tensors.items()}
        _atomic_write(folder / f"{name}.safetensors", lambda tmp: save_file(plain, tmp, metadata={"format": "pt"}))
    write_json(folder / f"{name}.json", {"structure": structure})


def load_state(folder: str | Path, name: str) -> Any:
    """Inverse of :func:`save_state`."""
    folder = Path(folder)
    structure = read_json(folder / f"{name}.json")["structure"]
    weights = folder / f"{name}.safetensors"
    tensors = read_tensors(weights) if weights.is_file() else {}
    return _join_tree(structure, tensors)
