"""Merge / unmerge: merged equals unmerged, unmerge restores every bit, refusals are clear."""
import pytest
import torch

import peftlab
from peftlab import LoraConfig
from peftlab.errors import AdapterStateError, MergeError

INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def bits(state):
    return {k: v.view(INT_VIEW[v.dtype]).clone() if v.dtype in INT_VIEW else v.clone() for k, v in state.items()}


def assert_bit_equal(state, reference):
    assert state.keys() == reference.keys()
    for key, value in bits(state).items():
        assert value.equal(reference[key]), f"{key} differs"


def trained_config(**overrides):
    # "random" init makes B non-zero, as after training, so merges really change the weights
    return LoraConfig(**{"r": 4, "alpha": 8, "init": "random", "bias": "lora_only", **overrides})


def test_merged_logits_equal_unmerged(any_model_factory, token_batch):
    wrapped = peftlab.wrap(any_model_factory(), trained_config())
    with wrapped.disable_adapters():
        base = wrapped(**token_batch).logits
    unmerged = wrapped(**token_batch).logits
    assert (unmerged - base).abs().max() > 1e-3  # the adapter really changes the output
    wrapped.merge()
    merged = wrapped(**token_batch).logits
    rel = (merged - unmerged).abs().max() / unmerged.abs().max()
    assert rel <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_unmerge_is_bit_exact_after_100_cycles(any_model_factory, dtype, token_batch):
    model = any_model_factory(dtype=dtype)
    reference = bits(model.state_dict())
    wrapped = peftlab.wrap(model, trained_config(alpha=64), name="a")
    wrapped.add_adapter("b", trained_config(r=2, init="gaussian", target_modules="all-linear"))
    with torch.no_grad():  # give b a non-zero B so that it changes the weights too
        for weights in wrapped.adapters["b"].layers.values():
            weights.lora_B.normal_(std=0.05)
    wrapped.set_adapter(["a", "b"])
    for _ in range(100):
        wrapped.merge()
        wrapped.unmerge()
    assert_bit_equal(model.state_dict(), reference)
    # and merging really changed the weights in between
    wrapped.merge()
    assert any(not v.equal(reference[k]) for k, v in bits(model.state_dict()).items())


def test_bias_and_modules_to_save_merge_exactly(token_batch):
    from tests.conftest import make_bert_classifier

    model = make_bert_classifier()
    reference = bits(model.state_dict())
    wrapped = peftlab.wrap(model, trained_config(bias="all"))
    with torch.no_grad():
        for p in wrapped.adapters["default"].biases.parameters():
            p.normal_(std=0.1)
        for p in wrapped.adapters["default"].copies.parameters():
            p.add_(0.1)
    unmerged = wrapped(**token_batch).logits
    wrapped.merge()
    assert torch.allclose(wrapped(**token_batch).logits, unmerged, rtol=1e-5, atol=1e-6)
    wrapped.unmerge()
    assert_bit_equal(model.state_dict(), reference)
    assert wrapped(**token_batch).logits.equal(unmerged)


def test_merge_is_idempotent_and_several_adapters_merge_together(token_batch):
    from tests.conftest import make_llama

    wrapped = peftlab.wrap(make_llama(), trained_config(), name="a")
    wrapped.add_adapter("b", trained_config(target_modules=["v_proj"]), activate=True)
    both = wrapped(**token_batch).logits
    wrapped.merge(["a"])
    once = {k: v.clone() for k, v in wrapped.base_model.state_dict().items()}
    wrapped.merge("a")  # already merged: a no-op
    assert all(v.equal(once[k]) for k, v in wrapped.base_model.state_dict().items())
    assert torch.allclose(wrapped(**token_batch).logits, both, rtol=1e-5, atol=1e-5)  # a merged, b live
    wrapped.merge()
    assert wrapped.adapters["a"].merged and wrapped.adapters["b"].merged
    assert torch.allclose(wrapped(**token_batch).logits, both, rtol=1e-5, atol=1e-5)


def test_merge_and_unload_returns_plain_model_with_adapter_folded_in(any_model_factory, token_batch):
    model = any_model_factory()
    wrapped = peftlab.wrap(model, trained_config())
    expected = wrapped(**token_batch).logits
    plain = wrapped.merge_and_unload()
    assert plain is model and not wrapped.adapters
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in plain.modules())
    assert torch.allclose(plain(**token_batch).logits, expected, rtol=1e-5, atol=1e-5)
    assert set(plain.state_dict()) == set(type(model)(model.config).state_dict())  # no foreign keys


def test_merged_adapter_cannot_be_deleted_disabled_or_switched_off():
    from tests.conftest import make_llama

    wrapped = peftlab.wrap(make_llama(), trained_config(), name="a")
    wrapped.add_adapter("b", trained_config())
    wrapped.merge()
    with pytest.raises(AdapterStateError, match=r"adapter 'a' is merged.*unmerge\(\) before deleting"):
        wrapped.delete_adapter("a")
    with pytest.raises(AdapterStateError, match=r"\['a'\] are merged.*before disabling"):
        with wrapped.disable_adapters():
            pass
    with pytest.raises(AdapterStateError, match=r"\['a'\] are merged.*before switching"):
        wrapped.set_adapter("b")
    assert all(not p.requires_grad for p in wrapped.adapters["a"].parameters())  # frozen while merged
    wrapped.unmerge()
    assert all(p.requires_grad for p in wrapped.adapters["a"].parameters())
    wrapped.delete_adapter("a")
    assert list(wrapped.adapters) == ["b"]


def test_safe_merge_refuses_non_finite_results_and_changes_nothing():
    from tests.conftest import make_llama

    model = make_llama(dtype=torch.float16)
    reference = bits(model.state_dict())
    wrapped = peftlab.wrap(model, trained_config(target_modules=["q_proj", "o_proj"]), name="ok")
    wrapped.add_adapter("huge", trained_config(target_modules=["o_proj"]))
    with torch.no_grad():
        wrapped.adapters["huge"].layers["model/layers/1/self_attn/o_proj"].lora_B.fill_(1e6)
    wrapped.set_adapter(["ok", "huge"])
    with pytest.raises(MergeError, match=r"'model.layers.1.self_attn.o_proj' would create \d+ non-finite"):
        wrapped.merge()
    assert not wrapped.adapters["ok"].merged and not wrapped.adapters["huge"].merged
    assert_bit_equal(model.state_dict(), reference)
