"""QLoRA: LoRA on NF4 layers — training, memory behaviour of backward, merge paths, export."""
import copy

import bitsandbytes.functional as bnbf
import pytest
import torch
from transformers import AutoModelForCausalLM

import peftlab
from peftlab import LoraConfig
from peftlab.errors import MergeError
from peftlab.quant import NF4Linear, quantize_model
from tests.conftest import make_gpt2, make_llama


def qlora(factory=make_llama, compute_dtype=None, **config):
    model = quantize_model(factory(), compute_dtype=compute_dtype)
    return model, peftlab.wrap(model, LoraConfig(**{"r": 4, "init": "random", **config}))


def packed_state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_lora_targets_nf4_layers_and_equals_base_at_init(token_batch):
    model = quantize_model(make_llama())
    expected = model(**token_batch).logits
    wrapped = peftlab.wrap(model, LoraConfig(r=4))
    assert len(wrapped.adapters["default"].layers) == 2 * 7
    assert wrapped(**token_batch).logits.equal(expected)
    counts = {r.kind: r.total for r in wrapped.summary().rows}
    dense = {r.kind: r.total for r in peftlab.wrap(make_llama(), LoraConfig(r=4)).summary().rows}
    assert counts["NF4Linear"] == dense["Linear"] - model.lm_head.weight.numel()  # 4-bit weights count in full


def test_qlora_training_lowers_loss_and_changes_only_adapters(token_batch):
    model, wrapped = qlora(init="kaiming")
    before = packed_state(model)
    wrapped.train()
    optimizer = torch.optim.AdamW(wrapped.trainable_parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        loss = wrapped(**token_batch, labels=token_batch["input_ids"]).loss
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert losses[-1] < losses[0]
    assert all(v.equal(before[k]) for k, v in model.state_dict().items())


def test_gradient_checkpointing_gives_adapter_gradients_on_first_step(token_batch):
    _, wrapped = qlora(init="kaiming")
    wrapped.enable_gradient_checkpointing()
    wrapped.train()
    wrapped(**token_batch, labels=token_batch["input_ids"]).loss.backward()
    grads = [w.lora_B.grad for w in wrapped.adapters["default"].layers.values()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_backward_keeps_no_dequantized_weight_alive(token_batch):
    model, wrapped = qlora()
    weight_shapes = {(m.out_features, m.in_features) for m in model.modules() if isinstance(m, NF4Linear)}
    saved = []

    def pack(tensor):
        saved.append((tuple(tensor.shape), tensor.dtype))
        return tensor

    wrapped.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = wrapped(**token_batch, labels=token_batch["input_ids"]).loss
    assert saved  # the hook saw the activations autograd keeps
    assert not [s for s in saved if s[0] in weight_shapes and s[1].is_floating_point]
    loss.backward()


def test_merge_unmerge_keeps_packed_bytes_exact(token_batch):
    model, wrapped = qlora(bias="lora_only")
    wrapped.add_adapter("b", LoraConfig(r=2, init="random", target_modules=["q_proj"]), activate=True)
    before = packed_state(model)
    unmerged = wrapped(**token_batch).logits
    for _ in range(10):
        wrapped.merge()
        merged = wrapped(**token_batch).logits
        wrapped.unmerge()
    assert (merged - unmerged).abs().max() / unmerged.abs().max() <= 1e-5
    assert all(v.equal(before[k]) for k, v in model.state_dict().items())
    assert all(m.merged_weight is None for m in model.modules() if isinstance(m, NF4Linear))
    assert wrapped(**token_batch).logits.equal(unmerged)


def test_merge_refuses_non_finite_and_changes_nothing(token_batch):
    model, wrapped = qlora(compute_dtype=torch.float16, target_modules=["o_proj"])
    with torch.no_grad():  # a merged weight beyond fp16's range (65504)
        wrapped.adapters["default"].layers["model/layers/1/self_attn/o_proj"].lora_B.fill_(1e6)
    before = packed_state(model)
    with pytest.raises(MergeError, match="'model.layers.1.self_attn.o_proj' would create"):
        wrapped.merge()
    assert all(v.equal(before[k]) for k, v in model.state_dict().items())
    assert all(m.merged_weight is None for m in model.modules() if isinstance(m, NF4Linear))


@pytest.mark.parametrize("factory", [make_llama, make_gpt2])
def test_merge_and_unload_dequantizes_instead_of_requantizing(factory, tmp_path, token_batch):
    model, wrapped = qlora(factory)
    expected = wrapped(**token_batch).logits
    plain = wrapped.merge_and_unload()
    assert not any(isinstance(m, NF4Linear) for m in plain.modules())
    assert type(plain.get_submodule("transformer.h.0.attn.c_attn" if factory is make_gpt2 else
                                    "model.layers.0.self_attn.q_proj")).__name__ == (
        "Conv1D" if factory is make_gpt2 else "Linear")
    assert (plain(**token_batch).logits - expected).abs().max() / expected.abs().max() <= 1e-5
    plain.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(reloaded(**token_batch).logits, plain(**token_batch).logits)


def test_requantize_reports_the_error_and_matches_bitsandbytes(token_batch):
    model, wrapped = qlora()
    reference = copy.deepcopy(wrapped).merge_and_unload()  # dense merged weights
    dense = reference.model.layers[0].mlp.down_proj.weight.detach()
    requantized = wrapped.merge_and_unload(requantize=True, probe=token_batch)
    layer = requantized.model.layers[0].mlp.down_proj
    assert isinstance(layer, NF4Linear)
    packed, state = bnbf.quantize_4bit(dense, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert layer.weight.equal(packed)
    error = wrapped.requantize_error
    assert 0 < error["mean_relative"] <= error["max_relative"]


def test_requantize_needs_a_quantized_base():
    wrapped = peftlab.wrap(make_llama(), LoraConfig(r=4))
    with pytest.raises(MergeError, match="no 4-bit layers"):
        wrapped.merge_and_unload(requantize=True)


@pytest.mark.gpu
def test_qlora_on_cuda_matches_a_dense_reference_in_bf16():
    """bf16 compute on the GPU: forward and adapter gradients agree with the same LoRA on the dequantized weights."""
    from peftlab.quant.loading import dequantize_model

    torch.manual_seed(0)
    model = quantize_model(make_llama(dtype=torch.bfloat16).cuda(), compute_dtype=torch.bfloat16)
    dense = copy.deepcopy(model)
    dequantize_model(dense)  # the same weights, as bf16 nn.Linear
    ids = torch.randint(0, 128, (4, 64), device="cuda")
    grads, logits = [], []
    for base in (model, dense):
        torch.manual_seed(1)
        wrapped = peftlab.wrap(base, LoraConfig(r=8, init="random"))
        wrapped.train()
        out = wrapped(input_ids=ids, labels=ids)
        out.loss.backward()
        logits.append(out.logits.float())
        grads.append(torch.cat([p.grad.flatten() for p in wrapped.trainable_parameters()]))
        if base is model:
            state = packed_state(model)
            wrapped.merge()
            wrapped.unmerge()
            assert all(v.equal(state[k]) for k, v in model.state_dict().items())
    torch.testing.assert_close(logits[0], logits[1], rtol=2e-2, atol=2e-2)
    assert torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0) > 0.999
