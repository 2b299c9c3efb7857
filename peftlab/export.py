"""Merge adapters into the base weights and write a plain Hugging Face model folder.

The folder (config, sharded safetensors, generation config, tokenizer) loads with
``transformers`` alone; ``quantize="nf4"`` writes bitsandbytes' 4-bit format instead, which
``transformers`` loads with bitsandbytes. Every export checks itself: the written folder is
loaded back into a fresh model and its logits on a probe batch are compared with the unmerged
adapter model's, and the relative errors are reported.

Adapters trained on an NF4 base (QLoRA) are merged into the *dequantized* NF4 weights they were
trained against, never into the original full-precision ones and never silently re-quantized.
Nothing is half-written: the folder is assembled under a temporary name next to ``out_dir`` and
renamed into place only after the check passed.

    report = peftlab.export(["runs/a/adapter"], "merged", base="path/to/base", dtype="bf16")
    print(report.text())
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import checkpoint, registry
from .errors import MergeError, PeftlabError

__all__ = ["ExportError", "ExportReport", "export"]

logger = logging.getLogger("peftlab")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
QUANTIZATIONS = ("nf4",)
BASE_QUANTIZATIONS = ("auto", "none", "nf4")
# Largest max-relative logits error a dense export may show before it is refused (dtype rounding only).
DENSE_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 1e-2}
PROBE_SHAPE = (2, 32)
_BIAS_FLAGS_HINT = "attention_bias / mlp_bias (Llama-style) or bias"


class ExportError(PeftlabError, ValueError):
    """An export that cannot be done as asked (bad input, unmergeable adapter, failed check)."""


@dataclass
class ExportReport:
    """What :func:`export` wrote and how closely the written model matches the unmerged adapters."""

    out_dir: str
    adapters: list[str]
    model_class: str
    dtype: str
    quantize: str | None
    base_was_nf4: bool
    files: list[str]
    size_bytes: int
    max_relative_error: float
    mean_relative_error: float
    probe_shape: list[int]
    config_changes: dict[str, Any] = field(default_factory=dict)
    zero_biases: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def text(self) -> str:
        """A few lines for people."""
        merged = ", ".join(self.adapters)
        base = " into the dequantized NF4 base" if self.base_was_nf4 else ""
        fmt = f"NF4 4-bit (bitsandbytes), compute dtype {self.dtype}" if self.quantize else self.dtype
        lines = [(f"merged {merged}{base} -> {self.out_dir} ({self.model_class}, {fmt}, "
                  f"{len(self.files)} files, {self.size_bytes / 2**20:,.1f} MiB)")]
        if self.config_changes:
            lines.append("config changed so the merged biases load: " +
                         ", ".join(f"{k}={v}" for k, v in self.config_changes.items()) +
                         (f" ({len(self.zero_biases)} biases added as zeros)" if self.zero_biases else ""))
        lines.append(f"check: reloaded with transformers; logits vs the unmerged adapter model on a "
                     f"{self.probe_shape[0]}x{self.probe_shape[1]} probe: max relative error "
                     f"{self.max_relative_error:.3g}, mean {self.mean_relative_error:.3g}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- inputs
def _dtype(value: str | torch.dtype | None, what: str = "dtype") -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    if value not in DTYPES:
        raise ExportError(f"{what} {value!r} is not one of {', '.join(DTYPES)}.")
    return DTYPES[value]


def _dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def _check_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a folder; choose a folder path for the export.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"{out} already holds files; pass --overwrite (overwrite=True) to replace it, or choose "
                          "another folder.")


@dataclass
class _Adapter:
    folder: Path
    saved: dict[str, Any]
    shapes: dict[str, tuple[int, ...]]  # tensor name -> shape, read without loading the tensors


def _read_adapters(paths: Sequence[str | os.PathLike]) -> list[_Adapter]:
    """Check each adapter folder and that its method can be merged, before any model is loaded."""
    from safetensors import safe_open

    if not paths:
        raise ExportError("name at least one adapter folder to merge.")
    adapters = []
    for path in paths:
        folder = checkpoint.adapter_folder(path)
        source = str(folder / checkpoint.CONFIG_NAME)
        saved = checkpoint.read_json(folder / checkpoint.CONFIG_NAME)
        method_cls = registry.for_saved_config(saved, source)
        if not method_cls.mergeable:
            raise ExportError(f"{folder}: {method_cls.method} adapters cannot be merged into the base weights "
                              f"({method_cls.not_mergeable_because}); serve it unmerged instead, e.g. "
                              f"peftlab.load(model, '{folder}').")
        weights = folder / checkpoint.WEIGHTS_NAME
        shapes: dict[str, tuple[int, ...]] = {}
        if weights.is_file():
            try:
                with safe_open(str(weights), framework="pt") as f:
                    shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            except Exception as err:  # safetensors raises its own types for bad headers
                raise ExportError(f"{weights} is truncated or corrupted ({err}).") from None
        adapters.append(_Adapter(folder, saved, shapes))
    return adapters


def _run_says_nf4(adapter: _Adapter) -> bool:
    """Whether the adapter sits in a ``peftlab finetune`` run folder whose config quantized the base."""
    import yaml

    run_config = adapter.folder.parent / "config.yaml"
    if not run_config.is_file():
        return False
    try:
        data = yaml.safe_load(run_config.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return False
    if not isinstance(data, dict):
        return False
    method = data.get("method")
    name = method.get("name") if isinstance(method, dict) else method
    return data.get("quantize") == "nf4" or name == "qlora"


def _base_is_nf4(config, adapters: list[_Adapter], base_quantize: str) -> bool:
    if base_quantize not in BASE_QUANTIZATIONS:
        raise ExportError(f"base_quantize {base_quantize!r} is not one of {', '.join(BASE_QUANTIZATIONS)}.")
    if base_quantize != "auto":
        return base_quantize == "nf4"
    return getattr(config, "quantization_config", None) is not None or any(_run_says_nf4(a) for a in adapters)


_TASK_CLASSES = {"CAUSAL_LM": "AutoModelForCausalLM", "SEQ_CLS": "AutoModelForSequenceClassification",
                 "TOKEN_CLS": "AutoModelForTokenClassification", "QUESTION_ANS": "AutoModelForQuestionAnswering"}
_HEAD_NAMES = ("classifier", "score")


def _head_labels(adapters: list[_Adapter]) -> int | None:
    """Rows of a trained classification head saved with an adapter (its number of labels)."""
    for adapter in adapters:
        for key, shape in adapter.shapes.items():
            parts = key.split(".")
            if len(shape) == 2 and parts[-1] == "weight" and parts[-2] in _HEAD_NAMES:
                return shape[0]
    return None


def _model_class(config, adapters: list[_Adapter]):
    """The Auto class of the task an adapter records, else the base config's own architecture, else a
    classifier when an adapter carries a trained classification head, else a causal LM."""
    import transformers

    for adapter in adapters:
        name = _TASK_CLASSES.get(str(adapter.saved.get("task_type") or ""))
        if name:
            return getattr(transformers, name)
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if isinstance(cls, type) and issubclass(cls, nn.Module):
            return cls
    if _head_labels(adapters) is not None:
        return transformers.AutoModelForSequenceClassification
    return transformers.AutoModelForCausalLM


def _embedding_rows(model: nn.Module, adapters: list[_Adapter]) -> int | None:
    """Vocabulary size of a trained input embedding saved with an adapter (modules_to_save)."""
    embedding = model.get_input_embeddings()
    path = next(n for n, m in model.named_modules() if m is embedding)
    for adapter in adapters:
        for key, shape in adapter.shapes.items():
            if key == f"{path}.weight" or key.endswith(f".{path}.weight"):
                return shape[0]
    return None


def _load_base(location: str, config, adapters: list[_Adapter], dtype: torch.dtype, nf4: bool,
               device: torch.device) -> nn.Module:
    cls = _model_class(config, adapters)
    kwargs: dict[str, Any] = {}
    labels = _head_labels(adapters)
    if labels is not None and getattr(config, "num_labels", labels) != labels:
        kwargs["num_labels"] = labels
    try:
        if nf4:
            from .quant.loading import from_pretrained

            model = from_pretrained(location, quantize="nf4", model_cls=cls, device=device, compute_dtype=dtype,
                                    dtype=dtype, **kwargs)
        else:
            model = cls.from_pretrained(location, dtype=dtype, **kwargs).to(device)
    except (OSError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ExportError(f"base: cannot load {location!r} as {getattr(cls, '__name__', cls)} ({first}).") from None
    rows = _embedding_rows(model, adapters)
    if rows is not None and rows != model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(rows)  # the adapter was trained on a resized vocabulary
    return model.eval()


def _load_tokenizer(folders: list[Path]):
    """The first tokenizer found in the adapter folders (finetune saves one there) or the base folder."""
    from transformers import AutoTokenizer

    for folder in folders:
        if any((folder / name).is_file() for name in ("tokenizer_config.json", "tokenizer.json")):
            try:
                return AutoTokenizer.from_pretrained(folder)
            except (OSError, ValueError):
                continue
    return None


# ----------------------------------------------------------------------------- merging
def _fresh_keys(model: nn.Module) -> dict[str, torch.Size]:
    """State-dict shapes of a model built anew from ``model.config`` (what transformers will expect)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        fresh = type(model)._from_config(model.config)
    return {k: v.shape for k, v in fresh.state_dict().items()}


def _fit_config_to_biases(model: nn.Module) -> tuple[dict[str, Any], list[str]]:
    """Make ``model.config`` describe the biases merging created (BitFit's ``add_missing``).

    Tries the config's boolean ``*bias*`` switches that are off; the ones that let a fresh model hold
    every merged bias are turned on, and biases they add that merging did not create are filled with
    zeros (so outputs are unchanged). Refuses when no switch explains a merged bias.
    """
    keys = {k: v.shape for k, v in model.state_dict().items()}
    expected = _fresh_keys(model)
    extra = {k for k in keys if k not in expected}
    if not extra:
        return {}, []
    config = model.config
    switches = [k for k, v in config.to_dict().items() if "bias" in k and v is False]
    changes: dict[str, Any] = {}
    for switch in switches:
        setattr(config, switch, True)
        gained = set(_fresh_keys(model)) - set(expected)
        if gained & extra:
            changes[switch] = True
            expected = _fresh_keys(model)
        else:
            setattr(config, switch, False)
    missing_bias = sorted(extra - set(expected))
    if missing_bias:
        for switch in changes:
            setattr(config, switch, False)
        raise ExportError(f"merging created the bias '{missing_bias[0]}', which {type(model).__name__}'s config "
                          f"cannot declare ({_BIAS_FLAGS_HINT}), so transformers would drop it; serve the adapter "
                          "unmerged, or train it without add_missing.")
    zeros = sorted(k for k in expected if k not in keys)
    not_bias = [k for k in zeros if not k.endswith(".bias")]
    if not_bias:
        raise ExportError(f"setting {', '.join(changes)} in the config would also add '{not_bias[0]}', which is not a "
                          "bias; serve the adapter unmerged instead.")
    for key in zeros:
        owner = model.get_submodule(key.rsplit(".", 1)[0])
        like = owner.weight
        owner.bias = nn.Parameter(torch.zeros(expected[key], dtype=like.dtype, device=like.device),
                                  requires_grad=False)
    return changes, zeros


def _quantize_nf4(model: nn.Module, dtype: torch.dtype) -> None:
    """Quantize to bitsandbytes' NF4 + double quantization and describe it in the config."""
    from transformers import BitsAndBytesConfig

    from .quant import NF4Linear, quantize_model

    quantize_model(model, compute_dtype=dtype)
    for module in model.modules():
        if isinstance(module, NF4Linear):  # shared code tables would be refused as shared tensors when saving
            for key in ("quant_map", "nested_quant_map"):
                if module._buffers.get(key) is not None:
                    module._buffers[key] = module._buffers[key].clone()
    model.config.quantization_config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=torch.uint8, llm_int8_skip_modules=model.peftlab_quant_report.skipped)
    del model.peftlab_quant_report


# ----------------------------------------------------------------------------- the check
def _probe(model: nn.Module, probe: str | None, tokenizer, device: torch.device) -> dict[str, torch.Tensor]:
    if probe is not None:
        if tokenizer is None:
            raise ExportError("--probe needs a tokenizer, and neither the adapter folders nor the base folder has "
                              "one; leave the probe out to use random tokens.")
        ids = tokenizer(probe, return_tensors="pt")["input_ids"]
        return {"input_ids": ids.to(device)}
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, PROBE_SHAPE, generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids.to(device)}


@torch.no_grad()
def _logits(model: nn.Module, batch: dict) -> torch.Tensor:
    out = model(**batch)
    return (out.logits if hasattr(out, "logits") else out[0]).float()


def _relative_errors(value: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    diff = (value.to(reference.device) - reference).abs()
    return (diff.max() / reference.abs().max()).item(), (diff.mean() / reference.abs().mean()).item()


def _reload(folder: Path, cls, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """The written folder as transformers loads it, in a new model object (no peftlab hooks)."""
    try:
        model = cls.from_pretrained(folder, dtype=dtype, device_map={"": device}).eval()
    except Exception as err:  # whatever transformers raises, the export is not loadable
        raise ExportError(f"the exported folder does not load with transformers ({type(err).__name__}: "
                          f"{(str(err).strip().splitlines() or [''])[0]}); nothing was written.") from None
    return generic_bnb_cpu_path(model)


def generic_bnb_cpu_path(model: nn.Module) -> nn.Module:
    """Keeps bitsandbytes' 4-bit layers on their generic path on the CPU. On CPUs with AVX512-BF16,
    bitsandbytes (0.50) repacks their weights for a bf16 kernel at the first forward in eval mode,
    which fails where rows are not whole blocks or the row count is not a multiple of 32, and rounds
    the scales to bf16 elsewhere; the check should measure the exported weights alike on every CPU."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


# ----------------------------------------------------------------------------- writing
def _folder_size(folder: Path) -> tuple[list[str], int]:
    files = sorted(p.name for p in folder.iterdir() if p.is_file())
    return files, sum((folder / f).stat().st_size for f in files)


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished folder to ``out``; an existing ``out`` is replaced only once the new one is there."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.replace(out, old / out.name)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old / out.name, out)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- the API
@dataclass
class _Prepared:
    """The unmerged adapter model to export, and what the report needs to know about it."""

    wrapped: Any  # PeftModel with the adapters to merge active
    names: list[str]
    base_was_nf4: bool
    dtype: torch.dtype
    tokenizer: Any


def export(
    model_or_adapters: Any,
    out_dir: str | os.PathLike,
    *,
    base: str | os.PathLike | None = None,
    dtype: str | torch.dtype | None = None,
    quantize: str | None = None,
    probe: str | None = None,
    overwrite: bool = False,
    base_quantize: str = "auto",
    max_shard_size: str | int = "5GB",
    device: str | torch.device | None = None,
    max_error: float | None = None,
) -> ExportReport:
    """Merge adapters into their base and write a model folder that plain ``transformers`` loads.

    Args:
        model_or_adapters: a :class:`~peftlab.PeftModel` (its active adapters are merged into a copy;
            the model itself is left as it was), or one or more adapter folders.
        out_dir: the folder to write; an existing non-empty one only with ``overwrite=True``.
        base: the base model (folder, hub id or ``pkg:`` reference) for adapter folders; default:
            the ``base_model_name_or_path`` recorded in the first adapter.
        dtype: ``"bf16"``, ``"fp16"`` or ``"fp32"`` (default: the base's own dtype).
        quantize: ``"nf4"`` writes bitsandbytes' 4-bit NF4 + double quantization format.
        probe: text for the check's probe batch (default: random tokens).
        base_quantize: ``"nf4"`` when the adapters were trained on an NF4 base (QLoRA): they are then
            merged into the dequantized NF4 weights; ``"auto"`` detects a pre-quantized base or a
            ``peftlab finetune`` run folder that quantized it; ``"none"`` merges into the base as stored.
        max_shard_size: largest safetensors shard (transformers' notation, e.g. ``"2GB"``).
        device: where to merge and check (default: CUDA when available).
        max_error: refuse the export when the check's max relative logits error is larger (default:
            the dtype's rounding allowance for dense exports, no limit for NF4).

    Memory: the merged model and the reloaded copy exist at once; a PeftModel argument is copied first.
    """
    out = Path(out_dir)
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise ExportError(f"quantize {quantize!r} is not supported; use one of {', '.join(QUANTIZATIONS)} or none.")
    _check_out_dir(out, overwrite)
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    prepared = _prepare(model_or_adapters, base, _dtype(dtype), base_quantize, device)
    batch = _probe(prepared.wrapped.base_model, probe, prepared.tokenizer, device)
    reference = _logits(prepared.wrapped, batch)
    merged, changes, zeros = _merge(prepared, quantize)
    prepared.wrapped = None  # the merged model is what remains of it
    limit = max_error if max_error is not None else (None if quantize else DENSE_TOLERANCE[prepared.dtype])
    files, size, max_rel, mean_rel = _write_checked(merged, out, prepared, batch, reference, device, max_shard_size,
                                                    limit)
    report = ExportReport(str(out), prepared.names, type(merged).__name__, _dtype_name(prepared.dtype), quantize,
                          prepared.base_was_nf4, files, size, max_rel, mean_rel, list(batch["input_ids"].shape),
                          changes, zeros)
    logger.info(report.text())
    return report


def _prepare(model_or_adapters: Any, base, dtype: torch.dtype | None, base_quantize: str,
             device: torch.device) -> _Prepared:
    from .model import PeftModel

    if isinstance(model_or_adapters, PeftModel):
        wrapped, names, nf4 = _copy_of(model_or_adapters, dtype)
        return _Prepared(wrapped.to(device), names, nf4, dtype or _model_dtype(wrapped.base_model), None)
    paths = [model_or_adapters] if isinstance(model_or_adapters, (str, os.PathLike)) else list(model_or_adapters)
    adapters = _read_adapters(paths)
    wrapped, nf4, location, dtype = _wrap_folders(adapters, base, dtype, base_quantize, device)
    tokenizer = _load_tokenizer([a.folder for a in adapters] + [Path(location)])
    return _Prepared(wrapped, [str(a.folder) for a in adapters], nf4, dtype, tokenizer)


def _merge(prepared: _Prepared, quantize: str | None) -> tuple[nn.Module, dict[str, Any], list[str]]:
    """The plain merged model in the export dtype (NF4 if asked), its config describing every weight."""
    try:
        merged = prepared.wrapped.merge_and_unload()
    except MergeError as err:
        raise ExportError(str(err)) from None
    changes, zeros = _fit_config_to_biases(merged)
    merged.to(prepared.dtype)
    if quantize == "nf4":
        _quantize_nf4(merged, prepared.dtype)
    tokenizer = prepared.tokenizer
    if tokenizer is not None and merged.config.pad_token_id is None and tokenizer.pad_token_id is not None \
            and type(merged).__name__.endswith("ForSequenceClassification"):
        merged.config.pad_token_id = tokenizer.pad_token_id  # the head finds each sequence's last token with it
    return merged, changes, zeros


def _write_checked(merged: nn.Module, out: Path, prepared: _Prepared, batch: dict, reference: torch.Tensor,
                   device: torch.device, max_shard_size: str | int, limit: float | None):
    """Write into a temporary folder beside ``out``, reload it with transformers, compare the logits, and
    rename it into place only if the error is within ``limit`` -> (files, bytes, max and mean error)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        merged.save_pretrained(tmp, max_shard_size=max_shard_size)
        if prepared.tokenizer is not None:
            prepared.tokenizer.save_pretrained(tmp)
        reloaded = _reload(tmp, type(merged), prepared.dtype, device)
        max_rel, mean_rel = _relative_errors(_logits(reloaded, batch), reference)
        del reloaded
        if limit is not None and not max_rel <= limit:
            raise ExportError(f"the exported model's logits differ from the unmerged adapter model's by {max_rel:.3g} "
                              f"(max relative), more than the allowed {limit:.3g}; nothing was written.")
        files, size = _folder_size(tmp)
        _move_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return files, size, max_rel, mean_rel


def _model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's floating-point weights (an NF4 layer's compute dtype)."""
    from .quant import NF4Linear

    for module in model.modules():
        if isinstance(module, NF4Linear):
            return module.compute_dtype
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def _config_dtype(config) -> torch.dtype:
    """The dtype a checkpoint's config records (fp32 when it records none of bf16/fp16/fp32)."""
    saved = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(saved, str):
        saved = getattr(torch, saved.removeprefix("torch."), None)
    return saved if saved in DTYPES.values() else torch.float32


def _copy_of(model, dtype: torch.dtype | None):
    """A deep copy of a PeftModel to merge (the caller's model stays unmerged), with its active adapters."""
    from .quant import NF4Linear

    names = list(model.active_adapters)
    if not names:
        raise ExportError("the model has no active adapter to merge; activate them with set_adapter().")
    for name in names:
        adapter = model.adapters[name]
        if not adapter.mergeable:
            raise ExportError(f"adapter '{name}' ({adapter.method}) cannot be merged into the base weights "
                              f"({adapter.not_mergeable_because}); serve it unmerged instead.")
    wrapped = copy.deepcopy(model)
    nf4 = any(isinstance(m, NF4Linear) for m in wrapped.base_model.modules())
    if nf4 and dtype is not None:
        for module in wrapped.base_model.modules():
            if isinstance(module, NF4Linear):
                module.compute_dtype = dtype  # dequantize straight into the export dtype
    return wrapped, names, nf4


def _wrap_folders(adapters: list[_Adapter], base, dtype: torch.dtype | None, base_quantize: str,
                  device: torch.device):
    """Load the base (NF4 when the adapters were trained on one) and the adapters, all active
    -> (PeftModel, whether the base is NF4, the base's location, the export dtype)."""
    from transformers import AutoConfig

    from .train.setup import model_location
    from .model import PeftModel

    reference = base if base is not None else adapters[0].saved.get("base_model_name_or_path")
    if not reference:
        raise ExportError(f"no base model: pass --base (base=...); {adapters[0].folder} does not record one.")
    location = model_location(str(reference))
    try:
        config = AutoConfig.from_pretrained(location)
    except (OSError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ExportError(f"base: cannot read a model config from {str(reference)!r} ({first}).") from None
    nf4 = _base_is_nf4(config, adapters, base_quantize)
    dtype = dtype or _config_dtype(config)
    wrapped = PeftModel(_load_base(location, config, adapters, dtype, nf4, device))
    names = [f"adapter{i}" for i in range(len(adapters))]
    for name, adapter in zip(names, adapters):
        wrapped.load_adapter(adapter.folder, name=name)
    wrapped.set_adapter(names)
    return wrapped, nf4, location, dtype
