"""LoRA behaviour: identity at init, training touches only adapter weights, options, dtypes."""
import copy
import math

import pytest
import torch

import peftlab
from peftlab import LoraConfig
from tests.conftest import loss_of, make_bert_classifier, make_gpt2, make_llama, train_steps


CONFIGS = [
    LoraConfig(r=4),
    LoraConfig(r=8, alpha=4, init="gaussian", use_rslora=True, dropout=0.3),
    LoraConfig(r=2, target_modules=r".*\.(o_proj|c_proj|output\.dense)", bias="all"),
    LoraConfig(r=2, bias="lora_only", layers=1),
]


@pytest.mark.parametrize("config", CONFIGS, ids=["default", "gaussian-rslora-dropout", "bias-all", "lora-only-layer1"])
def test_wrapped_model_equals_base_at_init(any_model_factory, config, token_batch):
    model = any_model_factory()
    expected = model(**token_batch).logits
    wrapped = peftlab.wrap(model, copy.deepcopy(config))
    assert wrapped(**token_batch).logits.equal(expected)


def test_training_changes_only_adapter_parameters(any_model_factory, token_batch):
    model = any_model_factory()
    base_before = {k: v.clone() for k, v in model.state_dict().items()}
    wrapped = peftlab.wrap(model, LoraConfig(r=4, bias="lora_only"))
    adapter_before = {k: v.clone() for k, v in wrapped.adapters.state_dict().items()}
    losses = train_steps(wrapped, token_batch)
    assert losses[-1] < losses[0]
    for key, value in model.state_dict().items():
        assert value.equal(base_before[key]), f"base tensor {key} changed"
    changed = [k for k, v in wrapped.adapters.state_dict().items() if not v.equal(adapter_before[k])]
    assert any("lora_A" in k for k in changed) and any("lora_B" in k for k in changed)
    has_biases = any(getattr(m, "bias", None) is not None for m in model.modules())
    assert any("biases" in k for k in changed) == has_biases  # Llama's linears have no biases


def test_only_adapter_parameters_are_trainable():
    wrapped = peftlab.wrap(make_bert_classifier(), LoraConfig(r=4, target_modules=["query", "value"]))
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("adapters.default.") for n in trainable)
    # the classifier head of a classification model is trained in full by default
    assert any(".copies.classifier." in n for n in trainable)


def test_summary_counts_match_formula():
    model = make_llama()
    wrapped = peftlab.wrap(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2}))
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    q = 4 * (cfg.hidden_size + cfg.num_attention_heads * head_dim)
    v = 2 * (cfg.hidden_size + cfg.num_key_value_heads * head_dim)
    expected_lora = cfg.num_hidden_layers * (q + v)
    base_total = sum(p.numel() for p in model.parameters())
    summary = wrapped.summary()
    assert summary.trainable == expected_lora
    assert summary.total == base_total + expected_lora
    assert math.isclose(summary.percent, 100 * expected_lora / (base_total + expected_lora))
    row = {r.kind: r for r in summary.rows}["lora [default]"]
    assert row.trainable == row.total == expected_lora
    assert "lora [default]" in str(summary) and "trainable params:" in summary.line()


def test_rank_and_alpha_patterns():
    wrapped = peftlab.wrap(make_llama(), LoraConfig(r=4, alpha=8, target_modules=["q_proj", "k_proj"],
                                                    rank_pattern={"k_proj": 2}, alpha_pattern={r"layers\.1\.self_attn\.q_proj": 32}))
    layers = wrapped.adapters["default"].layers
    assert layers["model/layers/0/self_attn/k_proj"].lora_A.shape[0] == 2
    assert layers["model/layers/0/self_attn/q_proj"].lora_A.shape[0] == 4
    assert layers["model/layers/0/self_attn/q_proj"].scaling == 2.0
    assert layers["model/layers/1/self_attn/q_proj"].scaling == 8.0
    assert layers["model/layers/0/self_attn/k_proj"].scaling == 4.0


def test_rslora_scaling_and_gpt2_fan_in_fan_out():
    wrapped = peftlab.wrap(make_gpt2(), LoraConfig(r=16, alpha=8, use_rslora=True, target_modules=["c_attn"]))
    weights = wrapped.adapters["default"].layers["transformer/h/0/attn/c_attn"]
    assert weights.scaling == 8 / 4 and weights.fan_in_fan_out
    assert weights.delta().shape == wrapped.base_model.transformer.h[0].attn.c_attn.weight.shape


def test_dropout_is_active_in_train_and_inactive_in_eval(token_batch):
    wrapped = peftlab.wrap(make_llama(), LoraConfig(r=4, dropout=0.5, init="random"))
    wrapped.eval()
    assert wrapped(**token_batch).logits.equal(wrapped(**token_batch).logits)
    wrapped.train()
    torch.manual_seed(0)
    first = wrapped(**token_batch).logits
    assert not first.equal(wrapped(**token_batch).logits)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_low_precision_bases_train_with_fp32_adapters(dtype, token_batch):
    model = make_llama(dtype=dtype)
    wrapped = peftlab.wrap(model, LoraConfig(r=4))
    weights = wrapped.adapters["default"].layers["model/layers/0/self_attn/q_proj"]
    assert weights.lora_A.dtype == torch.float32
    wrapped.train()
    loss = loss_of(wrapped, token_batch)
    assert loss.dtype == dtype or loss.dtype == torch.float32
    loss.backward()
    assert weights.lora_B.grad is not None and weights.lora_B.grad.abs().sum() > 0
    assert wrapped(**token_batch).logits.dtype == dtype


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_adapter_gradients_on_first_step(reentrant, token_batch):
    wrapped = peftlab.wrap(make_llama(), LoraConfig(r=4))
    wrapped.enable_gradient_checkpointing(use_reentrant=reentrant)
    wrapped.train()
    loss_of(wrapped, token_batch).backward()
    grads = [w.lora_B.grad for w in wrapped.adapters["default"].layers.values()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_generate_passes_through_and_matches_merged_model():
    wrapped = peftlab.wrap(make_llama(), LoraConfig(r=4, init="random"))
    prompt = torch.tensor([[1, 5, 9, 3]])
    out = wrapped.generate(input_ids=prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    plain = copy.deepcopy(wrapped).merge_and_unload()
    assert type(plain).__name__ == "LlamaForCausalLM"
    assert out.equal(plain.generate(input_ids=prompt, max_new_tokens=6, do_sample=False, pad_token_id=0))
    assert wrapped.config is wrapped.base_model.config  # attribute access passes through


def test_deepcopy_is_independent(token_batch):
    wrapped = peftlab.wrap(make_llama(), LoraConfig(r=4, init="random"))
    clone = copy.deepcopy(wrapped)
    before = wrapped(**token_batch).logits
    clone.delete_adapter("default")
    assert wrapped(**token_batch).logits.equal(before)
    assert not clone(**token_batch).logits.equal(before)


def test_several_adapters_switch_and_stack(token_batch):
    model = make_llama()
    base = model(**token_batch).logits
    wrapped = peftlab.wrap(model, LoraConfig(r=4, init="random"), name="a")
    wrapped.add_adapter("b", LoraConfig(r=2, init="random", target_modules=["v_proj"]))
    assert wrapped.active_adapters == ["a"]  # adding never silently stacks
    out_a = wrapped(**token_batch).logits
    wrapped.set_adapter("b")
    out_b = wrapped(**token_batch).logits
    wrapped.set_adapter(["a", "b"])
    out_ab = wrapped(**token_batch).logits
    assert not out_a.equal(out_b) and not out_ab.equal(out_a) and not out_ab.equal(out_b)
    with wrapped.disable_adapters():
        assert wrapped(**token_batch).logits.equal(base)
    assert wrapped.active_adapters == ["a", "b"]
    wrapped.delete_adapter("a")
    wrapped.delete_adapter("b")
    assert wrapped(**token_batch).logits.equal(base)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
