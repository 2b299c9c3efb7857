"""Training checkpoints: everything an exact resume needs, written atomically, the last N kept.

A checkpoint is a folder ``checkpoints/step-000120`` holding the trainable tensors, the optimizer,
schedule and loss-scaler state, the RNG states and the loop position. It is assembled in a
temporary folder and renamed into place, so a crash never leaves a half-written checkpoint.
"""
from __future__ import annotations

import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..checkpoint import (
    load_state,
    read_json,
    read_tensors,
    save_state,
    write_json,
    write_tensors,
)
from ..errors import CheckpointError

PREFIX = "step-"


@dataclass
class LoopState:
    """Where the loop is: the next optimizer step, and the epoch/batch it starts from."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best_metric: float | None = None
    evals_without_improvement: int = 0
    tokens_seen: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)  # eval results so far


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    state["numpy"] = [state["numpy"][0], torch.from_numpy(state["numpy"][1].copy()), *state["numpy"][2:]]
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


def trainable_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(root: Path, loop: LoopState, model: nn.Module, optimizer: Any, schedule: Any,
                    scaler: Any, keep_last: int) -> Path:
    """Write ``root/step-NNNNNN`` atomically and delete all but the newest ``keep_last``."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{loop.step:06d}"
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write_tensors(tmp / "trainable.safetensors", trainable_tensors(model), "the trainable parameters")
        save_state(tmp, "optimizer", optimizer.state_dict())
        save_state(tmp, "schedule", schedule.state_dict())
        save_state(tmp, "rng", _rng_state())
        if scaler is not None:
            save_state(tmp, "scaler", scaler.state_dict())
        write_json(tmp / "loop.json", asdict(loop))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / "loop.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def load_checkpoint(folder: Path, model: nn.Module, optimizer: Any, schedule: Any, scaler: Any) -> LoopState:
    """Restore everything :func:`save_checkpoint` wrote; returns the loop position."""
    tensors = read_tensors(folder / "trainable.safetensors")
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(tensors) != expected:
        missing = sorted(expected - set(tensors)) or sorted(set(tensors) - expected)
        raise CheckpointError(f"{folder}: its trainable parameters do not match this run's model (first difference: "
                              f"'{missing[0]}'); resume with the config the run started with.")
    with torch.no_grad():
        for name, value in tensors.items():
            if params[name].shape != value.shape:
                raise CheckpointError(f"{folder}: '{name}' has shape {list(value.shape)} but the model needs "
                                      f"{list(params[name].shape)}; resume with the config the run started with.")
            params[name].copy_(value)
    optimizer.load_state_dict(load_state(folder, "optimizer"))
    schedule.load_state_dict(load_state(folder, "schedule"))
    if scaler is not None and (folder / "scaler.json").is_file():
        scaler.load_state_dict(load_state(folder, "scaler"))
    _set_rng_state(load_state(folder, "rng"))
    return LoopState(**read_json(folder / "loop.json"))
