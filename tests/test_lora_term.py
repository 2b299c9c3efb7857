"""The one-node LoRA term: values and gradients against fp64 autograd and HF PEFT."""
from __future__ import annotations

import peft
import pytest
import torch

import peftlab
from peftlab import LoraConfig
from peftlab.adapters.lora import LoraWeights
from peftlab.adapters.lora_term import LoraTerm, weights_changed

from .conftest import loss_of, make_gpt2, make_llama


def _reference(x, out, a, b, scaling):
    """``out + scaling * x A^T B^T`` in fp64 with plain autograd."""
    return out + (x @ a.t()) @ (b * scaling).t()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2), (torch.float16, 3e-3)])
def test_values_and_gradients_match_fp64_autograd(dtype, tol):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 40, generator=gen)
    out = torch.randn(3, 7, 24, generator=gen)
    a = torch.randn(6, 40, generator=gen) / 6
    b = torch.randn(24, 6, generator=gen) / 6
    upstream = torch.randn(3, 7, 24, generator=gen)
    scaling = 2.5

    leaves = [t.clone().double().requires_grad_() for t in (x, out, a, b)]
    _reference(*leaves, scaling).backward(upstream.double())
    expected = _reference(*(t.detach() for t in leaves), scaling)

    xs, outs = x.to(dtype).requires_grad_(), out.to(dtype).requires_grad_()
    a32, b32 = a.clone().requires_grad_(), b.clone().requires_grad_()
    result = LoraTerm.apply(xs, outs, a32, b32, a.to(dtype), (b * scaling).to(dtype), scaling)
    result.backward(upstream.to(dtype))

    def close(got, want):
        err = (got.double() - want).abs().max() / want.abs().max()
        assert err < tol, f"relative error {err:.2e}"

    close(result.detach(), expected)
    for got, leaf in zip((xs.grad, outs.grad, a32.grad, b32.grad), leaves):
        close(got, leaf.grad)
    assert a32.grad.dtype == b32.grad.dtype == torch.float32  # gradients land on the fp32 weights


def _hf_peft_copy(ours: peftlab.PeftModel, factory, tmp_path):
    ours.save(tmp_path / "adapter")
    return peft.PeftModel.from_pretrained(factory(), str(tmp_path / "adapter"), is_trainable=True)


def _gpt2_without_dropout():
    return make_gpt2(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


@pytest.mark.parametrize("factory", [make_llama, _gpt2_without_dropout], ids=["llama", "gpt2"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_adapter_gradients_match_hf_peft(factory, checkpointing, tmp_path, token_batch):
    ours = peftlab.wrap(factory(), LoraConfig(r=4, alpha=8, init="random"))
    theirs = _hf_peft_copy(ours, factory, tmp_path)
    if checkpointing:
        ours.enable_gradient_checkpointing()
        theirs.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for model in (ours, theirs):
        model.train()
        loss_of(model, token_batch).backward()
    their_grads = {name.replace(".default", ""): p.grad for name, p in theirs.named_parameters() if p.requires_grad}
    compared = 0
    for key, weights in ours.adapters["default"].layers.items():
        path = "base_model.model." + key.replace("/", ".")
        for attr in ("lora_A", "lora_B"):
            want = their_grads[f"{path}.{attr}.weight"]
            got = getattr(weights, attr).grad
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
            compared += 1
    assert compared == 2 * len(ours.adapters["default"].layers) > 0


@pytest.mark.parametrize("optimizer_kind", ["sgd", "fused_adamw"])
def test_training_and_inference_paths_agree_and_follow_weight_updates(optimizer_kind, token_batch):
    wrapped = peftlab.wrap(make_llama(), LoraConfig(r=4, init="random"))
    if optimizer_kind == "sgd":
        optimizer = torch.optim.SGD(wrapped.trainable_parameters(), lr=0.5)
    else:  # fused kernels move no version counters: the step hook must still refresh the copies
        optimizer = torch.optim.AdamW(wrapped.trainable_parameters(), lr=0.05, fused=True)
    for _ in range(2):
        wrapped.train()
        with_grad = wrapped(**token_batch).logits
        with torch.no_grad():
            without_grad = wrapped(**token_batch).logits
        torch.testing.assert_close(with_grad.detach(), without_grad, rtol=1e-5, atol=1e-5)
        loss_of(wrapped, token_batch).backward()
        optimizer.step()  # the cached 16-bit copies must follow this in-place update
        optimizer.zero_grad()
    merged = peftlab.wrap(make_llama(), LoraConfig(r=4, init="random"))
    merged.load_state_dict(wrapped.state_dict())
    merged.merge()
    with torch.no_grad():
        torch.testing.assert_close(wrapped(**token_batch).logits, merged(**token_batch).logits, rtol=1e-4, atol=1e-4)


def test_cached_copies_are_remade_only_when_the_weights_may_have_changed():
    weights = LoraWeights(8, 4, r=2, scaling=2.0, dropout=0.0, fan_in_fan_out=False, init="random",
                          device=torch.device("cpu"))
    first = weights._weights(torch.bfloat16)
    assert weights._weights(torch.bfloat16)[0] is first[0]
    with torch.no_grad():
        weights.lora_B.mul_(3)
    a16, b16 = weights._weights(torch.bfloat16)
    assert a16 is not first[0]
    torch.testing.assert_close(b16, (weights.lora_B.detach() * 2.0).to(torch.bfloat16))
    weights.lora_B.data.mul_(0)  # .data: no version bump, as with a fused optimizer kernel
    weights_changed()
    assert weights._weights(torch.bfloat16)[1].abs().sum() == 0
