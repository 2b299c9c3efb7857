"""``peftlab estimate MODEL --method ... --batch N --seq N``: peak GPU memory of a finetuning step."""
from __future__ import annotations

import json

import typer

from .app import app, reported_errors
from .inspect import run_arguments

_HELP = """Estimate the peak GPU memory (torch.cuda.max_memory_allocated) of one training step, by part:
weights, adapters, gradients, optimizer states, activations, logits and workspace overhead. Only
config.json is read: the model is built on the meta device and the method injected there.

Method options and any finetune key use finetune's syntax; a finetune YAML config may be given
instead of MODEL. Examples:

  peftlab estimate ./llama --method lora --method.r 16 --batch 4 --seq 1024 --gradient-checkpointing

  peftlab estimate ./llama --method qlora --batch 8 --seq 2048 --optimizer paged_adamw_8bit

  peftlab estimate runs/config.yaml --json
"""


@app.command(help=_HELP, context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def estimate(
    ctx: typer.Context,
    model: str = typer.Argument(..., help="Model folder, hub id, pkg: reference, or a finetune YAML config."),
    batch: int | None = typer.Option(None, "--batch", help="Sequences per micro-batch (train.batch_size)."),
    seq: int | None = typer.Option(None, "--seq", help="Tokens per sequence (data.max_seq_len)."),
    optimizer: str | None = typer.Option(None, "--optimizer", help="adamw, paged_adamw_8bit, sgd, lomo or "
                                            "adalomo (train.optimizer)."),
    gradient_checkpointing: bool = typer.Option(False, "--gradient-checkpointing",
                                                help="Non-reentrant activation checkpointing."),
    precision: str | None = typer.Option(None, "--precision", help="bf16, fp16 or fp32 [default: bf16]."),
    task: str | None = typer.Option(None, "--task", help="causal_lm or classification [default: the "
                                       "config's architecture]."),
    as_json: bool = typer.Option(False, "--json", help="Print the estimate as JSON."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors."),
) -> None:
    from ..estimate import estimate_run

    extra = list(ctx.args)
    for key, value in (("train.batch_size", batch), ("data.max_seq_len", seq), ("train.optimizer", optimizer),
                       ("train.precision", precision)):
        if value is not None:
            extra.append(f"{key}={value}")
    if gradient_checkpointing:
        extra.append("train.gradient_checkpointing=true")
    with reported_errors(debug):
        run, _ = run_arguments(model, extra)
        result = estimate_run(run, task=task)
        typer.echo(json.dumps(result.to_dict(), indent=2) if as_json else result.text())
