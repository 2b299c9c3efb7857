"""Triton NF4 kernels on the CPU through Triton's interpreter, against peftlab's torch reference.

The interpreter must be switched on before any kernel is defined, so the checks run in one
child pytest process started with ``TRITON_INTERPRET=1``; the rest of the suite keeps its
normal Triton. The interpreter computes fp16/fp32 faithfully (bf16 is covered on the GPU).
"""
from __future__ import annotations

import pytest

from tests.interpreted import INNER, run_inner

if not INNER:
    def test_kernels_under_triton_interpreter():
        """Runs this module's interpreter checks in a child process and fails with its report."""
        run_inner(__file__)


else:
    import dataclasses

    import torch

    from peftlab.quant.kernels import (
        NF4KernelError,
        NF4Weight,
        chunked,
        gemm,
        gemv,
        nf4_dequantize,
        nf4_matmul,
        nf4_matmul_grad_input,
    )
    from peftlab.quant.kernels.dequant import dequantize
    from peftlab.quant.kernels.tuning import blocks_per_step
    from peftlab.quant.nf4 import dequantize_nf4, quantize_nf4, to_tiles

    def _weight(n, k, blocksize=64, nested=True, seed=0):
        w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
        packed, state = quantize_nf4(w, blocksize=blocksize, double_quant=nested)
        return packed, state, dequantize_nf4(packed, state, torch.float32)

    def _rel(out, ref):
        return ((out.float() - ref).norm() / ref.norm()).item()

    def _inputs(m, n, k, seed=1):
        g = torch.Generator().manual_seed(seed)
        return torch.randn(m, k, generator=g).half(), torch.randn(n, generator=g).half()

    @pytest.mark.parametrize("n,k,blocksize,nested", [
        (40, 192, 64, True),    # tiled kernel, 30 blocks: one partial nested block
        (24, 320, 128, False),  # rows are not whole blocks: flat kernel, fp32 absmax
        (9, 100, 64, True),     # flat kernel, partial last block
        (6, 512, 256, True),
    ])
    def test_dequantize_is_bit_exact(n, k, blocksize, nested):
        packed, state, ref = _weight(n, k, blocksize, nested)
        for dtype in (torch.float32, torch.float16):
            assert torch.equal(nf4_dequantize(packed, state, dtype), ref.to(dtype))

    def test_dequantize_piece_into_strided_scratch():
        packed, state, ref = _weight(40, 256)
        weight = NF4Weight.from_state(packed, state)
        scratch = torch.full((37, 200), float("nan"))
        piece = dequantize(weight, torch.float32, row_start=2, row_count=37, col_start=64, col_count=128,
                           out=scratch[:, :128])
        assert torch.equal(piece, ref[2:39, 64:192])
        assert torch.isnan(scratch[:, 128:]).all()  # nothing written outside the piece
        wide = torch.full((40, 300), float("nan"))
        assert torch.equal(dequantize(weight, torch.float32, out=wide[:, :256]), ref)  # whole weight, strided rows
        assert torch.isnan(wide[:, 256:]).all()
        with pytest.raises(NF4KernelError, match="aligned"):
            dequantize(weight, torch.float32, col_start=32, col_count=64)

    @pytest.mark.parametrize("nested,bias", [(True, True), (False, False)])
    def test_gemv_matches_reference(nested, bias):
        packed, state, ref = _weight(24, 320, nested=nested)
        weight = NF4Weight.from_state(packed, state)
        x, b = _inputs(2, 24, 320)
        b = b if bias else None
        expect = x.float() @ ref.t() + (b.float() if bias else 0)
        for config in ({"BN": 1, "BK": 128, "VEC": 4, "num_warps": 4}, {"BN": 4, "BK": 512, "VEC": 16, "num_warps": 2}):
            assert _rel(gemv.gemv(x, weight, b, blocks_per_step(config, 64)), expect) < 2e-3

    @pytest.mark.parametrize("nested,bias,k,chunk", [(True, True, 320, 2), (False, False, 768, 8), (True, False, 256, 8)])
    def test_one_row_gemv_matches_reference(nested, bias, k, chunk):
        # 5 blocks in chunks of 2 (split in three, the last short), 12 in 8 + 4, 4 in one chunk
        packed, state, ref = _weight(24, k, nested=nested)
        weight = NF4Weight.from_state(packed, state)
        x, b = _inputs(1, 24, k)
        b = b if bias else None
        expect = x.float() @ ref.t() + (b.float() if bias else 0)
        out = gemv.gemv_row(x, weight, b, {"PROGRAMS_PER_SM": 2, "CHUNK_BLOCKS": chunk, "VEC": 16, "num_warps": 4})
        assert out.shape == (1, 24) and out.dtype == x.dtype and _rel(out, expect) < 2e-3
        with pytest.raises(NF4KernelError, match="one activation row, got 2"):
            gemv.gemv_row(torch.cat([x, x]), weight, b, {"PROGRAMS_PER_SM": 2, "num_warps": 4})

    @pytest.mark.parametrize("w_is_a,split_k", [(True, 2), (False, 1)])
    def test_tiled_matmul_matches_reference(w_is_a, split_k):
        packed, state, ref = _weight(40, 320)
        weight = NF4Weight.from_state(packed, state)
        x, b = _inputs(17, 40, 320)
        config = {"BM": 16, "BN": 16, "BK": 64, "SPLIT_K": split_k, "W_IS_A": w_is_a, "num_warps": 4,
                  "num_stages": 2}
        out = gemm.matmul(x, weight, b, blocks_per_step(config, 64))
        assert out.dtype == torch.float16 and out.shape == (17, 40)
        assert _rel(out, x.float() @ ref.t() + b.float()) < 2e-3

    @pytest.mark.parametrize("split_k", [1, 3])
    def test_tiled_grad_input_matches_reference(split_k):
        packed, state, ref = _weight(40, 192, nested=split_k == 1)
        weight = NF4Weight.from_state(packed, state)
        grad = _inputs(5, 40, 40)[0]
        config = {"BM": 16, "BR": 16, "BK": 128, "SPLIT_K": split_k, "num_warps": 4, "num_stages": 2}
        out = gemm.matmul_grad_input(grad, weight, blocks_per_step(config, 64))
        assert _rel(out, grad.float() @ ref) < 2e-3

    def test_chunked_paths_match_reference():
        packed, state, ref = _weight(40, 192)
        weight = NF4Weight.from_state(packed, state)
        x, b = _inputs(3, 40, 192)
        out = chunked.matmul(x.float(), weight, b.float(), chunk_elems=7 * 192)  # 6 chunks, last one short
        assert _rel(out, x.float() @ ref.t() + b.float()) < 1e-6
        grad = _inputs(3, 40, 40)[0].float()
        out = chunked.matmul_grad_input(grad, weight, chunk_elems=40 * 64)  # one block column per chunk
        assert _rel(out, grad @ ref) < 1e-6
        # Off CUDA there is no side stream: overlap runs the same chunks in order.
        assert torch.equal(chunked.matmul_grad_input(grad, weight, 40 * 64, overlap=True), out)
        # The dispatcher overlaps only under CUDA-graph capture and for two or more whole chunks.
        assert not chunked.overlap_pays(weight, 40 * 64)

    @pytest.mark.parametrize("blocksize", [32, 64, 256])
    def test_every_kernel_reads_tiled_weights(blocksize):
        """Bytes in tiles, as a layer on a GPU holds them: blocks of 16 and 32 bytes inside a tile's
        rows, and of 128 bytes spanning two tiles."""
        n, k = 32, 512
        packed, state, ref = _weight(n, k, blocksize)
        packed, state = to_tiles(packed, (n, k)), dataclasses.replace(state, tiled=True)
        weight = NF4Weight.from_state(packed, state)
        assert weight.tiled
        assert torch.equal(nf4_dequantize(packed, state, torch.float32), ref)
        # pieces of whole tiles are walked in storage order, others block by block along rows
        for rows, cols in (((16, 32), (256, 512)), ((3, 29), (blocksize, min(3 * blocksize, k)))):
            piece = dequantize(weight, torch.float32, row_start=rows[0], row_count=rows[1] - rows[0],
                               col_start=cols[0], col_count=cols[1] - cols[0])
            assert torch.equal(piece, ref[rows[0]:rows[1], cols[0]:cols[1]])
        x, b = _inputs(3, n, k)
        expect = x.float() @ ref.t() + b.float()
        out = gemv.gemv(x, weight, b, blocks_per_step({"BN": 4, "BK": 256, "VEC": 16, "num_warps": 2}, blocksize))
        assert _rel(out, expect) < 2e-3
        out = gemv.gemv_row(x[:1], weight, b, {"PROGRAMS_PER_SM": 2, "CHUNK_BLOCKS": 4, "VEC": 16, "num_warps": 4})
        assert _rel(out, expect[:1]) < 2e-3
        config = {"BM": 16, "BN": 16, "BK": 256, "SPLIT_K": 2, "W_IS_A": True, "num_warps": 4, "num_stages": 2}
        assert _rel(gemm.matmul(x, weight, b, blocks_per_step(config, blocksize)), expect) < 2e-3
        grad = _inputs(3, n, n)[0]
        config = {"BM": 16, "BR": 16, "BK": 256, "SPLIT_K": 1, "num_warps": 4, "num_stages": 2}
        assert _rel(gemm.matmul_grad_input(grad, weight, blocks_per_step(config, blocksize)), grad.float() @ ref) < 2e-3
        assert _rel(chunked.matmul(x.float(), weight, b.float(), chunk_elems=16 * k), expect) < 1e-6

    def test_plans_follow_the_measured_tables():
        from peftlab.quant.kernels import tuning

        assert tuning.forward_plan(1, 11008, 4096, 64, torch.bfloat16)[0] == tuning.FORWARD[(11008, 4096)][1][0]
        assert all(tuning.forward_plan(m, 11008, 4096, 64, torch.bfloat16)[0] != "gemv1" for m in (2, 3, 16))
        # An unmeasured shape takes the nearest measured one; M=3 goes to the M=4 entry.
        assert tuning.forward_plan(3, 11000, 4100, 128, torch.float16) == tuning.FORWARD[(11008, 4096)][4]
        # ... and M=20 to the nearest entry whose kernel takes 20 rows (not the 16-row mma kernel).
        kind, config = tuning.forward_plan(20, 11000, 4100, 128, torch.float16)
        assert tuning.FORWARD[(11008, 4096)][16][0] == "mma" and (kind, kind) == (tuning.FORWARD[(11008, 4096)][64][0], "fused")
        assert config["NB"] == max(1, tuning.FORWARD[(11008, 4096)][64][1]["BK"] // 128)
        # fp32 activations never reach tl.dot (it would round them to tf32).
        assert tuning.forward_plan(64, 4096, 4096, 64, torch.float32) == ("chunked", None)
        assert tuning.grad_input_plan(1, 4096, 4096, 64, torch.float32) == ("chunked", None)

    def test_gpu_entries_replace_the_h100_choice_only_on_their_gpu():
        from peftlab.quant.kernels import tuning

        assert tuning.family_of("NVIDIA H200") == tuning.family_of("NVIDIA H200 NVL") == "H200"
        assert tuning.family_of("NVIDIA H100 80GB HBM3") == tuning.gpu_family(torch.device("cpu")) == ""
        for family, shapes in tuning.GPU_FORWARD.items():
            for (n, k), by_m in shapes.items():
                for m, entry in by_m.items():
                    assert tuning.forward_plan(m, n, k, 64, torch.bfloat16, family) == entry
                    assert tuning.forward_plan(m, n, k, 64, torch.bfloat16) == tuning.FORWARD[(n, k)][m] != entry
                    other = max(tuning.FORWARD[(n, k)])  # the family's other entries stay the H100's
                    assert tuning.forward_plan(other, n, k, 64, torch.bfloat16, family) == \
                        tuning.forward_plan(other, n, k, 64, torch.bfloat16)
                    # the GPU tests run every plan of mma_plans, so it must list this one for its rows
                    assert any(c == entry[1] and (p > 8) == (m > 8) for p, c in tuning.mma_plans())

    def test_public_entry_points_keep_leading_dims_and_check_inputs():
        packed, state, ref = _weight(24, 100)  # rows not made of whole blocks -> dequantize + matmul
        x = torch.randn(2, 3, 100).half()
        out = nf4_matmul(x, packed, state)
        assert out.shape == (2, 3, 24)
        assert _rel(out, (x.float() @ ref.t())) < 2e-3
        grad = torch.randn(2, 3, 24)
        assert _rel(nf4_matmul_grad_input(grad, packed, state), grad @ ref) < 1e-6
        with pytest.raises(NF4KernelError, match="last dimension 99"):
            nf4_matmul(torch.randn(2, 99), packed, state)
        with pytest.raises(NF4KernelError, match="bytes"):
            nf4_matmul(x, packed[:-1], state)

    @pytest.mark.parametrize("fuse_down", [True, False])
    @pytest.mark.parametrize("m,r,bias", [(1, 16, True), (21, 4, False), (40, 20, True)])
    def test_fused_lora_linear_matches_fp64(fuse_down, m, r, bias):
        from peftlab.quant.kernels.lora_linear import lora_linear

        g = torch.Generator().manual_seed(m + r)
        n, k = 48, 96  # K is not a multiple of BK: the masked tail runs
        x, w = torch.randn(m, k, generator=g).half(), (torch.randn(n, k, generator=g) / 8).half()
        a, b = (torch.randn(r, k, generator=g) / 8).half(), (torch.randn(n, r, generator=g) / 4).half()
        bvec = torch.randn(n, generator=g).half() if bias else None
        config = {"BM": 16, "BN": 32, "BK": 64, "GROUP_M": 2, "FUSE_DOWN": fuse_down, "num_warps": 4, "num_stages": 2}
        out = lora_linear(x, w, bvec, a, b, config)
        h = (x.double() @ a.double().t()).half().double()  # the kernel rounds h like a 16-bit GEMM output
        ref = x.double() @ w.double().t() + h @ b.double().t() + (bvec.double() if bias else 0)
        assert out.shape == (m, n) and out.dtype == torch.float16
        assert ((out.double() - ref).norm() / ref.norm()).item() < 2e-3

    def test_lora_add_matches_fp64():
        from peftlab.quant.kernels.lora_linear import lora_add

        g = torch.Generator().manual_seed(3)
        out, h, b = torch.randn(37, 50, generator=g).half(), torch.randn(37, 6, generator=g).half(), \
            torch.randn(50, 6, generator=g).half()
        ref = out.double() + h.double() @ b.double().t()
        result = lora_add(out, h, b, {"BM": 16, "BN": 32, "num_warps": 4})
        assert result is out  # in place
        assert ((out.double() - ref).norm() / ref.norm()).item() < 2e-3

    @pytest.mark.parametrize("bias", [True, False])
    def test_transient_merge_matches_fp64_and_leaves_the_weight_alone(bias):
        from peftlab.quant.kernels.lora_linear import lora_transient_merge

        g = torch.Generator().manual_seed(7)
        x, w = torch.randn(33, 40, generator=g).half(), (torch.randn(24, 40, generator=g) / 8).half()
        a, b = (torch.randn(5, 40, generator=g) / 8).half(), (torch.randn(24, 5, generator=g) / 4).half()
        bvec = torch.randn(24, generator=g).half() if bias else None
        before = w.clone()
        out = lora_transient_merge(x, w, bvec, a, b, {"BM": 16, "BN": 32, "num_warps": 4})
        ref = x.double() @ (w.double() + b.double() @ a.double()).t() + (bvec.double() if bias else 0)
        assert out.shape == (33, 24) and out.dtype == torch.float16 and torch.equal(w, before)
        assert ((out.double() - ref).norm() / ref.norm()).item() < 2e-3
