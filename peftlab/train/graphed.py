"""A whole training step — forward, backward, optimizer step — replayed as one CUDA graph.

An eager LoRA step on a 1B-parameter model issues thousands of small kernels, and Python spends
longer issuing them than the GPU spends running them. Captured once, the step replays with one
launch: the GPU never waits for the host. This needs what CUDA graphs need: batches of a fixed
shape (each new shape gets its own graph, captured after ``warmup`` eager steps of that shape),
no host synchronisation inside the step, and an optimizer whose step runs on the GPU
(``capturable=True``).
"""
from __future__ import annotations

from typing import Callable

import torch

from ..adapters.lora_term import weights_changed
from ..errors import ConfigError

Batch = dict[str, torch.Tensor]


def _signature(batch: Batch) -> tuple:
    return tuple(sorted((k, tuple(v.shape), v.dtype, v.device) for k, v in batch.items()))


class _Graph:
    """One captured step and the static tensors it reads and writes."""

    def __init__(self, batch: Batch):
        self.inputs = {k: v.clone() for k, v in batch.items()}
        self.graph = torch.cuda.CUDAGraph()
        self.loss: torch.Tensor | None = None


class GraphedStep:
    """``step(batch) -> loss``: one optimizer step on ``batch``, captured as a CUDA graph after warm-up.

    Args:
        optimizer: a torch optimizer created with ``capturable=True`` (e.g. ``AdamW(..., fused=True,
            capturable=True)``); its gradients are set to None before the capture.
        loss_fn: ``loss_fn(batch) -> scalar loss tensor``, with no host synchronisation inside
            (no ``.item()``, no data-dependent Python branches).
        warmup: eager steps per batch shape before its capture (cuBLAS and Triton set themselves up
            in these; they are real training steps).
        max_grad_norm: clip the gradient norm before each step (inside the graph), or ``None``.
        all_reduce: average the gradients over ``torch.distributed``'s default group after backward,
            inside the graph — data parallelism for a captured step, where DDP's hooks cannot run
            (start one process per GPU, e.g. with ``accelerate launch``, and give each its own batches).

    Every call is one real training step, eager or replayed. The returned loss is a tensor that the
    next call overwrites: read it (``.item()``) or clone it before calling again. On CPU, or on a GPU
    where ``enabled=False``, every step runs eagerly.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, loss_fn: Callable[[Batch], torch.Tensor], *,
                 warmup: int = 3, max_grad_norm: float | None = None, all_reduce: bool = False, enabled: bool = True):
        self._params = [p for group in optimizer.param_groups for p in group["params"]]
        on_cuda = any(p.is_cuda for p in self._params)
        for group in optimizer.param_groups:
            if enabled and on_cuda and "capturable" in group and not group["capturable"]:
                raise ConfigError(f"GraphedStep needs an optimizer created with capturable=True; "
                                  f"{type(optimizer).__name__} has capturable=False.")
        if all_reduce and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise ConfigError("GraphedStep(all_reduce=True) needs an initialised torch.distributed process group "
                              "(start the script with accelerate launch or torchrun).")
        if warmup < 1:
            raise ConfigError(f"GraphedStep warmup is {warmup}; it must be at least 1 eager step.")
        self.optimizer, self.loss_fn = optimizer, loss_fn
        self.warmup, self.max_grad_norm, self.all_reduce, self.enabled = warmup, max_grad_norm, all_reduce, enabled
        self._eager_steps: dict[tuple, int] = {}
        self._graphs: dict[tuple, _Graph] = {}
        self._pool = None
        self._side = None

    @property
    def captured_shapes(self) -> int:
        """How many batch shapes have a captured graph."""
        return len(self._graphs)

    def __call__(self, batch: Batch) -> torch.Tensor:
        on_cuda = all(v.is_cuda for v in batch.values())
        if not (self.enabled and on_cuda):
            return self._eager(batch)
        key = _signature(batch)
        graph = self._graphs.get(key)
        if graph is None:
            if self._eager_steps.get(key, 0) < self.warmup:
                self._eager_steps[key] = self._eager_steps.get(key, 0) + 1
                return self._eager_on_side_stream(batch)
            graph = self._capture(key, batch)
        for name, value in batch.items():
            graph.inputs[name].copy_(value, non_blocking=True)
        graph.graph.replay()
        weights_changed()  # the replayed optimizer step ran no Python: mark cached adapter copies stale
        return graph.loss

    # ------------------------------------------------------------------ internals
    def _step_body(self, batch: Batch) -> torch.Tensor:
        loss = self.loss_fn(batch)
        loss.backward()
        if self.all_reduce:
            self._average_gradients()
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self._params, self.max_grad_norm, foreach=True)
        self.optimizer.step()
        return loss.detach()

    def _average_gradients(self) -> None:
        grads = [p.grad for p in self._params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])  # one collective instead of one per tensor
        torch.distributed.all_reduce(flat)
        flat.div_(torch.distributed.get_world_size())  # a sum then a division: gloo has no AVG
        torch._foreach_copy_(grads, [piece.view_as(g) for g, piece in zip(grads, flat.split([g.numel() for g in grads]))])

    def _eager(self, batch: Batch) -> torch.Tensor:
        loss = self._step_body(batch)
        self.optimizer.zero_grad(set_to_none=True)
        return loss

    def _eager_on_side_stream(self, batch: Batch) -> torch.Tensor:
        # Warm-up on a side stream, as CUDA graph capture requires of the work it will record.
        self._side = self._side or torch.cuda.Stream()
        self._side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._side):
            loss = self._eager(batch)
        torch.cuda.current_stream().wait_stream(self._side)
        return loss

    def _capture(self, key: tuple, batch: Batch) -> _Graph:
        graph = _Graph(batch)
        self._pool = self._pool or torch.cuda.graph_pool_handle()
        self.optimizer.zero_grad(set_to_none=True)  # backward then writes fresh gradient tensors
        weights_changed()  # so the capture records the casts instead of reading copies made outside it
        torch.cuda.synchronize()
        try:
            # thread_local: NCCL's watchdog thread may query events while this thread captures
            with torch.cuda.graph(graph.graph, pool=self._pool, capture_error_mode="thread_local"):
                graph.loss = self._step_body(graph.inputs)
        except RuntimeError as err:
            if "CUDAGeneratorImpl" in str(err):
                raise ConfigError("GraphedStep: gradient checkpointing reads the CUDA RNG state, which cannot happen "
                                  "inside a CUDA graph; enable it with preserve_rng_state=False (exact when the model "
                                  "has no dropout).") from err
            raise
        self._graphs[key] = graph
        return graph
