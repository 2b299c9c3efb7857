"""The typer app and the error handling every command shares."""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator

import typer
from rich.console import Console
from rich.markup import escape

app = typer.Typer(name="peftlab", help="Parameter-efficient finetuning for Hugging Face transformers.",
                  add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None)
err_console = Console(stderr=True)

USAGE_ERROR = 2


def expected_errors() -> tuple[type[BaseException], ...]:
    """Errors caused by input or setup, reported as one line instead of a traceback."""
    from ..errors import PeftlabError

    errors: list[type[BaseException]] = [PeftlabError, FileNotFoundError]
    try:
        from ..optim import LomoConfigError, LomoUsageError

        errors += [LomoConfigError, LomoUsageError]
    except ImportError:
        pass
    return tuple(errors)


@contextmanager
def reported_errors(debug: bool) -> Iterator[None]:
    """Turn expected errors into ``error: <one sentence>`` on stderr and exit code 2 (traceback with --debug)."""
    try:
        yield
    except expected_errors() as err:
        if debug:
            raise
        code = getattr(err, "exit_code", USAGE_ERROR)
        err_console.print(f"[red]error:[/red] {escape(str(err))}", highlight=False, soft_wrap=True)
        raise typer.Exit(code) from None


def main_commands() -> None:
    """Import the command modules, which register themselves on ``app``."""
    from . import estimate, finetune, inspect, merge  # noqa: F401


def main() -> None:
    """Console-script entry point."""
    main_commands()
    app(prog_name="peftlab", args=sys.argv[1:])


@app.callback()
def _root() -> None:
    """peftlab: LoRA, QLoRA, adapters, prefix tuning, BitFit and LOMO for transformers models."""
