"""LOMO and AdaLomo: full finetuning with the update fused into the backward pass.

Each trainable parameter carries a ``register_post_accumulate_grad_hook``. The moment its
gradient is complete the hook updates the parameter and drops the gradient, so no model-sized
gradient buffer ever exists (and LOMO keeps no optimizer state at all). Both classes subclass
``torch.optim.Optimizer`` so LR schedulers and training loops work unchanged: ``step()`` and
``zero_grad()`` do nothing, and a learning rate changed in ``param_groups`` applies from the next
backward.

Usage::

    opt = AdaLomo(model, lr=1e-3)                 # or Lomo(model, lr=1e-2, weight_decay=0.01)
    for batch in data:
        loss = model(**batch).loss
        opt.backward(loss)                        # updates every parameter; plain
                                                  # loss.backward() works too without clipping
        sched.step()                              # optional; opt.step() is a no-op
        print(opt.last_grad_norm)                 # true global gradient norm of this step

Cost of the options (each is one extra backward pass, never extra memory):

* ``clip_grad_norm``: the clip coefficient needs the global norm before any parameter moves, and
  by the time the norm is known every gradient is gone. ``backward()`` therefore runs backward
  twice: pass 1 (``retain_graph=True``) only sums squared gradient norms, pass 2 updates with the
  coefficient. Roughly 2× the backward compute of a step; the retained graph holds only what the
  forward pass already held, so peak memory barely changes.
* fp16 dynamic loss scaling: an overflow in *any* gradient must cancel the update of *all*
  parameters, but most parameters have already been updated by the time a late gradient
  overflows. Rolling back would need a copy of the weights, so instead pass 1 checks every
  gradient (the same measuring pass as clipping; both share it) and pass 2 runs only if all are
  finite; otherwise the step is skipped and the scale backs off. No ``torch.distributed`` needed.

What cannot be correct is refused with :class:`LomoConfigError` / :class:`LomoUsageError`:
gradient accumulation (a parameter is updated as soon as one micro-batch's gradient exists),
reentrant gradient checkpointing (each segment's nested backward would deliver a shared parameter's
gradient, and so its update, in pieces), and a
``DistributedDataParallel`` wrapper (its all-reduce runs after the hook has already updated the
replica, so replicas diverge). For data parallelism pass the bare model: when
``torch.distributed`` is initialised every gradient is averaged across ranks inside the hook,
before it is used. (Every rank must then produce gradients for the same parameters in the same
order, as DDP also requires.)

Low-precision weights are written back with stochastic rounding (see ``fused_update``), seeded
from ``(seed, parameter index, step)`` so runs are reproducible, ranks stay bit-identical, and a
resumed run continues exactly.
"""
from __future__ import annotations

import functools
import inspect
import json
import math
import sys
import threading
import warnings
import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..adapters.lora_term import weights_changed
from .fused_update import CHUNK_ELEMENTS, apply_update_, apply_updates_, as_matrix, batchable

__all__ = [
    "Lomo", "AdaLomo", "DynamicLossScaler", "LomoConfigError", "LomoUsageError",
    "state_dict_to_safetensors", "state_dict_from_safetensors",
]

_STATE_FORMAT = "peftlab.lomo"
_STATE_VERSION = 1


class LomoConfigError(ValueError):
    """A LOMO/AdaLomo setting or model setup that cannot give correct updates."""


class LomoUsageError(RuntimeError):
    """LOMO/AdaLomo used in a way that would silently train wrongly (raised before any update)."""


# Attribute naming the fused optimizer whose hook a parameter carries (two would race).
_OWNER_ATTR = "_peftlab_fused_optimizer"


class DynamicLossScaler:
    """fp16 loss scale: halve on overflow, double after ``growth_interval`` clean steps."""

    def __init__(self, init_scale: float = 2.0 ** 16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 1000, min_scale: float = 1.0) -> None:
        if not (init_scale > 0 and growth_factor > 1 and 0 < backoff_factor < 1 and growth_interval >= 1):
            raise LomoConfigError("DynamicLossScaler needs init_scale > 0, growth_factor > 1, "
                                  "0 < backoff_factor < 1 and growth_interval >= 1")
        self.scale = float(init_scale)
        self.growth_factor, self.backoff_factor = float(growth_factor), float(backoff_factor)
        self.growth_interval, self.min_scale = int(growth_interval), float(min_scale)
        self.clean_steps = 0

    def update(self, overflow: bool) -> None:
        """Record one step's outcome."""
        if overflow:
            self.scale = max(self.scale * self.backoff_factor, self.min_scale)
            self.clean_steps = 0
            return
        self.clean_steps += 1
        if self.clean_steps >= self.growth_interval:
            self.scale *= self.growth_factor
            self.clean_steps = 0

    def state_dict(self) -> dict[str, float | int]:
        """All of the scaler's state, JSON-friendly."""
        return {"scale": self.scale, "clean_steps": self.clean_steps, "growth_factor": self.growth_factor,
                "backoff_factor": self.backoff_factor, "growth_interval": self.growth_interval,
                "min_scale": self.min_scale}

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.scale = float(state["scale"])
        self.clean_steps = int(state["clean_steps"])
        self.growth_factor = float(state["growth_factor"])
        self.backoff_factor = float(state["backoff_factor"])
        self.growth_interval = int(state["growth_interval"])
        self.min_scale = float(state["min_scale"])


class _Bucket:
    """Gradients of one device, dtype and param group waiting for one batched update."""

    def __init__(self, group: dict[str, Any], sink: torch.Tensor | None) -> None:
        self.group, self.sink = group, sink
        self.params: list[torch.Tensor] = []
        self.grads: list[torch.Tensor] = []
        self.steps: list[int] = []  # each parameter's step number once this update is applied
        self.nbytes = 0

    def add(self, p: torch.Tensor, grad: torch.Tensor, step: int) -> None:
        self.params.append(p)
        self.grads.append(grad)
        self.steps.append(step)
        self.nbytes += grad.numel() * grad.element_size()


class _FusedBackwardOptimizer(torch.optim.Optimizer):
    """Hook machinery shared by :class:`Lomo` and :class:`AdaLomo`; subclasses define ``_update``."""

    def __init__(
        self,
        params: nn.Module | Iterable[Any],
        defaults: dict[str, Any],
        *,
        clip_grad_norm: float | None,
        loss_scaling: str,
        init_loss_scale: float,
        gradient_accumulation_steps: int,
        seed: int,
        track_grad_norm: bool,
        process_group: Any,
        bucket_mb: float = 0.0,
    ) -> None:
        name = type(self).__name__
        if gradient_accumulation_steps != 1:
            raise LomoConfigError(
                f"{name} cannot do gradient accumulation (gradient_accumulation_steps="
                f"{gradient_accumulation_steps}): each parameter is updated inside the backward pass as "
                "soon as one micro-batch's gradient exists. Use gradient_accumulation_steps=1 and a larger "
                "batch, or an optimizer with gradient buffers (AdamW).")
        if clip_grad_norm is not None and not clip_grad_norm > 0:
            raise LomoConfigError(f"{name}: clip_grad_norm must be a positive number or None, got {clip_grad_norm}")
        if loss_scaling not in ("auto", "dynamic", "none"):
            raise LomoConfigError(f"{name}: loss_scaling must be 'auto', 'dynamic' or 'none', got {loss_scaling!r}")

        model = params if isinstance(params, nn.Module) else None
        if model is not None:
            _refuse_unsupported_model(model, name)
            named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            if not named:
                raise LomoConfigError(f"{name}: the model has no trainable parameters "
                                      "(every parameter has requires_grad=False)")
            params = named
        self._model_ref = weakref.ref(model) if model is not None else None
        self.clip_grad_norm = clip_grad_norm
        self.seed = int(seed)
        self.track_grad_norm = track_grad_norm
        self.process_group = process_group
        self._hook_handles: list[Any] = []
        if not bucket_mb >= 0:
            raise LomoConfigError(f"{name}: bucket_mb must be >= 0, got {bucket_mb}")
        self.bucket_bytes = int(bucket_mb * 2 ** 20)
        # Gradients waiting for one batched update launch, per (device, dtype, param group).
        self._pending: dict[tuple, list] = {}
        self._index: dict[torch.Tensor, int] = {}
        self._group_of: dict[torch.Tensor, dict[str, Any]] = {}
        self._name_of: dict[torch.Tensor, str] = {}
        # Per-backward-pass bookkeeping.
        self._mode = "implicit"            # "implicit" (plain loss.backward), "measure" or "update"
        self._grad_scale = 1.0             # multiplies raw gradients (1/loss scale × clip coefficient)
        self._graph_task: int | None = None
        self._pass_lock = threading.Lock()  # per-device autograd threads may run hooks concurrently
        self._track_this_pass = track_grad_norm
        self._sq_norm: dict[torch.device, torch.Tensor] = {}
        self._norm_value: float | None = None
        self._world_size = 1
        self._step_called = False
        self._updates_since_step = 0
        self.last_step_skipped = False
        self.skipped_steps = 0

        super().__init__(params, defaults)

        trainable = [p for group in self.param_groups for p in group["params"] if p.requires_grad]
        fp16 = any(p.dtype == torch.float16 for p in trainable)
        self.loss_scaler = (DynamicLossScaler(init_loss_scale)
                            if loss_scaling == "dynamic" or (loss_scaling == "auto" and fp16) else None)

    # ------------------------------------------------------------------ torch.optim.Optimizer API

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (as ``torch.optim.Optimizer``) and hook its trainable parameters."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        self._validate_group(group, len(self.param_groups) - 1)
        names = group.get("param_names")
        for i, p in enumerate(group["params"]):
            if p in self._index:
                raise LomoConfigError(f"{type(self).__name__}: parameter "
                                      f"'{names[i] if names else i}' appears in more than one group")
            self._index[p] = len(self._index)
            self._group_of[p] = group
            self._name_of[p] = names[i] if names else f"param_groups[{len(self.param_groups) - 1}][{i}]"
            if not p.requires_grad:
                continue  # frozen: never receives a gradient, never gets state
            owner = getattr(p, _OWNER_ATTR, lambda: None)()
            if owner is not None and owner is not self:
                raise LomoConfigError(f"parameter '{self._name_of[p]}' is already driven by another "
                                      f"{type(owner).__name__}; call remove_hooks() on it first")
            if p.grad is not None:
                p.grad = None  # a stale gradient would be added to the first fused update
            setattr(p, _OWNER_ATTR, weakref.ref(self))
            self._hook_handles.append(p.register_post_accumulate_grad_hook(self._on_grad_ready))

    def step(self, closure=None):  # noqa: D401 - torch API
        """No-op (updates happen inside backward). Runs ``closure`` if given and returns its loss."""
        if self._updates_since_step > 1:
            self._fail_accumulation()
        self._step_called = True
        self._updates_since_step = 0
        if closure is not None:
            with torch.enable_grad():
                return closure()
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """No-op: the hooks already drop every gradient after using it."""

    # ------------------------------------------------------------------ public API

    def backward(self, loss: torch.Tensor, *, retain_graph: bool = False) -> None:
        """Run backward on ``loss``, updating every trainable parameter.

        One backward pass normally; two when ``clip_grad_norm`` is set or fp16 loss scaling is on
        (see the module docstring). Sets :attr:`last_grad_norm` and :attr:`last_step_skipped`.
        """
        if not self._hook_handles:
            raise LomoUsageError(f"{type(self).__name__}.backward: the hooks were removed "
                                 "(remove_hooks() or the with-block ended); build a new optimizer")
        model = self._model_ref() if self._model_ref is not None else None
        if model is not None:
            _refuse_reentrant_checkpointing(model, type(self).__name__)
        try:
            self._backward(loss, retain_graph)
        finally:
            weights_changed()  # the Triton updates move no version counters

    def _backward(self, loss: torch.Tensor, retain_graph: bool) -> None:
        self.last_step_skipped = False
        if not self._needs_measure_pass:
            self._run_pass("update", loss, 1.0, retain_graph, track=self.track_grad_norm)
            return
        scale = self.loss_scaler.scale if self.loss_scaler is not None else 1.0
        scaled = loss.float() * scale if scale != 1.0 else loss
        self._run_pass("measure", scaled, 1.0 / scale, True, track=True)
        norm = self.last_grad_norm if self._sq_norm else 0.0
        if not math.isfinite(norm):
            self.last_step_skipped = True
            self.skipped_steps += 1
            if self.loss_scaler is not None:
                self.loss_scaler.update(overflow=True)
            return
        coef = 1.0
        if self.clip_grad_norm is not None:
            coef = min(1.0, self.clip_grad_norm / (norm + 1e-6))
        self._run_pass("update", scaled, coef / scale, retain_graph, track=False)
        self._norm_value = norm
        if self.loss_scaler is not None:
            self.loss_scaler.update(overflow=False)

    def fused_backward(self, loss: torch.Tensor, lr: float | None = None) -> None:
        """``lomo-optim``-compatible spelling: set every group's ``lr`` (if given), then :meth:`backward`."""
        if lr is not None:
            for group in self.param_groups:
                group["lr"] = lr
        self.backward(loss)

    @property
    def last_grad_norm(self) -> float:
        """L2 norm of the last step's whole gradient (unscaled, rank-averaged, before clipping).

        Reading it synchronises with the device once; ``nan`` when the step was never measured.
        """
        if self._norm_value is None:
            if not self._sq_norm:
                return float("nan")
            total = sum(v.double().item() for v in self._sq_norm.values())
            self._norm_value = math.sqrt(total)
        return self._norm_value

    @property
    def loss_scale(self) -> float | None:
        """Current fp16 loss scale, or ``None`` without loss scaling."""
        return None if self.loss_scaler is None else self.loss_scaler.scale

    def remove_hooks(self) -> None:
        """Detach from the parameters: later backward passes leave ``.grad`` untouched."""
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles.clear()
        for p in self._index:
            if getattr(p, _OWNER_ATTR, lambda: None)() is self:
                delattr(p, _OWNER_ATTR)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.remove_hooks()

    def state_dict(self) -> dict[str, Any]:
        """All state needed to resume exactly: hyperparameters, per-parameter state, loss scale.

        Tensors appear only under ``state``; everything else is JSON-friendly. See
        :func:`state_dict_to_safetensors` for a safetensors + JSON round trip.
        """
        groups = []
        for group in self.param_groups:
            entry = {k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items()
                     if k not in ("params", "param_names")}
            entry["params"] = [self._index[p] for p in group["params"]]
            groups.append(entry)
        state = {self._index[p]: dict(st) for p, st in self.state.items() if st}
        return {"format": _STATE_FORMAT, "version": _STATE_VERSION, "optimizer": type(self).__name__,
                "seed": self.seed, "param_groups": groups, "state": state,
                "loss_scaler": None if self.loss_scaler is None else self.loss_scaler.state_dict(),
                "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output into an optimizer built over the same parameters."""
        name = type(self).__name__
        if state_dict.get("format") != _STATE_FORMAT or state_dict.get("optimizer") != name:
            raise LomoConfigError(f"{name}.load_state_dict: expected a '{_STATE_FORMAT}' state of a {name}, got "
                                  f"format={state_dict.get('format')!r}, optimizer={state_dict.get('optimizer')!r}")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise LomoConfigError(f"{name}.load_state_dict: the state has {len(saved_groups)} param groups, "
                                  f"this optimizer has {len(self.param_groups)}")
        for i, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise LomoConfigError(f"{name}.load_state_dict: param_groups[{i}] has {len(saved['params'])} "
                                      f"parameters in the state but {len(group['params'])} here")
        by_index = {self._index[p]: p for p in self._index}
        for saved, group in zip(saved_groups, self.param_groups):
            for key, value in saved.items():
                if key != "params":
                    group[key] = tuple(value) if isinstance(group.get(key), tuple) else value
        self.state.clear()
        for key, entry in state_dict["state"].items():
            p = by_index.get(int(key))
            if p is None:
                raise LomoConfigError(f"{name}.load_state_dict: the state names parameter index {key}, but this "
                                      f"optimizer has only {len(by_index)} parameters")
            self.state[p] = {k: (v.to(device=p.device, dtype=torch.float32) if torch.is_tensor(v) else int(v))
                             for k, v in entry.items()}
        self.seed = int(state_dict["seed"])
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
        scaler_state = state_dict.get("loss_scaler")
        if scaler_state is not None:
            self.loss_scaler = self.loss_scaler or DynamicLossScaler()
            self.loss_scaler.load_state_dict(scaler_state)

    # ------------------------------------------------------------------ the hook

    @property
    def _needs_measure_pass(self) -> bool:
        return self.clip_grad_norm is not None or self.loss_scaler is not None

    def _run_pass(self, mode: str, loss: torch.Tensor, grad_scale: float, retain_graph: bool, track: bool) -> None:
        self._mode, self._grad_scale, self._track_this_pass = mode, grad_scale, track
        self._graph_task = None
        self._sq_norm, self._norm_value = {}, None
        try:
            loss.backward(retain_graph=retain_graph)
        finally:
            self._mode, self._grad_scale, self._track_this_pass = "implicit", 1.0, self.track_grad_norm
            self._graph_task = None

    def _on_grad_ready(self, p: torch.Tensor) -> None:
        grad = p.grad
        if grad is None:
            return
        p.grad = None
        task = _graph_task_id()
        if task != self._graph_task:
            with self._pass_lock:
                if task != self._graph_task:
                    self._begin_pass(task)
        if grad.is_sparse:
            self._graph_task = None
            raise LomoUsageError(f"{type(self).__name__}: parameter '{self._name_of[p]}' got a sparse gradient; "
                                 "use a dense embedding (sparse=False)")
        if self._world_size > 1:
            grad = self._average_across_ranks(grad)
        if self._mode == "measure":
            self._add_sq_norm(grad, None)
            return
        group = self._group_of[p]
        sink = self._norm_sink(grad.device) if self._track_this_pass else None
        if self.bucket_bytes and self._defer(p, grad, group, sink):
            return
        with torch.no_grad():
            raw_sq = self._update(p, grad, group, self.state[p], self._grad_scale, self._index[p], sink)
        if raw_sq is not None and sink is not None:
            sink.add_(raw_sq)

    def _begin_pass(self, task: int) -> None:
        self._graph_task = None  # reset first so an error below leaves a clean slate
        self._pending.clear()  # left over only if an earlier backward failed midway
        name = type(self).__name__
        if _inside_reentrant_checkpoint():
            raise LomoUsageError(
                f"{name} cannot run under reentrant gradient checkpointing "
                "(torch.utils.checkpoint with use_reentrant=True): each checkpointed segment runs its own nested "
                "backward, so a parameter used in several segments would get its gradient, and its update, in "
                "pieces. Use torch.utils.checkpoint.checkpoint(..., use_reentrant=False).")
        if self._mode == "implicit" and self._needs_measure_pass:
            why = "clip_grad_norm" if self.clip_grad_norm is not None else "fp16 loss scaling"
            raise LomoUsageError(f"{name} with {why} needs two backward passes: call opt.backward(loss) "
                                 "instead of loss.backward()")
        if self._mode != "measure":
            if self._step_called and self._updates_since_step >= 1:
                self._fail_accumulation()
            self._updates_since_step += 1
        if self._mode == "implicit":
            self._sq_norm, self._norm_value = {}, None
        self._world_size = _data_parallel_world_size(self.process_group)
        if self.bucket_bytes and self._mode != "measure":
            torch.autograd.Variable._execution_engine.queue_callback(self._flush_all)
        self._graph_task = task

    def _defer(self, p: torch.Tensor, grad: torch.Tensor, group: dict[str, Any], sink: torch.Tensor | None) -> bool:
        """Queue ``p``'s update for a batched launch instead of updating now; False if it cannot be."""
        if not batchable(p, grad):
            return False
        key = (p.device, p.dtype, id(group))
        bucket = self._pending.get(key)
        if bucket is None:
            bucket = self._pending[key] = _Bucket(group, sink)
        bucket.add(p, grad, self.state[p].get("step", 0) + 1)
        if bucket.nbytes >= self.bucket_bytes:
            self._flush(key)
        return True

    def _flush(self, key: tuple) -> None:
        """Apply the queued updates of one bucket (one by one if the batched kernels fail)."""
        bucket = self._pending.pop(key)
        with torch.no_grad(), torch.cuda.device(bucket.params[0].device):
            try:
                self._apply_batch(bucket)
            except Exception as exc:  # a broken Triton install must not stop training
                warnings.warn(f"{type(self).__name__}: batched update failed ({exc}); updating parameters "
                              "one by one from now on.", stacklevel=2)
                self.bucket_bytes = 0
                for p, grad in zip(bucket.params, bucket.grads):
                    raw_sq = self._update(p, grad, bucket.group, self.state[p], self._grad_scale,
                                          self._index[p], bucket.sink)
                    if raw_sq is not None and bucket.sink is not None:
                        bucket.sink.add_(raw_sq)
                return
        for p, step in zip(bucket.params, bucket.steps):
            self.state[p]["step"] = step

    def _flush_all(self) -> None:
        """Apply every queued update (runs when the backward pass ends)."""
        for key in list(self._pending):
            self._flush(key)

    def _apply_batch(self, bucket: _Bucket) -> None:
        """Update every parameter of ``bucket`` (all batchable, one device, dtype and group)."""
        raise NotImplementedError

    def _seeds(self, bucket: _Bucket) -> list[int]:
        """The rounding seed of each parameter of ``bucket`` for its step (as one-by-one updates use)."""
        return [self._seed_for(self._index[p], step) for p, step in zip(bucket.params, bucket.steps)]

    def _fail_accumulation(self) -> None:
        self._updates_since_step = 0
        raise LomoUsageError(
            f"{type(self).__name__} saw several backward passes for one optimizer step(): gradient accumulation "
            "is impossible when each parameter is updated inside backward (every backward already applied "
            "an update). Set gradient_accumulation_steps=1.")

    def _average_across_ranks(self, grad: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        if dist.get_backend(self.process_group) == "nccl":
            dist.all_reduce(grad, op=dist.ReduceOp.AVG, group=self.process_group)
        else:  # gloo has no AVG
            dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=self.process_group)
            grad.div_(self._world_size)
        return grad

    def _norm_sink(self, device: torch.device) -> torch.Tensor:
        """This pass's on-device sum of squared gradient norms (the update adds to it without syncing)."""
        sink = self._sq_norm.get(device)
        if sink is None:
            sink = self._sq_norm[device] = torch.zeros((), dtype=torch.float32, device=device)
        return sink

    def _add_sq_norm(self, grad: torch.Tensor, raw_sq: torch.Tensor | None) -> None:
        if raw_sq is None:
            raw_sq = torch.linalg.vector_norm(grad, dtype=torch.float32).square()
        sq = raw_sq * (self._grad_scale ** 2) if self._mode == "measure" else raw_sq
        self._norm_sink(grad.device).add_(sq)

    def _validate_group(self, group: dict[str, Any], index: int) -> None:
        where = f"{type(self).__name__} param_groups[{index}]"
        if not group["lr"] >= 0:
            raise LomoConfigError(f"{where}: lr must be >= 0, got {group['lr']}")
        if not group["weight_decay"] >= 0:
            raise LomoConfigError(f"{where}: weight_decay must be >= 0, got {group['weight_decay']}")

    def _seed_for(self, index: int, step: int) -> int:
        return _mix64(self.seed, index, step) & 0x7FFFFFFF

    def _update(self, p: torch.Tensor, grad: torch.Tensor, group: dict[str, Any], state: dict[str, Any],
                grad_scale: float, index: int, sq_out: torch.Tensor | None) -> torch.Tensor | None:
        """Update ``p`` in place from its raw gradient. Either adds the raw gradient's squared norm to
        ``sq_out`` itself (when given) and returns None, or returns that squared norm."""
        raise NotImplementedError


class Lomo(_FusedBackwardOptimizer):
    """LOMO (Lv et al., 2023): SGD with decoupled weight decay, fused into backward.

    ``p ← p·(1 − lr·weight_decay) − lr·g``. No optimizer state beyond a step counter per
    parameter (it seeds stochastic rounding).

    Args:
        params: a model (its trainable parameters are used, and its setup is checked) or an
            iterable of parameters / ``(name, parameter)`` pairs / param-group dicts.
        lr: learning rate (per group; schedulers may change it between steps).
        weight_decay: decoupled weight decay (per group).
        clip_grad_norm: clip the global gradient norm to this value (two backward passes).
        loss_scaling: ``"auto"`` (dynamic when a trainable parameter is fp16), ``"dynamic"`` or ``"none"``.
        init_loss_scale: first fp16 loss scale.
        stochastic_rounding: write 16-bit weights back with stochastic rounding (per group).
        seed: seeds the rounding noise.
        gradient_accumulation_steps: must be 1 (any other value is refused, loudly).
        track_grad_norm: compute :attr:`last_grad_norm` on single-pass steps too (one cheap reduction
            per parameter; reading it is what synchronises).
        process_group: group whose ranks average gradients (default: the world, when initialised).
        bucket_mb: on CUDA, 16-bit parameters whose gradients arrive together are updated by one
            kernel launch once their gradients reach this many MiB (and at the end of backward), so
            a step launches tens of kernels instead of one per parameter. Costs at most this much
            extra memory; 0 updates each parameter the moment its gradient is ready. The results
            are bit-identical either way.
    """

    def __init__(self, params: nn.Module | Iterable[Any], lr: float = 1e-3, weight_decay: float = 0.0, *,
                 clip_grad_norm: float | None = None, loss_scaling: str = "auto", init_loss_scale: float = 2.0 ** 16,
                 stochastic_rounding: bool = True, seed: int = 0, gradient_accumulation_steps: int = 1,
                 track_grad_norm: bool = True, process_group: Any = None, bucket_mb: float = 64.0) -> None:
        defaults = dict(lr=lr, weight_decay=weight_decay, stochastic_rounding=stochastic_rounding)
        super().__init__(params, defaults, clip_grad_norm=clip_grad_norm, loss_scaling=loss_scaling,
                         init_loss_scale=init_loss_scale, gradient_accumulation_steps=gradient_accumulation_steps,
                         seed=seed, track_grad_norm=track_grad_norm, process_group=process_group,
                         bucket_mb=bucket_mb)

    def _apply_batch(self, bucket):
        group = bucket.group
        apply_updates_(bucket.params, bucket.grads, self._seeds(bucket), lr=float(group["lr"]),
                       weight_decay=float(group["weight_decay"]), grad_scale=self._grad_scale,
                       stochastic_rounding=group["stochastic_rounding"], sq_out=bucket.sink)

    def _update(self, p, grad, group, state, grad_scale, index, sq_out):
        step = state.get("step", 0) + 1
        apply_update_(p, grad, lr=float(group["lr"]), weight_decay=float(group["weight_decay"]),
                      grad_scale=grad_scale, stochastic_rounding=group["stochastic_rounding"],
                      seed=self._seed_for(index, step), sq_out=sq_out)
        state["step"] = step
        return None


class AdaLomo(_FusedBackwardOptimizer):
    """AdaLomo (Lv et al., 2024): LOMO with Adafactor-style adaptive learning rates.

    For a matrix parameter θ (viewed as ``[shape[0], numel // shape[0]]``) with gradient G, at step t::

        β_t = 1 − t^decay_rate
        r_t = β_t r_{t−1} + (1 − β_t) · row-means(G² + ε1)      c_t likewise over columns
        V   = r_t c_tᵀ / mean(r_t)                              (vectors: v_t, unfactored)
        U   = G / √V;   Û = U / max(1, RMS(U) / clip_threshold)   (grouped update normalisation)
        η   = lr · max(ε2, RMS(θ_{t−1}))                         (relative step size)
        θ_t = θ_{t−1} (1 − η·weight_decay) − η Û

    State: ``exp_avg_sq_row`` / ``exp_avg_sq_col`` (fp32, ``n + m`` numbers) or ``exp_avg_sq`` for
    vectors, plus a step counter, created on the parameter's device at its first update and only
    for trainable parameters. Other arguments as :class:`Lomo`; ``eps = (ε1, ε2)``. Batched updates
    (``bucket_mb``, default 64) run six kernels per bucket instead of about thirty per parameter; their
    reductions round differently from the one-by-one path, so the two agree to fp32 rounding, not bit
    for bit. Their reductions use no atomics, so every run (and every data-parallel rank) gets the same bits.
    """

    def __init__(self, params: nn.Module | Iterable[Any], lr: float = 1e-3, weight_decay: float = 0.0, *,
                 eps: tuple[float, float] = (1e-30, 1e-3), clip_threshold: float = 1.0, decay_rate: float = -0.8,
                 clip_grad_norm: float | None = None, loss_scaling: str = "auto", init_loss_scale: float = 2.0 ** 16,
                 stochastic_rounding: bool = True, seed: int = 0, gradient_accumulation_steps: int = 1,
                 track_grad_norm: bool = True, process_group: Any = None, bucket_mb: float = 64.0) -> None:
        defaults = dict(lr=lr, weight_decay=weight_decay, eps=tuple(eps), clip_threshold=clip_threshold,
                        decay_rate=decay_rate, stochastic_rounding=stochastic_rounding)
        super().__init__(params, defaults, clip_grad_norm=clip_grad_norm, loss_scaling=loss_scaling,
                         init_loss_scale=init_loss_scale, gradient_accumulation_steps=gradient_accumulation_steps,
                         seed=seed, track_grad_norm=track_grad_norm, process_group=process_group,
                         bucket_mb=bucket_mb)

    def _apply_batch(self, bucket):
        from .batched_adalomo import adalomo_updates_  # needs Triton, which batchable() checked

        group = bucket.group
        adalomo_updates_(bucket.params, bucket.grads, [self.state[p] for p in bucket.params], self._seeds(bucket),
                         [1.0 - step ** group["decay_rate"] for step in bucket.steps], lr=float(group["lr"]),
                         weight_decay=float(group["weight_decay"]), eps=group["eps"],
                         clip_threshold=float(group["clip_threshold"]), grad_scale=self._grad_scale,
                         stochastic_rounding=group["stochastic_rounding"], sq_out=bucket.sink)

    def _validate_group(self, group, index):
        super()._validate_group(group, index)
        where = f"AdaLomo param_groups[{index}]"
        eps = group["eps"]
        if len(eps) != 2 or not (eps[0] >= 0 and eps[1] >= 0):
            raise LomoConfigError(f"{where}: eps must be two numbers >= 0 (eps1, eps2), got {eps}")
        if not group["clip_threshold"] > 0:
            raise LomoConfigError(f"{where}: clip_threshold must be > 0, got {group['clip_threshold']}")
        if not group["decay_rate"] < 0:
            raise LomoConfigError(f"{where}: decay_rate must be < 0 (beta_t = 1 - t**decay_rate), "
                                  f"got {group['decay_rate']}")

    def _update(self, p, grad, group, state, grad_scale, index, sq_out):
        eps1, eps2 = group["eps"]
        step = state.get("step", 0) + 1
        beta = 1.0 - step ** group["decay_rate"]
        scale2 = grad_scale * grad_scale
        g2d = as_matrix(grad.contiguous())
        n_rows, n_cols = g2d.shape
        if p.dim() >= 2:
            row_sum, col_sum, squares = _sums_of_squares(g2d)
            raw_sq = row_sum.sum()
            if "exp_avg_sq_row" not in state:
                state["exp_avg_sq_row"] = torch.zeros(n_rows, dtype=torch.float32, device=p.device)
                state["exp_avg_sq_col"] = torch.zeros(n_cols, dtype=torch.float32, device=p.device)
            r, c = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
            r.mul_(beta).add_(row_sum.mul_(scale2 / n_cols).add_(eps1), alpha=1.0 - beta)
            c.mul_(beta).add_(col_sum.mul_(scale2 / n_rows).add_(eps1), alpha=1.0 - beta)
            row = (r / r.mean()).rsqrt_()
            col = c.rsqrt()
            weighted = _row_weighted_squares(g2d, col.square(), squares)
            sum_u2 = torch.dot(row.square(), weighted) * scale2
        else:
            squares = _float_squares(g2d).view(-1)
            raw_sq = squares.sum()
            if "exp_avg_sq" not in state:
                state["exp_avg_sq"] = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
            v = state["exp_avg_sq"]
            v.mul_(beta).add_(squares * scale2 + eps1, alpha=1.0 - beta)
            row, col = v.rsqrt(), None
            sum_u2 = torch.dot(squares, row.square()) * scale2
        rms_u = (sum_u2 / p.numel()).sqrt()
        grad_mult = 1.0 / torch.clamp(rms_u / group["clip_threshold"], min=1.0)
        rms_p = torch.linalg.vector_norm(p, dtype=torch.float32) / math.sqrt(p.numel())
        lr_mult = torch.clamp(rms_p, min=eps2)
        apply_update_(p, grad, lr=float(group["lr"]), weight_decay=float(group["weight_decay"]),
                      grad_scale=grad_scale, lr_mult=lr_mult, grad_mult=grad_mult, row=row, col=col,
                      stochastic_rounding=group["stochastic_rounding"], seed=self._seed_for(index, step))
        state["step"] = step
        return raw_sq


def _sums_of_squares(g2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Row and column sums of ``g²`` in fp32, by row chunks; also ``g²`` itself if it fit in one chunk."""
    n_rows, n_cols = g2d.shape
    rows_per_chunk = max(1, CHUNK_ELEMENTS // n_cols)
    row_sum = torch.empty(n_rows, dtype=torch.float32, device=g2d.device)
    col_sum = torch.zeros(n_cols, dtype=torch.float32, device=g2d.device)
    squares = None
    for start in range(0, n_rows, rows_per_chunk):
        sq = _float_squares(g2d[start:start + rows_per_chunk])
        row_sum[start:start + rows_per_chunk] = sq.sum(1)
        col_sum += sq.sum(0)
        squares = sq if rows_per_chunk >= n_rows else None
    return row_sum, col_sum, squares


def _float_squares(g: torch.Tensor) -> torch.Tensor:
    """``g²`` in a fresh fp32 tensor (one temporary, never writing into ``g``)."""
    return g.float().square_() if g.dtype != torch.float32 else g.square()


def _row_weighted_squares(g2d: torch.Tensor, col_weights: torch.Tensor, squares: torch.Tensor | None) -> torch.Tensor:
    """``Σ_j g_ij² · w_j`` for every row i (recomputing ``g²`` chunk by chunk when not cached)."""
    if squares is not None:
        return torch.mv(squares, col_weights)
    rows_per_chunk = max(1, CHUNK_ELEMENTS // g2d.shape[1])
    parts = [torch.mv(_float_squares(g2d[s:s + rows_per_chunk]), col_weights)
             for s in range(0, g2d.shape[0], rows_per_chunk)]
    return torch.cat(parts)


# ---------------------------------------------------------------------- model checks


def _refuse_unsupported_model(model: nn.Module, name: str) -> None:
    wrappers = [torch.nn.parallel.DistributedDataParallel]
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
        wrappers.append(FullyShardedDataParallel)
    except ImportError:  # torch built without distributed
        pass
    for wrapper in wrappers:
        if isinstance(model, wrapper):
            raise LomoConfigError(
                f"{name} cannot drive a {wrapper.__name__}-wrapped model: the wrapper reduces gradients after "
                f"{name}'s hook has already updated each replica, so replicas diverge. Pass the bare module "
                f"(model.module); {name} averages gradients across ranks itself when torch.distributed is "
                "initialised.")
    _refuse_reentrant_checkpointing(model, name)


def _refuse_reentrant_checkpointing(model: nn.Module, name: str) -> None:
    """Refuse Hugging Face gradient checkpointing configured with ``use_reentrant=True`` (or the old default)."""
    for module_name, module in model.named_modules():
        if getattr(module, "gradient_checkpointing", False) is not True:
            continue
        fn = getattr(module, "_gradient_checkpointing_func", None)
        if fn is not None and _is_reentrant_checkpoint_fn(fn):
            raise LomoConfigError(
                f"{name}: module '{module_name or type(module).__name__}' uses reentrant gradient checkpointing "
                "(use_reentrant=True): each checkpointed segment runs its own nested backward, so a parameter "
                "used in several segments would get its gradient, and its update, in pieces. Enable it with "
                "use_reentrant=False: model.activation_checkpointing_enable(activation_checkpointing_kwargs="
                "{'use_reentrant': False}) (older transformers: gradient_checkpointing_enable("
                "gradient_checkpointing_kwargs={'use_reentrant': False})).")


def _is_reentrant_checkpoint_fn(fn: Any) -> bool:
    from torch.utils.checkpoint import checkpoint

    if isinstance(fn, functools.partial):
        if "use_reentrant" in fn.keywords:
            return bool(fn.keywords["use_reentrant"])
        fn = fn.func
    return fn is checkpoint  # torch's checkpoint defaults to use_reentrant=True when not told


@functools.lru_cache(maxsize=1)
def _reentrant_backward_code():
    from torch.utils.checkpoint import CheckpointFunction

    return inspect.unwrap(CheckpointFunction.backward).__code__


def _inside_reentrant_checkpoint() -> bool:
    """True when called (from a hook) inside the nested backward of a reentrant checkpoint."""
    code = _reentrant_backward_code()
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is code:
            return True
        frame = frame.f_back
    return False


def _graph_task_id() -> int:
    """Id of the backward pass (autograd graph task) now running; each ``backward()`` gets a new one."""
    return torch._C._current_graph_task_id()


def _data_parallel_world_size(group: Any) -> int:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def _mix64(*values: int) -> int:
    """Deterministic 64-bit mix (splitmix64 steps) of small integers."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return h


# ---------------------------------------------------------------------- serialisation


def state_dict_to_safetensors(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Split an optimizer ``state_dict()`` into safetensors tensors and a ``{"lomo": json}`` metadata dict.

    Save with ``safetensors.torch.save_file(tensors, path, metadata=metadata)``.
    """
    tensors: dict[str, torch.Tensor] = {}
    plain_state: dict[str, dict[str, Any]] = {}
    for index, entry in state_dict["state"].items():
        plain_state[str(index)] = {}
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"state.{index}.{key}"] = value.detach().contiguous()
            else:
                plain_state[str(index)][key] = value
    meta = {k: v for k, v in state_dict.items() if k != "state"}
    meta["state"] = plain_state
    return tensors, {"lomo": json.dumps(meta)}


def state_dict_from_safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, Any]:
    """Inverse of :func:`state_dict_to_safetensors` (``tensors`` from ``safetensors.torch.load_file``)."""
    if "lomo" not in metadata:
        raise LomoConfigError("optimizer state file has no 'lomo' metadata entry; it was not written by "
                              "state_dict_to_safetensors")
    meta = json.loads(metadata["lomo"])
    state: dict[int, dict[str, Any]] = {int(i): dict(entry) for i, entry in meta.pop("state").items()}
    for key, tensor in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = tensor
    meta["state"] = state
    return meta
