"""A method defined outside peftlab plugs in through the registry alone."""
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import peftlab
from peftlab import registry
from peftlab.adapters import sites
from peftlab.adapters.base import Adapter, AdapterConfig, saved_metadata
from peftlab.errors import ConfigError, MergeError
from tests.conftest import make_llama


@dataclass
class ScaleConfig(AdapterConfig):
    """A toy method: scales the output of the final norm by a trainable factor (not mergeable here)."""

    method = "test-scale"
    module: str = "model.norm"


@registry.register
class Scale(Adapter):
    method = "test-scale"
    config_cls = ScaleConfig
    not_mergeable_because = "it is a test method"

    def __init__(self, name, config):
        super().__init__(name, config)
        self.factor = nn.Parameter(torch.ones(()))

    def _scale(self, out):
        return out * self.factor

    def inject(self, model, strict=True):
        sites.add_transform(model.get_submodule(self.config.module), self.config.module, self, self._scale)

    def remove(self, model):
        sites.detach(model.get_submodule(self.config.module), self)

    def checkpoint_config(self, model):
        return {**self.config.to_dict(), "peftlab": saved_metadata(self.method, 1)}

    def checkpoint_tensors(self, model):
        return {"factor": self.factor.detach()}

    def load_checkpoint_tensors(self, model, tensors, source):
        self.factor.data.copy_(tensors["factor"])


def test_plugin_method_wraps_trains_saves_and_loads(tmp_path, token_batch):
    model = make_llama()
    base = model(**token_batch).logits
    wrapped = peftlab.wrap(model, ScaleConfig())
    assert wrapped(**token_batch).logits.equal(base)
    with torch.no_grad():
        wrapped.adapters["default"].factor.fill_(2.0)
    scaled = wrapped(**token_batch).logits
    assert not scaled.equal(base)
    wrapped.save(tmp_path)
    reloaded = peftlab.load(make_llama(), tmp_path)
    assert isinstance(reloaded.adapters["default"], Scale)
    assert reloaded(**token_batch).logits.equal(scaled)


def test_transforms_apply_after_every_additive_term(token_batch):
    """A LoRA added after an output transform still runs before it on the same module."""
    model = make_llama()
    wrapped = peftlab.wrap(model, ScaleConfig(module="model.layers.0.mlp.down_proj"), name="scale")
    wrapped.add_adapter("lora", peftlab.LoraConfig(r=2, init="random", target_modules=["layers.0.mlp.down_proj"]))
    wrapped.set_adapter(["scale", "lora"])
    with torch.no_grad():
        wrapped.adapters["scale"].factor.fill_(0.0)
    # scale 0 after (base + lora) zeroes the MLP's contribution entirely, so LoRA has no effect
    with_lora = wrapped(**token_batch).logits
    wrapped.set_adapter("scale")
    assert with_lora.equal(wrapped(**token_batch).logits)


def test_non_mergeable_method_is_refused_with_its_reason():
    wrapped = peftlab.wrap(make_llama(), ScaleConfig())
    with pytest.raises(MergeError, match=r"adapter 'default' \(test-scale\) cannot be merged: it is a test method"):
        wrapped.merge()
    with pytest.raises(MergeError, match=r"cannot be merged: it is a test method; serve it unmerged"):
        wrapped.merge_and_unload()


def test_unknown_method_suggests_the_nearest():
    with pytest.raises(ConfigError, match=r"unknown method 'lroa'; valid methods: .*lora.* Did you mean 'lora'\?"):
        registry.get("lroa")
    assert "lora" in registry.names() and "test-scale" in registry.names()
