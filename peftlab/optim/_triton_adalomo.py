"""Triton kernels for batched AdaLomo updates (see ``batched_adalomo``).

A batch holds several 16-bit tensors of one dtype. Each is viewed as a matrix ``[R, C]``
(``as_matrix``; a vector is viewed as ``[1, n]`` so that its per-element second moment is the
"column" statistic). One int64 table row per tensor gives its addresses, sizes, offsets into one
fp32 workspace and the first program of each kernel's grid; one fp32 entry gives its beta.
Every reduction is done in a fixed order, without atomics: replicas that see the same gradients
compute the same bits.

Kernels, in launch order:

1. ``stats``    per block of BR rows: row sums of g², the block's column sums of g², Σ p².
2. ``colsum``   per block of columns: the column sums, adding the row blocks' partial sums.
3. ``factors``  per tensor: the moment updates and the row/column factors of 1/√V.
4. ``weighted`` per block of BR rows: Σ u² of those rows (u = g / √V).
5. ``scalars``  per tensor: update-clipping multiplier and relative step size.
6. ``update``   per tile: the parameter update with stochastic rounding.
"""
import triton
import triton.language as tl

from ._triton_update import _finish, tensor_of

# Columns of the int64 table (workspace columns are offsets into the fp32 workspace).
COLUMNS = ("p", "g", "rows", "cols", "state_a", "state_b", "rowsum", "colpart", "colsum", "rowf", "colf",
           "ppart", "upart", "scalars", "first_row_block", "first_col_block", "first_tile", "factored", "seed")
NCOL = tl.constexpr(len(COLUMNS))
(P, G, ROWS, COLS, STATE_A, STATE_B, ROWSUM, COLPART, COLSUM, ROWF, COLF, PPART, UPART, SCALARS,
 FIRST_RB, FIRST_CB, FIRST_TILE, FACTORED, SEED) = (tl.constexpr(i) for i in range(len(COLUMNS)))
BR = tl.constexpr(16)   # rows per block (stats, weighted, update)
BC = tl.constexpr(256)  # columns per step or tile
SUM_COLS = tl.constexpr(64)        # columns per colsum program
SUM_ROW_BLOCKS = tl.constexpr(32)  # row blocks colsum adds per step


@triton.jit
def _tensor_row(table_ptr, pid, n_tensors, FIRST: tl.constexpr, DTYPE: tl.constexpr):
    """Table row of the tensor that program ``pid`` works on (grid column FIRST), its parameter and
    gradient pointers, its row and column counts, and ``pid``'s index among that tensor's programs."""
    row = table_ptr + tensor_of(table_ptr, pid, n_tensors, NCOL, FIRST) * NCOL
    p_ptr = tl.load(row + P).to(tl.pointer_type(DTYPE))
    g_ptr = tl.load(row + G).to(tl.pointer_type(DTYPE))
    return row, p_ptr, g_ptr, tl.load(row + ROWS), tl.load(row + COLS), pid - tl.load(row + FIRST)


@triton.jit
def stats_kernel(table_ptr, ws_ptr, n_tensors, DTYPE: tl.constexpr):
    row, p_ptr, g_ptr, n_rows, n_cols, rb = _tensor_row(table_ptr, tl.program_id(0), n_tensors, FIRST_RB, DTYPE)
    rows = rb * BR + tl.arange(0, BR)
    row_mask = rows < n_rows
    acc_g = tl.zeros((BR,), tl.float32)
    acc_p = tl.zeros((BR, BC), tl.float32)
    colpart = ws_ptr + tl.load(row + COLPART) + rb * n_cols
    for c0 in range(0, n_cols, BC):
        cols = c0 + tl.arange(0, BC)
        mask = row_mask[:, None] & (cols < n_cols)[None, :]
        offs = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        sq = g * g
        acc_g += tl.sum(sq, axis=1)
        acc_p += p * p
        tl.store(colpart + cols, tl.sum(sq, axis=0), mask=cols < n_cols)
    tl.store(ws_ptr + tl.load(row + ROWSUM) + rows, acc_g, mask=row_mask)
    tl.store(ws_ptr + tl.load(row + PPART) + rb, tl.sum(tl.sum(acc_p, axis=1), axis=0))


@triton.jit
def colsum_kernel(table_ptr, ws_ptr, n_tensors):
    # Many row blocks per step: each step's loads are independent, so the loop is not latency-bound.
    pid = tl.program_id(0)
    row = table_ptr + tensor_of(table_ptr, pid, n_tensors, NCOL, FIRST_CB) * NCOL
    n_rows = tl.load(row + ROWS)
    n_cols = tl.load(row + COLS)
    cols = (pid - tl.load(row + FIRST_CB)) * SUM_COLS + tl.arange(0, SUM_COLS)
    col_mask = cols < n_cols
    colpart = ws_ptr + tl.load(row + COLPART)
    acc = tl.zeros((SUM_ROW_BLOCKS, SUM_COLS), tl.float32)
    n_rb = tl.cdiv(n_rows, BR)
    for rb0 in range(0, n_rb, SUM_ROW_BLOCKS):
        rb = rb0 + tl.arange(0, SUM_ROW_BLOCKS)
        mask = (rb < n_rb)[:, None] & col_mask[None, :]
        acc += tl.load(colpart + rb.to(tl.int64)[:, None] * n_cols + cols[None, :], mask=mask, other=0.0)
    tl.store(ws_ptr + tl.load(row + COLSUM) + cols, tl.sum(acc, axis=0), mask=col_mask)


@triton.jit
def factors_kernel(table_ptr, beta_ptr, ws_ptr, sq_ptr, grad_scale_sq, eps1,
                   HAS_SQ: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0)
    row = table_ptr + t * NCOL
    beta = tl.load(beta_ptr + t)
    n_rows = tl.load(row + ROWS)
    n_cols = tl.load(row + COLS)
    state_a = tl.load(row + STATE_A).to(tl.pointer_type(tl.float32))
    rowsum = ws_ptr + tl.load(row + ROWSUM)
    colsum = ws_ptr + tl.load(row + COLSUM)
    rowf = ws_ptr + tl.load(row + ROWF)
    colf = ws_ptr + tl.load(row + COLF)
    raw = tl.zeros((BLOCK,), tl.float32)
    if tl.load(row + FACTORED) != 0:  # factored: r over rows, c over columns, V = r cᵀ / mean(r)
        state_b = tl.load(row + STATE_B).to(tl.pointer_type(tl.float32))
        total = tl.zeros((BLOCK,), tl.float32)
        for i0 in range(0, n_rows, BLOCK):
            i = i0 + tl.arange(0, BLOCK)
            m = i < n_rows
            s = tl.load(rowsum + i, mask=m, other=0.0)
            raw += s
            r = beta * tl.load(state_a + i, mask=m, other=0.0) + (1.0 - beta) * (s * grad_scale_sq / n_cols + eps1)
            tl.store(state_a + i, r, mask=m)
            total += tl.where(m, r, 0.0)
        mean = tl.sum(total, axis=0) / n_rows
        for i0 in range(0, n_rows, BLOCK):
            i = i0 + tl.arange(0, BLOCK)
            m = i < n_rows
            tl.store(rowf + i, tl.rsqrt(tl.load(state_a + i, mask=m, other=1.0) / mean), mask=m)
        for j0 in range(0, n_cols, BLOCK):
            j = j0 + tl.arange(0, BLOCK)
            m = j < n_cols
            s = tl.load(colsum + j, mask=m, other=0.0)
            c = beta * tl.load(state_b + j, mask=m, other=0.0) + (1.0 - beta) * (s * grad_scale_sq / n_rows + eps1)
            tl.store(state_b + j, c, mask=m)
            tl.store(colf + j, tl.rsqrt(c), mask=m)
    else:  # a vector [1, n]: its own second moment per element
        for j0 in range(0, n_cols, BLOCK):
            j = j0 + tl.arange(0, BLOCK)
            m = j < n_cols
            s = tl.load(colsum + j, mask=m, other=0.0)
            raw += s
            v = beta * tl.load(state_a + j, mask=m, other=0.0) + (1.0 - beta) * (s * grad_scale_sq + eps1)
            tl.store(state_a + j, v, mask=m)
            tl.store(colf + j, tl.rsqrt(v), mask=m)
        tl.store(rowf, 1.0)
    if HAS_SQ:
        tl.atomic_add(sq_ptr, tl.sum(raw, axis=0))


@triton.jit
def weighted_kernel(table_ptr, ws_ptr, n_tensors, DTYPE: tl.constexpr):
    row, _, g_ptr, n_rows, n_cols, rb = _tensor_row(table_ptr, tl.program_id(0), n_tensors, FIRST_RB, DTYPE)
    rows = rb * BR + tl.arange(0, BR)
    row_mask = rows < n_rows
    colf = ws_ptr + tl.load(row + COLF)
    acc = tl.zeros((BR, BC), tl.float32)
    for c0 in range(0, n_cols, BC):
        cols = c0 + tl.arange(0, BC)
        cmask = cols < n_cols
        mask = row_mask[:, None] & cmask[None, :]
        g = tl.load(g_ptr + rows.to(tl.int64)[:, None] * n_cols + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        cf = tl.load(colf + cols, mask=cmask, other=0.0)
        acc += g * g * (cf * cf)[None, :]
    rf = tl.load(ws_ptr + tl.load(row + ROWF) + rows, mask=row_mask, other=0.0)
    tl.store(ws_ptr + tl.load(row + UPART) + rb, tl.sum(tl.sum(acc, axis=1) * rf * rf, axis=0))


@triton.jit
def scalars_kernel(table_ptr, ws_ptr, grad_scale_sq, clip_threshold, eps2, BLOCK: tl.constexpr):
    t = tl.program_id(0)
    row = table_ptr + t * NCOL
    n_rb = tl.cdiv(tl.load(row + ROWS), BR)
    numel = (tl.load(row + ROWS) * tl.load(row + COLS)).to(tl.float32)
    ppart = ws_ptr + tl.load(row + PPART)
    upart = ws_ptr + tl.load(row + UPART)
    sum_p = tl.zeros((BLOCK,), tl.float32)
    sum_u = tl.zeros((BLOCK,), tl.float32)
    for b0 in range(0, n_rb, BLOCK):
        b = b0 + tl.arange(0, BLOCK)
        m = b < n_rb
        sum_p += tl.load(ppart + b, mask=m, other=0.0)
        sum_u += tl.load(upart + b, mask=m, other=0.0)
    rms_u = tl.sqrt(tl.sum(sum_u, axis=0) * grad_scale_sq / numel)
    scal = ws_ptr + tl.load(row + SCALARS)
    tl.store(scal, 1.0 / tl.maximum(rms_u / clip_threshold, 1.0))                      # grad multiplier
    tl.store(scal + 1, tl.maximum(tl.sqrt(tl.sum(sum_p, axis=0) / numel), eps2))      # relative step size


@triton.jit
def update_kernel(table_ptr, ws_ptr, n_tensors, lr, weight_decay, grad_scale,
                  DTYPE: tl.constexpr, ROUNDING: tl.constexpr):
    row, p_ptr, g_ptr, n_rows, n_cols, local = _tensor_row(table_ptr, tl.program_id(0), n_tensors, FIRST_TILE, DTYPE)
    col_blocks = tl.cdiv(n_cols, BC)
    rows = (local // col_blocks) * BR + tl.arange(0, BR)
    cols = (local % col_blocks) * BC + tl.arange(0, BC)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    offs = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    rf = tl.load(ws_ptr + tl.load(row + ROWF) + rows, mask=rows < n_rows, other=0.0)
    cf = tl.load(ws_ptr + tl.load(row + COLF) + cols, mask=cols < n_cols, other=0.0)
    scal = ws_ptr + tl.load(row + SCALARS)
    u = g * (grad_scale * tl.load(scal)) * rf[:, None] * cf[None, :]
    seed = tl.load(row + SEED).to(tl.int32)
    new = _finish(p, u, lr * tl.load(scal + 1), weight_decay, seed, offs.to(tl.int32), ROUNDING)
    tl.store(p_ptr + offs, new.to(DTYPE), mask=mask)
