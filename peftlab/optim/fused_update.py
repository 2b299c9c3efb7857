"""In-place parameter updates for fused (inside-backward) optimizers, with stochastic rounding.

One operation, used by LOMO and AdaLomo alike::

    u     = grad * grad_scale * grad_mult * row[i] * col[j]      (row/col/grad_mult optional)
    step  = lr * lr_mult                                          (lr_mult optional)
    param = param * (1 - step * weight_decay) - step * u

The arithmetic runs in fp32. A 16-bit parameter is written back with *stochastic rounding*
(round up with probability equal to the distance to the lower neighbour), so an update far smaller
than half a bf16 ulp still moves the weight in expectation instead of being rounded away — and it
costs no memory, unlike a Kahan compensation buffer. The random bits come from ``seed`` alone, so
a run is reproducible and a resumed run draws the same bits as an uninterrupted one.

``row``/``col`` are fp32 vectors over the parameter viewed as ``[shape[0], numel // shape[0]]``
(a 1-D parameter is viewed as ``[numel, 1]``, so ``row`` is then per element). ``lr_mult`` and
``grad_mult`` are 0-d fp32 tensors on the parameter's device, so no device-to-host sync is needed.

On CUDA, 16-bit parameters go through one Triton kernel that reads the parameter and the gradient
once and writes the parameter once; elsewhere (and for fp32) plain torch ops run over row chunks,
so the fp32 temporaries of a large matrix (an embedding, say) stay small.
"""
from __future__ import annotations

import functools
import warnings

import torch

__all__ = ["apply_update_", "apply_updates_", "batchable", "device_table", "stochastic_round", "as_matrix", "CHUNK_ELEMENTS"]

# Largest slice of a parameter processed at once on the torch path (fp32 temporaries of 64 MiB).
CHUNK_ELEMENTS = 1 << 24

_LOW_PRECISION = (torch.bfloat16, torch.float16)


def as_matrix(t: torch.Tensor) -> torch.Tensor:
    """View ``t`` as ``[shape[0], numel // shape[0]]`` (1-D: ``[numel, 1]``); ``t`` must be contiguous."""
    if t.dim() <= 1:
        return t.view(-1, 1)
    return t.view(t.shape[0], -1)


def stochastic_round(x: torch.Tensor, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """Round an fp32 tensor to ``dtype`` (bf16 or fp16) stochastically; ``x`` may be overwritten.

    The result is one of the two neighbours of each value, the upper one with probability equal
    to the value's distance from the lower one, so ``E[round(x)] = x``.
    """
    if dtype == torch.bfloat16:
        # bf16 is the top half of an fp32 bit pattern: add 16 random low bits, then truncate.
        noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
        bits = x.view(torch.int32)
        bits.add_(noise).bitwise_and_(-(1 << 16))
        return x.to(torch.bfloat16)
    if dtype == torch.float16:
        nearest = x.to(torch.float16)
        toward_zero = torch.where(nearest.float().abs() > x.abs(),
                                  torch.nextafter(nearest, torch.zeros_like(nearest)), nearest)
        outward = torch.where(x >= 0, torch.full_like(nearest, float("inf")),
                              torch.full_like(nearest, float("-inf")))
        away = torch.nextafter(toward_zero, outward)
        low = toward_zero.float()
        frac = (x - low) / (away.float() - low)
        draw = torch.rand(x.shape, device=x.device, generator=generator)
        return torch.where(draw < frac, away, toward_zero)
    raise TypeError(f"stochastic_round supports bfloat16 and float16, not {dtype}")


def apply_update_(
    param: torch.Tensor,
    grad: torch.Tensor,
    *,
    lr: float,
    weight_decay: float = 0.0,
    grad_scale: float = 1.0,
    lr_mult: torch.Tensor | None = None,
    grad_mult: torch.Tensor | None = None,
    row: torch.Tensor | None = None,
    col: torch.Tensor | None = None,
    stochastic_rounding: bool = True,
    seed: int = 0,
    sq_out: torch.Tensor | None = None,
) -> None:
    """Apply ``param ← param·(1 − step·wd) − step·u`` in place (see the module docstring).

    ``sq_out`` (a 0-d fp32 tensor on the parameter's device), if given, gets the raw gradient's
    squared L2 norm added to it (inside the update kernel where possible).
    """
    if not param.is_contiguous():
        # Rare (transposed parameters): update a contiguous copy, then write it back.
        work = param.contiguous()
        apply_update_(work, grad, lr=lr, weight_decay=weight_decay, grad_scale=grad_scale,
                      lr_mult=lr_mult, grad_mult=grad_mult, row=row, col=col,
                      stochastic_rounding=stochastic_rounding, seed=seed, sq_out=sq_out)
        param.copy_(work)
        return
    grad = grad.contiguous()
    if param.is_cuda and param.dtype in _LOW_PRECISION and _triton_kernels() is not None:
        try:
            _apply_triton(param, grad, lr, weight_decay, grad_scale, lr_mult, grad_mult, row, col,
                          stochastic_rounding, seed, sq_out if col is None else None)
            if sq_out is not None and col is not None:
                sq_out.add_(torch.linalg.vector_norm(grad, dtype=torch.float32).square())
            return
        except Exception as exc:  # a broken Triton install must not stop training
            warnings.warn(f"Triton update kernel failed ({exc}); falling back to torch ops.", stacklevel=2)
            _triton_kernels.cache_clear()
            _disable_triton()
    if sq_out is not None:
        sq_out.add_(torch.linalg.vector_norm(grad, dtype=torch.float32).square())
    _apply_torch(param, grad, lr, weight_decay, grad_scale, lr_mult, grad_mult, row, col,
                 stochastic_rounding, seed)


def batchable(param: torch.Tensor, grad: torch.Tensor) -> bool:
    """Whether :func:`apply_updates_` can take this pair (16-bit CUDA tensors of one dtype, Triton present)."""
    return (param.is_cuda and param.dtype in _LOW_PRECISION and grad.dtype == param.dtype
            and param.is_contiguous() and grad.is_contiguous() and _triton_kernels() is not None)


_MULTI_BLOCK = 2048


def apply_updates_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    seeds: list[int],
    *,
    lr: float,
    weight_decay: float = 0.0,
    grad_scale: float = 1.0,
    stochastic_rounding: bool = True,
    sq_out: torch.Tensor | None = None,
) -> None:
    """:func:`apply_update_` (plain LOMO form) for many :func:`batchable` tensors of one dtype and device
    in a single kernel launch; bit-identical to updating them one by one with the same seeds. Raises
    if the kernel fails (the optimizer then falls back to one-by-one updates).

    One launch instead of one per parameter matters because the update runs inside backward, where
    every launch's host time delays the backward kernels behind it.
    """
    kernels = _triton_kernels()
    dtype = params[0].dtype
    rounding = kernels.ROUND_NEAREST
    if stochastic_rounding:
        rounding = kernels.ROUND_STOCHASTIC_BF16 if dtype == torch.bfloat16 else kernels.ROUND_STOCHASTIC_FP16
    rows, first = [], 0
    for p, g, seed in zip(params, grads, seeds):
        rows += [p.data_ptr(), g.data_ptr(), p.numel(), int(seed) & 0x7FFFFFFF, first]
        first += -(-p.numel() // _MULTI_BLOCK)
    table = device_table(rows, torch.int64, params[0].device)
    kernels.multi_flat_update_kernel[(first,)](
        table, sq_out if sq_out is not None else table, len(params), float(lr), float(weight_decay),
        float(grad_scale), DTYPE=kernels.TL_DTYPES[dtype], HAS_SQ=sq_out is not None, ROUNDING=rounding,
        BLOCK=_MULTI_BLOCK)


def device_table(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``values`` as a tensor on ``device``; copied from pinned memory so the host does not wait."""
    return torch.tensor(values, dtype=dtype, pin_memory=device.type == "cuda").to(device, non_blocking=True)


# ----------------------------------------------------------------------------- torch path

_generators: dict[torch.device, torch.Generator] = {}


def _generator(device: torch.device, seed: int) -> torch.Generator:
    gen = _generators.get(device)
    if gen is None:
        gen = _generators[device] = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def _apply_torch(param, grad, lr, weight_decay, grad_scale, lr_mult, grad_mult, row, col,
                 stochastic_rounding, seed):
    step = lr if lr_mult is None else lr_mult * lr          # float or 0-d tensor
    decay = None if weight_decay == 0 else 1 - step * weight_decay
    p2, g2 = as_matrix(param), as_matrix(grad)
    n_rows, n_cols = p2.shape
    rows_per_chunk = max(1, CHUNK_ELEMENTS // max(n_cols, 1))
    low_precision = param.dtype in _LOW_PRECISION
    gen = _generator(param.device, seed) if (low_precision and stochastic_rounding) else None
    plain = row is None and col is None and grad_mult is None and lr_mult is None
    for start in range(0, n_rows, rows_per_chunk):
        sl = slice(start, min(start + rows_per_chunk, n_rows))
        p_c, g_c = p2[sl], g2[sl]
        work = p_c.float() if low_precision else p_c       # fp32 params are updated in place
        if decay is not None:
            work.mul_(decay)
        if plain:
            work.add_(g_c.float() if low_precision else g_c, alpha=-(lr * grad_scale))
        else:
            u = torch.mul(g_c, grad_scale) if g_c.dtype == torch.float32 else g_c.float().mul_(grad_scale)
            if row is not None:
                u.mul_(row[sl].unsqueeze(1))
            if col is not None:
                u.mul_(col)
            if grad_mult is not None:
                u.mul_(grad_mult)
            work.sub_(u.mul_(step))
        if low_precision:
            p_c.copy_(stochastic_round(work, param.dtype, gen) if gen is not None else work)


# ----------------------------------------------------------------------------- Triton path

_TRITON_DISABLED = False


def _disable_triton() -> None:
    global _TRITON_DISABLED
    _TRITON_DISABLED = True


@functools.lru_cache(maxsize=1)
def _triton_kernels():
    """The Triton kernels module, or ``None`` where Triton is missing or was disabled after a failure."""
    if _TRITON_DISABLED:
        return None
    try:
        from . import _triton_update
    except ImportError:
        return None
    return _triton_update


def _apply_triton(param, grad, lr, weight_decay, grad_scale, lr_mult, grad_mult, row, col,
                  stochastic_rounding, seed, sq_out=None):
    kernels = _triton_kernels()
    rounding = kernels.ROUND_NEAREST
    if stochastic_rounding:
        rounding = (kernels.ROUND_STOCHASTIC_BF16 if param.dtype == torch.bfloat16
                    else kernels.ROUND_STOCHASTIC_FP16)
    dummy = param  # any pointer for absent optional operands (never read)
    common = dict(HAS_LR_MULT=lr_mult is not None, HAS_GRAD_MULT=grad_mult is not None, ROUNDING=rounding)
    scalars = (float(lr), float(weight_decay), float(grad_scale), int(seed) & 0x7FFFFFFF)
    lr_mult_arg = lr_mult if lr_mult is not None else dummy
    grad_mult_arg = grad_mult if grad_mult is not None else dummy
    if col is None:
        numel = param.numel()
        block = 2048
        kernels.flat_update_kernel[(-(-numel // block),)](
            param, grad, row if row is not None else dummy, lr_mult_arg, grad_mult_arg,
            sq_out if sq_out is not None else dummy, numel,
            *scalars, HAS_VEC=row is not None, HAS_SQ=sq_out is not None, BLOCK=block, **common)
        return
    n_rows, n_cols = as_matrix(param).shape
    if row is None:
        row = torch.ones(n_rows, device=param.device, dtype=torch.float32)
    block_r, block_c = 16, 256
    grid = (-(-n_rows // block_r), -(-n_cols // block_c))
    kernels.tiled_update_kernel[grid](param, grad, row, col, lr_mult_arg, grad_mult_arg, n_rows, n_cols,
                                      *scalars, BLOCK_R=block_r, BLOCK_C=block_c, **common)
