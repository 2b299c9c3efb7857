"""PeftModel: a Hugging Face model plus named adapters of any registered method."""
from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from . import checkpoint, registry
from .adapters import sites
from .adapters.base import Adapter, AdapterConfig
from .errors import AdapterStateError, MergeError
from .summary import ParameterSummary, summarize

logger = logging.getLogger("peftlab")


class PeftModel(nn.Module):
    """A base model with named adapters.

    ``forward``, ``generate`` and any attribute the wrapper does not define pass through to the
    base model, so a ``PeftModel`` can stand in for it in training and inference code. Wrapping
    freezes every base parameter; adapters own their trainable parameters.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        if isinstance(model, PeftModel):
            raise AdapterStateError("the model is already a PeftModel; add adapters to it with add_adapter().")
        model.requires_grad_(False)
        self.base_model = model
        self.adapters = nn.ModuleDict()
        self._merge_order: list[str] = []
        self.requantize_error: dict[str, float] | None = None

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_model", "adapters"):
                raise
            return getattr(self._modules["base_model"], name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The base model's forward, with the active adapters applied."""
        return self.base_model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """The base model's ``generate``, with the active adapters applied."""
        return self.base_model.generate(*args, **kwargs)

    # --- adapters ----------------------------------------------------------------------------
    @property
    def active_adapters(self) -> list[str]:
        """Names of the adapters applied in forward (merged ones included)."""
        return [name for name, adapter in self.adapters.items() if adapter.active]

    def _get(self, name: str) -> Adapter:
        if name not in self.adapters:
            known = ", ".join(self.adapters) or "(none)"
            raise AdapterStateError(f"no adapter named '{name}'; this model has: {known}.")
        return self.adapters[name]

    def _attach(self, name: str, config: AdapterConfig, strict: bool) -> Adapter:
        if not isinstance(name, str) or not name or "." in name:
            raise AdapterStateError(f"adapter name {name!r} is invalid; use a non-empty name without dots.")
        if name in self.adapters:
            raise AdapterStateError(f"an adapter named '{name}' already exists; delete_adapter('{name}') first "
                                    "or choose another name.")
        adapter = registry.for_config(config)(name, config)
        try:
            adapter.inject(self.base_model, strict=strict)
        except BaseException:
            adapter.remove(self.base_model)  # leave no hooks behind from a half-done injection
            raise
        self.adapters[name] = adapter
        sites.refresh(self.base_model)
        return adapter

    def _maybe_activate(self, name: str, activate: bool | None) -> None:
        if activate or (activate is None and not self.active_adapters):
            self.set_adapter(self.active_adapters + [name])

    def add_adapter(self, name: str, config: AdapterConfig, activate: bool | None = None) -> Adapter:
        """Add a new trainable adapter of the config's method.

        ``activate=None`` activates it only if no adapter is active yet, so adding a second adapter
        never silently stacks it on the first; use :meth:`set_adapter` to choose.
        """
        adapter = self._attach(name, config, strict=True)
        adapter.set_trainable(True)
        self._maybe_activate(name, activate)
        return adapter

    def load_adapter(self, path: str | Path, name: str = "default", trainable: bool = False,
                     activate: bool | None = None) -> Adapter:
        """Load an adapter folder written by peftlab or HF PEFT (only JSON and safetensors are read)."""
        saved, tensors = checkpoint.load_adapter_files(path)
        folder = Path(path)
        config_source = str(folder / checkpoint.CONFIG_NAME)
        adapter_cls = registry.for_saved_config(saved, config_source)
        config = adapter_cls.config_from_checkpoint(saved, config_source)
        adapter = self._attach(name, config, strict=False)
        try:
            adapter.load_checkpoint_tensors(self.base_model, tensors, str(folder / checkpoint.WEIGHTS_NAME))
        except BaseException:
            self.delete_adapter(name)
            raise
        adapter.set_trainable(trainable)
        self._maybe_activate(name, activate)
        return adapter

    def set_adapter(self, names: str | Sequence[str]) -> None:
        """Choose the adapters applied in forward (one name or several, possibly of different methods)."""
        wanted = [names] if isinstance(names, str) else list(names)
        for name in wanted:
            self._get(name)
        dropped = [n for n in self._merge_order if n not in wanted]
        if dropped:
            raise AdapterStateError(f"adapter(s) {dropped} are merged into the base weights; unmerge() before "
                                    "switching them off.")
        for name, adapter in self.adapters.items():
            adapter.active = name in wanted
        sites.refresh(self.base_model)

    @contextmanager
    def disable_adapters(self) -> Iterator[PeftModel]:
        """Run the base model alone inside the ``with`` block; the active set is restored afterwards."""
        if self._merge_order:
            raise AdapterStateError(f"adapter(s) {self._merge_order} are merged into the base weights; unmerge() "
                                    "before disabling adapters.")
        previous = self.active_adapters
        self.set_adapter([])
        try:
            yield self
        finally:
            self.set_adapter(previous)

    def delete_adapter(self, name: str) -> None:
        """Remove an adapter and its hooks; refused while it is merged."""
        adapter = self._get(name)
        if adapter.merged:
            raise AdapterStateError(f"adapter '{name}' is merged into the base weights; unmerge() before deleting "
                                    "it, or merge_and_unload() to keep it in the weights.")
        adapter.remove(self.base_model)
        del self.adapters[name]

    # --- merging -----------------------------------------------------------------------------
    def merge(self, names: str | Sequence[str] | None = None) -> None:
        """Fold adapters (default: the active ones) into the base weights; merged ones are skipped.

        Merged adapters cost nothing at inference. Either every named adapter is merged, or, if one
        fails (e.g. non-finite result), none of this call's merges remain.
        """
        wanted = self.active_adapters if names is None else ([names] if isinstance(names, str) else list(names))
        adapters = [self._get(n) for n in wanted]
        for adapter in adapters:
            if not adapter.mergeable:
                adapter.merge(self.base_model)  # raises the method's own explanation
        done = []
        try:
            for adapter in adapters:
                if not adapter.merged:
                    adapter.merge(self.base_model)
                    adapter.active = True
                    self._merge_order.append(adapter.adapter_name)
                    done.append(adapter)
        except BaseException:
            for adapter in reversed(done):
                adapter.unmerge(self.base_model)
                self._merge_order.remove(adapter.adapter_name)
            raise
        finally:
            sites.refresh(self.base_model)

    def unmerge(self) -> None:
        """Take every merged adapter out of the base weights, restoring them bit for bit."""
        while self._merge_order:
            self.adapters[self._merge_order[-1]].unmerge(self.base_model)
            self._merge_order.pop()
        sites.refresh(self.base_model)

    def merge_and_unload(self, requantize: bool = False, probe: torch.Tensor | dict | None = None) -> nn.Module:
        """Merge the active adapters, remove all adapters and return the plain base model.

        A 4-bit (NF4) base is dequantized to its compute dtype and the fp32 deltas are added there:
        never a silent re-quantization. ``requantize=True`` quantizes those layers back to NF4 and
        logs the relative logits error this introduced against the unmerged adapter model, measured
        on ``probe`` (input ids or a batch dict; random tokens by default); the numbers are also kept
        in ``requantize_error``.
        """
        blocked = [n for n in self.active_adapters if not self.adapters[n].mergeable]
        if blocked:
            adapter = self.adapters[blocked[0]]
            raise MergeError(f"adapter '{blocked[0]}' ({adapter.method}) cannot be merged: "
                             f"{adapter.not_mergeable_because}; serve it unmerged, or delete it first.")
        from .quant.loading import dequantize_model, requantize_layers

        if requantize:
            probe = _probe_batch(self.base_model, probe)
            reference = _logits(self.base_model, probe)
        self.merge()
        for name in list(self.adapters):
            self.adapters[name].remove(self.base_model)
            del self.adapters[name]
        self._merge_order.clear()
        quantized = dequantize_model(self.base_model)
        if requantize:
            if not quantized:
                raise MergeError("requantize=True, but the base model has no 4-bit layers to quantize back.")
            requantize_layers(self.base_model, quantized)
            self.requantize_error = _relative_error(_logits(self.base_model, probe), reference)
            logger.warning("re-quantizing the merged weights to NF4 changed the probe logits by %.3g (max) / %.3g "
                           "(mean) relative to the unmerged adapter model", self.requantize_error["max_relative"],
                           self.requantize_error["mean_relative"])
        return self.base_model

    # --- saving ------------------------------------------------------------------------------
    def save(self, path: str | Path, name: str | None = None) -> None:
        """Save adapters: one adapter (or ``name``) into ``path``, several into ``path/<name>/`` each."""
        names = [self._get(name).adapter_name] if name else list(self.adapters)
        if not names:
            raise AdapterStateError("this model has no adapters to save.")
        path = Path(path)
        for adapter_name in names:
            adapter = self.adapters[adapter_name]
            folder = path if len(names) == 1 else path / adapter_name
            checkpoint.save_adapter_files(folder, adapter.checkpoint_config(self.base_model),
                                          adapter.checkpoint_tensors(self.base_model), f"adapter '{adapter_name}'",
                                          zeros_ok=adapter.zero_when_untrained)

    # --- training helpers --------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters an optimizer should update."""
        return [p for p in self.parameters() if p.requires_grad]

    def summary(self) -> ParameterSummary:
        """Trainable vs total parameters, per module kind (printable as a table)."""
        return summarize(self.base_model, dict(self.adapters))

    def enable_gradient_checkpointing(self, use_reentrant: bool = False, preserve_rng_state: bool = True) -> None:
        """Turn on the base model's activation checkpointing (non-reentrant by default); see
        :func:`enable_gradient_checkpointing`."""
        enable_gradient_checkpointing(self.base_model, use_reentrant, preserve_rng_state)


def enable_gradient_checkpointing(model: nn.Module, use_reentrant: bool = False, preserve_rng_state: bool = True) -> None:
    """Turn on a transformers model's activation checkpointing, whatever its transformers version calls it.

    Non-reentrant checkpointing gives adapter gradients with a frozen base; the reentrant kind needs
    inputs that require grad, which we then arrange for. ``preserve_rng_state=False`` skips saving
    the RNG state for the recomputation — exact when the model has no active dropout, and needed
    inside a CUDA graph (:class:`peftlab.train.GraphedStep`), where the state cannot be read.
    """
    kwargs = {"use_reentrant": use_reentrant, "preserve_rng_state": preserve_rng_state}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.18
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if use_reentrant:
        model.enable_input_require_grads()


def _probe_batch(model: nn.Module, probe: torch.Tensor | dict | None) -> dict:
    if isinstance(probe, dict):
        return probe
    if probe is None:
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        if vocab is None:
            raise MergeError("requantize=True needs a probe batch for this model (pass probe=...).")
        device = next(model.parameters()).device
        probe = torch.randint(0, vocab, (2, 32), generator=torch.Generator().manual_seed(0)).to(device)
    return {"input_ids": probe}


@torch.no_grad()
def _logits(model: nn.Module, batch: dict) -> torch.Tensor:
    out = model(**batch)
    return (out.logits if hasattr(out, "logits") else out[0]).float()


def _relative_error(value: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    diff = (value - reference).abs()
    return {"max_relative": (diff.max() / reference.abs().max()).item(),
            "mean_relative": (diff.mean() / reference.abs().mean()).item()}


def wrap(model: nn.Module, config: AdapterConfig, name: str = "default") -> PeftModel:
    """Add an adapter described by ``config`` to ``model`` (wrapping it in a :class:`PeftModel` if needed)."""
    peft_model = model if isinstance(model, PeftModel) else PeftModel(model)
    peft_model.add_adapter(name, config)
    return peft_model


def load(model: nn.Module, path: str | Path, name: str = "default", trainable: bool = False) -> PeftModel:
    """Load a saved adapter onto ``model``; ``trainable=True`` readies it for further training."""
    peft_model = model if isinstance(model, PeftModel) else PeftModel(model)
    peft_model.load_adapter(path, name=name, trainable=trainable)
    return peft_model
