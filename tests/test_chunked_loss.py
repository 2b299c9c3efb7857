"""Chunked linear + cross-entropy equals the plain full-logits loss, in value and gradients."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from peftlab.train.loss import causal_lm_loss, chunked_linear_cross_entropy
from tests.conftest import make_gpt2, make_llama


def _inputs(n_tokens=37, hidden=16, vocab=50, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n_tokens, hidden, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) * 0.3).to(dtype).requires_grad_()
    b = (torch.randn(vocab, generator=g) * 0.1).to(dtype).requires_grad_()
    y = torch.randint(0, vocab, (n_tokens,), generator=g)
    y[::5] = -100
    return h, w, b, y


@pytest.mark.parametrize("chunk_size", [1, 8, 1000])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_full_logits_cross_entropy(chunk_size, with_bias):
    h, w, b, y = _inputs()
    bias = b if with_bias else None
    loss = chunked_linear_cross_entropy(h, w, y, bias=bias, chunk_size=chunk_size)
    grads = torch.autograd.grad(loss * 1.7, [h, w] + ([b] if with_bias else []))
    ref = F.cross_entropy(F.linear(h, w, bias), y)
    ref_grads = torch.autograd.grad(ref * 1.7, [h, w] + ([b] if with_bias else []))
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_bf16_is_close_to_the_fp32_loss():
    h, w, _, y = _inputs(dtype=torch.bfloat16)
    loss = chunked_linear_cross_entropy(h, w, y, chunk_size=8)
    gh, gw = torch.autograd.grad(loss, [h, w])
    ref = F.cross_entropy(F.linear(h.float(), w.float()), y)
    rh, rw = torch.autograd.grad(ref, [h, w])
    assert loss.dtype == torch.float32 and gh.dtype == torch.bfloat16
    torch.testing.assert_close(loss, ref, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(gh.float(), rh.float(), rtol=5e-2, atol=2e-3)
    torch.testing.assert_close(gw.float(), rw.float(), rtol=5e-2, atol=2e-3)


def test_no_valid_label_gives_nan_like_torch():
    h, w, _, y = _inputs()
    y[:] = -100
    assert torch.isnan(chunked_linear_cross_entropy(h, w, y)) and torch.isnan(F.cross_entropy(h @ w.t(), y))


@pytest.mark.parametrize("factory", [make_llama, make_gpt2])
def test_causal_lm_loss_equals_the_model_loss(factory):
    model = factory()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # right padding: ignored in both losses
    labels = ids.masked_fill(mask == 0, -100)
    ref = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    loss = causal_lm_loss(model, ids, attention_mask=mask, chunk_size=5)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_bad_input_is_named():
    h, w, _, y = _inputs()
    with pytest.raises(ValueError, match="chunk_size must be a positive number of tokens, got 0"):
        chunked_linear_cross_entropy(h, w, y, chunk_size=0)
    with pytest.raises(ValueError, match=r"labels shape \(36,\) must equal hidden's leading shape \(37,\)"):
        chunked_linear_cross_entropy(h, w, y[:-1])
    model = make_llama()
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="config.final_logit_softcapping=30.0 transforms the logits"):
        causal_lm_loss(model, torch.zeros(1, 4, dtype=torch.long))


def test_obstacles_are_named_and_plain_heads_have_none():
    import peftlab
    from peftlab import LoraConfig
    from peftlab.train.loss import chunked_loss_obstacle

    assert chunked_loss_obstacle(make_llama()) is None
    assert chunked_loss_obstacle(make_gpt2()) is None  # tied head: still a plain nn.Linear
    capped = make_llama()
    capped.config.final_logit_softcapping = 30.0
    assert chunked_loss_obstacle(capped) == "config.final_logit_softcapping=30.0 transforms the logits"
    routed = make_llama()
    routed.config.output_router_logits = True
    assert "auxiliary loss" in chunked_loss_obstacle(routed)
    # a trained copy of the head lives in a hook that reading head.weight would bypass
    wrapped = peftlab.wrap(make_llama(), LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    assert "forward hooks" in chunked_loss_obstacle(wrapped.base_model)
    assert chunked_loss_obstacle(wrapped) == chunked_loss_obstacle(wrapped.base_model)  # a PeftModel is unwrapped
    with pytest.raises(ValueError, match="forward hooks"):
        causal_lm_loss(wrapped.base_model, torch.zeros(1, 4, dtype=torch.long))


def test_packed_positions_reach_the_backbone():
    model = make_llama()
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 128, (2, 12), generator=gen)
    positions = torch.tensor([list(range(5)) + list(range(7)), list(range(12))])  # two examples packed in row 0
    labels = ids.clone()
    labels[0, 5] = -100  # no target across the example boundary
    ref = model(input_ids=ids, position_ids=positions, labels=labels, use_cache=False).loss  # as the trainer calls it
    loss = causal_lm_loss(model, ids, labels=labels, position_ids=positions, chunk_size=7)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    unpositioned = causal_lm_loss(model, ids, labels=labels, chunk_size=7)
    assert not torch.allclose(unpositioned, ref)  # the positions mattered, so they were passed on
