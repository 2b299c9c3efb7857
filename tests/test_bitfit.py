"""BitFit: only biases train, as offsets; groups per architecture; exact merge/unmerge, incl. added biases."""
import copy
import json
import math

import pytest
import torch

import peftlab
from peftlab.adapters.bitfit import BitFitConfig
from peftlab.checkpoint import CONFIG_NAME
from peftlab.errors import CheckpointError, ConfigError, TargetError
from tests.conftest import loss_of, make_bert_classifier, make_gpt2, make_llama, train_steps
from tests.test_houlsby import (
    INTER,
    LABELS,
    LAYERS,
    H,
    bert_base,
    bert_base_total,
)

FACTORIES = {"llama": make_llama, "gpt2": make_gpt2, "bert": make_bert_classifier}
INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def bits(state):
    return {k: v.view(INT_VIEW[v.dtype]).clone() for k, v in state.items()}


def config_for(arch, **overrides):
    return BitFitConfig(**{"add_missing": arch == "llama", **overrides})  # Llama's linear layers have no biases


def perturb(wrapped, std=0.1):
    with torch.no_grad():
        for p in wrapped.trainable_parameters():
            p.add_(torch.randn_like(p) * std)


@pytest.mark.parametrize("biases", ["all", ["query", "value", "ffn_intermediate"], ["attention_output", "norm"]])
def test_wrapped_model_equals_base_at_init(any_model_factory, biases, token_batch):
    model = any_model_factory()
    expected = model(**token_batch).logits
    name = type(model).__name__
    if name.startswith("GPT2") and "query" in biases:
        biases = ["attention_input", "ffn_intermediate"]  # GPT-2 fuses q, k and v into one projection
    if name.startswith("Llama") and "norm" in biases:
        biases = ["attention_output"]  # RMSNorm has no bias
    wrapped = peftlab.wrap(model, BitFitConfig(biases=biases, add_missing=name.startswith("Llama")))
    assert wrapped(**token_batch).logits.equal(expected)


def test_offset_gradients_equal_the_bias_gradients_of_the_plain_model(token_batch):
    """Reference: autograd on the unwrapped model with its biases trainable."""
    reference = make_bert_classifier()
    reference.requires_grad_(False)
    biases = {n: p for n, p in reference.named_parameters() if n.endswith(".bias") and not n.startswith("classifier")}
    for p in biases.values():
        p.requires_grad_(True)
    loss_of(reference, token_batch).backward()

    wrapped = peftlab.wrap(make_bert_classifier(), BitFitConfig())
    loss_of(wrapped, token_batch).backward()
    offsets = wrapped.adapters["default"].biases
    assert sorted(f"{p}.bias" for p in offsets.paths()) == sorted(biases)
    for path, offset in zip(offsets.paths(), offsets.offsets.values()):
        torch.testing.assert_close(offset.delta.grad, biases[f"{path}.bias"].grad, rtol=1e-6, atol=1e-7)


def test_training_changes_only_bias_offsets(any_model_factory, token_batch):
    model = any_model_factory()
    arch = type(model).__name__
    base_before = {k: v.clone() for k, v in model.state_dict().items()}
    wrapped = peftlab.wrap(model, BitFitConfig(add_missing=arch.startswith("Llama")))
    adapter_before = {k: v.clone() for k, v in wrapped.adapters.state_dict().items()}
    losses = train_steps(wrapped, token_batch, steps=6, lr=5e-2)
    assert losses[-1] < losses[0]
    for key, value in model.state_dict().items():
        assert value.equal(base_before[key]), f"base tensor {key} changed"
    changed = {k for k, v in wrapped.adapters.state_dict().items() if not v.equal(adapter_before[k])}
    assert changed and all(".biases." in k or ".copies.classifier." in k for k in changed)
    trainable = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert all(".biases." in n or ".copies." in n for n in trainable)


def test_groups_map_to_each_architectures_modules():
    def paths(model, **kwargs):
        return peftlab.wrap(model, BitFitConfig(modules_to_save=[], **kwargs)).adapters["default"].biases.paths()

    bert = "bert.encoder.layer.{}."
    assert paths(make_bert_classifier(), biases=["query", "value", "ffn_intermediate"]) == [
        bert.format(i) + s for i in (0, 1)
        for s in ("attention.self.query", "attention.self.value", "intermediate.dense")]
    assert paths(make_bert_classifier(), biases=["attention_output", "ffn_output", "norm"]) == [
        bert.format(i) + s for i in (0, 1)
        for s in ("attention.output.dense", "attention.output.LayerNorm", "output.dense", "output.LayerNorm")]
    assert paths(make_gpt2(), biases=["attention_input", "ffn_intermediate"]) == [
        f"transformer.h.{i}.{s}" for i in (0, 1) for s in ("attn.c_attn", "mlp.c_fc")]
    assert paths(make_llama(), biases=["key", "ffn_intermediate"], add_missing=True) == [
        f"model.layers.{i}.{s}" for i in (0, 1) for s in ("self_attn.k_proj", "mlp.gate_proj", "mlp.up_proj")]
    # module names and suffixes work too, alone or mixed with groups
    assert paths(make_bert_classifier(), biases=["pooler.dense", "layer.1.attention.self.key", "query"]) == [
        bert.format(0) + "attention.self.query", bert.format(1) + "attention.self.query",
        bert.format(1) + "attention.self.key", "bert.pooler.dense"]


def test_all_biases_and_add_missing_choose_the_right_modules():
    bert = peftlab.wrap(make_bert_classifier(), BitFitConfig()).adapters["default"]
    assert "classifier" not in bert.biases.paths() and bert.copies.paths() == ["classifier"]
    assert len(bert.biases.paths()) == 1 + 2 * 8 + 1  # embeddings LayerNorm, 8 per layer, pooler
    gpt2 = peftlab.wrap(make_gpt2(), BitFitConfig()).adapters["default"]
    assert len(gpt2.biases.paths()) == 2 * 6 + 1 and "lm_head" not in gpt2.biases.paths()
    llama = peftlab.wrap(make_llama(), BitFitConfig(add_missing=True)).adapters["default"]
    assert len(llama.biases.paths()) == 2 * 7 and "lm_head" not in llama.biases.paths()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_merge_unmerge_is_bit_exact(any_model_factory, dtype, token_batch):
    model = any_model_factory(dtype=dtype)
    reference = bits(model.state_dict())
    arch = type(model).__name__
    wrapped = peftlab.wrap(model, BitFitConfig(add_missing=arch.startswith("Llama")))
    perturb(wrapped)
    unmerged = wrapped(**token_batch).logits
    for _ in range(20):
        wrapped.merge()
        wrapped.unmerge()
    assert bits(model.state_dict()).keys() == reference.keys()
    assert all(v.equal(reference[k]) for k, v in bits(model.state_dict()).items())
    assert wrapped(**token_batch).logits.equal(unmerged)
    wrapped.merge()
    assert wrapped.summary().trainable == 0  # merged offsets must not train
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(wrapped(**token_batch).logits, unmerged, rtol=tol, atol=tol)


def test_added_biases_become_real_parameters_when_merged(token_batch):
    model = make_llama()
    q_proj = model.model.layers[0].self_attn.q_proj
    wrapped = peftlab.wrap(model, BitFitConfig(add_missing=True))
    perturb(wrapped)
    unmerged = wrapped(**token_batch).logits
    delta = wrapped.adapters["default"].biases.offsets["model/layers/0/self_attn/q_proj"].delta.detach().clone()
    wrapped.merge()
    assert isinstance(q_proj.bias, torch.nn.Parameter) and not q_proj.bias.requires_grad
    assert q_proj.bias.equal(delta) and "model.layers.0.self_attn.q_proj.bias" in model.state_dict()
    wrapped.unmerge()
    assert q_proj.bias is None and "bias" in q_proj._parameters  # registered as None, exactly as before
    plain = copy.deepcopy(wrapped).merge_and_unload()
    assert type(plain).__name__ == "LlamaForCausalLM" and not any(m._forward_hooks for m in plain.modules())
    torch.testing.assert_close(plain(**token_batch).logits, unmerged, rtol=1e-5, atol=1e-5)


def test_two_adapters_adding_the_same_missing_bias_unmerge_exactly(token_batch):
    model = make_llama()
    reference = bits(model.state_dict())
    wrapped = peftlab.wrap(model, BitFitConfig(add_missing=True), name="a")
    wrapped.add_adapter("b", BitFitConfig(biases=["attention_input"], add_missing=True))
    perturb(wrapped)
    wrapped.set_adapter(["a", "b"])
    both = wrapped(**token_batch).logits
    wrapped.merge()  # "a" creates the biases, "b" adds into them
    torch.testing.assert_close(wrapped(**token_batch).logits, both, rtol=1e-5, atol=1e-5)
    wrapped.unmerge()
    assert bits(model.state_dict()).keys() == reference.keys()
    assert all(v.equal(reference[k]) for k, v in bits(model.state_dict()).items())


@pytest.mark.parametrize("arch", sorted(FACTORIES))
def test_save_load_round_trip_gives_identical_logits(arch, tmp_path, token_batch):
    wrapped = peftlab.wrap(FACTORIES[arch](dtype=torch.bfloat16), config_for(arch))
    perturb(wrapped)
    expected = wrapped(**token_batch).logits
    wrapped.save(tmp_path)
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["peftlab"]["method"] == "bitfit"
    reloaded = peftlab.load(FACTORIES[arch](dtype=torch.bfloat16), tmp_path)
    assert reloaded(**token_batch).logits.equal(expected)
    reloaded.merge()  # a loaded adapter merges like a trained one
    reloaded.unmerge()
    assert reloaded(**token_batch).logits.equal(expected)


def test_bert_base_count_is_about_a_tenth_of_a_percent():
    biases_per_layer = 4 * H + INTER + H + 2 * H  # q, k, v, attention output, intermediate, output, 2 LayerNorms
    biases = LAYERS * biases_per_layer + H + H + LABELS  # + embeddings LayerNorm, pooler and classifier
    summary = peftlab.wrap(bert_base(), BitFitConfig(modules_to_save=[])).summary()
    assert {r.kind: r.trainable for r in summary.rows}["bias [default]"] == biases
    assert summary.trainable == biases == 102_914
    assert math.isclose(summary.percent, 100 * biases / (bert_base_total() + biases))
    assert 0.09 < summary.percent < 0.1


# --- errors ---------------------------------------------------------------------------------
def test_models_without_biases_are_refused_clearly():
    with pytest.raises(TargetError, match=r"bitfit: LlamaForCausalLM has no bias parameters to train; set "
                                          r"add_missing=True"):
        peftlab.wrap(make_llama(), BitFitConfig())
    with pytest.raises(TargetError, match=r"'model.layers.0.self_attn.q_proj' \(Linear, from 'query'\) has no bias in "
                                          r"LlamaForCausalLM; set add_missing=True"):
        peftlab.wrap(make_llama(), BitFitConfig(biases=["query"]))
    with pytest.raises(TargetError, match=r"'model.layers.0.input_layernorm' \(LlamaRMSNorm, from 'norm'\) has no "
                                          r"bias, and only linear layers can be given one"):
        peftlab.wrap(make_llama(), BitFitConfig(biases=["norm"], add_missing=True))


class ConvThenLinear(torch.nn.Module):
    """A model without blocks whose convolution adds its bias per channel, not along the last dimension."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv1d(4, 4, kernel_size=1)
        self.proj = torch.nn.Linear(4, 4)


def test_biases_off_the_last_dimension_and_models_without_blocks():
    with pytest.warns(UserWarning, match=r"leaving out the biases of 1 module\(s\) .* e.g. 'conv' \(Conv1d\)"):
        adapter = peftlab.wrap(ConvThenLinear(), BitFitConfig()).adapters["default"]
    assert adapter.biases.paths() == ["proj"]
    with pytest.raises(TargetError, match=r"the bias of 'conv' \(Conv1d, from 'conv'\) is not added along the last "
                                          r"dimension"):
        peftlab.wrap(ConvThenLinear(), BitFitConfig(biases=["conv"]))
    with pytest.raises(TargetError, match=r"bitfit group 'query' needs the transformer blocks of ConvThenLinear, but "
                                          r"it has no nn.ModuleList of blocks"):
        peftlab.wrap(ConvThenLinear(), BitFitConfig(biases=["query"]))


def test_unknown_entries_and_fused_projections():
    with pytest.raises(TargetError, match=r"group 'query' matches no module of GPT2LMHeadModel; its attention input "
                                          r"projections are \['c_attn'\] .*use 'attention_input'"):
        peftlab.wrap(make_gpt2(), BitFitConfig(biases=["query"]))
    with pytest.raises(TargetError, match=r"biases entry 'querry' is neither a group \(query, key, .*\) nor a module "
                                          r"of BertForSequenceClassification; its modules with biases end in: .*query"):
        peftlab.wrap(make_bert_classifier(), BitFitConfig(biases=["querry"]))


def test_config_validation_names_the_field():
    with pytest.raises(ConfigError, match=r"bitfit config field 'biases' is 'some'; use 'all' or a list of group"):
        BitFitConfig(biases="some")
    with pytest.raises(ConfigError, match=r"'biases' is \[\]"):
        BitFitConfig(biases=[])
    with pytest.raises(ConfigError, match=r"'add_missing' is 'yes'; it must be true or false"):
        BitFitConfig(add_missing="yes")


def test_checkpoint_shape_mismatch_names_module_and_shapes(tmp_path):
    wrapped = peftlab.wrap(make_llama(), BitFitConfig(add_missing=True))
    perturb(wrapped)
    wrapped.save(tmp_path)
    wider = make_llama(hidden_size=96, num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(CheckpointError, match=r"bias offset of 'model.layers.0.self_attn.q_proj' has shape \[64\], but "
                                              r"the base model needs \[96\]"):
        peftlab.load(wider, tmp_path)
