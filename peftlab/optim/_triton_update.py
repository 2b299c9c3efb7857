"""Triton kernels behind ``fused_update.apply_update_`` for 16-bit CUDA parameters.

Each reads the parameter and its gradient once and writes the parameter once (6 bytes per bf16
element); the fp32 arithmetic and the stochastic rounding happen in registers. The rounding noise is
a murmur3-style hash of (seed, element offset): a handful of integer operations per element, where
Philox (``tl.randint``) costs about a hundred, which on a 1B-parameter model is several
milliseconds of a training step.
"""
import torch
import triton
import triton.language as tl

ROUND_NEAREST, ROUND_STOCHASTIC_BF16, ROUND_STOCHASTIC_FP16 = 0, 1, 2
TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _noise(seed, offs):
    """32 well-mixed random bits per element offset, determined by ``seed`` (murmur3's finaliser)."""
    h = offs.to(tl.uint32) * 0x9E3779B1 + seed.to(tl.uint32)
    h ^= h >> 16
    h *= 0x85EBCA6B
    h ^= h >> 13
    h *= 0xC2B2AE35
    h ^= h >> 16
    return h


@triton.jit
def _finish(p, u, step, weight_decay, seed, rand_offs, ROUNDING: tl.constexpr):
    new = p * (1.0 - step * weight_decay) - step * u
    if ROUNDING == 1:
        # bf16 is the top half of an fp32 bit pattern: add 16 random low bits, then truncate.
        noise = (_noise(seed, rand_offs) & 0xFFFF).to(tl.int32)
        bits = (new.to(tl.int32, bitcast=True) + noise) & -65536
        return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)
    elif ROUNDING == 2:
        # fp16: round toward zero, then step one ulp outward with probability = the remainder.
        low = new.to(tl.float16, fp_downcast_rounding="rtz")
        away = (low.to(tl.int16, bitcast=True) + 1).to(tl.float16, bitcast=True)
        low32 = low.to(tl.float32)
        frac = (new - low32) / (away.to(tl.float32) - low32)
        uniform = (_noise(seed, rand_offs) >> 8).to(tl.float32) * (1.0 / 16777216.0)
        return tl.where(uniform < frac, away, low)
    else:
        return new


@triton.jit
def _load_flat(p_ptr, g_ptr, offs, mask, sq_ptr, HAS_SQ: tl.constexpr):
    """fp32 parameter and gradient at ``offs``; with HAS_SQ the gradient's Σg² is added to ``sq_ptr``."""
    p = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_SQ:
        tl.atomic_add(sq_ptr, tl.sum(g * g, axis=0))
    return p, g


@triton.jit
def tensor_of(table_ptr, pid, n_tensors, NCOL: tl.constexpr, FIRST: tl.constexpr):
    """Row of a batch table (NCOL int64 columns per tensor) whose tensor's programs, starting at
    column FIRST, include program ``pid``."""
    t = 0
    for i in range(1, n_tensors):
        t = tl.where(pid >= tl.load(table_ptr + i * NCOL + FIRST), i, t)
    return t


@triton.jit
def flat_update_kernel(p_ptr, g_ptr, vec_ptr, lr_mult_ptr, grad_mult_ptr, sq_ptr, numel,
                       lr, weight_decay, grad_scale, seed,
                       HAS_VEC: tl.constexpr, HAS_LR_MULT: tl.constexpr, HAS_GRAD_MULT: tl.constexpr,
                       HAS_SQ: tl.constexpr, ROUNDING: tl.constexpr, BLOCK: tl.constexpr):
    """Element-wise update; ``vec`` (optional) scales each element's gradient. With ``HAS_SQ`` the raw
    gradient's sum of squares is also added to ``sq_ptr`` (one atomic per block), so tracking the
    gradient norm costs no extra pass or launch."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    p, g = _load_flat(p_ptr, g_ptr, offs, mask, sq_ptr, HAS_SQ)
    u = g * grad_scale
    if HAS_VEC:
        u = u * tl.load(vec_ptr + offs, mask=mask, other=0.0)
    if HAS_GRAD_MULT:
        u = u * tl.load(grad_mult_ptr)
    step = lr
    if HAS_LR_MULT:
        step = step * tl.load(lr_mult_ptr)
    new = _finish(p, u, step, weight_decay, seed, offs.to(tl.int32), ROUNDING)
    tl.store(p_ptr + offs, new.to(p_ptr.dtype.element_ty), mask=mask)


@triton.jit
def tiled_update_kernel(p_ptr, g_ptr, row_ptr, col_ptr, lr_mult_ptr, grad_mult_ptr, n_rows, n_cols,
                        lr, weight_decay, grad_scale, seed,
                        HAS_LR_MULT: tl.constexpr, HAS_GRAD_MULT: tl.constexpr,
                        ROUNDING: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Update of a ``[n_rows, n_cols]`` matrix whose gradient is scaled by ``row[i] * col[j]``."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    offs = rows[:, None] * n_cols + cols[None, :]
    p = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
    u = tl.load(g_ptr + offs, mask=mask).to(tl.float32) * grad_scale
    r = tl.load(row_ptr + rows, mask=rows < n_rows, other=0.0)
    c = tl.load(col_ptr + cols, mask=cols < n_cols, other=0.0)
    u = u * r[:, None] * c[None, :]
    if HAS_GRAD_MULT:
        u = u * tl.load(grad_mult_ptr)
    step = lr
    if HAS_LR_MULT:
        step = step * tl.load(lr_mult_ptr)
    new = _finish(p, u, step, weight_decay, seed, offs.to(tl.int32), ROUNDING)
    tl.store(p_ptr + offs, new.to(p_ptr.dtype.element_ty), mask=mask)


@triton.jit
def multi_flat_update_kernel(table_ptr, sq_ptr, n_tensors, lr, weight_decay, grad_scale,
                             DTYPE: tl.constexpr, HAS_SQ: tl.constexpr, ROUNDING: tl.constexpr,
                             BLOCK: tl.constexpr):
    """``flat_update_kernel`` over several tensors of one dtype in one launch.

    ``table`` holds one int64 row per tensor: parameter address, gradient address, numel, seed and
    the first program of that tensor. Each program finds its tensor, then updates BLOCK elements of
    it exactly as the single-tensor kernel would (same noise, so the result is bit-identical).
    """
    pid = tl.program_id(0)
    row = table_ptr + tensor_of(table_ptr, pid, n_tensors, 5, 4) * 5
    p_ptr = tl.load(row).to(tl.pointer_type(DTYPE))
    g_ptr = tl.load(row + 1).to(tl.pointer_type(DTYPE))
    seed = tl.load(row + 3).to(tl.int32)
    offs = (pid - tl.load(row + 4)) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < tl.load(row + 2)
    p, g = _load_flat(p_ptr, g_ptr, offs, mask, sq_ptr, HAS_SQ)
    new = _finish(p, g * grad_scale, lr, weight_decay, seed, offs.to(tl.int32), ROUNDING)
    tl.store(p_ptr + offs, new.to(DTYPE), mask=mask)
