"""Which modules a target spec selects, and the errors for specs that select nothing."""
import pytest

import peftlab
from peftlab.errors import TargetError
from peftlab.targeting import head_modules, layer_index, parse_layers, resolve_targets
from tests.conftest import make_bert_classifier, make_gpt2, make_llama


def test_suffixes_select_every_layer_in_model_order():
    model = make_llama()
    assert resolve_targets(model, ["v_proj", "q_proj"]) == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj",
    ]


def test_full_name_and_dotted_suffix():
    model = make_llama()
    assert resolve_targets(model, ["model.layers.1.mlp.up_proj"]) == ["model.layers.1.mlp.up_proj"]
    assert resolve_targets(model, ["mlp.down_proj"]) == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]


def test_regex_matches_whole_names_and_skips_parent_blocks():
    model = make_llama()
    assert resolve_targets(model, r".*\.1\.self_attn\.(q|k)_proj") == [
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj"]
    # a regex that also matches the attention block itself keeps only linear modules
    assert resolve_targets(model, r".*layers\.0\.self_attn.*") == [
        f"model.layers.0.self_attn.{p}_proj" for p in "qkvo"]


def test_all_linear_excludes_lm_head_and_classifier():
    llama = resolve_targets(make_llama(), "all-linear")
    assert len(llama) == 2 * 7 and "lm_head" not in llama
    gpt2 = resolve_targets(make_gpt2(), "all-linear")
    assert len(gpt2) == 2 * 4 and all(".h." in n for n in gpt2)  # Conv1D layers, not the tied lm_head
    bert = resolve_targets(make_bert_classifier(), "all-linear")
    assert "classifier" not in bert and "bert.pooler.dense" in bert
    assert {"classifier"} <= head_modules(make_bert_classifier())


def test_layers_ranges_and_excludes():
    model = make_llama(num_hidden_layers=4)
    assert parse_layers("0-1,3") == [0, 1, 3] and parse_layers([2, "0-1"]) == [0, 1, 2]
    chosen = resolve_targets(model, ["q_proj"], layers="1-2")
    assert chosen == ["model.layers.1.self_attn.q_proj", "model.layers.2.self_attn.q_proj"]
    chosen = resolve_targets(model, "all-linear", exclude=["mlp.down_proj", "o_proj"], layers=3)
    assert chosen == [f"model.layers.3.{p}" for p in
                      ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")]
    assert layer_index("transformer.h.7.attn.c_attn") == 7
    assert layer_index("bert.encoder.layer.3.attention.self.query", "layer") == 3


def test_typo_lists_existing_suffixes_and_suggests():
    with pytest.raises(TargetError) as err:
        resolve_targets(make_llama(), ["q_proj", "vproj"])
    msg = str(err.value)
    assert "'vproj'" in msg and "LlamaForCausalLM" in msg and "down_proj" in msg and "Did you mean 'v_proj'" in msg


def test_non_linear_target_is_refused_with_its_type():
    with pytest.raises(TargetError, match=r"'model.layers.0.self_attn' is a LlamaAttention, not a linear layer"):
        resolve_targets(make_llama(), ["model.layers.0.self_attn"])


def test_layers_that_do_not_exist():
    with pytest.raises(TargetError, match=r"none in layers \[5\]"):
        resolve_targets(make_llama(), ["q_proj"], layers=5)
    with pytest.raises(TargetError, match="layers: cannot read 'x-3'"):
        parse_layers("x-3")


def test_bad_regex_is_named():
    with pytest.raises(TargetError, match=r"not a valid regex"):
        resolve_targets(make_llama(), "q_proj(")


def test_wrap_reports_bad_targets_and_leaves_model_untouched(token_batch):
    model = make_llama()
    before = model(**token_batch).logits
    with pytest.raises(TargetError):
        peftlab.wrap(model, peftlab.LoraConfig(target_modules=["q_proj", "nope"], init="random"))
    # no hooks were left behind by the failed injection
    assert all(not m._forward_hooks for m in model.modules())
    assert model(**token_batch).logits.equal(before)
