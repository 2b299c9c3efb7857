"""Which kernel and which tile sizes each NF4 matmul uses, chosen from measurements.

``FORWARD`` and ``BACKWARD`` hold, for each weight shape ``(N, K)`` and number of activation rows
``M`` that ``python benchmarks/kernels.py --sweep`` measured on an H100 (bf16, blocksize 64, double
quantization), the fastest kernel and config. Other shapes use the nearest measured shape (in log N,
log K) and other M the nearest measured M that the entry's kernel can take (in log M, ties going to
the larger M). Sources: the full sweep ``benchmarks/results/kernels-sweep-h100.json`` (its
candidates) for most rows; ``kernels-mma-depth-h100.json`` for the ``mma`` rows of 1-4 rows
(candidates in alternating rounds, every call reading its weight from HBM; earlier alternating files
timed one weight that stayed in L2 and are superseded); ``kernels-mma-h100.json`` for the other
``mma`` rows; ``kernels-overlap-h100.json`` and ``kernels-overlap-priority-h100.json`` for the
``overlap`` entries at M=4096; ``kernels-skinny-trials-h100.json`` and ``kernels-mma-m1-h100.json``
(``--sweep --kinds mma --ms 1``; both alternating rounds from HBM, 3 rounds) for the rows whose
comments name them, and ``kernels-rows8-h100.json`` (8-row programs against the plan of the time,
alternating rounds from HBM, 3 rounds; ``kernels-rows8b-h100.json`` the same at 2-8 rows) and
``kernels-steady-lab-h100.json`` (the unmasked steady loop against the masked one, the same way) and
``kernels-late-scale-h100.json`` (block scales applied after the mma against the plan of the time,
two runs of 3 and 5 alternating rounds from HBM) and ``kernels-l2-hint-h100.json`` (weight loads
with the L2 prefetch-size hint against the plan, the same way) and ``kernels-occupancy-h100.json``
(more warps per program and register caps against the plan, the same way) and
``kernels-unroll-h100.json`` (the masked loop unrolled by two against the plan, two runs of 5
alternating rounds from HBM) and ``kernels-scale-ahead-h100.json`` (block scales decoded a step
ahead against the plan, the same way) and ``kernels-tiled-h100.json`` (the weight's bytes in tiles,
as an ``NF4Linear`` holds them on the GPU: the plans against row-major bytes and every distinct
skinny plan against each other, the same way) and ``kernels-balance-h100.json`` (balanced grids
against the plan, alternating rounds of steady windows from HBM) and ``kernels-gpu-plans.json`` (every
distinct skinny plan against the shipped one on an H100 and an H200, the same way; it also chose the
H200's entries of ``GPU_FORWARD``) for the rows that name them. The measured shapes
all fit in tiles, so their ``mma`` rows are measured on tiled weights. Kinds: ``gemv1`` (persistent
one-row GEMV), ``gemv`` (CUDA-core GEMV), ``mma`` (``skinny``: up to 16 rows, the weight decoded in
registers, or with ``TABLE`` through a shared pair table, for tensor-core ``mma.sync``; ``DEPTH``
segments fetched ahead, activations at use unless ``X_AHEAD``, block scales from a per-program
shared table with ``SHARED_SCALES``, ``rows=8`` for programs of 8 weight rows, twice as many,
``steady`` for no masks where segments are whole, ``late`` for block scales applied to the mma's
fp32 partials, ``hint`` for weight loads that fill 256 bytes of L2 per miss, ``maxnreg`` for a cap
on registers per thread, ``unroll`` for masked steps per loop iteration, ``scale_ahead`` for block
scales decoded one step before their segment, ``balance`` for the last row groups split along K where
one program per row group would leave some SMs a program more than the rest), ``fused`` (dequantize tiles into ``tl.dot``),
``chunked`` (dequantize into a scratch buffer + cuBLAS; the value is the chunk size in elements,
``None`` for the whole weight at once), ``overlap`` (chunks as ``chunked``, the next one dequantized
on a side stream during the current GEMM). The comments give the measured time, for some rows
against the config it replaced in the same run.
"""
from __future__ import annotations

import functools
import math

import torch


def _mma(warps: int, split: int, table: bool = False, depth: int = 1, x_ahead: bool = True,
         shared_scales: bool = False, rows: int = 16, steady: bool = False, late: bool = False,
         hint: bool = False, maxnreg: int | None = None, unroll: int = 1, scale_ahead: bool = False,
         balance: bool = False) -> dict:
    return {"SPLIT": split, "num_warps": warps, "TABLE": table, "DEPTH": depth, "X_AHEAD": x_ahead,
            "SHARED_SCALES": shared_scales, "ROWS": rows, "STEADY": steady, "LATE_SCALE": late, "L2_HINT": hint,
            "MAXNREG": maxnreg, "UNROLL": unroll, "SCALE_AHEAD": scale_ahead, "BALANCE": balance}


DEQUANT_CONFIG = {"elems_per_program": 2048, "num_warps": 4, "flat_block": 1024}

# 688 programs of 4 warps, each walking half the segments one of 2 warps did; 72 registers keep 6
# programs per SM, so all run in one wave; scales decoded a step ahead and activations at use (with
# activations ahead: 15.4 us); in tiles 13.6-13.8 us against 14.3-14.4 row-major (kernels-tiled, 3
# runs), where the L2 hint no longer pays (13.65-13.75 us without it against 13.71-13.82); 688
# programs leave 28 SMs a sixth: balanced, 12.81 us against 13.52 (kernels-balance, steady windows)
_M1_11008 = _mma(4, 1, table=True, x_ahead=False, maxnreg=72, scale_ahead=True, balance=True)

FORWARD = {
    (4096, 4096): {
        1: ('mma', _mma(4, 1, table=True, depth=2, x_ahead=False, rows=8, late=True)),  # 8.1 us vs 8.4 (kernels-tiled, 2 runs)
        2: ('mma', _mma(4, 1, table=True, depth=2, x_ahead=False, rows=8, late=True)),  # 8.1-8.2 us vs 8.5-8.6 (kernels-tiled, 2 runs)
        4: ('mma', _mma(4, 1, table=True, depth=2, x_ahead=False, rows=8, late=True)),  # 8.4-8.6 us vs 9.0-9.1 (kernels-late-scale)
        8: ('mma', _mma(4, 1, table=True, depth=2, x_ahead=False, rows=8, late=True)),  # 8.8-9.0 us vs 9.6-10.0 (kernels-tiled, 2 runs)
        12: ('mma', _mma(4, 1)),  # 11.6 us vs 14.0 fused
        16: ('mma', _mma(4, 1, depth=2, steady=True, hint=True, unroll=2)),  # 10.8 us vs 11.0 (kernels-tiled, m16_variants, 2 runs)
        64: ('fused', {'BM': 64, 'BN': 128, 'BK': 128, 'SPLIT_K': 4, 'W_IS_A': False, 'num_warps': 4, 'num_stages': 3}),  # 20.6 us
        256: ('chunked', None),  # 33.9 us
        1024: ('chunked', None),  # 60.5 us
        4096: ('overlap', 8388608),  # 213.8 us vs 217.9 whole (alternating rounds)
    },
    (4096, 11008): {
        # scales decoded a step ahead in place of the shared scale table, two segments in flight (with the table: 21.8 us)
        # in tiles 13.9-14.0 us against 14.6-14.9 row-major (kernels-tiled, 3 runs); in tiles the L2 hint no longer
        # pays: 13.84-13.96 us without it against 13.86-14.04 with it (kernels-tiled, 2 runs of 2 passes)
        1: ('mma', _mma(8, 1, table=True, depth=2, unroll=2, scale_ahead=True)),
        2: ('mma', _mma(8, 1, table=True, depth=2, hint=True, unroll=2, scale_ahead=True)),  # 14.1-14.2 us vs 14.5 (kernels-tiled, 2 runs)
        4: ('mma', _mma(8, 1, table=True, shared_scales=True, hint=True, unroll=2)),  # 14.8 us in tiles (kernels-tiled)
        8: ('mma', _mma(8, 1, table=True, depth=2, late=True, hint=True)),  # 17.7 us vs 18.0 (kernels-l2-hint)
        12: ('mma', _mma(8, 1)),  # 21.9 us vs 30.1 fused
        16: ('mma', _mma(4, 1, depth=3, steady=True, hint=True, unroll=2)),  # 22.4-22.6 us vs 25.6-25.8 (kernels-tiled, 2 runs)
        64: ('fused', {'BM': 64, 'BN': 128, 'BK': 128, 'SPLIT_K': 4, 'W_IS_A': False, 'num_warps': 4, 'num_stages': 3}),  # 44.6 us
        256: ('chunked', None),  # 93.0 us
        1024: ('chunked', None),  # 159.5 us
        4096: ('overlap', 12582912),  # 1024-row chunks: 497.2 us vs 540.0 whole (kernels-overlap-trials)
    },
    (11008, 4096): {
        1: ('mma', _M1_11008),
        # the M = 1 plan serves 2-4 rows too, and the plan that 2-4 rows had serves 8 (kernels-gpu-plans, 2-4 runs)
        2: ('mma', _M1_11008),  # 13.11-13.12 us vs 13.74-13.75 (H200: 12.96 vs 13.30)
        4: ('mma', _M1_11008),  # 13.86-14.02 us vs 14.49-14.59 (H200: 14.09-14.21 vs 14.39-14.50)
        8: ('mma', _mma(4, 1, table=True, hint=True, maxnreg=72, balance=True)),  # 17.00-17.11 us vs 18.56-18.57 (H200: 17.51 vs 18.92)
        12: ('mma', _mma(2, 1)),  # 22.6 us vs 31.5 fused
        16: ('mma', _mma(2, 1, depth=2, shared_scales=True, steady=True, hint=True)),  # 22.1-22.4 us vs 22.2-22.6 (kernels-l2-hint, 2 runs)
        64: ('fused', {'BM': 64, 'BN': 64, 'BK': 128, 'SPLIT_K': 2, 'W_IS_A': False, 'num_warps': 4, 'num_stages': 3}),  # 45.7 us
        256: ('chunked', None),  # 84.0 us
        1024: ('chunked', None),  # 171.6 us
        4096: ('overlap', 8388608),  # 538.2 us vs 617.8 whole, 574.0 in 32M chunks (alternating rounds)
    },
    (14336, 4096): {
        1: ('mma', _mma(4, 1, table=True, depth=2, x_ahead=False, hint=True, unroll=2)),  # 19.7 us vs 20.0 (kernels-unroll)
        2: ('mma', _mma(4, 1, table=True, shared_scales=True, hint=True, unroll=2)),  # 19.1-19.3 us vs 19.6-19.7 (kernels-tiled, 2 runs)
        4: ('mma', _mma(4, 1, table=True, shared_scales=True, unroll=2)),  # 19.56-19.67 us vs 19.71-19.88 with the L2 hint (kernels-gpu-plans, 4 runs; H200: 18.14-18.31 vs 18.24-18.41)
        8: ('mma', _mma(4, 1, table=True, shared_scales=True, unroll=2)),  # 23.0 us vs 23.3 (kernels-unroll)
        12: ('mma', _mma(4, 1)),  # 26.8 us vs 36.8 fused
        # every step is steady here; the unrolled build of the (unused) masked loop still ran faster, in both runs
        16: ('mma', _mma(2, 1, depth=2, x_ahead=False, shared_scales=True, steady=True, hint=True, unroll=2)),  # 26.5-26.8 us vs 27.0-27.2 (kernels-unroll, 2 runs)
        64: ('fused', {'BM': 64, 'BN': 128, 'BK': 128, 'SPLIT_K': 2, 'W_IS_A': False, 'num_warps': 4, 'num_stages': 3}),  # 46.0 us
        256: ('chunked', None),  # 110.2 us
        1024: ('chunked', None),  # 214.2 us
        4096: ('overlap', 8388608),  # 702.1 us vs 771.6 whole (alternating rounds)
    },
}

# Entries where one GPU runs another plan faster than the H100's choice, by ``gpu_family``
# (results/kernels-gpu-plans.json: every distinct skinny plan against the shipped one, alternating
# rounds of steady windows from HBM, 2-3 runs on each GPU). An H200 runs the skinny kernels in about
# an H100's time (they read about 1.8 TB/s on both, so its 1.4x faster memory is not what bounds
# them), but these two entries run faster there with the plan named; on an H100 both lose (14.68-14.70
# us against 14.42-14.50, and 7.99-8.03 against 7.89-7.92).
GPU_FORWARD: dict[str, dict[tuple[int, int], dict[int, tuple[str, object]]]] = {
    "H200": {
        (4096, 11008): {4: FORWARD[(4096, 11008)][1]},  # 13.53-13.65 us vs 14.28-14.41 (3 runs)
        (4096, 4096): {1: FORWARD[(14336, 4096)][1]},  # 7.59-7.67 us vs 7.95-8.00 (3 runs)
    },
}


def family_of(device_name: str) -> str:
    """The ``GPU_FORWARD`` key for a GPU's name (``torch.cuda.get_device_name``), or ``""``."""
    return next((family for family in GPU_FORWARD if family in device_name.split()), "")


@functools.cache
def gpu_family(device: torch.device) -> str:
    """The ``GPU_FORWARD`` key of the GPU that ``device`` names; ``""`` for other GPUs and the CPU."""
    return family_of(torch.cuda.get_device_name(device)) if device.type == "cuda" else ""


@functools.cache
def _forward_table(family: str) -> dict:
    """``FORWARD`` with ``family``'s entries of ``GPU_FORWARD`` in place of the H100's."""
    overrides = GPU_FORWARD.get(family, {})
    return {shape: {**by_m, **overrides.get(shape, {})} for shape, by_m in FORWARD.items()}


BACKWARD = {
    (4096, 4096): {
        1: ('fused', {'BM': 64, 'BR': 128, 'BK': 128, 'SPLIT_K': 4, 'num_warps': 8, 'num_stages': 3}),  # 19.1 us
        4: ('fused', {'BM': 64, 'BR': 128, 'BK': 128, 'SPLIT_K': 4, 'num_warps': 8, 'num_stages': 3}),  # 19.1 us
        16: ('fused', {'BM': 64, 'BR': 128, 'BK': 128, 'SPLIT_K': 4, 'num_warps': 8, 'num_stages': 3}),  # 19.5 us
        64: ('fused', {'BM': 64, 'BR': 128, 'BK': 128, 'SPLIT_K': 4, 'num_warps': 8, 'num_stages': 3}),  # 20.9 us
        256: ('chunked', None),  # 36.0 us
        1024: ('chunked', 16777216),  # 61.5 us
        4096: ('chunked', 16777216),  # 206.5 us
    },
    (4096, 11008): {
        1: ('fused', {'BM': 64, 'BR': 128, 'BK': 128, 'SPLIT_K': 4, 'num_warps': 8, 'num_stages': 3}),  # 41.0 us
        4: ('fused', {'BM': 64, 'BR': 128, 'BK': 128, 'SPLIT_K': 4, 'num_warps': 8, 'num_stages': 3}),  # 41.2 us
        16: ('fused', {'BM': 64, 'BR': 128, 'BK': 128, 'SPLIT_K': 4, 'num_warps': 8, 'num_stages': 3}),  # 41.7 us
        64: ('fused', {'BM': 64, 'BR': 128, 'BK': 128, 'SPLIT_K': 4, 'num_warps': 8, 'num_stages': 3}),  # 44.7 us
        256: ('chunked', None),  # 85.5 us
        1024: ('chunked', 33554432),  # 168.5 us
        4096: ('overlap', 8388608),  # 534.7 us vs 598.4 whole, 591.4 in 16M chunks (alternating rounds)
    },
    (11008, 4096): {
        1: ('fused', {'BM': 16, 'BR': 64, 'BK': 128, 'SPLIT_K': 8, 'num_warps': 4, 'num_stages': 3}),  # 43.5 us
        4: ('fused', {'BM': 16, 'BR': 64, 'BK': 128, 'SPLIT_K': 8, 'num_warps': 4, 'num_stages': 3}),  # 43.2 us
        16: ('fused', {'BM': 16, 'BR': 64, 'BK': 128, 'SPLIT_K': 8, 'num_warps': 4, 'num_stages': 3}),  # 43.4 us
        64: ('fused', {'BM': 64, 'BR': 128, 'BK': 128, 'SPLIT_K': 4, 'num_warps': 8, 'num_stages': 3}),  # 46.4 us
        256: ('chunked', None),  # 91.2 us
        1024: ('chunked', None),  # 162.3 us
        4096: ('chunked', None),  # 525.2 us
    },
    (14336, 4096): {
        1: ('fused', {'BM': 16, 'BR': 64, 'BK': 128, 'SPLIT_K': 8, 'num_warps': 4, 'num_stages': 3}),  # 53.1 us
        4: ('fused', {'BM': 16, 'BR': 64, 'BK': 128, 'SPLIT_K': 8, 'num_warps': 4, 'num_stages': 3}),  # 53.0 us
        16: ('fused', {'BM': 16, 'BR': 64, 'BK': 128, 'SPLIT_K': 8, 'num_warps': 4, 'num_stages': 3}),  # 53.1 us
        64: ('fused', {'BM': 64, 'BR': 128, 'BK': 128, 'SPLIT_K': 4, 'num_warps': 8, 'num_stages': 3}),  # 57.8 us
        256: ('chunked', None),  # 115.6 us
        1024: ('chunked', None),  # 203.0 us
        4096: ('chunked', None),  # 689.7 us
    },
}

def _lora(bm, bn, bk, warps, stages, fuse_down, group_m=8):
    return {"BM": bm, "BN": bn, "BK": bk, "GROUP_M": group_m, "FUSE_DOWN": fuse_down, "num_warps": warps,
            "num_stages": stages}


def _lora_fused(bm: int, bn: int, bk: int, stages: int) -> dict:
    return _lora(bm, bn, bk, 4, stages, True)


def _lora_add(bm: int, bn: int) -> dict:
    return {"BM": bm, "BN": bn, "num_warps": 4}


# An adapted linear layer at inference, per base weight shape (N, K) and token count M, from
# ``python benchmarks/lora_linear.py --sweep`` on an H100 (bf16, r=16): ``("fused", config)`` runs
# ``lora_linear`` (base and LoRA in one kernel), ``("add", config)`` the base GEMM and ``h`` on
# cuBLAS and ``lora_add`` for the output, ``("merge", config)`` ``lora_add`` writing a merged weight
# for the call and one cuBLAS GEMM on it (``lora_transient_merge``), ``("separate", None)`` three
# cuBLAS GEMMs. ``add`` and ``merge`` run only inside CUDA-graph capture (see ``adapters.lora``).
LORA_FORWARD: dict[tuple[int, int], dict[int, tuple[str, dict | None]]] = {
    (256, 2048): {
        1: ("fused", _lora_fused(16, 16, 256, 3)),  # 7.3 us vs 12.1
        16: ("fused", _lora_fused(16, 16, 256, 3)),  # 6.8 us vs 11.9
        128: ("fused", _lora_fused(64, 16, 256, 3)),  # 7.9 us vs 13.3
        512: ("merge", _lora_add(128, 64)),  # 9.0 us vs 14.6
        2048: ("merge", _lora_add(128, 64)),  # 10.5 us vs 16.5
        4096: ("merge", _lora_add(128, 64)),  # 13.8 us vs 21.0
    },
    (2048, 2048): {
        1: ("fused", _lora_fused(16, 32, 256, 3)),  # 10.7 us vs 14.2
        16: ("fused", _lora_fused(16, 16, 256, 3)),  # 8.4 us vs 14.2
        128: ("fused", _lora_fused(64, 32, 128, 4)),  # 9.1 us vs 14.6
        512: ("merge", _lora_add(128, 64)),  # 16.5 us vs 20.3
        2048: ("merge", _lora_add(128, 64)),  # 30.9 us vs 37.1
        4096: ("merge", _lora_add(64, 128)),  # 53.5 us vs 69.1
    },
    (2048, 5632): {
        1: ("add", _lora_add(32, 256)),  # 21.7 us vs 22.9
        16: ("fused", _lora_fused(16, 16, 256, 3)),  # 17.3 us vs 22.7
        128: ("fused", _lora_fused(64, 32, 128, 4)),  # 18.7 us vs 23.2
        512: ("add", _lora_add(128, 64)),  # 33.9 us vs 35.6
        2048: ("merge", _lora_add(128, 64)),  # 76.3 us vs 78.9
        4096: ("merge", _lora_add(64, 128)),  # 135.8 us vs 168.4
    },
    (5632, 2048): {
        1: ("fused", _lora_fused(16, 64, 256, 3)),  # 15.3 us vs 18.4
        16: ("fused", _lora_fused(16, 64, 128, 4)),  # 14.3 us vs 18.5
        128: ("fused", _lora_fused(64, 128, 128, 3)),  # 15.6 us vs 19.7
        512: ("add", _lora_add(64, 128)),  # 28.6 us vs 30.1
        2048: ("merge", _lora_add(128, 64)),  # 78.9 us vs 92.0
        4096: ("merge", _lora_add(64, 128)),  # 147.5 us vs 193.1
    },
}

# fp32 activations were not swept (training and decoding run in bf16/fp16); this GEMV config is
# covered by the GPU tests. It also serves an ``mma`` entry on a GPU without ``mma.sync`` for bf16.
GEMV_FALLBACK = {"BN": 4, "BK": 1024, "VEC": 4, "num_warps": 4}


def _nearest(options, value: float, key=math.log2):
    """The option closest to ``value`` on a log scale; ties go to the larger option."""
    return min(options, key=lambda o: (abs(key(o) - key(value)), -o))


# The most activation rows each single-purpose kernel takes; entries of these kinds serve no more.
_MAX_ROWS = {"gemv1": 1, "mma": 16}


def _lookup(table: dict, m: int, n: int, k: int) -> tuple[str, object]:
    shape = min(table, key=lambda s: (math.log2(s[0] / n) ** 2 + math.log2(s[1] / k) ** 2, s))
    usable = [mm for mm, (kind, _) in table[shape].items() if m <= _MAX_ROWS.get(kind, m)]
    return table[shape][_nearest(usable, max(m, 1))]


def mma_plans() -> list[tuple[int, dict]]:
    """``(m, config)`` of every distinct skinny (``mma``) plan of the forward tables, one ``m`` per
    config and B-tile count (1-8 or 9-16 activation rows compile to different kernels)."""
    plans: dict[tuple, tuple[int, dict]] = {}
    for by_m in [entry for family in ("", *GPU_FORWARD) for entry in _forward_table(family).values()]:
        for m, (kind, config) in by_m.items():
            if kind == "mma":
                plans.setdefault((m > 8,) + tuple(sorted(config.items())), (m, config))
    return list(plans.values())


@functools.lru_cache(maxsize=4096)  # asked twice per adapted layer and forward
def lora_plan(m: int, n: int, k: int) -> tuple[str, dict | None]:
    """How an adapted ``[m, k] @ [n, k].T`` runs at inference (see ``LORA_FORWARD``)."""
    if not LORA_FORWARD or m < 1:
        return "separate", None
    return _lookup(LORA_FORWARD, m, n, k)


def blocks_per_step(config: dict, blocksize: int) -> dict:
    """Turns a config's ``BK`` (elements) into ``NB`` (whole quantization blocks, at least one)."""
    out = {key: value for key, value in config.items() if key != "BK"}
    out["NB"] = max(1, config["BK"] // blocksize)
    return out


@functools.lru_cache(maxsize=4096)  # asked on every call; the answer depends only on the arguments
def forward_plan(m: int, n: int, k: int, blocksize: int, dtype: torch.dtype, family: str = "") -> tuple[str, object]:
    """``("gemv1" | "gemv" | "mma" | "fused", config)`` or ``("chunked" | "overlap", chunk_elems)`` for
    ``[m, k] @ [n, k].T`` on a GPU of ``family`` (see ``gpu_family``)."""
    if dtype == torch.float32:  # tl.dot would round fp32 to tf32; CUDA cores or cuBLAS keep fp32
        return ("gemv", blocks_per_step(GEMV_FALLBACK, blocksize)) if m <= 16 else ("chunked", None)
    kind, config = _lookup(_forward_table(family), m, n, k)
    return (kind, config) if kind in ("chunked", "overlap", "gemv1", "mma") else (kind, blocks_per_step(config, blocksize))


@functools.lru_cache(maxsize=4096)
def grad_input_plan(m: int, n: int, k: int, blocksize: int, dtype: torch.dtype) -> tuple[str, object]:
    """``("fused", config)`` or ``("chunked" | "overlap", chunk_elems)`` for ``[m, n] @ [n, k]``."""
    if dtype == torch.float32:
        return "chunked", None
    kind, config = _lookup(BACKWARD, m, n, k)
    return (kind, config) if kind in ("chunked", "overlap") else (kind, blocks_per_step(config, blocksize))


def dequant_blocks_per_program(blocksize: int) -> int:
    """Quantization blocks one dequantize program handles (a power of two)."""
    return 1 << max(0, int(math.log2(max(1, DEQUANT_CONFIG["elems_per_program"] // blocksize))))


def _fused(bm, bn, bk, warps, stages, split=1, w_is_a=False):
    return {"BM": bm, "BN": bn, "BK": bk, "SPLIT_K": split, "W_IS_A": w_is_a, "num_warps": warps,
            "num_stages": stages}


def _grad(bm, br, bk, warps, stages, split=1):
    return {"BM": bm, "BR": br, "BK": bk, "SPLIT_K": split, "num_warps": warps, "num_stages": stages}


def _row(programs_per_sm, warps, chunk_blocks=64):
    return {"PROGRAMS_PER_SM": programs_per_sm, "CHUNK_BLOCKS": chunk_blocks, "VEC": 16, "num_warps": warps}


def lora_candidates(m: int) -> list[dict]:
    """``lora_linear`` configs ``benchmarks/lora_linear.py --sweep`` times for ``m`` tokens."""
    if m <= 256:  # weight-bound: narrow column tiles (enough programs), h computed alongside
        row_tiles = (16,) if m <= 16 else (64,) if m < 128 else (64, 128)
        configs = [_lora(bm, bn, bk, w, s, True) for bm in row_tiles
                   for bn, bk, w, s in ((16, 256, 4, 3), (32, 128, 4, 4), (32, 256, 4, 3), (64, 128, 4, 4),
                                        (64, 256, 4, 3), (128, 128, 4, 3))]
        # Shared memory per pipeline stage holds the x, W and A tiles (16-bit); H100 has 227 KB per program.
        return [c for c in configs if c["num_stages"] * (c["BM"] + c["BN"] + 16) * c["BK"] * 2 <= 200_000]
    return [_lora(128, 128, 64, 8, 3, False), _lora(128, 256, 64, 8, 3, False), _lora(128, 128, 64, 8, 4, True)]


def lora_add_candidates() -> list[dict]:
    """``lora_add`` configs the sweep times."""
    return [{"BM": bm, "BN": bn, "num_warps": w} for bm, bn, w in
            ((64, 128, 4), (128, 128, 8), (64, 256, 8), (128, 64, 4), (32, 256, 4), (128, 256, 8))]


def _gemv(bn, bk, warps):
    return {"BN": bn, "BK": bk, "VEC": 4, "num_warps": warps}




def sweep_candidates() -> dict:
    """Configs ``benchmarks/kernels.py --sweep`` times; the tables above keep the winners."""
    return {
        "dequant": [{"elems_per_program": e, "num_warps": w} for e, w in ((2048, 4), (4096, 4), (8192, 8))],
        "gemv1": [_row(p, 4, c) for c in (32, 64) for p in (4, 8, 12, 16)]
        + [_row(8, 8), _row(16, 8), _row(6, 4), _row(10, 4)],
        "gemv": [_gemv(1, 2048, 2), _gemv(1, 4096, 4), _gemv(2, 2048, 4), _gemv(4, 2048, 4), _gemv(4, 1024, 4),
                 _gemv(4, 1024, 2), _gemv(8, 1024, 4), _gemv(8, 512, 2)],
        "fused_small": [_fused(16, 64, 256, 4, 3, 2, w_is_a=True), _fused(16, 64, 256, 4, 3, 4, w_is_a=True),
                        _fused(16, 64, 256, 4, 3, 8, w_is_a=True), _fused(16, 64, 128, 4, 3, 4, w_is_a=True),
                        _fused(16, 128, 128, 4, 3, 4, w_is_a=True), _fused(16, 64, 128, 4, 3, 1, w_is_a=True),
                        _fused(16, 32, 128, 4, 3, 4, w_is_a=True), _fused(16, 64, 64, 4, 4, 4, w_is_a=True),
                        _fused(16, 64, 128, 2, 3, 4, w_is_a=True), _fused(16, 64, 128, 4, 2, 8, w_is_a=True),
                        _fused(16, 128, 64, 4, 3, 4, w_is_a=True), _fused(16, 128, 128, 8, 3, 4, w_is_a=True),
                        _fused(16, 32, 256, 2, 3, 8, w_is_a=True), _fused(16, 64, 256, 8, 3, 4, w_is_a=True),
                        _fused(16, 64, 128, 4, 1, 4, w_is_a=True), _fused(16, 128, 128, 4, 3, 2, w_is_a=True)],
        "mma": [_mma(w, 1, t, d, x, sh, rows, st) for rows in (16, 8) for w in (2, 4, 8) for t in (False, True)
                for d, x in ((1, True), (2, False), (2, True)) for sh in (False, True)
                for st in ((False, True) if rows == 16 else (False,))]
        + [_mma(w, 1, t, d, x, rows=rows, late=True) for rows in (16, 8) for w in (2, 4, 8) for t in (False, True)
           for d, x in ((1, True), (2, False))]
        + [_mma(w, 1, True, d, x, rows=rows, late=late, hint=True) for rows in (16, 8) for w in (2, 4, 8)
           for d, x in ((1, True), (2, True)) for late in (False, True)]
        + [_mma(4, 1, True, hint=True, maxnreg=cap) for cap in (64, 72, 80)]
        + [_mma(w, 1, t, shared_scales=True, hint=True) for w in (4, 8) for t in (False, True)]
        + [_mma(w, 1, True, d, x, sh, hint=True, unroll=2) for w in (4, 8) for d, x in ((1, True), (2, False))
           for sh in (False, True)],
        "fused": [_fused(64, 128, 128, 4, 3, 2), _fused(64, 64, 128, 4, 3, 2), _fused(64, 128, 128, 4, 3, 4),
                  _fused(64, 64, 128, 4, 3)],
        "chunked": [{"chunk_elems": None}, {"chunk_elems": 32 << 20}],
        "overlap": [{"chunk_elems": e << 20} for e in (8, 12, 16)],
        "grad_fused": [_grad(16, 64, 256, 4, 3, 4), _grad(16, 64, 128, 4, 3, 8), _grad(64, 128, 128, 8, 3, 4),
                       _grad(128, 128, 64, 8, 3, 2), _grad(64, 128, 128, 8, 3), _grad(128, 128, 64, 8, 3)],
        "grad_chunked": [{"chunk_elems": None}, {"chunk_elems": 16 << 20}, {"chunk_elems": 32 << 20}],
        "grad_overlap": [{"chunk_elems": e << 20} for e in (8, 16)],
    }
