"""Put NF4 into transformers models: in place (`quantize_model`) or while streaming a checkpoint
(`from_pretrained`), so a full-precision copy of the whole model never sits on the GPU."""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from peftlab.errors import PeftlabError

from . import nf4
from .linear4bit import NF4Linear, quant_state_from_tensors

__all__ = ["QuantizationError", "QuantizationReport", "quantize_model", "from_pretrained", "select_targets"]

logger = logging.getLogger(__name__)

METHODS = ("nf4",)
# Heads stay in full precision: quantizing the layer that produces the logits costs accuracy and,
# for tied embeddings, would break the tie. Any module path with one of these parts is skipped.
DEFAULT_SKIP_PARTS = ("lm_head", "cls", "score", "classifier", "qa_outputs")
_BLOB_SUFFIX = ".quant_state.bitsandbytes__nf4"
_QUANT_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", _BLOB_SUFFIX)


class QuantizationError(PeftlabError, ValueError):
    """A quantization request or a checkpoint to quantize/load is invalid."""


@dataclass
class QuantizationReport:
    """What quantization did to a model, and its parameter memory before and after."""

    quantized: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    bytes_bf16: int = 0
    bytes_now: int = 0
    pre_quantized: bool = False
    unexpected_keys: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line for logs."""
        how = "loaded pre-quantized" if self.pre_quantized else "quantized"
        return (f"{how} {len(self.quantized)} linear layers to NF4 ({len(self.skipped)} kept in full precision); "
                f"parameter memory {self.bytes_bf16 / 2**20:,.2f} MiB in bf16 -> {self.bytes_now / 2**20:,.2f} MiB")


# ----------------------------------------------------------------------------- choosing layers
def _is_conv1d(module: nn.Module) -> bool:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return False
    return isinstance(module, Conv1D)


def _is_quantizable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def _matches(name: str, pattern: str) -> bool:
    if name == pattern or name.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def _output_head(model: nn.Module) -> nn.Module | None:
    try:
        return model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None


def select_targets(model: nn.Module, skip: Iterable[str] | None = None) -> tuple[list[str], list[str]]:
    """Names of the Linear/Conv1D modules to quantize, and of those kept in full precision.

    Kept: the output head, anything under a module named like a head (``DEFAULT_SKIP_PARTS``),
    names matching an entry of ``skip`` (exact name, dotted suffix, or a full-match regex), and
    layers whose weight has an odd number of elements (NF4 packs two per byte).
    """
    if isinstance(skip, str):
        skip = [skip]
    skip = list(skip or [])
    head = _output_head(model)
    targets, kept = [], []
    for name, module in model.named_modules():
        if not _is_quantizable(module):
            continue
        parts = name.split(".")
        if (module is head or any(p in DEFAULT_SKIP_PARTS for p in parts)
                or any(_matches(name, s) for s in skip)):
            kept.append(name)
        elif module.weight.numel() % 2:
            logger.warning("%s: weight %s has an odd number of elements; kept in full precision.",
                           name, list(module.weight.shape))
            kept.append(name)
        else:
            targets.append(name)
    return targets, kept


def _check_method(method: str | None) -> None:
    if method not in METHODS:
        raise QuantizationError(f"unknown quantization method {method!r}; supported: {', '.join(map(repr, METHODS))}.")


def _replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)


def parameter_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes if every parameter were bf16, bytes actually held by parameters and NF4 constants)."""
    bf16 = now = 0
    for module in model.modules():
        if isinstance(module, NF4Linear):
            bf16 += 2 * module.weight_numel
            now += sum(t.numel() * t.element_size() for t in (module.weight, *module.buffers(recurse=False)))
    seen = {id(m.weight) for m in model.modules() if isinstance(m, NF4Linear)}
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        bf16 += p.numel() * (2 if p.is_floating_point() else p.element_size())
        now += p.numel() * p.element_size()
    return bf16, now


def quantize_model(
    model: nn.Module,
    method: str = "nf4",
    *,
    double_quant: bool = True,
    blocksize: int = 64,
    skip: Iterable[str] | None = None,
    compute_dtype: torch.dtype | None = None,
) -> nn.Module:
    """Replace every ``nn.Linear``/``Conv1D`` of ``model`` by :class:`NF4Linear`, in place.

    Heads are kept in full precision (see :func:`select_targets`); ``skip`` adds names, suffixes or
    regexes to keep. Each weight is quantized on the device it is on. Returns ``model``, with a
    :class:`QuantizationReport` in ``model.peftlab_quant_report``.
    """
    _check_method(method)
    nf4._check_blocksize(blocksize, "quantize_model")
    targets, kept = select_targets(model, skip)
    for name in targets:
        module = model.get_submodule(name)
        _replace_module(model, name, NF4Linear.from_linear(
            module, blocksize=blocksize, double_quant=double_quant, compute_dtype=compute_dtype, name=name))
    report = QuantizationReport(quantized=targets, skipped=kept)
    report.bytes_bf16, report.bytes_now = parameter_bytes(model)
    model.peftlab_quant_report = report
    logger.info(report.summary())
    return model


def dequantize_model(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Replace every :class:`NF4Linear` by its dense layer (merged weights included), in place.

    Returns each replaced layer's quantization settings, for :func:`requantize_layers`.
    """
    settings = {}
    for name, module in list(model.named_modules()):
        if isinstance(module, NF4Linear):
            settings[name] = dict(blocksize=module.blocksize, double_quant=module.double_quant,
                                  compute_dtype=module._compute_dtype)
            _replace_module(model, name, module.to_linear())
    return settings


def requantize_layers(model: nn.Module, settings: dict[str, dict[str, Any]]) -> None:
    """Quantize the named dense layers back to NF4 with their recorded settings, in place."""
    for name, kwargs in settings.items():
        _replace_module(model, name, NF4Linear.from_linear(model.get_submodule(name), name=name, **kwargs))


# ----------------------------------------------------------------------------- checkpoints
def _resolve_folder(path_or_id: str | os.PathLike, hub_kwargs: dict) -> Path:
    path = Path(path_or_id)
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(path_or_id), allow_patterns=["*.json", "*.safetensors"], **hub_kwargs))
    except Exception as exc:  # offline, unknown repo, no hub client: one actionable message
        raise QuantizationError(
            f"'{path_or_id}' is not a local model folder and could not be fetched from the Hugging Face Hub "
            f"({type(exc).__name__}); pass a folder holding config.json and model.safetensors."
        ) from None


def _checkpoint_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder, in order (single file or sharded with an index)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise QuantizationError(f"{index}: not a safetensors index with a 'weight_map' ({exc}).") from None
        files = list(dict.fromkeys(folder / f for f in weight_map.values()))
        for f in files:
            if not f.is_file():
                raise QuantizationError(f"{index} lists shard '{f.name}', which is missing from {folder}.")
        return files
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        raise QuantizationError(f"{folder} holds only pickle checkpoints (.bin/.pt); peftlab loads safetensors "
                                f"only — re-save the model with save_pretrained(safe_serialization=True).")
    raise QuantizationError(f"{folder} has neither model.safetensors nor model.safetensors.index.json.")


def _bnb_4bit_settings(config) -> dict | None:
    """The checkpoint's bitsandbytes 4-bit settings, or None for a full-precision checkpoint."""
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return None
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    method = qc.get("quant_method")
    if method != "bitsandbytes":
        raise QuantizationError(f"config.json: quantization_config.quant_method is {method!r}; peftlab reads "
                                f"full-precision checkpoints and bitsandbytes 4-bit NF4 ones.")
    if not (qc.get("load_in_4bit") or qc.get("_load_in_4bit")):
        raise QuantizationError("config.json: quantization_config is bitsandbytes 8-bit; only 4-bit NF4 "
                                "checkpoints can be loaded.")
    if qc.get("bnb_4bit_quant_type", "fp4") != "nf4":
        raise QuantizationError(f"config.json: bnb_4bit_quant_type is {qc.get('bnb_4bit_quant_type', 'fp4')!r}; "
                                f"only 'nf4' is supported.")
    return qc


def _as_dtype(value, where: str) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    name = str(value).removeprefix("torch.")
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise QuantizationError(f"{where}: {value!r} is not a torch dtype name (e.g. 'bfloat16').")
    return dtype


def _key_mapper(model: nn.Module, expected: dict[str, bool]) -> Callable[[str], str]:
    """checkpoint key -> model key: transformers' registered renames plus base-model prefix fixes."""
    prefix = getattr(model, "base_model_prefix", "") or None
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            rename_source_key,
        )

        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
    except ImportError:  # older transformers: only the prefix fix below
        rename_source_key = None

    def rename(key: str) -> str:
        suffix = next((s for s in _QUANT_SUFFIXES if key.endswith(s)), "")
        base = key[: len(key) - len(suffix)]
        if rename_source_key is not None:
            new, pattern = rename_source_key(base, renamings, converters, prefix, expected)
            if pattern is not None:
                raise QuantizationError(
                    f"checkpoint tensor '{key}' must be fused or split ({pattern}) to fit "
                    f"{type(model).__name__}; streaming loading does not support such converted weights.")
        else:
            new = base
            if prefix and new not in expected and f"{prefix}.{new}" in expected:
                new = f"{prefix}.{new}"
            elif prefix and new.startswith(prefix + ".") and new[len(prefix) + 1:] in expected:
                new = new[len(prefix) + 1:]
        return new + suffix

    return rename


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Put ``value`` in place of the parameter or buffer ``name`` (shape checked)."""
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    old = module._parameters.get(leaf) if leaf in module._parameters else module._buffers.get(leaf)
    if old is not None and tuple(old.shape) != tuple(value.shape):
        raise QuantizationError(f"checkpoint tensor '{name}' has shape {list(value.shape)} but the model "
                                f"expects {list(old.shape)}.")
    if leaf in module._parameters:
        grad = old is not None and old.requires_grad and value.is_floating_point()
        module._parameters[leaf] = nn.Parameter(value, requires_grad=grad)
    else:
        module._buffers[leaf] = value


def _split_weight_key(name: str) -> tuple[str | None, str | None]:
    """'a.b.weight.absmax' -> ('a.b', 'absmax'); 'a.b.weight' -> ('a.b', 'weight'); else (None, None)."""
    for suffix in ("",) + _QUANT_SUFFIXES:
        tail = ".weight" + suffix
        if name.endswith(tail):
            return name[: -len(tail)], ("blob" if suffix == _BLOB_SUFFIX else suffix.lstrip(".") or "weight")
    return None, None


class _PreQuantizedParts:
    """Collects a layer's bitsandbytes tensors (possibly spread over shards) until they are complete."""

    def __init__(self) -> None:
        self.parts: dict[str, dict[str, torch.Tensor]] = {}

    def add(self, module: str, key: str, tensor: torch.Tensor) -> dict[str, torch.Tensor] | None:
        parts = self.parts.setdefault(module, {})
        parts[key] = tensor
        if "weight" not in parts or "blob" not in parts:
            return None
        needed = {"absmax", "quant_map"}
        if b'"nested_offset"' in bytes(parts["blob"].tolist()):
            needed |= {"nested_absmax", "nested_quant_map"}
        if not needed <= parts.keys():
            return None
        return self.parts.pop(module)


def _keys(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        return list(f.keys())


def install_shells(model: nn.Module, targets: list[str], *, blocksize: int, double_quant: bool,
                    compute_dtype: torch.dtype | None, dtype: torch.dtype) -> dict[str, tuple[NF4Linear, bool]]:
    """Swap each target for an empty NF4Linear on the meta device -> {name: (layer, was_conv1d)}."""
    shells = {}
    for name in targets:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise QuantizationError(f"checkpoint has NF4 weights for '{name}', which {type(model).__name__} "
                                    f"does not have.") from None
        conv1d = _is_conv1d(module)
        out_f, in_f = module.weight.shape[::-1] if conv1d else module.weight.shape
        shell = NF4Linear(in_f, out_f, bias=module.bias is not None, blocksize=blocksize, double_quant=double_quant,
                          compute_dtype=compute_dtype, weight_dtype=dtype, device="meta", name=name)
        shell.from_conv1d = conv1d
        _replace_module(model, name, shell)
        shells[name] = (shell, conv1d)
    return shells


def _stream_checkpoint(model: nn.Module, files: list[Path], rename: Callable[[str], str], expected: dict[str, bool],
                       shells: dict[str, tuple[NF4Linear, bool]], *, pre_quantized: bool, device: torch.device,
                       dtype: torch.dtype, folder: Path) -> tuple[set[str], list[str]]:
    """Read the checkpoint tensor by tensor into ``model`` -> (model keys loaded, checkpoint keys ignored).

    Linear weights of ``shells`` are quantized on ``device`` as they arrive (or, when
    ``pre_quantized``, their bitsandbytes parts are collected and installed as they complete).
    """
    from safetensors import safe_open

    keep_fp32 = set(getattr(model, "_keep_in_fp32_modules", None) or [])
    pending = _PreQuantizedParts()
    loaded: set[str] = set()
    unexpected: list[str] = []
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                name = rename(key)
                module, part = _split_weight_key(name)
                if module in shells and pre_quantized:
                    done = pending.add(module, part, f.get_tensor(key))
                    if done is not None:
                        label = f"NF4Linear '{module}' in {folder}"
                        packed, state = quant_state_from_tensors(done.pop("weight"), done.pop("blob"), done, label)
                        shells[module][0]._install(packed.to(device), state.to(device), assign=True)
                        loaded.add(module + ".weight")
                elif module in shells and part == "weight":
                    shell, conv1d = shells[module]
                    weight = f.get_tensor(key).to(device=device, dtype=dtype)
                    packed, state = nf4.quantize_nf4(weight.t() if conv1d else weight, shell.blocksize,
                                                     shell.double_quant, name=module)
                    shell.set_quantized(packed, state)
                    del weight  # the only full-precision matrix on the device
                    loaded.add(name)
                elif name in expected:
                    tensor = f.get_tensor(key)
                    if tensor.is_floating_point():
                        fp32 = any(p in keep_fp32 for p in name.split("."))
                        _set_tensor(model, name, tensor.to(device=device, dtype=torch.float32 if fp32 else dtype))
                    else:
                        _set_tensor(model, name, tensor.to(device))
                    loaded.add(name)
                else:
                    unexpected.append(key)
    if pending.parts:
        module, parts = next(iter(pending.parts.items()))
        raise QuantizationError(f"{folder}: the NF4 tensors of '{module}' are incomplete (found "
                                f"{sorted(parts)}); the checkpoint is truncated or corrupted.")
    return loaded, unexpected


def _initialize_missing(model: nn.Module, shells: dict, device: torch.device, folder: Path) -> None:
    """Give parameters the checkpoint lacks (e.g. a new classifier head) the model's own random init."""
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if not missing:
        return
    unloaded = sorted({n.rsplit(".", 1)[0] for n in missing} & shells.keys())
    if unloaded:
        raise QuantizationError(f"{folder}: the checkpoint has no weight for the quantized layer '{unloaded[0]}'.")
    logger.warning("%s: %d parameters are not in the checkpoint and were newly initialized: %s.",
                   folder, len(missing), ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else ""))
    owners: dict[str, list[str]] = {}
    for name in missing:
        owner, _, leaf = name.rpartition(".")
        owners.setdefault(owner, []).append(leaf)
    with torch.no_grad():
        for owner, leaves in owners.items():
            module = model.get_submodule(owner)
            # _init_weights resets the whole module: keep what the checkpoint did provide.
            loaded = {k: p.detach().clone() for k, p in module.named_parameters(recurse=False) if k not in leaves}
            for leaf in leaves:
                old = module._parameters[leaf]
                module._parameters[leaf] = nn.Parameter(torch.empty_like(old, device=device),
                                                        requires_grad=old.requires_grad)
            if hasattr(model, "_init_weights"):
                model._init_weights(module)
            for k, value in loaded.items():
                module._parameters[k].copy_(value)


def from_pretrained(
    path_or_id: str | os.PathLike,
    *,
    quantize: str | None = "nf4",
    double_quant: bool = True,
    blocksize: int = 64,
    compute_dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    model_cls=None,
    skip: Iterable[str] | None = None,
    verbose: bool = False,
    **hf_kwargs,
) -> nn.Module:
    """Load a transformers model from safetensors, quantizing its linear layers to NF4 as they stream in.

    The model is built on the meta device; each checkpoint tensor is read, moved to ``device``
    (default: CUDA when available), cast to ``dtype`` (``dtype``/``torch_dtype`` in ``hf_kwargs``;
    default ``"auto"``: the checkpoint's) and, for a linear weight, quantized there at once — so at
    most one full-precision matrix is on the device at a time. A checkpoint saved by transformers
    with bitsandbytes 4-bit NF4 is loaded as is (no re-quantization). ``quantize=None`` loads without
    quantizing. ``model_cls`` defaults to ``AutoModelForCausalLM``; other ``hf_kwargs`` go to the
    model constructor (e.g. ``attn_implementation``), and ``revision``/``token``/``cache_dir`` to the
    Hub when ``path_or_id`` is not a local folder. The returned model is in eval mode and carries a
    :class:`QuantizationReport` in ``model.peftlab_quant_report``.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    if quantize is not None:
        _check_method(quantize)
    nf4._check_blocksize(blocksize, "from_pretrained")
    hub_kwargs = {k: hf_kwargs.pop(k) for k in ("revision", "token", "cache_dir") if k in hf_kwargs}
    folder = _resolve_folder(path_or_id, hub_kwargs)
    files = _checkpoint_files(folder)
    trust = hf_kwargs.pop("trust_remote_code", False)
    dtype = hf_kwargs.pop("dtype", hf_kwargs.pop("torch_dtype", "auto"))
    # Config fields (e.g. num_labels) update the config; the rest go to the model constructor.
    config, hf_kwargs = AutoConfig.from_pretrained(folder, trust_remote_code=trust, return_unused_kwargs=True,
                                                   **hf_kwargs)
    bnb = _bnb_4bit_settings(config)
    if bnb is not None:
        del config.quantization_config  # the layers are ours; transformers must not build bitsandbytes ones
        if compute_dtype is None:
            compute_dtype = _as_dtype(bnb.get("bnb_4bit_compute_dtype"), "config.json: bnb_4bit_compute_dtype")

    if dtype == "auto":
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    dtype = _as_dtype(dtype, "dtype")
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))

    model_cls = model_cls or AutoModelForCausalLM
    if hasattr(model_cls, "from_config"):  # an Auto class
        hf_kwargs["trust_remote_code"] = trust
        build = model_cls.from_config
    else:
        build = model_cls._from_config
    with init_empty_weights(include_buffers=False):  # parameters on meta; computed buffers stay real
        model = build(config, dtype=dtype, **hf_kwargs)
    expected = dict.fromkeys(model.state_dict(), True)
    rename = _key_mapper(model, expected)

    # Which layers become NF4: those the checkpoint stores as NF4, or our selection.
    checkpoint_keys = [k for path in files for k in _keys(path)]
    if bnb is not None:
        targets = [rename(k)[: -len(".weight" + _BLOB_SUFFIX)] for k in checkpoint_keys if k.endswith(_BLOB_SUFFIX)]
        kept = sorted({n for n, m in model.named_modules() if _is_quantizable(m)} - set(targets))
    elif quantize is not None:
        targets, kept = select_targets(model, skip)
    else:
        targets, kept = [], []
    shells = install_shells(model, targets, blocksize=blocksize, double_quant=double_quant,
                             compute_dtype=compute_dtype, dtype=dtype)
    loaded, unexpected = _stream_checkpoint(model, files, rename, expected, shells, pre_quantized=bnb is not None,
                                            device=device, dtype=dtype, folder=folder)

    missing = {k for k in expected if k not in loaded}
    if hasattr(model, "tie_weights"):
        try:  # transformers >= 5 ties symmetrically given what the checkpoint lacked
            model.tie_weights(missing_keys=missing)
        except TypeError:
            model.tie_weights()
    _initialize_missing(model, shells, device, folder)
    for module in model.modules():  # computed buffers (rotary frequencies, position ids) follow the model
        for key, buf in module._buffers.items():
            if buf is not None and buf.device != device:
                module._buffers[key] = buf.to(device)
    model.eval()

    report = QuantizationReport(quantized=list(shells), skipped=kept, pre_quantized=bnb is not None,
                                unexpected_keys=unexpected)
    report.bytes_bf16, report.bytes_now = parameter_bytes(model)
    model.peftlab_quant_report = report
    if unexpected:
        logger.warning("%s: %d checkpoint tensors do not belong to %s and were ignored, e.g. %s.",
                       folder, len(unexpected), type(model).__name__, unexpected[0])
    logger.info(report.summary())
    if verbose:
        print(report.summary())
    return model
