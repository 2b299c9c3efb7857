"""The ``peftlab`` command line (typer). Each command lives in its own module."""
from .app import app, main

__all__ = ["app", "main"]
