"""Several methods on one model: LoRA + BitFit, LoRA + Houlsby on the same modules, Houlsby + prefix,
and several bottleneck adapters switched by name. Each adapter saves and loads on its own."""
import functools

import pytest
import torch
import torch.nn.functional as F

import peftlab
from peftlab import LoraConfig
from peftlab.adapters.bitfit import BitFitConfig
from peftlab.adapters.houlsby import HoulsbyConfig, PfeifferConfig
from peftlab.adapters.prefix import PrefixTuningConfig
from peftlab.errors import AdapterStateError, MergeError
from tests.conftest import make_bert_classifier, make_llama

INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def bits(model):
    return {k: v.view(INT_VIEW[v.dtype]).clone() for k, v in model.state_dict().items()}


def perturb(adapter, std=0.1):
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(torch.randn_like(p) * std)


def reload(factory, folder, names):
    """A fresh model with each saved adapter loaded from its own folder, all active."""
    model = peftlab.PeftModel(factory())
    for name in names:
        model.load_adapter(folder / name, name=name)
    model.set_adapter(names)
    return model


def test_lora_plus_bitfit_merge_exactly_and_save_separately(tmp_path, token_batch):
    model = make_bert_classifier(dtype=torch.bfloat16)
    reference = bits(model)
    wrapped = peftlab.wrap(model, LoraConfig(r=4, init="random", target_modules=["query", "value"]), name="lora")
    wrapped.add_adapter("bitfit", BitFitConfig(modules_to_save=[]))  # the classifier is LoRA's to train
    perturb(wrapped.adapters["bitfit"])
    wrapped.set_adapter("lora")
    lora_only = wrapped(**token_batch).logits
    wrapped.set_adapter(["lora", "bitfit"])
    both = wrapped(**token_batch).logits
    assert not both.equal(lora_only)
    wrapped.merge()
    torch.testing.assert_close(wrapped(**token_batch).logits, both, rtol=3e-2, atol=3e-2)
    wrapped.unmerge()
    assert all(v.equal(reference[k]) for k, v in bits(model).items())
    assert wrapped(**token_batch).logits.equal(both)

    wrapped.save(tmp_path)
    fresh = functools.partial(make_bert_classifier, dtype=torch.bfloat16)
    assert reload(fresh, tmp_path, ["lora", "bitfit"])(**token_batch).logits.equal(both)


def test_two_methods_training_the_same_head_cannot_be_active_together(token_batch):
    wrapped = peftlab.wrap(make_bert_classifier(), LoraConfig(r=4), name="lora")
    wrapped.add_adapter("bitfit", BitFitConfig(), activate=True)  # both keep a trainable copy of the classifier
    with pytest.raises(AdapterStateError, match=r"module 'classifier' has trainable copies in active adapters "
                                                r"\['lora', 'bitfit'\]; activate only one"):
        wrapped(**token_batch)


def lora_and_houlsby(order):
    """Llama with LoRA and Houlsby on the same output projections, added in ``order``, same weights either way."""
    configs = {"lora": LoraConfig(r=4, init="random", target_modules=["o_proj", "down_proj"]),
               "houlsby": HoulsbyConfig(init="random", reduction_factor=8, train_layer_norms=False)}
    wrapped = peftlab.PeftModel(make_llama())
    torch.manual_seed(7)
    for name in order:
        wrapped.add_adapter(name, configs[name])
    wrapped.set_adapter(list(order))
    return wrapped


def test_lora_and_houlsby_on_the_same_modules_compose_in_a_fixed_order(tmp_path, token_batch):
    first = lora_and_houlsby(["lora", "houlsby"])
    second = lora_and_houlsby(["houlsby", "lora"])
    second.adapters.load_state_dict(first.adapters.state_dict())  # the same weights, added the other way round
    out = first(**token_batch).logits
    assert second(**token_batch).logits.equal(out)

    # reference: plain hooks doing the paper's order, LoRA inside the projection, the bottleneck after it
    lora, houlsby = first.adapters["lora"], first.adapters["houlsby"]
    reference = make_llama()
    for path in houlsby.paths():
        ab = lora.layers[path.replace(".", "/")]
        bn = {n: t.detach() for n, t in houlsby.bottlenecks[path.replace(".", "/")].named_parameters()}

        def hook(module, args, h, ab=ab, bn=bn):
            h = h + F.linear(F.linear(args[0], ab.lora_A.detach()), ab.lora_B.detach()) * ab.scaling
            return h + F.linear(F.silu(F.linear(h, bn["down.weight"], bn["down.bias"])), bn["up.weight"], bn["up.bias"])
        reference.get_submodule(path).register_forward_hook(hook)
    torch.testing.assert_close(out, reference(**token_batch).logits, rtol=1e-5, atol=1e-5)

    # LoRA merges underneath the live bottleneck; the bottleneck itself is refused and nothing else changes
    base = bits(first.base_model)
    first.merge("lora")
    torch.testing.assert_close(first(**token_batch).logits, out, rtol=1e-5, atol=1e-5)
    with pytest.raises(MergeError, match=r"adapter 'houlsby' \(houlsby\) cannot be merged"):
        first.merge()
    first.unmerge()
    assert all(v.equal(base[k]) for k, v in bits(first.base_model).items())
    assert first(**token_batch).logits.equal(out)
    first.save(tmp_path)
    assert reload(make_llama, tmp_path, ["houlsby", "lora"])(**token_batch).logits.equal(out)


def test_houlsby_plus_prefix_each_saved_on_its_own(tmp_path, token_batch):
    wrapped = peftlab.wrap(make_llama(), PrefixTuningConfig(prefix_length=3, bottleneck=8), name="prefix")
    wrapped.add_adapter("houlsby", HoulsbyConfig(init="random"))
    perturb(wrapped.adapters["houlsby"].norms)
    outs = {}
    for active in (["prefix"], ["houlsby"], ["prefix", "houlsby"]):
        wrapped.set_adapter(active)
        outs[tuple(active)] = wrapped(**token_batch).logits
    both = outs[("prefix", "houlsby")]
    assert not both.equal(outs[("prefix",)]) and not both.equal(outs[("houlsby",)])
    wrapped.save(tmp_path)
    reloaded = reload(make_llama, tmp_path, ["prefix", "houlsby"])
    torch.testing.assert_close(reloaded(**token_batch).logits, both, rtol=1e-6, atol=1e-6)  # prefix MLP folded on save
    reloaded.set_adapter("houlsby")
    assert reloaded(**token_batch).logits.equal(outs[("houlsby",)])


def test_several_bottleneck_adapters_switch_by_name(token_batch):
    model = make_llama()
    base = model(**token_batch).logits
    wrapped = peftlab.wrap(model, HoulsbyConfig(init="random"), name="a")
    wrapped.add_adapter("b", PfeifferConfig(init="random"))
    wrapped.add_adapter("c", HoulsbyConfig(init="random"))
    outs = {}
    for name in ("a", "b", "c"):
        wrapped.set_adapter(name)
        outs[name] = wrapped(**token_batch).logits
    assert len({tuple(o.flatten().tolist()) for o in outs.values()}) == 3
    wrapped.set_adapter("a")
    assert wrapped(**token_batch).logits.equal(outs["a"])  # switching back is exact
    wrapped.set_adapter(["a", "b"])  # a trains norms, b does not: they stack
    assert not wrapped(**token_batch).logits.equal(outs["a"])
    wrapped.set_adapter(["a", "c"])  # both stand in their own norm copies: refused with the reason
    with pytest.raises(AdapterStateError, match=r"trainable copies in active adapters \['a', 'c'\]"):
        wrapped(**token_batch)
    with wrapped.disable_adapters():
        assert wrapped(**token_batch).logits.equal(base)
    for name in ("a", "b", "c"):
        wrapped.delete_adapter(name)
    assert wrapped(**token_batch).logits.equal(base)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
