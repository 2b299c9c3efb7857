"""Runs a test module's checks under Triton's CPU interpreter, in a child pytest process.

The interpreter must be switched on before any kernel is defined, so modules that need it hold
their checks behind ``INNER`` and, outside it, one test that calls :func:`run_inner`.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

INNER = os.environ.get("PEFTLAB_KERNEL_INTERPRETER") == "1"


def run_inner(test_file: str, timeout: int = 600) -> None:
    """Runs ``test_file`` with ``TRITON_INTERPRET=1`` and fails with the child's report."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PEFTLAB_KERNEL_INTERPRETER="1", TRITON_DEFAULT_FP_FUSION="1")
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", test_file],
                          cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout
