"""Houlsby / Pfeiffer bottleneck adapters: placement, identity at init, math, training, saving, refusals."""
import copy
import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

import peftlab
from peftlab.adapters.houlsby import HoulsbyConfig, PfeifferConfig
from peftlab.checkpoint import CONFIG_NAME, WEIGHTS_NAME
from peftlab.errors import CheckpointError, ConfigError, MergeError, TargetError
from tests.conftest import loss_of, make_bert_classifier, make_gpt2, make_llama, train_steps

FACTORIES = {"llama": make_llama, "gpt2": make_gpt2, "bert": make_bert_classifier}

# The placement the paper prescribes, written out per family: the attention output projection and the
# feed-forward output projection of every block (Pfeiffer: the latter only).
PLACEMENT = {
    "bert": ("bert.encoder.layer.{}.attention.output.dense", "bert.encoder.layer.{}.output.dense"),
    "gpt2": ("transformer.h.{}.attn.c_proj", "transformer.h.{}.mlp.c_proj"),
    "llama": ("model.layers.{}.self_attn.o_proj", "model.layers.{}.mlp.down_proj"),
}


def perturb_norms(wrapped):
    """Make trained norm copies differ from the base norms, as after training."""
    with torch.no_grad():
        for p in wrapped.adapters["default"].norms.parameters():
            p.add_(torch.randn_like(p) * 0.1)


@pytest.mark.parametrize("arch", sorted(FACTORIES))
def test_placement_per_architecture(arch):
    attention, ffn = PLACEMENT[arch]
    houlsby = peftlab.wrap(FACTORIES[arch](), HoulsbyConfig()).adapters["default"]
    assert houlsby.paths() == [attention.format(0), ffn.format(0), attention.format(1), ffn.format(1)]
    pfeiffer = peftlab.wrap(FACTORIES[arch](), PfeifferConfig()).adapters["default"]
    assert pfeiffer.paths() == [ffn.format(0), ffn.format(1)]
    only_top = peftlab.wrap(FACTORIES[arch](), HoulsbyConfig(layers=1)).adapters["default"]
    assert only_top.paths() == [attention.format(1), ffn.format(1)]


CONFIGS = [HoulsbyConfig(), PfeifferConfig(), HoulsbyConfig(bottleneck_size=3, activation="gelu", layers="1")]


@pytest.mark.parametrize("config", CONFIGS, ids=["houlsby", "pfeiffer", "size3-gelu-layer1"])
def test_wrapped_model_equals_base_at_init(any_model_factory, config, token_batch):
    model = any_model_factory()
    expected = model(**token_batch).logits
    wrapped = peftlab.wrap(model, copy.deepcopy(config))
    assert wrapped(**token_batch).logits.equal(expected)


@pytest.mark.parametrize("activation, fn", [("swish", F.silu), ("relu", F.relu), ("gelu", F.gelu)])
def test_adapter_output_matches_hand_written_bottleneck(activation, fn, token_batch):
    """Reference: plain forward hooks that compute h + W_up act(W_down h + b_down) + b_up with torch ops."""
    wrapped = peftlab.wrap(make_llama(), HoulsbyConfig(reduction_factor=8, activation=activation, init="random",
                                                       train_layer_norms=False))
    adapter = wrapped.adapters["default"]
    weights = {p: {n: t.detach().clone() for n, t in adapter.bottlenecks[p.replace(".", "/")].named_parameters()}
               for p in adapter.paths()}
    assert all(w["down.weight"].shape == (8, 64) for w in weights.values())  # 64 // 8
    actual = wrapped(**token_batch).logits

    reference = make_llama()
    for path, w in weights.items():
        def hook(module, args, out, w=w):
            return out + F.linear(fn(F.linear(out, w["down.weight"], w["down.bias"])), w["up.weight"], w["up.bias"])
        reference.get_submodule(path).register_forward_hook(hook)
    expected = reference(**token_batch).logits
    assert not expected.equal(make_llama()(**token_batch).logits)  # the adapters really act
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)


def test_training_changes_only_adapter_parameters(any_model_factory, token_batch):
    model = any_model_factory()
    base_before = {k: v.clone() for k, v in model.state_dict().items()}
    wrapped = peftlab.wrap(model, HoulsbyConfig(reduction_factor=4))
    adapter_before = {k: v.clone() for k, v in wrapped.adapters.state_dict().items()}
    losses = train_steps(wrapped, token_batch, steps=6, lr=1e-2)
    assert losses[-1] < losses[0]
    for key, value in model.state_dict().items():
        assert value.equal(base_before[key]), f"base tensor {key} changed"
    changed = {k for k, v in wrapped.adapters.state_dict().items() if not v.equal(adapter_before[k])}
    for part in (".up.weight", ".down.weight", "norms."):
        assert any(part in k for k in changed), part
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert all(n.startswith("adapters.default.") for n in trainable)


def test_trained_norms_switch_off_with_the_adapter(token_batch):
    model = make_gpt2()
    base = model(**token_batch).logits
    wrapped = peftlab.wrap(model, HoulsbyConfig())
    norms = wrapped.adapters["default"].norms.paths()
    assert norms == ["transformer.h.0.ln_1", "transformer.h.0.ln_2", "transformer.h.1.ln_1", "transformer.h.1.ln_2",
                     "transformer.ln_f"]
    perturb_norms(wrapped)
    adapted = wrapped(**token_batch).logits
    assert not adapted.equal(base)
    with wrapped.disable_adapters():
        assert wrapped(**token_batch).logits.equal(base)
    assert wrapped(**token_batch).logits.equal(adapted)
    wrapped.delete_adapter("default")
    assert wrapped(**token_batch).logits.equal(base)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_norms_follow_layers_and_pfeiffer_keeps_them_frozen():
    wrapped = peftlab.wrap(make_llama(), HoulsbyConfig(layers=[1]))
    assert wrapped.adapters["default"].norms.paths() == [
        "model.layers.1.input_layernorm", "model.layers.1.post_attention_layernorm", "model.norm"]
    assert not peftlab.wrap(make_llama(), PfeifferConfig()).adapters["default"].norms.paths()


@pytest.mark.parametrize("method", ["houlsby", "pfeiffer"])
@pytest.mark.parametrize("arch", sorted(FACTORIES))
def test_save_load_round_trip_gives_identical_logits(arch, method, tmp_path, token_batch):
    config = HoulsbyConfig(init="random") if method == "houlsby" else PfeifferConfig(init="random")
    wrapped = peftlab.wrap(FACTORIES[arch](), config)
    if method == "houlsby":
        perturb_norms(wrapped)
    expected = wrapped(**token_batch).logits
    wrapped.save(tmp_path)
    saved = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert saved["peftlab"]["method"] == method and saved["reduction_factor"] == 16
    reloaded = peftlab.load(FACTORIES[arch](), tmp_path)
    assert type(reloaded.adapters["default"]).method == method
    assert reloaded(**token_batch).logits.equal(expected)
    assert reloaded.summary().trainable == 0
    assert peftlab.load(FACTORIES[arch](), tmp_path, trainable=True).summary().trainable == wrapped.summary().trainable


def test_merge_is_refused_and_changes_nothing(token_batch):
    model = make_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    wrapped = peftlab.wrap(model, HoulsbyConfig(init="random"))
    with pytest.raises(MergeError, match=r"adapter 'default' \(houlsby\) cannot be merged: its bottleneck .* is a "
                                         r"nonlinearity"):
        wrapped.merge()
    with pytest.raises(MergeError, match=r"\(houlsby\) cannot be merged: .*; serve it unmerged"):
        wrapped.merge_and_unload()
    assert all(v.equal(before[k]) for k, v in model.state_dict().items())
    assert not wrapped.adapters["default"].merged and wrapped.adapters["default"].live


def test_low_precision_base_keeps_fp32_adapter_weights(token_batch):
    wrapped = peftlab.wrap(make_llama(dtype=torch.bfloat16), HoulsbyConfig())
    bottleneck = wrapped.adapters["default"].bottlenecks["model/layers/0/mlp/down_proj"]
    assert bottleneck.up.weight.dtype == torch.float32
    wrapped.train()
    loss_of(wrapped, token_batch).backward()
    assert bottleneck.up.weight.grad.abs().sum() > 0
    assert wrapped(**token_batch).logits.dtype == torch.bfloat16


def test_gradient_checkpointing_gives_adapter_gradients(token_batch):
    wrapped = peftlab.wrap(make_llama(), HoulsbyConfig())
    wrapped.enable_gradient_checkpointing()
    wrapped.train()
    loss_of(wrapped, token_batch).backward()
    assert all(b.up.weight.grad.abs().sum() > 0 for b in wrapped.adapters["default"].bottlenecks.values())


def test_deepcopy_is_independent(token_batch):
    wrapped = peftlab.wrap(make_llama(), HoulsbyConfig(init="random"))
    before = wrapped(**token_batch).logits
    clone = copy.deepcopy(wrapped)
    clone.delete_adapter("default")
    assert wrapped(**token_batch).logits.equal(before)
    assert not clone(**token_batch).logits.equal(before)


# --- BERT-base-sized parameter counts (meta device: no weights allocated) ----------------------
H, LAYERS, INTER, VOCAB, POSITIONS, TYPES, LABELS = 768, 12, 3072, 30522, 512, 2, 2


def bert_base():
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(hidden_size=H, num_hidden_layers=LAYERS, intermediate_size=INTER, vocab_size=VOCAB,
                        max_position_embeddings=POSITIONS, type_vocab_size=TYPES, num_labels=LABELS)
    with torch.device("meta"):
        return BertForSequenceClassification(config)


def bert_base_total():
    embeddings = (VOCAB + POSITIONS + TYPES) * H + 2 * H
    layer = 4 * (H * H + H) + (H * INTER + INTER) + (INTER * H + H) + 2 * (2 * H)
    return embeddings + LAYERS * layer + (H * H + H) + (H * LABELS + LABELS)


def test_bert_base_counts_match_the_formulas():
    head = H * LABELS + LABELS  # the classifier, trained in full
    norms = (2 * LAYERS + 1) * 2 * H  # two LayerNorms per layer + the embeddings' LayerNorm
    m = H // 16
    per_adapter = (H * m + m) + (m * H + H)
    cases = {"houlsby": (HoulsbyConfig(), 2 * LAYERS * per_adapter, norms),
             "pfeiffer": (PfeifferConfig(), LAYERS * per_adapter, 0)}
    base_total = bert_base_total()
    for method, (config, bottlenecks, trained_norms) in cases.items():
        summary = peftlab.wrap(bert_base(), config).summary()
        rows = {r.kind: r.trainable for r in summary.rows}
        assert rows["bottleneck [default]"] == bottlenecks, method
        assert rows.get("layer_norm [default]", 0) == trained_norms, method
        assert rows["modules_to_save [default]"] == head, method
        trainable = bottlenecks + trained_norms + head
        assert summary.trainable == trainable and summary.total == base_total + trainable
        assert math.isclose(summary.percent, 100 * trainable / (base_total + trainable))
    assert bert_base_total() == 109_483_778  # the familiar BERT-base size (with a 2-way head)


# --- errors ---------------------------------------------------------------------------------
def test_config_validation_names_the_field():
    with pytest.raises(ConfigError, match=r"houlsby config field 'reduction_factor' is 0; it must be a positive"):
        HoulsbyConfig(reduction_factor=0)
    with pytest.raises(ConfigError, match=r"'bottleneck_size' is 1.5; it must be a positive integer"):
        HoulsbyConfig(bottleneck_size=1.5)
    with pytest.raises(ConfigError, match=r"pfeiffer config field 'activation' is 'tanh'; valid values: 'swish', "
                                          r"'relu', 'gelu'"):
        PfeifferConfig(activation="tanh")
    with pytest.raises(ConfigError, match=r"'init' is 'xavier'; valid values: 'zeros', 'random'"):
        HoulsbyConfig(init="xavier")
    with pytest.raises(ConfigError, match=r"'init_std' is 0"):
        HoulsbyConfig(init_std=0)
    with pytest.raises(ConfigError, match=r"'attention_modules' is empty"):
        HoulsbyConfig(attention_modules=[])
    with pytest.raises(TargetError, match=r"layers: cannot read 'x'"):
        HoulsbyConfig(layers="x")


def test_reduction_factor_too_large_names_the_module():
    with pytest.raises(ConfigError, match=r"reduction_factor 100 leaves no bottleneck for "
                                          r"'model.layers.0.self_attn.o_proj' \(64 features\)"):
        peftlab.wrap(make_llama(), HoulsbyConfig(reduction_factor=100))


class Flat(nn.Module):
    """A model without a list of blocks."""

    def __init__(self):
        super().__init__()
        self.proj_in = nn.Linear(8, 8)
        self.proj_out = nn.Linear(8, 8)

    def forward(self, x):
        return self.proj_out(torch.relu(self.proj_in(x)))


class Stack(nn.Module):
    """Blocks whose sublayers are not named like attention, or whose attention output is not hidden-wide."""

    def __init__(self, attention_name="mixer", out_width=8):
        super().__init__()
        self.config = SimpleNamespace(hidden_size=8)
        block = nn.Module()
        block.add_module(attention_name, nn.Sequential(nn.Linear(8, 8), nn.Linear(8, out_width)))
        block.ffn = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 8))
        self.blocks = nn.ModuleList([block])


def test_unplaceable_architectures_say_what_was_looked_for():
    with pytest.raises(TargetError, match=r"cannot place the attention adapters in Flat: it has no nn.ModuleList of "
                                          r"blocks holding linear layers; name the modules with attention_modules"):
        peftlab.wrap(Flat(), HoulsbyConfig())
    with pytest.raises(TargetError, match=r"cannot place the attention adapter in block 'blocks.0' of Stack: "
                                          r"looked for a submodule named like '\*attn\*' or '\*attention\*'"):
        peftlab.wrap(Stack(), HoulsbyConfig())
    with pytest.raises(TargetError, match=r"candidate output projection 'blocks.0.attn.1' has 4 output features, not "
                                          r"the hidden size 8; name the modules with attention_modules"):
        peftlab.wrap(Stack(attention_name="attn", out_width=4), HoulsbyConfig())
    # the feed-forward adapter alone is placeable there
    assert peftlab.wrap(Stack(), PfeifferConfig(bottleneck_size=2)).adapters["default"].paths() == ["blocks.0.ffn.1"]


def test_modules_named_explicitly():
    model = Flat()
    x = torch.randn(3, 8)
    expected = model(x)
    wrapped = peftlab.wrap(model, HoulsbyConfig(attention_modules=["proj_in"], ffn_modules="proj_o.*",
                                                bottleneck_size=2))
    assert wrapped.adapters["default"].paths() == ["proj_in", "proj_out"]
    assert wrapped(x).equal(expected)
    with pytest.raises(TargetError, match=r"houlsby ffn_modules target 'proj_ot' matches no module of Flat; its linear "
                                          r"modules end in: proj_in, proj_out. Did you mean 'proj_out'\?"):
        peftlab.wrap(Flat(), HoulsbyConfig(attention_modules=["proj_in"], ffn_modules=["proj_ot"]))


def test_layers_that_select_no_block():
    with pytest.raises(TargetError, match=r"houlsby: layers \[7\] select none of the blocks of LlamaForCausalLM "
                                          r"\(their indices are 0-1\)"):
        peftlab.wrap(make_llama(), HoulsbyConfig(layers=7))


def test_checkpoint_errors_name_module_and_shapes(tmp_path):
    peftlab.wrap(make_llama(), HoulsbyConfig()).save(tmp_path)
    wider = make_llama(hidden_size=96, num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(CheckpointError, match=r"adapter down.weight after 'model.layers.0.self_attn.o_proj' has shape "
                                              r"\[4, 64\], but the base model needs \[6, 96\]"):
        peftlab.load(wider, tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    key = "model.layers.1.mlp.down_proj.adapter.up.bias"
    save_file({k: v for k, v in tensors.items() if k != key}, tmp_path / WEIGHTS_NAME)
    with pytest.raises(CheckpointError, match=rf"tensor '{key}' \(adapter up.bias after "
                                              r"'model.layers.1.mlp.down_proj'\) is missing"):
        peftlab.load(make_llama(), tmp_path)
    save_file({**tensors, "model.extra.adapter.up.bias": torch.ones(2)}, tmp_path / WEIGHTS_NAME)
    with pytest.raises(CheckpointError, match=r"'model.extra.adapter.up.bias' does not belong to any module"):
        peftlab.load(make_llama(), tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**config, "activation": "tanh"}))
    with pytest.raises(ConfigError, match=rf"{CONFIG_NAME}: houlsby config field 'activation' is 'tanh'"):
        peftlab.load(make_llama(), tmp_path)
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**config, "future": 1,
                                                    "peftlab": {**config["peftlab"], "format_version": 9}}))
    save_file(tensors, tmp_path / WEIGHTS_NAME)
    with pytest.warns(UserWarning) as record:
        peftlab.load(make_llama(), tmp_path)
    messages = " ".join(str(w.message) for w in record)
    assert "ignoring unknown key(s) ['future']" in messages and "newer peftlab (format 9)" in messages
