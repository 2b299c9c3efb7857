"""Shared pieces of the benchmark scripts: environment record, timing, result files."""
from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS = Path(__file__).parent / "results"

# The 1.1B Llama shape the training benchmarks share (random init), and a tiny one for CPU smoke runs.
LLAMA_1B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                tie_word_embeddings=False)
LLAMA_TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  tie_word_embeddings=False)


def require_cuda(what: str) -> torch.device:
    """The CUDA device, or exit with one line saying that ``what`` needs one."""
    if not torch.cuda.is_available():
        sys.exit(f"{what} needs a CUDA GPU.")
    return torch.device("cuda")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def device_tag(device: torch.device) -> str:
    """Short name for result files: ``cpu``, ``h100``, ``h200``…"""
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    return next((tag for tag in ("h100", "h200", "a100", "l4", "a10") if tag in name), name.split()[-1])


def versions(*packages: str) -> dict[str, str]:
    found = {}
    for package in ("torch", "transformers", "peftlab", *packages):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def median_ms(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 3) -> float:
    """Median wall time of ``fn`` in milliseconds (synchronising CUDA around each call)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def write_result(name: str, data: dict) -> Path:
    """Write ``benchmarks/results/<name>.json`` atomically and return its path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    fd, tmp = tempfile.mkstemp(dir=RESULTS, suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle, indent=2)
        handle.write("\n")
    os.replace(tmp, path)
    return path


def update_result(name: str, section: str, data: dict) -> Path:
    """Replace one section of ``results/<name>.json`` (other scripts own the other sections)."""
    path = RESULTS / f"{name}.json"
    whole = json.loads(path.read_text()) if path.exists() else {}
    whole[section] = data
    return write_result(name, whole)


def build_bf16_llama(config: dict, device: torch.device, checkpointing: bool = True):
    """Random-init bf16 Llama built directly on ``device`` (no fp32 copy ever exists), in train mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from peftlab.model import enable_gradient_checkpointing

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with device:
            model = LlamaForCausalLM(LlamaConfig(**config))
    finally:
        torch.set_default_dtype(previous)
    model.train()
    if checkpointing:
        enable_gradient_checkpointing(model)
    return model


def spawn_worker(script: str, spec: dict, timeout: int, launcher: list[str] | None = None) -> dict:
    """Run ``script --worker <spec>`` in a fresh Python process and return the record it printed.

    A fresh process per measurement keeps each peak-memory reading clean. The worker prints one
    ``RESULT <json>`` line (see :func:`print_worker_result`); a crash or timeout becomes a status.
    ``launcher`` replaces the plain ``python`` (e.g. ``accelerate launch`` for several processes).
    """
    command = (launcher or [sys.executable]) + [script, "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"status": f"timed out after {timeout} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"status": "failed", "error": " | ".join(tail)}


def print_worker_result(result: dict) -> None:
    """The worker's side of :func:`spawn_worker`."""
    print("RESULT " + json.dumps(result), flush=True)
