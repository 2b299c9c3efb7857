"""Triton NF4 kernels on a CUDA GPU: every path against peftlab's torch reference (fp32 math)."""
from __future__ import annotations

import itertools

import pytest
import torch

from peftlab.quant.kernels import tuning

pytestmark = pytest.mark.gpu

DEVICE = "cuda"
# (rows, columns, bytes in tiles): in_features not a multiple of 64*256; 520 rows: partial tiles;
# 528 x 4224 in the 16 x 128 tiles layers hold on the GPU
SHAPES = [(768, 2112, False), (520, 4160, False), (528, 4224, True)]


def _weight(n, k, blocksize=64, nested=True, seed=0, tiled=False):
    """(packed, state, fp32 reference) of a random weight, its bytes row-major or in tiles."""
    from peftlab.quant.nf4 import dequantize_nf4, in_tiles, quantize_nf4

    g = torch.Generator(device=DEVICE).manual_seed(seed)
    w = torch.randn(n, k, device=DEVICE, generator=g) * 0.02
    packed, state = quantize_nf4(w, blocksize=blocksize, double_quant=nested)
    ref = dequantize_nf4(packed, state, torch.float32)
    if tiled:
        packed, state = in_tiles(packed, state)
    return packed, state, ref


def _rel(out, ref):
    assert torch.isfinite(out).all()
    return ((out.float() - ref).norm() / ref.norm()).item()


def _tol(dtype):
    return 1e-2 if dtype == torch.bfloat16 else 2e-3


def _x(m, k, dtype, seed=1):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return torch.randn(m, k, device=DEVICE, generator=g).to(dtype)


@pytest.mark.parametrize("blocksize,nested", [(64, True), (64, False), (128, True), (256, True), (32, True)])
@pytest.mark.parametrize("n,k,tiled", [(768, 2112, False), (33, 96, False), (7, 130, False), (48, 2048, True)])
def test_dequantize_matches_reference_bit_for_bit(n, k, tiled, blocksize, nested):
    from peftlab.quant.kernels import nf4_dequantize

    packed, state, ref = _weight(n, k, blocksize, nested, tiled=tiled)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        assert torch.equal(nf4_dequantize(packed, state, dtype), ref.to(dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("nested,bias", [(True, True), (False, False), (True, False)])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 16, 33, 64, 256, 1024, 4096])
@pytest.mark.parametrize("n,k,tiled", SHAPES)
def test_matmul_matches_reference(n, k, tiled, m, nested, bias, dtype):
    from peftlab.quant.kernels import nf4_matmul

    packed, state, ref = _weight(n, k, nested=nested, tiled=tiled)
    x = _x(m, k, dtype)
    b = (torch.randn(n, device=DEVICE) * 0.1).to(dtype) if bias else None
    out = nf4_matmul(x, packed, state, b)
    expect = x.float() @ ref.t() + (b.float() if bias else 0)
    assert out.dtype == dtype and out.shape == (m, n)
    assert _rel(out, expect) < _tol(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 16, 256, 4096])
@pytest.mark.parametrize("n,k,tiled", SHAPES)
def test_grad_input_matches_reference(n, k, tiled, m, dtype):
    from peftlab.quant.kernels import nf4_matmul_grad_input

    packed, state, ref = _weight(n, k, tiled=tiled)
    grad = _x(m, n, dtype)
    out = nf4_matmul_grad_input(grad, packed, state)
    assert out.dtype == dtype and out.shape == (m, k)
    assert _rel(out, grad.float() @ ref) < _tol(dtype)


def _forced_configs():
    """(kind, config) of every sweep candidate and every table entry; chunk configs as element counts."""
    forced = [(kind, cfg["chunk_elems"] if "chunked" in kind or "overlap" in kind else cfg)
              for kind, configs in tuning.sweep_candidates().items() if kind != "dequant" for cfg in configs]
    forced += [(kind, cfg) for row in tuning.FORWARD.values() for kind, cfg in row.values()]
    forced += [("grad_" + kind, cfg) for row in tuning.BACKWARD.values() for kind, cfg in row.values()]
    return forced


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 5, 40])
@pytest.mark.parametrize("n,k,tiled", SHAPES[1:])
def test_every_candidate_and_table_config_is_correct(n, k, tiled, m, dtype):
    """Each config the tables hold or may be tuned to, forced one at a time, on row-major and tiled bytes."""
    from peftlab.quant.kernels import NF4Weight, chunked, gemm, gemv, skinny
    from peftlab.quant.kernels.tuning import blocks_per_step

    packed, state, ref = _weight(n, k, nested=True, tiled=tiled)
    weight = NF4Weight.from_state(packed, state)
    x, grad = _x(m, k, dtype), _x(m, n, dtype, seed=2)
    b = (torch.randn(n, device=DEVICE) * 0.1).to(dtype) if dtype == torch.float16 else None
    expect = x.float() @ ref.t() + (b.float() if b is not None else 0)
    expect_grad = grad.float() @ ref
    run = {
        "gemv1": lambda cfg: gemv.gemv_row(x[:1], weight, b, cfg),
        "gemv": lambda cfg: gemv.gemv(x, weight, b, blocks_per_step(cfg, 64)),
        "mma": lambda cfg: skinny.matmul(x[:16], weight, b, cfg),
        "fused": lambda cfg: gemm.matmul(x, weight, b, blocks_per_step(cfg, 64)),
        "fused_small": lambda cfg: gemm.matmul(x, weight, b, blocks_per_step(cfg, 64)),
        "chunked": lambda cfg: chunked.matmul(x, weight, b, cfg),
        "grad_fused": lambda cfg: gemm.matmul_grad_input(grad, weight, blocks_per_step(cfg, 64)),
        "grad_chunked": lambda cfg: chunked.matmul_grad_input(grad, weight, cfg),
        "overlap": lambda cfg: chunked.matmul(x, weight, b, cfg, overlap=True),
        "grad_overlap": lambda cfg: chunked.matmul_grad_input(grad, weight, cfg, overlap=True),
    }
    for kind, config in _forced_configs():
        target = expect_grad if kind.startswith("grad") else expect
        target = target[:1] if kind == "gemv1" else target[:16] if kind == "mma" else target
        assert _rel(run[kind](config), target) < _tol(dtype), (kind, config)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k,blocksize,nested,tiled", [
    (n, k, blocksize, nested, False) for n in (520, 33) for blocksize, nested, k in
    [(64, True, 4160), (64, False, 2112), (64, True, 64), (32, True, 3232), (32, False, 96), (128, True, 4224),
     (256, False, 4352)]] + [(528, 4224, 64, True, True), (48, 4096, 32, False, True), (64, 4352, 256, False, True),
                             (32, 4224, 128, True, True)])
def test_skinny_mma_matches_reference(n, k, blocksize, nested, tiled, dtype):
    """Tensor-core decode for 1-16 rows: both tiles, partial segments (K % 128 = 64 or K < 128),
    partial 16- and 8-row groups, split K, masked and steady loops, one or several warps, with and
    without bias, register and
    shared-table decode, one to three segments fetched ahead, activations loaded ahead or at use,
    block scales decoded per segment or once into shared memory, applied before or after the mma,
    weights loaded by Triton or by the L2-hinted PTX, masked loops of one or two steps per iteration,
    block scales decoded a step ahead or at use; weight bytes row-major or in tiles."""
    from peftlab.quant.kernels import NF4Weight, skinny

    packed, state, ref = _weight(n, k, blocksize, nested, tiled=tiled)
    weight = NF4Weight.from_state(packed, state)
    b = (torch.randn(n, device=DEVICE) * 0.1).to(dtype)
    for m in (1, 2, 7, 8, 9, 16):
        x = _x(m, k, dtype, seed=m)
        launches = (({"SPLIT": 1, "num_warps": 4}, b), ({"SPLIT": 3, "num_warps": 2}, None),
                    ({"SPLIT": 1, "num_warps": 1}, None), ({"SPLIT": 2, "num_warps": 8}, b))
        variants = itertools.product((False, True), ((1, True), (2, False), (3, True)), (False, True))
        # every variant once (each is its own compiled kernel), the launches taking turns so that
        # each meets variants with and without shared scales
        for i, (table, (depth, ahead), shared) in enumerate(variants):
            config, bias = launches[(i + i // 4) % len(launches)]
            rows = 8 if (i + m) % 3 == 0 else 16  # a third of the variants with 8-row programs
            steady = (i + m) % 2 == 0  # half with the unmasked steady loop
            late = not shared and (i // 4 + m) % 2 == 0  # half the rest scale after the mma
            hint = (i + i // 4 + m) % 2 == 0  # half load the weights through the L2-hinted PTX
            unroll = 2 if (i // 3 + m) % 2 == 0 else 1  # half take two masked steps per loop iteration
            scale_ahead = not shared and (i // 2 + i // 6 + m) % 2 == 1  # most of the rest decode scales a step ahead
            config = dict(config, TABLE=table, DEPTH=depth, X_AHEAD=ahead, SHARED_SCALES=shared, ROWS=rows,
                          STEADY=steady, LATE_SCALE=late, L2_HINT=hint, UNROLL=unroll, SCALE_AHEAD=scale_ahead)
            assert skinny.supports(x, weight)
            out = skinny.matmul(x, weight, bias, config)
            expect = x.float() @ ref.t() + (bias.float() if bias is not None else 0)
            assert out.shape == (m, n) and out.dtype == dtype
            assert _rel(out, expect) < _tol(dtype), (m, config)


@pytest.mark.parametrize("m,config", tuning.mma_plans())
def test_every_shipped_skinny_plan_matches_reference(m, config):
    """What the dispatcher runs, config by config, on a weight with partial row groups and segments
    and on one in tiles."""
    from peftlab.quant.kernels import NF4Weight, skinny

    for n, k, tiled in SHAPES[1:]:
        packed, state, ref = _weight(n, k, tiled=tiled)
        weight = NF4Weight.from_state(packed, state)
        for rows in (m, 1 if m > 8 else 7):
            x = _x(rows, k, torch.bfloat16, seed=rows)
            assert _rel(skinny.matmul(x, weight, None, config), x.float() @ ref.t()) < _tol(torch.bfloat16), config


@pytest.mark.parametrize("m,tiled", [(1, True), (4, False), (11, True)])
def test_skinny_balanced_grid_matches_reference_and_repeats_exactly(m, tiled):
    """``BALANCE`` over the device's SMs on a weight of one row group per SM and five more, which
    it splits along K: the reference within tolerance (with bias), the same bits on every run
    whichever part finishes last, and the same inside a CUDA graph."""
    from peftlab.quant.kernels import NF4Weight, skinny

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    n, k = (sms + 5) * 16, 4224 if tiled else 4160
    packed, state, ref = _weight(n, k, tiled=tiled)
    weight = NF4Weight.from_state(packed, state)
    config = {"num_warps": 4, "TABLE": True, "SCALE_AHEAD": True, "BALANCE": True}
    assert skinny.tail_plan(sms + 5, -(-k // skinny.SEGMENT), 4, sms)[1] >= 2
    x = _x(m, k, torch.bfloat16, seed=m)
    bias = (torch.randn(n, device=DEVICE) * 0.1).to(torch.bfloat16)
    out = skinny.matmul(x, weight, bias, config)
    assert _rel(out, x.float() @ ref.t() + bias.float()) < _tol(torch.bfloat16)
    assert all(torch.equal(skinny.matmul(x, weight, bias, config), out) for _ in range(20))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replayed = skinny.matmul(x, weight, bias, config)
    for _ in range(3):
        graph.replay()
        assert torch.equal(replayed, out)


def test_skinny_mma_takes_strided_activations_and_runs_in_a_graph():
    from peftlab.quant.kernels import NF4Weight, skinny

    packed, state, ref = _weight(520, 4160)
    weight = NF4Weight.from_state(packed, state)
    wide = _x(5, 4164, torch.bfloat16)
    x = wide[:, 3:4163]  # row stride 4164, 2-byte offset: not an int64 view
    config = {"SPLIT": 2, "num_warps": 4, "TABLE": True}
    assert _rel(skinny.matmul(x, weight, None, config), x.float() @ ref.t()) < 1e-2
    static = _x(5, 4160, torch.bfloat16)
    skinny.matmul(static, weight, None, config)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = skinny.matmul(static, weight, None, config)
    static.copy_(_x(5, 4160, torch.bfloat16, seed=9))
    graph.replay()
    assert _rel(out, static.float() @ ref.t()) < 1e-2


def test_skinny_mma_realigns_activations_and_refuses_unaligned_codes():
    """8 bytes past a 16-byte boundary: activations are copied to an aligned buffer, packed codes
    (which cannot be copied cheaply) leave the layer to the other kernels, and both stay correct."""
    from peftlab.quant.kernels import NF4Weight, nf4_matmul, skinny
    from peftlab.quant.kernels.tuning import forward_plan

    assert forward_plan(3, 520, 4160, 64, torch.bfloat16)[0] == "mma"  # so the fallback below is taken
    packed, state, ref = _weight(520, 4160)
    weight = NF4Weight.from_state(packed, state)
    x = _x(1, 4 + 3 * 4160, torch.bfloat16).view(-1)[4:].view(3, 4160)
    assert x.data_ptr() % 16 == 8
    assert _rel(skinny.matmul(x, weight, None, {"num_warps": 2, "TABLE": True}), x.float() @ ref.t()) < 1e-2
    shifted = torch.empty(packed.numel() + 8, dtype=torch.uint8, device=DEVICE)[8:].view_as(packed)
    shifted.copy_(packed)
    assert not skinny.supports(x, NF4Weight.from_state(shifted, state))
    assert _rel(nf4_matmul(x, shifted, state, None), x.float() @ ref.t()) < 1e-2


@pytest.mark.parametrize("blocksize", [128, 256])
@pytest.mark.parametrize("m", [1, 16, 300])
def test_larger_blocksizes_and_unaligned_rows(blocksize, m):
    from peftlab.quant.kernels import nf4_matmul, nf4_matmul_grad_input

    for n, k in [(300, 4352), (64, 99)]:  # 99 columns: rows straddle blocks -> generic path
        packed, state, ref = _weight(n, k, blocksize=blocksize)
        x = _x(m, k, torch.bfloat16)
        assert _rel(nf4_matmul(x, packed, state), x.float() @ ref.t()) < 1e-2
        grad = _x(m, n, torch.bfloat16)
        assert _rel(nf4_matmul_grad_input(grad, packed, state), grad.float() @ ref) < 1e-2


def test_float32_activations_and_leading_dims():
    from peftlab.quant.kernels import nf4_matmul

    packed, state, ref = _weight(520, 4160)
    for m in (1, 8, 200):
        x = _x(m, 4160, torch.float32).view(1, m, 4160)
        out = nf4_matmul(x, packed, state)
        assert out.shape == (1, m, 520) and out.dtype == torch.float32
        assert _rel(out[0], x[0] @ ref.t()) < 1e-4


def test_every_output_element_is_written():
    from peftlab.quant.kernels import nf4_matmul

    packed, state, ref = _weight(520, 4160)
    for m in (1, 3, 16, 100, 2000):
        x = _x(m, 4160, torch.bfloat16)
        torch.cuda.empty_cache()
        # Poison the allocator's free memory so an unwritten output would show as NaN.
        torch.full((64 << 20,), float("nan"), device=DEVICE)
        out = nf4_matmul(x, packed, state)
        assert torch.isfinite(out).all()


def test_overlapped_chunks_equal_sequential_chunks_eagerly_and_in_a_graph():
    """The next chunk's dequantize runs on a side stream; results must not change, also when replayed."""
    from peftlab.quant.kernels import NF4Weight, chunked

    n, k = 520, 4160
    packed, state, ref = _weight(n, k)
    weight = NF4Weight.from_state(packed, state)
    x, grad = _x(300, k, torch.bfloat16), _x(300, n, torch.bfloat16, seed=2)
    b = (torch.randn(n, device=DEVICE) * 0.1).to(torch.bfloat16)
    rows, cols = 128 * k, 64 * n  # 5 row chunks (the last one short), 65 column chunks

    def both():
        return (chunked.matmul(x, weight, b, rows, overlap=True),
                chunked.matmul_grad_input(grad, weight, cols, overlap=True))

    out, dx = both()
    fill_stream, gemm_stream = chunked._streams_for(x.device)
    assert gemm_stream.priority < fill_stream.priority  # lower is higher: GEMM blocks go first
    assert torch.equal(out, chunked.matmul(x, weight, b, rows))
    assert torch.equal(dx, chunked.matmul_grad_input(grad, weight, cols))
    assert _rel(out, x.float() @ ref.t() + b.float()) < 1e-2 and _rel(dx, grad.float() @ ref) < 1e-2
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        both()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_out, graph_dx = both()
    x.copy_(_x(300, k, torch.bfloat16, seed=3))
    grad.copy_(_x(300, n, torch.bfloat16, seed=4))
    graph.replay()
    assert torch.equal(graph_out, chunked.matmul(x, weight, b, rows))
    assert torch.equal(graph_dx, chunked.matmul_grad_input(grad, weight, cols))


def test_overlap_plans_overlap_only_under_graph_capture():
    """The dispatcher runs a table's ``overlap`` entry overlapped inside a CUDA graph, whole-weight eagerly."""
    from peftlab.quant.kernels import NF4Weight, chunked, nf4_matmul, tuning

    n, k, m = 11008, 4096, 4096
    kind, chunk = tuning.forward_plan(m, n, k, 64, torch.bfloat16)
    assert kind == "overlap"
    packed, state, ref = _weight(n, k)
    weight = NF4Weight.from_state(packed, state)
    assert chunked.plan_chunks(kind, chunk, weight) == (None, False)
    x = _x(m, k, torch.bfloat16)
    expect = x.float() @ ref.t()
    assert _rel(nf4_matmul(x, packed, state), expect) < 1e-2
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        nf4_matmul(x, packed, state)
    torch.cuda.current_stream().wait_stream(side)
    graph, plans = torch.cuda.CUDAGraph(), []
    with torch.cuda.graph(graph):
        plans.append(chunked.plan_chunks(kind, chunk, weight))
        out = nf4_matmul(x, packed, state)
    graph.replay()
    assert plans == [(chunk, True)]
    assert _rel(out, expect) < 1e-2
