"""Which modules a method touches: names, suffixes, regex, "all-linear", layer ranges, excludes.

Matching follows HF PEFT so that PEFT configs select the same modules here:
a string target is a regex that must match the whole module name, a list entry matches a module
whose name equals it or ends with ``"." + entry``. Errors list the candidates that do exist.
"""
from __future__ import annotations

import difflib
import re
from typing import Iterable, Sequence

from torch import nn
from transformers.pytorch_utils import Conv1D

from .errors import TargetError

ALL_LINEAR = "all-linear"
HEAD_NAMES = ("lm_head", "score", "classifier", "qa_outputs", "cls")
_CLASSIFIER_SUFFIXES = ("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering",
                        "ForMultipleChoice", "ForImageClassification", "ForAudioClassification")

TargetSpec = str | Sequence[str]
LayerSpec = int | str | Sequence[int | str]


def is_linear(module: nn.Module) -> bool:
    """``nn.Linear``, GPT-2's ``Conv1D``, or a class that declares ``peftlab_linear = True`` (e.g. NF4Linear)."""
    return isinstance(module, (nn.Linear, Conv1D)) or bool(getattr(type(module), "peftlab_linear", False))


def linear_features(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a linear-like module."""
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_features, module.out_features


def head_modules(model: nn.Module) -> set[str]:
    """Names of the output head and classifier modules (never adapted by "all-linear")."""
    names = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    for name, module in model.named_modules():
        if (out is not None and module is out) or name.split(".")[0] in HEAD_NAMES:
            names.add(name)
    return names


def classification_head(model: nn.Module) -> list[str]:
    """The freshly initialised task head of a classification model (trained in full by default)."""
    if not type(model).__name__.endswith(_CLASSIFIER_SUFFIXES):
        return []
    children = dict(model.named_children())
    return [name for name in ("score", "classifier", "qa_outputs") if name in children][:1]


def parse_layers(spec: LayerSpec | None) -> list[int] | None:
    """``3``, ``"0-3,8"`` or ``[0, "4-6"]`` -> sorted layer indices (``None`` means every layer)."""
    if spec is None:
        return None
    items = [spec] if isinstance(spec, (int, str)) else list(spec)
    layers: set[int] = set()
    for item in items:
        parts = item.split(",") if isinstance(item, str) else [item]
        for part in parts:
            part = part.strip() if isinstance(part, str) else part
            try:
                if isinstance(part, str) and "-" in part.lstrip("-"):
                    lo, hi = (int(x) for x in part.split("-", 1))
                    if lo > hi:
                        raise ValueError
                    layers.update(range(lo, hi + 1))
                else:
                    layers.add(int(part))
            except (TypeError, ValueError):
                raise TargetError(
                    f"layers: cannot read {part!r}; use an index, a range like '0-3', or a list of them."
                ) from None
    return sorted(layers)


def layer_index(name: str, layers_pattern: str | Sequence[str] | None = None) -> int | None:
    """The block index in a module name (``model.layers.3.mlp`` -> 3), as HF PEFT finds it."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern)
        match = None
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if match:
                break
    return int(match.group("idx")) if match else None


def _matches(spec: TargetSpec, name: str) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == entry or name.endswith("." + entry) for entry in spec)


def is_under(name: str, roots: Iterable[str]) -> bool:
    """Whether module ``name`` is one of ``roots`` or inside one."""
    return any(name == root or name.startswith(root + ".") for root in roots)


def linear_suffixes(model: nn.Module) -> list[str]:
    """The distinct last name components of the model's linear modules."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if is_linear(m)})


def _no_match_error(model: nn.Module, entry: str, what: str) -> TargetError:
    suffixes = linear_suffixes(model)
    near = difflib.get_close_matches(entry.rsplit(".", 1)[-1], suffixes, n=1)
    hint = f" Did you mean '{near[0]}'?" if near else ""
    return TargetError(
        f"{what} target {entry!r} matches no module of {type(model).__name__}; "
        f"its linear modules end in: {', '.join(suffixes) or '(none)'}.{hint}"
    )


def resolve_targets(
    model: nn.Module,
    targets: TargetSpec,
    *,
    exclude: TargetSpec | None = None,
    layers: LayerSpec | None = None,
    layers_pattern: str | Sequence[str] | None = None,
    skip_under: Iterable[str] = (),
    strict: bool = True,
    what: str = "LoRA",
) -> list[str]:
    """Names of the linear modules selected by a target spec, in model order.

    ``strict`` makes every list entry match at least one module (catching typos); when reading a
    saved config we only require that something matches, as HF PEFT does.
    """
    layer_set = parse_layers(layers)
    skip_under = list(skip_under)
    all_linear = isinstance(targets, str) and targets.lower() == ALL_LINEAR
    heads = head_modules(model) if all_linear else set()
    if isinstance(targets, str) and not all_linear:
        try:
            re.compile(targets)
        except re.error as err:
            raise TargetError(f"{what} target_modules {targets!r} is not a valid regex: {err}.") from None

    chosen, hits = [], {entry: 0 for entry in ([] if isinstance(targets, str) else targets)}
    for name, module in model.named_modules():
        if not name or is_under(name, skip_under):
            continue
        if all_linear:
            if not is_linear(module) or name in heads:
                continue
        elif not _matches(targets, name):
            continue
        elif not is_linear(module):
            if isinstance(targets, str):
                continue  # regexes often also match parent blocks; only their linear matches count
            raise TargetError(
                f"{what} target {name!r} is a {type(module).__name__}, not a linear layer; {what} adapts "
                f"nn.Linear and Conv1D modules (linear modules end in: {', '.join(linear_suffixes(model))})."
            )
        if exclude and _matches(exclude, name):
            continue
        for entry in hits:
            hits[entry] += _matches([entry], name)
        if layer_set is not None and layer_index(name, layers_pattern) not in layer_set:
            continue
        chosen.append(name)

    spec_text = targets if isinstance(targets, str) else list(targets)
    missing = [entry for entry, n in hits.items() if n == 0]
    if strict and missing:
        raise _no_match_error(model, missing[0], what)
    if not chosen:
        if layer_set is not None and (all_linear or any(hits.values())):
            raise TargetError(
                f"{what} targets {spec_text!r} match modules, but none in layers {layer_set}; check 'layers' "
                "(and 'layers_pattern' if the blocks are not numbered like 'layers.N')."
            )
        raise _no_match_error(model, spec_text if isinstance(spec_text, str) else spec_text[0], what)
    return chosen
