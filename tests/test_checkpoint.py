"""Saving and loading adapters: round trips, HF PEFT interop both ways, and every refusal."""
import json
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

import peftlab
from peftlab import LoraConfig
from peftlab.checkpoint import CONFIG_NAME, WEIGHTS_NAME
from peftlab.errors import AdapterStateError, CheckpointError, ConfigError
from tests.conftest import make_bert_classifier, make_gpt2, make_llama

SAVE_CONFIGS = {
    "llama": LoraConfig(r=4, init="random", rank_pattern={"v_proj": 2}, alpha_pattern={"o_proj": 3}),
    "gpt2": LoraConfig(r=4, init="random", target_modules=["c_attn", "c_fc"], bias="lora_only", use_rslora=True),
    "bert": LoraConfig(r=4, init="random", bias="all", layers=1),
}
FACTORIES = {"llama": make_llama, "gpt2": make_gpt2, "bert": make_bert_classifier}


def perturb_copies(wrapped):
    """Make the trained head and bias offsets differ from the base, as after training."""
    with torch.no_grad():
        for adapter in wrapped.adapters.values():
            for name, p in adapter.named_parameters():
                if not name.startswith("layers."):
                    p.add_(torch.randn_like(p) * 0.1)


@pytest.mark.parametrize("arch", sorted(FACTORIES))
def test_save_load_round_trip_gives_identical_logits(arch, tmp_path, token_batch):
    wrapped = peftlab.wrap(FACTORIES[arch](), SAVE_CONFIGS[arch])
    perturb_copies(wrapped)
    expected = wrapped(**token_batch).logits
    wrapped.save(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["peft_type"] == "LORA" and config["peftlab"]["format_version"] == 1
    reloaded = peftlab.load(FACTORIES[arch](), tmp_path)
    assert reloaded(**token_batch).logits.equal(expected)
    assert reloaded.summary().trainable == 0  # loaded for inference by default


@pytest.mark.parametrize("arch", sorted(FACTORIES))
def test_hf_peft_loads_a_peftlab_adapter_with_identical_logits(arch, tmp_path, token_batch):
    wrapped = peftlab.wrap(FACTORIES[arch](), SAVE_CONFIGS[arch])
    perturb_copies(wrapped)
    expected = wrapped(**token_batch).logits
    wrapped.save(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(FACTORIES[arch](), str(tmp_path))
    torch.testing.assert_close(theirs(**token_batch).logits, expected, rtol=1e-6, atol=1e-6)


PEFT_CONFIGS = {
    "llama": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], rank_pattern={"down_proj": 2}),
    "gpt2": dict(r=4, lora_alpha=16, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, bias="lora_only",
                 layers_to_transform=[1], use_rslora=True),
    "bert": dict(r=4, lora_alpha=8, target_modules="all-linear", modules_to_save=["classifier"], bias="all",
                 task_type="SEQ_CLS"),
}


@pytest.mark.parametrize("arch", sorted(FACTORIES))
def test_peftlab_loads_an_hf_peft_adapter_with_identical_logits(arch, tmp_path, token_batch):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(FACTORIES[arch](), peft.LoraConfig(init_lora_weights=False, **PEFT_CONFIGS[arch]))
    with torch.no_grad():  # train-like changes to everything the adapter saves
        for name, p in theirs.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    theirs.eval()
    expected = theirs(**token_batch).logits
    theirs.save_pretrained(str(tmp_path))
    ours = peftlab.load(FACTORIES[arch](), tmp_path)
    torch.testing.assert_close(ours(**token_batch).logits, expected, rtol=1e-5, atol=1e-5)


def test_load_trainable_continues_training(tmp_path, token_batch):
    peftlab.wrap(make_llama(), LoraConfig(r=4)).save(tmp_path)
    model = peftlab.load(make_llama(), tmp_path, trainable=True)
    assert model.summary().trainable > 0
    model.train()
    model(**token_batch, labels=token_batch["input_ids"]).loss.backward()
    grads = [p.grad for p in model.trainable_parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_several_adapters_save_into_subfolders(tmp_path, token_batch):
    wrapped = peftlab.wrap(make_llama(), LoraConfig(r=4, init="random"), name="a")
    wrapped.add_adapter("b", LoraConfig(r=2, init="random", target_modules=["v_proj"]))
    wrapped.save(tmp_path)
    assert (tmp_path / "a" / CONFIG_NAME).is_file() and (tmp_path / "b" / WEIGHTS_NAME).is_file()
    with pytest.raises(CheckpointError, match=r"has no adapter_config.json; it holds adapters in subfolders \['a', 'b'\]"):
        peftlab.load(make_llama(), tmp_path)
    expected_b = (wrapped.set_adapter("b"), wrapped(**token_batch).logits)[1]
    reloaded = peftlab.load(make_llama(), tmp_path / "a", name="a")
    reloaded.load_adapter(tmp_path / "b", name="b")
    assert reloaded.active_adapters == ["a"]  # a second load does not stack on the first
    reloaded.set_adapter("b")
    assert reloaded(**token_batch).logits.equal(expected_b)


def saved_adapter(tmp_path, model_factory=make_llama, **overrides):
    peftlab.wrap(model_factory(), LoraConfig(**{"r": 4, "init": "random", **overrides})).save(tmp_path)
    return tmp_path


def test_shape_mismatch_names_module_and_both_shapes(tmp_path):
    saved_adapter(tmp_path)
    wider = make_llama(hidden_size=96, num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(CheckpointError, match=r"lora_A of 'model.layers.0.self_attn.q_proj' has shape \[4, 64\], "
                                              r"but the base model needs \[4, 96\]"):
        peftlab.load(wider, tmp_path)


def test_failed_load_leaves_model_without_the_adapter(tmp_path, token_batch):
    saved_adapter(tmp_path)
    model = make_llama(hidden_size=96, num_attention_heads=4, num_key_value_heads=2)
    wrapped = peftlab.PeftModel(model)
    with pytest.raises(CheckpointError):
        wrapped.load_adapter(tmp_path)
    assert not wrapped.adapters and all(not m._forward_hooks for m in model.modules())


def test_missing_and_unexpected_tensors(tmp_path):
    saved_adapter(tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    key = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"
    save_file({k: v for k, v in tensors.items() if k != key}, tmp_path / WEIGHTS_NAME)
    with pytest.raises(CheckpointError, match=rf"tensor '{key}' \(lora_B of 'model.layers.1.mlp.up_proj'\) is missing"):
        peftlab.load(make_llama(), tmp_path)
    save_file({**tensors, "base_model.model.model.extra.lora_A.weight": torch.ones(2, 2)}, tmp_path / WEIGHTS_NAME)
    with pytest.raises(CheckpointError, match=r"'model.extra.lora_A.weight' does not belong to any module"):
        peftlab.load(make_llama(), tmp_path)


def test_truncated_and_corrupted_weights(tmp_path):
    saved_adapter(tmp_path)
    path = tmp_path / WEIGHTS_NAME
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"{WEIGHTS_NAME} is truncated or corrupted"):
        peftlab.load(make_llama(), tmp_path)
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        peftlab.load(make_llama(), tmp_path)


def test_invalid_json_names_line_and_column(tmp_path):
    saved_adapter(tmp_path)
    (tmp_path / CONFIG_NAME).write_text('{\n  "peft_type": "LORA",\n  "r": 4,,\n}')
    with pytest.raises(CheckpointError, match=rf"{CONFIG_NAME}, line 3, column 10: invalid JSON"):
        peftlab.load(make_llama(), tmp_path)


def test_pickle_only_folder_is_refused(tmp_path):
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"peft_type": "LORA", "target_modules": ["q_proj"], "r": 4}))
    (tmp_path / "adapter_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match=r"holds only adapter_model.bin, a pickle file peftlab never loads"):
        peftlab.load(make_llama(), tmp_path)


def test_config_errors_and_tolerance(tmp_path):
    saved_adapter(tmp_path)
    config_path = tmp_path / CONFIG_NAME
    config = json.loads(config_path.read_text())

    config_path.write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ConfigError, match=r"uses DoRA \('use_dora'\), which peftlab does not support"):
        peftlab.load(make_llama(), tmp_path)

    config_path.write_text(json.dumps({**config, "peft_type": "IA3", "peftlab": {}}))
    with pytest.raises(ConfigError, match=r"peft_type 'IA3' is not supported; peftlab reads LORA"):
        peftlab.load(make_llama(), tmp_path)

    config_path.write_text(json.dumps({**config, "r": 0}))
    with pytest.raises(ConfigError, match=r"adapter_config.json: lora config field 'r' is 0"):
        peftlab.load(make_llama(), tmp_path)

    newer = {**config, "future_option": "x", "peftlab": {**config["peftlab"], "format_version": 99}}
    config_path.write_text(json.dumps(newer))
    with pytest.warns(UserWarning) as record:
        peftlab.load(make_llama(), tmp_path)
    messages = " ".join(str(w.message) for w in record)
    assert "ignoring unknown key(s) ['future_option']" in messages and "newer peftlab (format 99)" in messages


def test_minimal_peft_config_loads(tmp_path, token_batch):
    wrapped = peftlab.wrap(make_llama(), LoraConfig(r=4, alpha=8, init="random", target_modules=["q_proj"]))
    wrapped.save(tmp_path)
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"peft_type": "LORA", "target_modules": ["q_proj"],
                                                    "r": 4, "lora_alpha": 8}))
    assert peftlab.load(make_llama(), tmp_path)(**token_batch).logits.equal(wrapped(**token_batch).logits)


def test_empty_or_all_zero_adapters_are_never_saved(tmp_path):
    wrapped = peftlab.wrap(make_llama(), LoraConfig(r=4))
    with torch.no_grad():
        for p in wrapped.trainable_parameters():
            p.zero_()
    with pytest.raises(CheckpointError, match="every tensor is all zeros"):
        wrapped.save(tmp_path)
    weights = wrapped.adapters["default"].layers["model/layers/0/self_attn/q_proj"]
    weights.lora_A = torch.nn.Parameter(torch.empty(0))
    with pytest.raises(CheckpointError, match=r"tensor 'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight' is empty"):
        wrapped.save(tmp_path)
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_writes_are_atomic(tmp_path, monkeypatch):
    saved_adapter(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    wrapped = peftlab.wrap(make_llama(), LoraConfig(r=8, init="random"))

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("peftlab.checkpoint.save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        wrapped.save(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # old files intact, no temp files


def test_unknown_adapter_and_bad_names():
    wrapped = peftlab.wrap(make_llama(), LoraConfig(r=4))
    with pytest.raises(AdapterStateError, match=r"no adapter named 'x'; this model has: default"):
        wrapped.set_adapter("x")
    with pytest.raises(AdapterStateError, match="an adapter named 'default' already exists"):
        wrapped.add_adapter("default", LoraConfig(r=4))
    with pytest.raises(AdapterStateError, match="adapter name 'a.b' is invalid"):
        wrapped.add_adapter("a.b", LoraConfig(r=4))


def test_config_validation_names_the_field():
    with pytest.raises(ConfigError, match=r"'dropout' is 1.5; it must be in \[0, 1\)"):
        LoraConfig(dropout=1.5)
    with pytest.raises(ConfigError, match=r"'bias' is 'some'; valid values: 'none', 'all', 'lora_only'"):
        LoraConfig(bias="some")
    with pytest.raises(ConfigError, match=r"'init' is 'pissa'"):
        LoraConfig(init="pissa")
    with pytest.raises(ConfigError, match=r"rank_pattern\['q_proj'\]' is 0"):
        LoraConfig(rank_pattern={"q_proj": 0})
