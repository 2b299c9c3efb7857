"""``peftlab merge ADAPTER [ADAPTER ...] --base MODEL --out DIR``: merged weights as a plain model folder."""
from __future__ import annotations

import json
from pathlib import Path

import typer

from .app import app, reported_errors

_HELP = """Merge mergeable adapters (LoRA, BitFit; QLoRA's LoRA into the dequantized NF4 base) into
their base model and write a Hugging Face model folder that plain transformers loads: config, sharded
safetensors, tokenizer, generation config. --quantize nf4 writes bitsandbytes' 4-bit format instead.

The written folder is loaded back with transformers and its logits are compared with the unmerged
adapter model on a probe batch; the relative error is printed. Houlsby/Pfeiffer adapters and prefix
tuning cannot be merged: serve them unmerged.

Example:

  peftlab merge runs/a/adapter --base ./llama --out merged --dtype bf16
"""


@app.command(help=_HELP)
def merge(
    adapters: list[Path] | None = typer.Argument(None, help="Adapter folders, merged in this order.",
                                                    show_default=False),
    base: str | None = typer.Option(None, "--base", help="Base model folder, hub id or pkg: reference "
                                       "[default: the one recorded in the adapter]."),
    out: Path | None = typer.Option(None, "--out", help="Folder to write (required).", show_default=False),
    dtype: str | None = typer.Option(None, "--dtype", help="bf16, fp16 or fp32 [default: the base's dtype]."),
    quantize: str | None = typer.Option(None, "--quantize", help="nf4: write a bitsandbytes 4-bit checkpoint."),
    base_quantize: str = typer.Option("auto", "--base-quantize", help="nf4 if the adapters were trained on an NF4 "
                                      "base (QLoRA); auto detects a pre-quantized base or a qlora run folder."),
    probe: str | None = typer.Option(None, "--probe", help="Text for the check [default: random tokens]."),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="Largest safetensors shard."),
    max_error: float | None = typer.Option(None, "--max-error", help="Refuse the export above this max relative "
                                              "logits error [default: dtype rounding for dense exports]."),
    device: str | None = typer.Option(None, "--device", help="Where to merge and check [default: cuda if "
                                         "available]."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out folder."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors."),
) -> None:
    from ..export import ExportError, export

    with reported_errors(debug):
        if not adapters:
            raise ExportError("name at least one adapter folder to merge (peftlab merge ADAPTER --out DIR).")
        if out is None:
            raise ExportError("--out is required: the folder to write the merged model to.")
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        report = export(adapters, out, base=base, dtype=dtype, quantize=quantize, probe=probe, overwrite=overwrite,
                        base_quantize=base_quantize, max_shard_size=max_shard_size, device=device,
                        max_error=max_error)
        typer.echo(json.dumps(report.to_dict(), indent=2) if as_json else report.text())
