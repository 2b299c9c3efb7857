"""The run config of ``peftlab finetune``: one typed, validated object from YAML plus overrides.

    model: path/or/hub-id
    method: {name: lora, r: 16, alpha: 32}       # or just `method: lora`
    data: {train: data.jsonl, format: alpaca}
    train: {lr: 2e-4, epochs: 3, batch_size: 8}
    output: {dir: runs/my-run}

Overrides are ``section.key=value`` (``train.lr=1e-4``) or ``--section.key value``; a key that is
unique across sections may be given alone (``--lr 1e-4``). Every error names the file, line (for
YAML keys) and key, and suggests the nearest valid key.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from .. import registry
from ..errors import ConfigError
from .data import DataConfig, DataError

# Training modes that are not adapter methods: what they mean for the model and optimizer.
QLORA, FULL, LOMO, ADALOMO = "qlora", "full", "lomo", "adalomo"
FULL_PARAMETER_METHODS = (FULL, LOMO, ADALOMO)
OPTIMIZERS = ("adamw", "paged_adamw_8bit", "sgd", "lomo", "adalomo")
SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
TASKS = ("causal_lm", "classification")


class RunConfigError(ConfigError):
    """An invalid run config: names the file, line and key."""


@dataclass
class TrainConfig:
    """The ``train:`` section."""

    optimizer: str = "adamw"                 # adamw | paged_adamw_8bit | sgd | lomo | adalomo
    lr: float = 2e-4                         # peak learning rate
    weight_decay: float = 0.0                # decoupled weight decay
    schedule: str = "cosine"                 # cosine | linear | constant (after warmup)
    warmup_ratio: float = 0.03               # fraction of the steps spent warming up
    warmup_steps: int | None = None          # overrides warmup_ratio when set
    epochs: int = 1                          # passes over the training data
    max_steps: int | None = None             # optimizer steps; overrides epochs when set
    batch_size: int = 8                      # examples per micro-batch (per process)
    grad_accum: int = 1                      # micro-batches per optimizer step
    gradient_checkpointing: bool = False     # non-reentrant activation checkpointing
    chunked_loss: bool = True                # causal LM: cross-entropy over token slices, never the full logits
    precision: str = "auto"                  # auto (bf16 on capable GPUs, else fp32) | bf16 | fp16 | fp32
    max_grad_norm: float | None = 1.0        # clip the global gradient norm; null disables
    seed: int = 42                           # model init, data order and dropout


@dataclass
class OutputConfig:
    """The ``output:`` section."""

    dir: str = "runs/peftlab"                # where the adapter, checkpoints and logs go
    log_every: int = 10                      # optimizer steps between log lines
    eval_every: int | None = None            # steps between evaluations; null = once per epoch
    save_every: int | None = None            # steps between checkpoints; null = once per epoch
    keep_last: int = 2                       # checkpoints kept (older ones are deleted)
    early_stopping_patience: int | None = None  # evaluations without improvement before stopping
    overwrite: bool = False                  # allow replacing a finished run in `dir`
    tensorboard: bool = True                 # also log to TensorBoard when it is installed


@dataclass
class RunConfig:
    """Everything one finetuning run needs."""

    model: str                                # local folder or hub id
    data: DataConfig
    method: str = "lora"                      # an adapter method, or qlora | full | lomo | adalomo
    method_options: dict[str, Any] = field(default_factory=dict)
    task: str | None = None                   # causal_lm | classification; inferred from data.format
    quantize: str | None = None               # nf4 (implied by qlora)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    @property
    def adapter_method(self) -> str | None:
        """The registered adapter method this run wraps the model with (None for full finetuning)."""
        if self.method in FULL_PARAMETER_METHODS:
            return None
        return "lora" if self.method == QLORA else self.method

    def adapter_config(self):
        """The method's config object, built from ``method_options``."""
        return registry.get(self.adapter_method).config_cls(**self.method_options)

    def to_dict(self) -> dict[str, Any]:
        """The config as it would be written in YAML (``method`` as a section)."""
        out = dataclasses.asdict(self)
        out["method"] = {"name": out.pop("method"), **out.pop("method_options")}
        return out


# --- reading ---------------------------------------------------------------------------------
SECTIONS = {"train": TrainConfig, "output": OutputConfig, "data": DataConfig}
TOP_LEVEL = ("model", "task", "quantize", "method", *SECTIONS)


def load_run_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML run config (or start empty when ``path`` is None) and apply overrides."""
    raw, lines, source = {}, {}, "command line"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as err:
            raise RunConfigError(f"{path}: cannot read the config file ({err.strerror or err}).") from None
        raw, lines = _parse_yaml(text, source)
    for item in overrides:
        _apply_override(raw, item)
    return build_run_config(raw, source, lines)


def _parse_yaml(text: str, source: str) -> tuple[dict, dict[str, int]]:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark else ""
        raise RunConfigError(f"{source}{where}: invalid YAML ({getattr(err, 'problem', None) or err}).") from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise RunConfigError(f"{source}: the config must be a mapping of keys to values, not {type(data).__name__}.")
    lines: dict[str, int] = {}

    def walk(mapping: yaml.Node, prefix: str) -> None:
        for key_node, value_node in mapping.value:
            key = f"{prefix}{key_node.value}"
            lines[key] = key_node.start_mark.line + 1
            if isinstance(value_node, yaml.MappingNode):
                walk(value_node, key + ".")

    walk(node, "")
    return data, lines


def _apply_override(raw: dict, item: str) -> None:
    if "=" not in item:
        raise RunConfigError(f"override {item!r} must look like key=value (e.g. train.lr=1e-4).")
    key, text = item.split("=", 1)
    key = _full_key(key.strip().lstrip("-"))
    value = yaml.safe_load(text) if text.strip() else None
    parts = key.split(".")
    if parts[0] == "method" and isinstance(raw.get("method"), str):
        raw["method"] = {"name": raw["method"]}
    if key == "method" and isinstance(raw.get("method"), dict):
        raw["method"]["name"] = value
        return
    target = raw
    for part in parts[:-1]:
        if not isinstance(target.get(part), dict):
            target[part] = {}
        target = target[part]
    target[parts[-1]] = value


def _full_key(key: str) -> str:
    """``lr`` -> ``train.lr`` when the leaf name is unique across sections."""
    if "." in key or key in TOP_LEVEL:
        return key
    owners = [name for name, cls in SECTIONS.items() if key in {f.name for f in dataclasses.fields(cls)}]
    return f"{owners[0]}.{key}" if len(owners) == 1 else key


def _where(source: str, lines: dict[str, int], key: str) -> str:
    line = lines.get(key)
    return f"{source}, line {line}" if line else source


def _unknown(source: str, lines: dict[str, int], key: str, valid: list[str]) -> RunConfigError:
    leaf = key.rsplit(".", 1)[-1]
    near = difflib.get_close_matches(leaf, valid, n=1)
    prefix = key.rsplit(".", 1)[0] + "." if "." in key else ""
    hint = f"; did you mean '{prefix}{near[0]}'?" if near else f"; valid keys: {', '.join(valid)}."
    return RunConfigError(f"{_where(source, lines, key)}: unknown key '{key}'{hint}")


def build_run_config(raw: dict[str, Any], source: str = "config", lines: dict[str, int] | None = None) -> RunConfig:
    """Validate a config dict (as read from YAML) into a :class:`RunConfig`."""
    lines = lines or {}
    for key in raw:
        if key not in TOP_LEVEL:
            raise _unknown(source, lines, key, list(TOP_LEVEL))
    if not raw.get("model"):
        raise RunConfigError(f"{source}: 'model' is required (a local model folder or a hub id).")
    if raw.get("data") is None or not isinstance(raw["data"], dict) or "train" not in raw["data"]:
        raise RunConfigError(f"{source}: 'data.train' is required (one or more dataset files or a saved dataset).")

    method_raw = raw.get("method", "lora")
    method_raw = {"name": method_raw} if isinstance(method_raw, str) else dict(method_raw or {})
    method = method_raw.pop("name", "lora")
    valid_methods = sorted({*registry.names(), QLORA, *FULL_PARAMETER_METHODS})
    if method not in valid_methods:
        near = difflib.get_close_matches(str(method), valid_methods, n=1)
        hint = f"; did you mean '{near[0]}'?" if near else ""
        raise RunConfigError(f"{_where(source, lines, 'method')}: unknown method {method!r}; valid methods: "
                             f"{', '.join(valid_methods)}{hint}")

    sections = {}
    for name, cls in SECTIONS.items():
        sections[name] = _build_section(cls, raw.get(name) or {}, name, source, lines)
    config = RunConfig(model=str(raw["model"]), method=method, method_options=method_raw,
                       task=_choice(raw.get("task"), "task", TASKS, source, lines, optional=True),
                       quantize=_choice(raw.get("quantize"), "quantize", ("nf4",), source, lines, optional=True),
                       **sections)
    _validate(config, source, lines, explicit_optimizer="optimizer" in (raw.get("train") or {}))
    return config


def _build_section(cls: type, values: Any, name: str, source: str, lines: dict[str, int]) -> Any:
    if not isinstance(values, dict):
        raise RunConfigError(f"{_where(source, lines, name)}: '{name}' must be a mapping of keys to values.")
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise _unknown(source, lines, f"{name}.{key}", fields)
        kwargs[key] = _coerce(value, hints[key], f"{name}.{key}", source, lines)
    try:
        return cls(**kwargs)
    except (DataError, ConfigError, TypeError, ValueError) as err:
        raise RunConfigError(f"{_where(source, lines, name)}: {name}: {err}") from None


def _coerce(value: Any, hint: Any, key: str, source: str, lines: dict[str, int]) -> Any:
    """Check ``value`` against a field's type, converting YAML's strings like '2e-4' where meant."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (Union, types.UnionType) else (hint,)
    if value is None and type(None) in options:
        return None
    for option in options:
        base = typing.get_origin(option) or option
        if base is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:
                return float(value)
            except ValueError:
                continue
        if base is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if base is bool and isinstance(value, bool):
            return value
        if base in (str, Path) and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return value if isinstance(value, str) else str(value)
        if base in (list, dict, typing.Sequence) and isinstance(value, (list, dict)):
            return value
        if base is Any:
            return value
    wanted = " or ".join(_type_name(o) for o in options)
    raise RunConfigError(f"{_where(source, lines, key)}: '{key}' is {value!r}; expected {wanted}.")


def _type_name(hint: Any) -> str:
    if hint is type(None):
        return "null"
    return getattr(typing.get_origin(hint) or hint, "__name__", str(hint))


def _choice(value: Any, key: str, choices: tuple, source: str, lines: dict[str, int], optional: bool = False):
    if value is None and optional:
        return None
    if value not in choices:
        raise RunConfigError(f"{_where(source, lines, key)}: '{key}' is {value!r}; valid values: "
                             f"{', '.join(choices)}.")
    return value


def _validate(config: RunConfig, source: str, lines: dict[str, int], explicit_optimizer: bool) -> None:
    """Field choices and the combinations that cannot work."""
    train = config.train
    _choice(train.optimizer, "train.optimizer", OPTIMIZERS, source, lines)
    _choice(train.schedule, "train.schedule", SCHEDULES, source, lines)
    _choice(train.precision, "train.precision", PRECISIONS, source, lines)
    for key in ("batch_size", "grad_accum", "epochs"):
        if getattr(train, key) < 1:
            raise RunConfigError(f"{_where(source, lines, 'train.' + key)}: 'train.{key}' must be at least 1.")
    if train.max_steps is not None and train.max_steps < 1:
        raise RunConfigError(f"{_where(source, lines, 'train.max_steps')}: 'train.max_steps' must be at least 1.")
    if train.lr <= 0:
        raise RunConfigError(f"{_where(source, lines, 'train.lr')}: 'train.lr' must be positive.")

    if config.method in (LOMO, ADALOMO):
        if explicit_optimizer and train.optimizer != config.method:
            raise RunConfigError(f"{_where(source, lines, 'train.optimizer')}: method '{config.method}' trains with "
                                 f"its own fused optimizer; remove train.optimizer or set it to '{config.method}'.")
        train.optimizer = config.method
    elif train.optimizer in (LOMO, ADALOMO):
        raise RunConfigError(f"{_where(source, lines, 'train.optimizer')}: optimizer '{train.optimizer}' updates "
                             f"every weight inside backward; use method: {train.optimizer} for full finetuning.")
    if train.optimizer in (LOMO, ADALOMO) and train.grad_accum > 1:
        raise RunConfigError(f"{_where(source, lines, 'train.grad_accum')}: {train.optimizer} updates weights during "
                             "backward, so gradient accumulation cannot work; set train.grad_accum: 1 and raise "
                             "train.batch_size instead.")
    if config.method == QLORA:
        if config.quantize not in (None, "nf4"):
            raise RunConfigError(f"{_where(source, lines, 'quantize')}: qlora quantizes the base to nf4.")
        config.quantize = "nf4"
    if config.quantize and config.method in FULL_PARAMETER_METHODS:
        raise RunConfigError(f"{_where(source, lines, 'quantize')}: a quantized base cannot be trained in full "
                             f"(method '{config.method}'); use qlora or another adapter method.")
    if config.method_options and config.adapter_method is None:
        key = next(iter(config.method_options))
        raise RunConfigError(f"{_where(source, lines, 'method.' + key)}: method '{config.method}' takes no options "
                             f"(got '{key}').")

    data_is_classification = config.data.format == "classification"
    if config.task is None:
        config.task = "classification" if data_is_classification else "causal_lm"
    elif (config.task == "classification") != data_is_classification:
        raise RunConfigError(f"{_where(source, lines, 'task')}: task '{config.task}' does not fit data.format "
                             f"'{config.data.format}'; classification needs format: classification.")

    if config.adapter_method is not None:
        cls = registry.get(config.adapter_method).config_cls
        fields = [f.name for f in dataclasses.fields(cls)]
        for key in config.method_options:
            if key not in fields:
                raise _unknown(source, lines, f"method.{key}", fields)
        try:
            config.adapter_config()
        except (ConfigError, TypeError) as err:
            raise RunConfigError(f"{_where(source, lines, 'method')}: {err}") from None


def _field_comments(cls: type) -> dict[str, str]:
    """The ``# comment`` after each field in a dataclass's source: the one place its help is written."""
    import inspect
    import re

    comments = {}
    for line in inspect.getsource(cls).splitlines():
        match = re.match(r"\s+(\w+):[^#]*#\s*(.+)$", line)
        if match:
            comments[match.group(1)] = match.group(2).strip()
    return comments


def describe_options() -> str:
    """Every config key with its default and help, for ``--help``."""
    methods = " | ".join([*registry.names(), QLORA, *FULL_PARAMETER_METHODS])
    out = ["model (required): local model folder or hub id",
           f"method = lora: {methods}; its options as method.<option>",
           "task: causal_lm | classification (default: from data.format)",
           "quantize = null: nf4 for a 4-bit base"]
    for name, cls in SECTIONS.items():
        comments = _field_comments(cls)
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                default = f" = {f.default!r}"
            elif f.default_factory is not dataclasses.MISSING:
                default = f" = {f.default_factory()!r}"
            else:
                default = " (required)"
            out.append(f"{name}.{f.name}{default}: {comments.get(f.name, '')}".rstrip(": "))
    return "\n".join(out)
