"""AdaLomo updates of many 16-bit CUDA tensors in six kernel launches (instead of ~30 per tensor).

Same arithmetic as ``AdaLomo._update`` (see its docstring for the formulas), up to fp32 rounding
of the reductions; the stochastic-rounding noise is the same element for element. The kernels
live in ``_triton_adalomo``.
"""
from __future__ import annotations

import torch

from . import _triton_adalomo as K
from ._triton_update import (
    ROUND_NEAREST,
    ROUND_STOCHASTIC_BF16,
    ROUND_STOCHASTIC_FP16,
    TL_DTYPES,
)
from .fused_update import device_table


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def adalomo_updates_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    states: list[dict],
    seeds: list[int],
    betas: list[float],
    *,
    lr: float,
    weight_decay: float,
    eps: tuple[float, float],
    clip_threshold: float,
    grad_scale: float = 1.0,
    stochastic_rounding: bool = True,
    sq_out: torch.Tensor | None = None,
) -> None:
    """Apply one AdaLomo step to each ``params[i]`` from ``grads[i]`` (all :func:`fused_update.batchable`,
    one dtype and device), creating and updating the moment tensors in ``states[i]``.

    ``betas[i]`` is that parameter's ``1 - step ** decay_rate``. ``sq_out`` gets the raw gradients'
    squared norm added.
    """
    device, dtype = params[0].device, params[0].dtype
    rows, used = [], 0
    first_rb = first_cb = first_tile = 0

    def take(n: int) -> int:
        nonlocal used
        used += n
        return used - n

    for p, g, state, seed in zip(params, grads, states, seeds):
        factored = p.dim() >= 2
        n_rows, n_cols = (p.shape[0], p.numel() // p.shape[0]) if factored else (1, p.numel())
        if factored:
            if "exp_avg_sq_row" not in state:
                state["exp_avg_sq_row"] = torch.zeros(n_rows, dtype=torch.float32, device=device)
                state["exp_avg_sq_col"] = torch.zeros(n_cols, dtype=torch.float32, device=device)
            state_a, state_b = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
        else:
            if "exp_avg_sq" not in state:
                state["exp_avg_sq"] = torch.zeros(n_cols, dtype=torch.float32, device=device)
            state_a = state_b = state["exp_avg_sq"]
        row_blocks, col_blocks = _cdiv(n_rows, K.BR.value), _cdiv(n_cols, K.BC.value)
        sum_blocks = _cdiv(n_cols, K.SUM_COLS.value)
        rows += [p.data_ptr(), g.data_ptr(), n_rows, n_cols, state_a.data_ptr(), state_b.data_ptr(),
                 take(n_rows), take(row_blocks * n_cols), take(n_cols), take(n_rows), take(n_cols),
                 take(row_blocks), take(row_blocks), take(2), first_rb, first_cb, first_tile, int(factored),
                 int(seed) & 0x7FFFFFFF]
        first_rb += row_blocks
        first_cb += sum_blocks
        first_tile += row_blocks * col_blocks
    table = device_table(rows, torch.int64, device)
    beta = device_table(betas, torch.float32, device)
    ws = torch.empty(used, dtype=torch.float32, device=device)
    n, tl_dtype = len(params), TL_DTYPES[dtype]
    scale_sq = float(grad_scale) ** 2
    rounding = ROUND_NEAREST
    if stochastic_rounding:
        rounding = ROUND_STOCHASTIC_BF16 if dtype == torch.bfloat16 else ROUND_STOCHASTIC_FP16
    K.stats_kernel[(first_rb,)](table, ws, n, DTYPE=tl_dtype)
    K.colsum_kernel[(first_cb,)](table, ws, n)
    K.factors_kernel[(n,)](table, beta, ws, sq_out if sq_out is not None else ws, scale_sq, float(eps[0]),
                           HAS_SQ=sq_out is not None, BLOCK=1024)
    K.weighted_kernel[(first_rb,)](table, ws, n, DTYPE=tl_dtype)
    K.scalars_kernel[(n,)](table, ws, scale_sq, float(clip_threshold), float(eps[1]), BLOCK=1024)
    K.update_kernel[(first_tile,)](table, ws, n, float(lr), float(weight_decay), float(grad_scale),
                                   DTYPE=tl_dtype, ROUNDING=rounding)
