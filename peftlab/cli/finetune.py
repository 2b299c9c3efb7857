"""``peftlab finetune CONFIG.yaml [--key value ...] [a.b=value ...]``."""
from __future__ import annotations

from pathlib import Path

import typer

from ..train.config import describe_options
from .app import app, err_console, reported_errors

_HELP = f"""Finetune a model as one config file (and/or flags) says.

Override any key as section.key=value or --section.key value (unique keys also bare: --lr 1e-4).
Examples:

  peftlab finetune examples/configs/quickstart.yaml

  peftlab finetune cfg.yaml train.lr=1e-4 --method.r 8

  peftlab finetune --model ./my-model --data.train data.jsonl --data.format alpaca --output.dir runs/a

\b
Config keys and their defaults:
{describe_options()}
"""


def split_arguments(arguments: list[str]) -> tuple[Path | None, list[str]]:
    """The YAML path (first argument ending in .yaml/.yml) and ``key=value`` overrides from the rest."""
    config, overrides, i = None, [], 0
    while i < len(arguments):
        item = arguments[i]
        if item.startswith("--"):
            key = item[2:]
            if "=" in key:
                overrides.append(key)
            elif i + 1 < len(arguments) and not arguments[i + 1].startswith("--"):
                overrides.append(f"{key}={arguments[i + 1]}")
                i += 1
            else:
                overrides.append(f"{key}=true")
        elif config is None and item.endswith((".yaml", ".yml")) and "=" not in item:
            config = Path(item)
        else:
            overrides.append(item)
        i += 1
    return config, overrides


@app.command(help=_HELP, context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def finetune(
    ctx: typer.Context,
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint in output.dir."),
    print_config: bool = typer.Option(False, "--print-config", help="Print the resolved config and exit."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors."),
) -> None:
    import yaml

    from ..train.config import load_run_config

    with reported_errors(debug):
        path, overrides = split_arguments(list(ctx.args))
        config = load_run_config(path, overrides)
        if print_config:
            typer.echo(yaml.safe_dump(config.to_dict(), sort_keys=False))
            return
        from transformers.utils import logging as hf_logging

        from ..train.trainer import finetune as run_finetune

        hf_logging.disable_progress_bar()  # our own progress bar is the one to watch

        result = run_finetune(config, resume=resume, console=err_console)
        typer.echo(str(result.artifact))
