"""``peftlab inspect MODEL [--method NAME --method.<option> VALUE ...]``: a model without its weights."""
from __future__ import annotations

import json

import typer

from .app import app, reported_errors
from .finetune import split_arguments

_HELP = """Show a model's module tree (repeated blocks once), the linear layers a method can target
(by suffix, with counts and shapes) and, with a method, the exact trainable/total parameter counts.
Nothing is downloaded or loaded but config.json: the model is built on the meta device.

Method options use finetune's syntax (--method.r 16 or method.r=16); a finetune YAML config may be
given instead of MODEL. Examples:

  peftlab inspect ./llama

  peftlab inspect ./llama --method lora --method.r 16 --method.target_modules '[q_proj, v_proj]'

  peftlab inspect ./llama --method qlora --json
"""


def run_arguments(model: str, extra: list[str]) -> tuple[object, bool]:
    """The run config that MODEL (a model or a finetune YAML) and finetune-style overrides describe, and
    whether a method was asked for. Inspecting and estimating read no data, so none is required."""
    from ..inspect import NO_DATA, InspectError
    from ..train.config import load_run_config

    if model.startswith("--"):
        raise InspectError(f"put MODEL first (got the option {model!r} where the model belongs).")
    path, overrides = split_arguments([model, *extra])
    if path is None:
        overrides = [f"model={model}", *overrides[1:], f"data.train={NO_DATA}"]
    asked = path is not None or any(o.split("=", 1)[0].lstrip("-").split(".")[0] in ("method", "quantize")
                                    for o in overrides)
    return load_run_config(path, overrides), asked


@app.command(help=_HELP, context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def inspect(
    ctx: typer.Context,
    model: str = typer.Argument(..., help="Model folder, hub id, pkg: reference, or a finetune YAML config."),
    task: str | None = typer.Option(None, "--task", help="causal_lm or classification [default: the "
                                       "config's architecture]."),
    depth: int | None = typer.Option(None, "--depth", help="Show the module tree this many levels deep."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors."),
) -> None:
    from ..inspect import inspect_run, load_model_config

    with reported_errors(debug):
        run, asked = run_arguments(model, list(ctx.args))
        report = inspect_run(run if asked else None, config=load_model_config(run.model), task=task)
        typer.echo(json.dumps(report.to_dict(), indent=2) if as_json else report.text(depth))
