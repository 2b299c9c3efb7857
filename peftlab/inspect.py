"""Look at a model without loading its weights: its module tree, the linear layers a method can
target, and the exact parameter counts a method config gives.

The model is built from its ``config.json`` on the meta device (shapes and dtypes, no memory), and
the method injects itself there as it would into a real model: NF4 shells stand in for quantized
layers (``qlora``), adapters create meta parameters. Counts are therefore exact, not formulas.

    report = inspect_model("path/to/model", method="lora", method_options={"r": 16})
    print(report.text())
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import targeting
from .errors import PeftlabError
from .summary import ParameterSummary, summarize

__all__ = ["InspectError", "InspectReport", "LinearGroup", "TreeNode", "build_skeleton", "inspect_model",
           "inspect_run", "load_model_config", "method_run_config", "prepare_skeleton",
           "split_wrapped"]

# ``data.train`` is required by run configs; inspecting and estimating read no data.
NO_DATA = "(not used)"
_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.Sequential)


class InspectError(PeftlabError, ValueError):
    """A model reference or method config cannot be inspected."""


# ----------------------------------------------------------------------------- building
def load_model_config(ref: str):
    """The transformers config of a model folder, hub id or ``pkg:<package>/<path>`` reference."""
    from transformers import AutoConfig

    from .train.setup import model_location

    location = model_location(ref)
    if ref.startswith((".", "/", "~")) and not Path(location).expanduser().exists():
        raise InspectError(f"model: {ref} does not exist; expected a model folder with config.json or a hub id.")
    try:
        return AutoConfig.from_pretrained(location)
    except (OSError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise InspectError(f"model: cannot read a config.json from {ref!r} ({first}).") from None


def model_class(config, task: str | None = None):
    """The class to build: the task's Auto class when given, else the config's own architecture."""
    import transformers

    if task not in (None, "causal_lm", "classification"):
        raise InspectError(f"task {task!r} is not one of causal_lm, classification.")
    if task == "classification":
        return transformers.AutoModelForSequenceClassification
    if task is None:
        for name in getattr(config, "architectures", None) or []:
            cls = getattr(transformers, name, None)
            if isinstance(cls, type) and issubclass(cls, nn.Module):
                return cls
    return transformers.AutoModelForCausalLM


def build_skeleton(model, *, task: str | None = None, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Build ``model`` (a reference as for :func:`load_model_config`, or a transformers config) with
    every parameter on the meta device. Computed buffers (rotary frequencies) stay real and small."""
    from accelerate import init_empty_weights

    config = load_model_config(model) if isinstance(model, str) else model
    cls = model_class(config, task)
    build = cls.from_config if hasattr(cls, "from_config") else cls._from_config
    try:
        with init_empty_weights(include_buffers=False):
            model = build(config, dtype=dtype)
    except (ValueError, TypeError, KeyError) as err:
        raise InspectError(f"model: cannot build {getattr(cls, '__name__', cls)} from its config ({err}).") from None
    model.tie_weights()  # skipped while building with empty weights; tied heads must share their weight
    return model


def prepare_skeleton(model: nn.Module, run) -> nn.Module:
    """Apply a run config's method to a skeleton: NF4 shells for ``quantize``, then the adapter (or,
    for full finetuning, every weight trainable). Returns the model to count (a PeftModel for adapters)."""
    from .model import wrap

    if run.quantize:
        from .quant.loading import install_shells, select_targets

        targets, _ = select_targets(model)
        dtype = next(model.parameters()).dtype
        install_shells(model, targets, blocksize=64, double_quant=True, compute_dtype=dtype, dtype=dtype)
    if run.adapter_method is not None:
        return wrap(model, run.adapter_config())
    model.requires_grad_(True)
    return model


def split_wrapped(model: nn.Module) -> tuple[nn.Module, dict[str, nn.Module]]:
    """(base model, adapters by name) of a PeftModel; (model, {}) for a plain model."""
    from .model import PeftModel

    if isinstance(model, PeftModel):
        return model.base_model, dict(model.adapters)
    return model, {}


def method_run_config(model: str = "(config)", *, method: str = "lora", method_options: dict | None = None,
                      quantize: str | None = None, train: dict | None = None, seq_len: int | None = None):
    """A validated run config for a method (same names, options and rules as ``peftlab finetune``)."""
    from .train.config import build_run_config

    data: dict[str, Any] = {"train": NO_DATA}
    if seq_len is not None:
        data["max_seq_len"] = seq_len
    raw = {"model": model, "method": {"name": method, **(method_options or {})}, "data": data,
           "train": dict(train or {})}
    if quantize is not None:
        raw["quantize"] = quantize
    return build_run_config(raw, source="arguments")


# ----------------------------------------------------------------------------- the tree
@dataclass
class TreeNode:
    """One module, or a run of identical sibling modules shown once (``layers.{0..21}`` with ``repeat`` 22)."""

    name: str
    type: str
    repeat: int = 1
    detail: str = ""
    parameters: int = 0  # of one instance, its children included
    children: list[TreeNode] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _numel(module: nn.Module, name: str, param: nn.Parameter) -> int:
    # 4-bit layers count the weights they represent, as in PeftModel.summary().
    return getattr(module, "weight_numel", param.numel()) if name == "weight" else param.numel()


def _own_parameters(module: nn.Module) -> int:
    return sum(_numel(module, n, p) for n, p in module.named_parameters(recurse=False))


def _subtree_parameters(module: nn.Module) -> int:
    """Parameters under ``module``, a tied weight counted once."""
    seen: set[int] = set()
    total = 0
    for sub in module.modules():
        for name, param in sub.named_parameters(recurse=False):
            if id(param) not in seen:
                seen.add(id(param))
                total += _numel(sub, name, param)
    return total


class _TreeBuilder:
    def __init__(self) -> None:
        self.signatures: dict[int, tuple] = {}

    def signature(self, module: nn.Module) -> tuple:
        """Equal for modules of identical structure (types, shapes, dtypes, child names)."""
        key = id(module)
        if key not in self.signatures:
            own = tuple((n, tuple(p.shape), str(p.dtype)) for n, p in module.named_parameters(recurse=False))
            children = tuple((n, self.signature(c)) for n, c in module.named_children())
            self.signatures[key] = (type(module).__name__, module.extra_repr(), own, children)
        return self.signatures[key]

    def node(self, name: str, module: nn.Module) -> TreeNode:
        children = self.children(module)
        detail = "" if children else module.extra_repr()
        node = TreeNode(name, type(module).__name__, 1, detail, _subtree_parameters(module), children)
        # A container holding one run of identical blocks reads best as "layers.{0..21}".
        if isinstance(module, _CONTAINERS) and len(children) == 1:
            only = children[0]
            return dataclasses.replace(only, name=f"{name}.{only.name}" if name else only.name)
        return node

    def children(self, module: nn.Module) -> list[TreeNode]:
        out: list[TreeNode] = []
        run: list[tuple[str, nn.Module]] = []

        def flush() -> None:
            if not run:
                return
            first_name, first = run[0]
            label = first_name if len(run) == 1 else f"{{{first_name}..{run[-1][0]}}}"
            node = self.node(label, first)
            out.append(dataclasses.replace(node, repeat=len(run)) if len(run) > 1 else node)
            run.clear()

        for name, child in module.named_children():
            if run and name.isdigit() and run[-1][0].isdigit() and int(name) == int(run[-1][0]) + 1 \
                    and self.signature(child) == self.signature(run[-1][1]):
                run.append((name, child))
                continue
            flush()
            run.append((name, child))
        flush()
        return out


def module_tree(model: nn.Module) -> TreeNode:
    """The module tree with runs of identical numbered siblings condensed."""
    return _TreeBuilder().node("", model)


def _render_tree(node: TreeNode, depth: int, max_depth: int | None, lines: list[str]) -> None:
    """``node`` at ``depth`` (the root is 0) and its children down to ``max_depth`` levels below the root."""
    label = f"{node.name}: {node.type}" if node.name else node.type
    if node.detail:
        label += f"({node.detail})"
    if node.repeat > 1:
        label += f" ×{node.repeat}"
    count = f"{node.parameters:,}" + (" each" if node.repeat > 1 else "")
    lines.append(f"{'  ' * (depth + 1)}{label}  [{count}]")
    if max_depth is None or depth < max_depth:
        for child in node.children:
            _render_tree(child, depth + 1, max_depth, lines)


# ----------------------------------------------------------------------------- linear layers
@dataclass
class LinearGroup:
    """The linear layers sharing a name suffix (what ``target_modules=["q_proj"]`` selects)."""

    suffix: str
    kind: str
    count: int
    shapes: list[tuple[int, int]]  # distinct (in_features, out_features)
    parameters: int  # weights and biases of all of them
    head: bool  # an output head or classifier: left out by "all-linear"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def linear_groups(model: nn.Module) -> list[LinearGroup]:
    """Every linear layer kind of ``model`` by suffix, in model order."""
    heads = targeting.head_modules(model)
    groups: dict[tuple[str, bool], LinearGroup] = {}
    for name, module in model.named_modules():
        if not name or not targeting.is_linear(module):
            continue
        suffix, head = name.rsplit(".", 1)[-1], name in heads
        group = groups.setdefault((suffix, head), LinearGroup(suffix, type(module).__name__, 0, [], 0, head))
        group.count += 1
        shape = tuple(int(d) for d in targeting.linear_features(module))
        if shape not in group.shapes:
            group.shapes.append(shape)
        group.parameters += _own_parameters(module)
    return list(groups.values())


# ----------------------------------------------------------------------------- the report
@dataclass
class InspectReport:
    """What :func:`inspect_model` found. ``text()`` for people, ``to_dict()`` for JSON."""

    model_type: str
    model_class: str
    config: dict[str, Any]
    tree: TreeNode
    linears: list[LinearGroup]
    method: str | None = None
    method_options: dict[str, Any] = field(default_factory=dict)
    summary: ParameterSummary | None = None
    weight_bytes: int | None = None  # parameter memory as built (NF4 layers at their packed size)

    def to_dict(self) -> dict[str, Any]:
        out = {"model_type": self.model_type, "model_class": self.model_class, "config": self.config,
               "tree": self.tree.to_dict(), "linear_modules": [g.to_dict() for g in self.linears]}
        if self.summary is not None:
            out["method"] = {"name": self.method, "options": self.method_options,
                             "trainable": self.summary.trainable, "total": self.summary.total,
                             "trainable_percent": self.summary.percent, "weight_bytes": self.weight_bytes,
                             "rows": [dataclasses.asdict(r) for r in self.summary.rows]}
        return out

    def text(self, depth: int | None = None) -> str:
        """The tree (to ``depth`` levels), the linear layers and, with a method, its counts."""
        facts = ", ".join(f"{k} {v}" for k, v in self.config.items())
        lines = [f"{self.model_class} ({self.model_type}: {facts})", "",
                 "module tree (runs of identical blocks shown once):"]
        _render_tree(self.tree, 0, depth, lines)
        lines += ["", "linear modules (target them by suffix):"]
        rows = [("suffix", "kind", "count", "in -> out", "parameters")]
        for g in self.linears:
            shapes = ", ".join(f"{i} -> {o}" for i, o in g.shapes)
            rows.append((g.suffix + (" (head: not in all-linear)" if g.head else ""), g.kind, str(g.count), shapes,
                         f"{g.parameters:,}"))
        lines += _table(rows)
        if self.summary is not None:
            options = ", ".join(f"{k}={v}" for k, v in self.method_options.items())
            lines += ["", f"method {self.method}" + (f" ({options})" if options else "") + ":", str(self.summary),
                      self.summary.line()]
            if self.weight_bytes is not None:
                lines.append(f"parameter memory of the base as built: {self.weight_bytes / 2**20:,.1f} MiB")
        return "\n".join(lines)


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
            for r in rows]


_CONFIG_FACTS = (("hidden", ("hidden_size", "n_embd")), ("layers", ("num_hidden_layers", "n_layer")),
                 ("heads", ("num_attention_heads", "n_head")), ("kv_heads", ("num_key_value_heads",)),
                 ("intermediate", ("intermediate_size", "n_inner")), ("vocab", ("vocab_size",)))


def config_facts(config) -> dict[str, Any]:
    """The few config numbers that size a transformer."""
    facts = {}
    for label, names in _CONFIG_FACTS:
        value = next((getattr(config, n) for n in names if getattr(config, n, None) is not None), None)
        if value is not None:
            facts[label] = value
    return facts


def inspect_run(run, config=None, task: str | None = None) -> InspectReport:
    """Inspect ``run.model`` (or ``config``) with the run config's method; ``run=None`` for no method."""
    from .quant.loading import parameter_bytes
    from .train.setup import weights_dtype

    source = config if config is not None else run.model
    if isinstance(source, str):
        source = load_model_config(source)
    dtype = torch.bfloat16 if run is None else weights_dtype(run, "bf16")
    model = build_skeleton(source, task=task, dtype=dtype)
    report = InspectReport(getattr(source, "model_type", "?"), type(model).__name__, config_facts(source),
                           module_tree(model), linear_groups(model))
    if run is None:
        return report
    base, adapters = split_wrapped(prepare_skeleton(model, run))
    report.method, report.method_options = run.method, dict(run.method_options)
    report.summary = summarize(base, adapters)
    report.weight_bytes = parameter_bytes(base)[1]
    report.linears = linear_groups(base)  # NF4 shells now, if quantized
    return report


def inspect_model(model, *, method: str | None = None, method_options: dict | None = None,
                  quantize: str | None = None, task: str | None = None) -> InspectReport:
    """Inspect a model (folder, hub id, ``pkg:`` reference or transformers config) without its weights.

    With ``method`` (any ``peftlab finetune`` method: an adapter method, ``qlora``, ``full``, ``lomo``,
    ``adalomo``) and its options, the report also holds the exact trainable/total parameter counts.
    """
    config = load_model_config(model) if isinstance(model, str) else model
    run = None if method is None else method_run_config(
        model if isinstance(model, str) else "(config)", method=method, method_options=method_options,
        quantize=quantize)
    return inspect_run(run, config=config, task=task)
