"""NF4Linear against bitsandbytes' Linear4bit and functional API (golden on CPU)."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as bnbf  # noqa: E402
from bitsandbytes.nn import Linear4bit, Params4bit  # noqa: E402

from peftlab.quant.kernels import dispatch  # noqa: E402
from peftlab.quant.linear4bit import NF4Linear  # noqa: E402
from peftlab.quant.nf4 import NF4FormatError  # noqa: E402
from tests.conftest import bnb_dequantize  # noqa: E402

BLOB = "weight.quant_state.bitsandbytes__nf4"


def _linear(in_f=128, out_f=96, bias=True, dtype=torch.float32, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias).to(dtype)
    with torch.no_grad():
        lin.weight.mul_(3.0)
        if bias:
            lin.bias.normal_()
    return lin


def _bnb_dequantized(weight: torch.Tensor, blocksize=64, double_quant=True) -> torch.Tensor:
    """bitsandbytes' own quantize -> dequantize of ``weight`` ([out, in])."""
    packed, state = bnbf.quantize_4bit(weight, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4")
    return bnb_dequantize(packed, state)


def _bnb_layer(lin: nn.Linear, double_quant=True, blocksize=64) -> Linear4bit:
    layer = Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None, quant_type="nf4",
                       compress_statistics=double_quant)
    layer.weight = Params4bit(lin.weight.detach().float().clone(), requires_grad=False, blocksize=blocksize,
                              compress_statistics=double_quant, quant_type="nf4", module=layer)
    if lin.bias is not None:
        layer.bias = nn.Parameter(lin.bias.detach().float().clone())
    return layer.to("cpu")  # quantizes


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("blocksize", [32, 64, 256])
def test_forward_equals_linear_on_bitsandbytes_weight(double_quant, blocksize):
    lin = _linear(in_f=192, out_f=80)
    layer = NF4Linear.from_linear(lin, blocksize=blocksize, double_quant=double_quant)
    w_ref = _bnb_dequantized(lin.weight.detach(), blocksize, double_quant)
    assert torch.equal(layer.dequantize(), w_ref)
    x = torch.randn(3, 5, 192)
    assert layer.compute_dtype == torch.float32  # CPU default
    assert torch.equal(layer(x), nn.functional.linear(x, w_ref, lin.bias))


def test_bf16_compute_returns_input_dtype():
    lin = _linear()
    layer = NF4Linear.from_linear(lin, compute_dtype=torch.bfloat16)
    x = torch.randn(4, 128)
    y = layer(x)
    w_ref = _bnb_dequantized(lin.weight.detach())
    expected = nn.functional.linear(x.bfloat16(), w_ref.bfloat16(), lin.bias.bfloat16()).float()
    assert y.dtype == torch.float32 and torch.equal(y, expected)


def test_gpt2_conv1d_is_transposed():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(96, 128)  # nf=96 outputs, nx=128 inputs; weight [128, 96]
    nn.init.normal_(conv.weight)
    layer = NF4Linear.from_linear(conv)
    assert (layer.in_features, layer.out_features) == (128, 96)
    w_ref = _bnb_dequantized(conv.weight.detach().t().contiguous())
    x = torch.randn(2, 7, 128)
    assert torch.equal(layer(x), nn.functional.linear(x, w_ref, conv.bias))
    assert (layer(x) - conv(x)).abs().max() < 0.25 * conv(x).abs().max()


def test_backward_gives_input_and_bias_grads_and_keeps_no_weight():
    lin = _linear(in_f=64, out_f=48)
    layer = NF4Linear.from_linear(lin)
    w_ref = _bnb_dequantized(lin.weight.detach()).double()
    x = torch.randn(6, 64, requires_grad=True)
    grad_out = torch.randn(6, 48)

    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    assert layer.weight_numel not in saved  # no dequantized [out, in] weight kept for backward
    y.backward(grad_out)
    assert torch.allclose(x.grad.double(), grad_out.double() @ w_ref, rtol=1e-5, atol=1e-5)
    assert torch.allclose(layer.bias.grad.double(), grad_out.double().sum(0), rtol=1e-6, atol=1e-6)
    assert layer.weight.grad is None and not layer.weight.requires_grad
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["bias"]


def test_frozen_bias_and_input_without_grad():
    layer = NF4Linear.from_linear(_linear())
    layer.bias.requires_grad_(False)
    x = torch.randn(2, 128, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and layer.bias.grad is None


def test_module_facts():
    layer = NF4Linear.from_linear(_linear(in_f=128, out_f=96, dtype=torch.bfloat16))
    assert layer.weight.dtype == torch.uint8 and tuple(layer.weight.shape) == (128 * 96 // 2, 1)
    assert layer.weight_numel == 128 * 96 and layer.weight_dtype == torch.bfloat16
    assert layer.absmax.dtype == torch.uint8 and layer.absmax.numel() == 128 * 96 // 64
    assert "blocksize=64" in repr(layer) and "double_quant=True" in repr(layer)
    assert layer.dequantize().dtype == torch.bfloat16 and layer.dequantize().shape == (96, 128)


def test_dtype_casts_keep_quant_constants():
    layer = NF4Linear.from_linear(_linear(), double_quant=True)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.to(torch.bfloat16)
    layer.half()
    after = layer.state_dict()
    for key in ("weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map"):
        assert after[key].dtype == before[key].dtype and torch.equal(after[key], before[key]), key
    assert layer.bias.dtype == torch.float16


def test_meta_shell_materialises_then_loads():
    shell = NF4Linear(128, 96, device="meta", name="proj")
    shell.to_empty(device="cpu")
    assert shell.absmax.device.type == "cpu" and shell.absmax.dtype == torch.uint8
    lin = _linear()
    shell.load_state_dict(NF4Linear.from_linear(lin).state_dict())
    assert torch.equal(shell.dequantize(), _bnb_dequantized(lin.weight.detach()))


@pytest.mark.parametrize("double_quant", [False, True])
def test_state_dict_equals_bitsandbytes(double_quant):
    lin = _linear()
    ours = NF4Linear.from_linear(lin, double_quant=double_quant).state_dict()
    ref = _bnb_layer(lin, double_quant).state_dict()
    assert list(ours) == list(ref)
    for key in ref:
        assert ours[key].dtype == ref[key].dtype and torch.equal(ours[key], ref[key]), key
    info = json.loads(bytes(ours[BLOB].tolist()))
    assert info["quant_type"] == "nf4" and info["shape"] == [96, 128] and info["dtype"] == "float32"
    assert ("nested_offset" in info) == double_quant


@pytest.mark.parametrize("double_quant", [False, True])
def test_peftlab_layer_loads_into_bitsandbytes(double_quant):
    lin = _linear(dtype=torch.bfloat16)
    ours = NF4Linear.from_linear(lin, double_quant=double_quant)
    sd = ours.state_dict()
    layer = Linear4bit(128, 96, bias=True, quant_type="nf4", compute_dtype=torch.float32)
    stats = {k: v for k, v in sd.items() if k.startswith("weight.")}
    layer.weight = Params4bit.from_prequantized(sd["weight"], stats, device="cpu", module=layer)
    layer.bias = nn.Parameter(sd["bias"].float())
    assert torch.equal(bnb_dequantize(layer.weight, layer.weight.quant_state), ours.dequantize())
    x = torch.randn(3, 128)
    ours.bias.data = ours.bias.data.float()
    assert torch.allclose(layer(x), ours(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("source_dq,target_dq", [(True, False), (False, True), (True, True)])
def test_bitsandbytes_state_dict_loads_into_fresh_layer(source_dq, target_dq):
    lin = _linear()
    ref = _bnb_layer(lin, source_dq)
    layer = NF4Linear(128, 96, double_quant=target_dq)
    result = layer.load_state_dict(ref.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    assert layer.double_quant == source_dq
    assert torch.equal(layer.dequantize(), bnb_dequantize(ref.weight, ref.weight.quant_state))
    x = torch.randn(2, 128)
    assert torch.equal(layer(x), nn.functional.linear(x, layer.dequantize(), ref.bias))


def test_load_state_dict_inside_a_model_and_strict_keys():
    lin = _linear()
    src = nn.Sequential(nn.Linear(4, 4), NF4Linear.from_linear(lin))
    dst = nn.Sequential(nn.Linear(4, 4), NF4Linear(128, 96, double_quant=False))
    dst.load_state_dict(src.state_dict())
    assert torch.equal(dst[1].dequantize(), src[1].dequantize())
    sd = src.state_dict()
    sd["1.weight.extra"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        dst.load_state_dict(sd)
    del sd["1.weight.extra"], sd["1.bias"]
    assert dst.load_state_dict(sd, strict=False).missing_keys == ["1.bias"]


def test_full_precision_state_dict_is_quantized_on_load():
    lin = _linear()
    layer = NF4Linear(128, 96, blocksize=128, double_quant=True)
    layer.load_state_dict(lin.state_dict())
    assert torch.equal(layer.dequantize(), _bnb_dequantized(lin.weight.detach(), 128, True))
    assert torch.equal(layer.bias, lin.bias)


def test_torch_and_bitsandbytes_backends_agree_on_cpu():
    """The bitsandbytes dispatch path (QuantState conversion, matmul_4bit) runs on CPU too."""
    for double_quant in (False, True):
        layer = NF4Linear.from_linear(_linear(), double_quant=double_quant)
        x = torch.randn(5, 128)
        g = torch.randn(5, 96)
        assert torch.equal(dispatch.BITSANDBYTES.dequantize(layer, torch.float32),
                           dispatch.TORCH.dequantize(layer, torch.float32))
        assert torch.allclose(dispatch.BITSANDBYTES.linear(x, layer), dispatch.TORCH.linear(x, layer),
                              rtol=1e-5, atol=1e-5)
        assert torch.allclose(dispatch.BITSANDBYTES.grad_input(g, layer), dispatch.TORCH.grad_input(g, layer),
                              rtol=1e-5, atol=1e-5)
    assert dispatch.backend_for(torch.device("cpu")) is dispatch.TORCH


# ----------------------------------------------------------------------------- bad input
def _corrupt(sd: dict, **changes) -> dict:
    info = json.loads(bytes(sd[BLOB].tolist()))
    info.update(changes)
    sd = dict(sd)
    sd[BLOB] = torch.tensor(list(json.dumps(info).encode()), dtype=torch.uint8)
    return sd


def _load_as_proj(sd: dict, double_quant=True):
    model = nn.ModuleDict({"proj": NF4Linear(128, 96, double_quant=double_quant)})
    model.load_state_dict({"proj." + k: v for k, v in sd.items()})


def test_odd_and_bad_construction_errors():
    with pytest.raises(NF4FormatError, match="even"):
        NF4Linear(3, 3, name="head")
    with pytest.raises(NF4FormatError, match="blocksize 48"):
        NF4Linear(128, 96, blocksize=48)
    lin = nn.Linear(8, 8)
    lin.weight = nn.Parameter(torch.ones(8, 8, dtype=torch.int8), requires_grad=False)
    with pytest.raises(NF4FormatError, match="'mlp.up'.*int8|int8.*'mlp.up'"):
        NF4Linear.from_linear(lin, name="mlp.up")
    with pytest.raises(TypeError, match="Embedding"):
        NF4Linear.from_linear(nn.Embedding(4, 4))


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda sd: {**sd, BLOB: torch.tensor(list(b"{not json"), dtype=torch.uint8)}, "not valid UTF-8 JSON"),
        (lambda sd: _corrupt(sd, quant_type="fp4"), "quant_type 'fp4'"),
        (lambda sd: _corrupt(sd, blocksize=100), "blocksize 100"),
        (lambda sd: _corrupt(sd, dtype="int8"), "dtype 'int8'"),
        (lambda sd: _corrupt(sd, shape=[96, 64]), r"shape \[96, 64\]"),
        (lambda sd: {**sd, "weight.absmax": sd["weight.absmax"][:-1]}, "absmax' has 191 entries"),
        (lambda sd: {k: v for k, v in sd.items() if k != "weight.nested_absmax"}, "nested_absmax"),
    ],
)
def test_corrupted_state_dict_errors_name_the_layer(mutate, match):
    sd = NF4Linear.from_linear(_linear()).state_dict()
    with pytest.raises(NF4FormatError, match=match) as info:
        _load_as_proj(mutate(sd))
    assert "'proj'" in str(info.value)


def test_fp4_checkpoint_is_refused():
    layer = Linear4bit(128, 96, quant_type="fp4")
    layer.load_state_dict(_linear().state_dict())
    sd = layer.to("cpu").state_dict()
    assert "weight.quant_state.bitsandbytes__fp4" in sd
    with pytest.raises(NF4FormatError, match="'proj'.*fp4"):
        _load_as_proj(sd)


def test_tiled_layer_computes_the_same_and_saves_row_major():
    """A layer's bytes in tiles (as on a GPU running the Triton kernels) give the same forward,
    dequantized weight and backward; its state dict is still bitsandbytes' and loads anywhere."""
    lin = _linear(in_f=256, out_f=48)
    layer = NF4Linear.from_linear(lin)
    assert not layer.tiled  # on the CPU the bytes stay row-major
    ref_sd, ref_w = layer.state_dict(), layer.dequantize()
    x = torch.randn(3, 256, requires_grad=True)
    ref_y = layer(x)
    ref_y.sum().backward()
    ref_grad, x.grad = x.grad, None
    layer._set_tiled(True)
    assert layer.tiled and layer.quant_state.tiled and not torch.equal(layer.weight, ref_sd["weight"])
    assert torch.equal(layer.dequantize(), ref_w)
    y = layer(x)
    y.sum().backward()
    assert torch.equal(y, ref_y) and torch.equal(x.grad, ref_grad)
    sd = layer.state_dict()
    assert all(torch.equal(sd[k], ref_sd[k]) for k in ref_sd)
    assert torch.equal(_bnb_layer(lin).state_dict()["weight"], sd["weight"])
    assert torch.equal(layer.row_major_weight(), ref_sd["weight"])
    # bitsandbytes reads row-major bytes only: its backend is handed them
    x2 = x.detach()
    assert torch.equal(dispatch.BITSANDBYTES.dequantize(layer, torch.float32), ref_w)
    assert torch.allclose(dispatch.BITSANDBYTES.linear(x2, layer), ref_y.detach(), rtol=1e-5, atol=1e-5)
    fresh = NF4Linear(256, 48)
    fresh.load_state_dict(sd)
    assert not fresh.tiled and torch.equal(fresh.weight, ref_sd["weight"])
    layer.load_state_dict(ref_sd)  # a row-major state dict into a tiled layer
    assert not layer.tiled and torch.equal(layer.dequantize(), ref_w)


def test_untileable_shapes_and_tiled_states_are_checked():
    lin = _linear(in_f=192, out_f=40)  # 40 rows, 192 columns: no whole tiles
    layer = NF4Linear.from_linear(lin)
    state = layer.quant_state
    state.tiled = True
    with pytest.raises(NF4FormatError, match="tiled"):
        layer.set_quantized(layer.weight.detach().clone(), state)
    # the kernels' weight view checks the same, in its own error type
    from peftlab.quant.kernels.weights import NF4KernelError, NF4Weight

    with pytest.raises(NF4KernelError, match="tiles"):
        NF4Weight.from_state(layer.weight.detach(), state)


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("double_quant", [False, True])
def test_cuda_forward_and_backward_against_fp32_reference(double_quant):
    lin = _linear(in_f=512, out_f=384, dtype=torch.bfloat16)
    cpu_layer = NF4Linear.from_linear(lin, double_quant=double_quant)
    layer = NF4Linear.from_linear(lin.cuda(), double_quant=double_quant)
    assert layer.compute_dtype == torch.bfloat16
    assert torch.equal(layer.dequantize().cpu(), cpu_layer.dequantize())
    w32 = cpu_layer.dequantize(torch.float32).cuda()
    x = torch.randn(4, 33, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    ref = nn.functional.linear(x.float(), w32, lin.bias.float())
    assert y.dtype == torch.bfloat16
    assert (y.float() - ref).abs().max() <= 0.02 * ref.abs().max()
    g = torch.randn_like(y)
    y.backward(g)
    ref_grad = g.float() @ w32
    assert (x.grad.float() - ref_grad).abs().max() <= 0.02 * ref_grad.abs().max()
    # every backend that can run here agrees with the torch reference
    x32 = x.detach().float()
    for backend in {dispatch.backend_for(x.device), dispatch.TORCH}:
        out = backend.linear(x32, layer)
        assert torch.allclose(out, nn.functional.linear(x32, w32, lin.bias.float().cuda()), rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
def test_layers_on_the_gpu_hold_tiles_and_moves_reorder_them():
    """Built on the GPU, a tileable layer holds tiles and runs like the CPU layer; moved to the CPU it
    goes back to row-major, and back on the GPU into tiles; an untileable one stays row-major."""
    lin = _linear(in_f=256, out_f=48)
    cpu_layer = NF4Linear.from_linear(lin)
    layer = NF4Linear.from_linear(_linear(in_f=256, out_f=48).cuda())
    assert layer.tiled and torch.equal(layer.state_dict()["weight"].cpu(), cpu_layer.weight)
    assert torch.equal(layer.dequantize().cpu(), cpu_layer.dequantize())
    x = torch.randn(5, 256)
    assert torch.allclose(layer(x.cuda()).cpu(), cpu_layer(x), rtol=1e-2, atol=1e-2)
    moved = layer.cpu()
    assert not moved.tiled and torch.equal(moved.weight, cpu_layer.weight)
    assert moved.cuda().tiled
    assert cpu_layer.cuda().tiled  # a CPU-built layer moved in is tiled too
    odd = NF4Linear.from_linear(_linear(in_f=192, out_f=40).cuda())
    assert not odd.tiled


@pytest.mark.gpu
def test_to_cuda_moves_quant_state():
    layer = NF4Linear.from_linear(_linear()).to("cuda")
    sd = layer.state_dict()
    assert all(t.is_cuda for k, t in sd.items() if k != BLOB)  # the JSON blob is a CPU tensor, as in bitsandbytes
    assert layer.compute_dtype == torch.bfloat16
    x = torch.randn(2, 128, device="cuda")
    assert layer(x).dtype == torch.float32
