"""The tensor-core skinny kernel, whole, on the CPU: Triton's interpreter runs its Triton code and
``tests/ptx_model.py`` its inline PTX (decode, shared tables, ``mma``), against the torch reference
in fp32. Covers what only a GPU run covered before: partial segments and row groups, split K, one to
eight warps, 16- and 8-row programs, masked and steady loops, scaling before and after the mma,
every decode and queue variant, masked loops unrolled or not, block scales decoded a step ahead or
at use, weight loads with and without the L2 hint, weights row-major and in tiles, with and without
bias, fp16 and bf16 (the kernel
does no bf16 arithmetic in Triton, which the interpreter gets wrong; the PTX model rounds through
torch), and every plan the dispatcher ships.
"""
from __future__ import annotations

import dataclasses
import itertools

import pytest

from tests.interpreted import INNER, run_inner

if not INNER:
    def test_skinny_kernel_under_triton_interpreter():
        """Runs this module's checks in a child process and fails with its report."""
        run_inner(__file__, timeout=900)


else:
    import torch

    from peftlab.quant.kernels import NF4Weight, skinny, tuning
    from peftlab.quant.nf4 import dequantize_nf4, quantize_nf4, to_tiles
    from tests import ptx_model

    ptx_model.install()

    # (rows, columns, blocksize, double quant, dtype): K % 128 = 64 and K < 128 give partial
    # segments, 33 rows a partial 16-row group, blocksizes 32-256 every way a block meets a segment
    SHAPES = [(33, 1088, 64, True, torch.float16), (20, 576, 64, False, torch.bfloat16),
              (17, 96, 32, True, torch.float16), (24, 800, 32, False, torch.bfloat16),
              (16, 1152, 128, True, torch.bfloat16), (40, 1280, 256, False, torch.float16)]
    LAUNCHES = (({"SPLIT": 1, "num_warps": 4}, True), ({"SPLIT": 3, "num_warps": 2}, False),
                ({"SPLIT": 1, "num_warps": 1}, False), ({"SPLIT": 2, "num_warps": 8}, True))

    # Tileable shapes (rows in 16s, columns in 128s), the tiles read with blocks of 16-64 bytes
    TILED_SHAPES = [(48, 1024, 64, True, torch.float16), (32, 640, 32, False, torch.bfloat16),
                    (16, 1152, 128, True, torch.float16)]

    def _weight(n, k, blocksize, nested, tiled=False):
        """(NF4Weight, fp32 reference) of a random weight, its bytes row-major or in tiles."""
        packed, state = quantize_nf4(torch.randn(n, k) * 0.02, blocksize=blocksize, double_quant=nested)
        ref = dequantize_nf4(packed, state, torch.float32)
        if tiled:
            packed, state = to_tiles(packed, (n, k)), dataclasses.replace(state, tiled=True)
        weight = NF4Weight.from_state(packed, state)
        assert weight.tiled == tiled
        return weight, ref

    @pytest.mark.parametrize("n,k,blocksize,nested,dtype,tiled",
                             [shape + (False,) for shape in SHAPES] + [shape + (True,) for shape in TILED_SHAPES])
    def test_every_variant_matches_reference(n, k, blocksize, nested, dtype, tiled):
        torch.manual_seed(n + k)
        weight, ref = _weight(n, k, blocksize, nested, tiled)
        bias = (torch.randn(n) * 0.1).to(dtype)
        variants = list(itertools.product((False, True), ((1, True), (2, False), (3, True)), (False, True)))
        for m in (1, 9):  # one B tile; two, the second partial
            x = torch.randn(m, k).to(dtype)
            # every variant once per row count, the launches taking turns (shifted per row count)
            for i, (table, (depth, ahead), shared) in enumerate(variants):
                config, with_bias = LAUNCHES[(i + i // 4 + m) % len(LAUNCHES)]
                rows = 8 if (i + m) % 3 == 0 else 16  # a third of the variants with 8-row programs
                steady = (i // 2 + m) % 2 == 0  # half with the unmasked steady loop, with and without shared scales
                late = not shared and (i // 4 + m) % 2 == 0  # half the rest scale after the mma
                hint = (i + i // 4 + m) % 2 == 0  # half load the weights through the hinted PTX
                unroll = 2 if (i // 3 + m) % 2 == 0 else 1  # half take two masked steps per iteration
                scale_ahead = not shared and (i // 2 + i // 6 + m) % 2 == 1  # most of the rest decode scales a step ahead
                config = dict(config, TABLE=table, DEPTH=depth, X_AHEAD=ahead, SHARED_SCALES=shared, ROWS=rows,
                              STEADY=steady, LATE_SCALE=late, L2_HINT=hint, UNROLL=unroll, SCALE_AHEAD=scale_ahead)
                b = bias if with_bias else None
                out = skinny.matmul(x, weight, b, config)
                expect = x.float() @ ref.t() + (b.float() if b is not None else 0)
                assert out.shape == (m, n) and out.dtype == dtype
                err = ((out.float() - expect).norm() / expect.norm()).item()
                assert err < (2e-3 if dtype == torch.float16 else 1e-2), (m, config, err)

    def test_late_scale_with_shared_scales_is_refused():
        """The two scale paths exclude each other; asking for both names them instead of miscomputing."""
        packed, state = quantize_nf4(torch.randn(16, 128) * 0.02, blocksize=64, double_quant=True)
        weight = NF4Weight.from_state(packed, state)
        x = torch.randn(1, 128).to(torch.float16)
        with pytest.raises(ValueError, match="LATE_SCALE and SHARED_SCALES"):
            skinny.matmul(x, weight, None, {"num_warps": 2, "SHARED_SCALES": True, "LATE_SCALE": True})

    @pytest.mark.parametrize("m,dtype,tiled,config", [
        (1, torch.float16, False, {"num_warps": 2, "TABLE": True, "SCALE_AHEAD": True, "UNROLL": 2}),
        (4, torch.bfloat16, True, {"num_warps": 1, "DEPTH": 2, "X_AHEAD": False, "LATE_SCALE": True}),
        (9, torch.float16, True, {"num_warps": 2, "TABLE": True, "SHARED_SCALES": True, "ROWS": 8})])
    def test_balanced_grid_matches_reference(m, dtype, tiled, config):
        """``BALANCE`` over 4 SMs: the first 4 row groups whole, the rest split along K into parts
        whose fp32 partials the last part to finish adds (with the bias), as the unbalanced grid would."""
        torch.manual_seed(m)
        n, k = (80, 1024) if tiled else (72, 1088)  # 5 groups of 16 rows (the last partial without tiles)
        rows = config.get("ROWS", 16)
        weight, ref = _weight(n, k, 64, True, tiled)
        plan = skinny.tail_plan(-(-n // rows), -(-k // skinny.SEGMENT), config["num_warps"], 4)
        assert plan is not None and plan[0] == 4 * (n // rows // 4) and plan[1] >= 2, plan
        bias = (torch.randn(n) * 0.1).to(dtype)
        x = torch.randn(m, k).to(dtype)
        out = skinny.matmul(x, weight, bias, dict(config, BALANCE=4))
        expect = x.float() @ ref.t() + bias.float()
        assert ((out.float() - expect).norm() / expect.norm()).item() < (2e-3 if dtype == torch.float16 else 1e-2)
        plain = skinny.matmul(x, weight, bias, config)
        assert ((out.float() - plain.float()).abs().max() <= 2 * plain.float().abs().max() * 2 ** -8).item()

    @pytest.mark.parametrize("index,m,config", [(i, m, c) for i, (m, c) in enumerate(tuning.mma_plans())])
    def test_every_shipped_plan_matches_reference(index, m, config):
        """What the dispatcher runs, config by config, with K long enough for every plan's unmasked
        steady loop to run before its masked tail, every other plan in tiles as on the measured
        shapes (24 segments, 32 rows), the rest row-major with a partial segment and row group
        (24 and a half segments, 24 rows)."""
        torch.manual_seed(m)
        tiled = index % 2 == 0  # the plans take turns
        n, k = (32, 3072) if tiled else (24, 3136)
        weight, ref = _weight(n, k, 64, True, tiled)
        x = torch.randn(m, k).to(torch.float16)
        out = skinny.matmul(x, weight, None, config)
        expect = x.float() @ ref.t()
        assert ((out.float() - expect).norm() / expect.norm()).item() < 2e-3, config
