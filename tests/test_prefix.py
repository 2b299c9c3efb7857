"""Prefix tuning: training, checkpoints, generation and caches, padding, GQA, fp64 attention reference,
HF PEFT interop both ways, and every refusal."""
import copy
import json
import math
import warnings

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    BloomConfig,
    BloomForCausalLM,
    DynamicCache,
    EncoderDecoderCache,
    LlamaConfig,
    MistralConfig,
    MistralForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)
from transformers.cache_utils import DynamicSlidingWindowLayer

import peftlab
from peftlab.adapters import prefix_attention
from peftlab.adapters.prefix import PrefixMLP, PrefixTable, PrefixTuningConfig
from peftlab.adapters.prefix_attention import PrefixUnsupportedError
from peftlab.checkpoint import CONFIG_NAME, WEIGHTS_NAME
from peftlab.errors import CheckpointError, ConfigError, MergeError
from tests.conftest import make_bert_classifier, make_gpt2, make_llama

FACTORIES = {"llama": make_llama, "gpt2": make_gpt2, "bert": make_bert_classifier}
P = 3  # prefix length used throughout


def prefix_config(**overrides):
    return PrefixTuningConfig(**{"prefix_length": P, "bottleneck": 8, **overrides})


def batch(seed=0, size=2, length=9):
    ids = torch.randint(0, 128, (size, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def is_classifier(model):
    return "ForSequenceClassification" in type(getattr(model, "base_model", model)).__name__


def loss_of(model, inputs):
    labels = torch.arange(inputs["input_ids"].shape[0]) % 3 if is_classifier(model) else inputs["input_ids"]
    return model(**inputs, labels=labels).loss


def perturb(model):
    """Train-like changes to every trainable tensor (our adapter's or PEFT's)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)


def shifted(positions_of, inputs):
    """Position ids P..P+n-1: where HF PEFT puts the real tokens."""
    length = inputs["input_ids"].shape[1]
    return (torch.arange(length) + positions_of).expand(inputs["input_ids"].shape[0], -1)


# --- training ------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch,reparametrize", [("llama", True), ("gpt2", True), ("bert", True), ("llama", False)])
def test_training_lowers_loss_and_changes_only_prefix(arch, reparametrize):
    model = FACTORIES[arch]()
    base_before = {k: v.clone() for k, v in model.state_dict().items()}
    wrapped = peftlab.wrap(model, prefix_config(reparametrize=reparametrize))
    wrapped.train()
    adapter = wrapped.adapters["default"]
    assert isinstance(adapter.prefix, PrefixMLP if reparametrize else PrefixTable)
    before = {k: v.clone() for k, v in adapter.state_dict().items()}
    opt = torch.optim.Adam(wrapped.trainable_parameters(), lr=1e-2)
    inputs, losses = batch(), []
    for step in range(6):
        loss = loss_of(wrapped, inputs)
        losses.append(loss.item())
        loss.backward()
        if step == 0:
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.prefix.parameters())
        opt.step()
        opt.zero_grad()
    assert losses[-1] < losses[0]
    for key, value in model.state_dict().items():
        assert value.equal(base_before[key]), f"base tensor {key} changed"
    changed = {k for k, v in adapter.state_dict().items() if not v.equal(before[k])}
    assert {k for k in before if k.startswith("prefix.")} <= changed
    assert all(k.startswith(("prefix.", "copies.")) for k in changed)
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert all(n.startswith("adapters.default.prefix.") or ".copies.classifier." in n for n in trainable)


def test_summary_counts_the_mlp():
    model = make_llama()
    wrapped = peftlab.wrap(model, prefix_config(bottleneck=5))
    cfg = model.config
    width = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    expected = P * cfg.hidden_size + (cfg.hidden_size + 1) * 5 + (5 + 1) * width
    assert wrapped.summary().trainable == expected
    assert any(row.kind == "prefix [default]" for row in wrapped.summary().rows)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_prefix_gradients(use_reentrant):
    grads = []
    for checkpointing in (False, True):
        model = make_llama()
        torch.manual_seed(1)  # the same MLP initialisation in both runs
        wrapped = peftlab.wrap(model, prefix_config())
        if checkpointing:
            wrapped.enable_gradient_checkpointing(use_reentrant=use_reentrant)
        wrapped.train()
        loss_of(wrapped, batch()).backward()
        grads.append([p.grad.clone() for p in wrapped.adapters["default"].prefix.parameters()])
    for plain, checkpointed in zip(*grads):
        torch.testing.assert_close(checkpointed, plain, rtol=1e-5, atol=1e-7)


# --- attention math against an independent fp64 reference ---------------------------------------
def rope(x, positions, theta):
    """Rotary embedding in the rotate-half form; angles in fp32 as transformers computes them, the rest in fp64."""
    dim = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    angles = torch.cat((positions[:, None].float() * inv_freq[None, :],) * 2, dim=-1)
    cos, sin = angles.cos().double(), angles.sin().double()
    half = dim // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def reference_attention(attn, hidden, mask_2d, table, layer, config):
    """One Llama self-attention over [prefix; real] keys/values, by hand: GQA, RoPE, causal + padding mask."""
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = attn.head_dim
    bsz, length, _ = hidden.shape
    positions = torch.arange(length)
    q = (hidden @ attn.q_proj.weight.T).view(bsz, length, heads, head_dim).transpose(1, 2)
    k = (hidden @ attn.k_proj.weight.T).view(bsz, length, kv_heads, head_dim).transpose(1, 2)
    v = (hidden @ attn.v_proj.weight.T).view(bsz, length, kv_heads, head_dim).transpose(1, 2)
    theta = config.rope_parameters["rope_theta"]
    q, k = rope(q, positions, theta), rope(k, positions, theta)
    # PEFT layout per prefix position: layers, then K before V, then heads, then head_dim
    kv = table.double().view(P, config.num_hidden_layers, 2, kv_heads, head_dim)[:, layer]
    pk, pv = kv[:, 0].transpose(0, 1), kv[:, 1].transpose(0, 1)  # [kv_heads, P, head_dim]
    out = torch.empty(bsz, length, heads, head_dim, dtype=torch.float64)
    for b in range(bsz):
        for h in range(heads):
            g = h // (heads // kv_heads)
            keys, values = torch.cat((pk[g], k[b, g])), torch.cat((pv[g], v[b, g]))
            scores = q[b, h] @ keys.T / math.sqrt(head_dim)
            visible = torch.ones(length, P + length, dtype=torch.bool)
            visible[:, P:] = (positions[None, :] <= positions[:, None]) & mask_2d[b].bool()[None, :]
            weights = torch.softmax(scores.masked_fill(~visible, -math.inf), dim=-1)
            out[b, :, h] = weights @ values
    return out.reshape(bsz, length, heads * head_dim) @ attn.o_proj.weight.T


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("head_dim", [None, 24], ids=["head_dim=hidden/heads", "head_dim=24"])
def test_llama_attention_matches_fp64_reference(implementation, padded, head_dim):
    overrides = {"attn_implementation": implementation, **({"head_dim": head_dim} if head_dim else {})}
    model = make_llama(dtype=torch.float64, **overrides)
    wrapped = peftlab.wrap(model, prefix_config(reparametrize=False))
    adapter = wrapped.adapters["default"]
    inputs = batch(seed=3)
    if padded:
        inputs["attention_mask"][1, 6:] = 0  # right padding
    seen = {}
    for layer in (0, 1):
        attn = model.model.layers[layer].self_attn
        attn.register_forward_pre_hook(lambda m, a, kw, layer=layer: seen.__setitem__(("in", layer), kw["hidden_states"]),
                                       with_kwargs=True, prepend=True)
        attn.register_forward_hook(lambda m, a, out, layer=layer: seen.__setitem__(("out", layer), out[0]))
    wrapped(**inputs)
    for layer in (0, 1):
        attn = model.model.layers[layer].self_attn
        expected = reference_attention(attn, seen["in", layer], inputs["attention_mask"], adapter.prefix_table(),
                                       layer, model.config)
        real = inputs["attention_mask"].bool()
        tol = 1e-10 if implementation == "sdpa" else 1e-6  # transformers' eager softmax runs in fp32
        torch.testing.assert_close(seen["out", layer][real], expected[real], rtol=tol, atol=tol)


# --- padding ------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch,side", [("llama", "left"), ("llama", "right"), ("gpt2", "left"), ("gpt2", "right"),
                                       ("bert", "right")])
def test_padded_batches_match_single_sequences(arch, side):
    wrapped = peftlab.wrap(FACTORIES[arch](), prefix_config())
    perturb(wrapped)
    lengths, width = (9, 5), 9
    rows = [batch(seed=10 + i, size=1, length=n)["input_ids"][0] for i, n in enumerate(lengths)]
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[i, span], mask[i, span] = row, 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # what generate() passes; real tokens are 0..n-1
    logits = wrapped(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    for i, row in enumerate(rows):
        alone = wrapped(input_ids=row[None]).logits[0]
        got = logits[i] if arch == "bert" else logits[i][mask[i].bool()]
        torch.testing.assert_close(got, alone, rtol=1e-5, atol=1e-5)


# --- generation and caches -----------------------------------------------------------------------
def tiny(config_cls, model_cls, **overrides):
    """A 2-layer decoder of another family (fixed seed, same vocabulary as the conftest models)."""
    def make():
        torch.manual_seed(0)
        config = config_cls(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                            num_attention_heads=4, **overrides)
        return model_cls(config).eval()
    return make


DECODERS = {
    "llama": make_llama,
    "gpt2": make_gpt2,
    "qwen2": tiny(transformers.Qwen2Config, transformers.Qwen2ForCausalLM, num_key_value_heads=2),
    "gemma-head_dim16": tiny(transformers.GemmaConfig, transformers.GemmaForCausalLM, num_key_value_heads=1,
                             head_dim=16),
    "gpt_neox-layer_past": tiny(transformers.GPTNeoXConfig, transformers.GPTNeoXForCausalLM),
    "opt": tiny(transformers.OPTConfig, transformers.OPTForCausalLM, ffn_dim=48, word_embed_proj_dim=32),
}


@pytest.mark.parametrize("arch", sorted(DECODERS))
def test_generate_equals_stepwise_full_recomputation(arch):
    wrapped = peftlab.wrap(DECODERS[arch](), prefix_config())
    perturb(wrapped)
    inputs = batch(seed=5, length=6)
    new = 5
    out = wrapped.generate(**inputs, max_new_tokens=new, do_sample=False, output_logits=True,
                           return_dict_in_generate=True, pad_token_id=0)
    ids = inputs["input_ids"]
    for step in range(new):
        logits = wrapped(input_ids=ids).logits[:, -1]  # no cache: everything recomputed
        torch.testing.assert_close(out.logits[step], logits, rtol=1e-5, atol=1e-5)
        ids = torch.cat((ids, logits.argmax(-1, keepdim=True)), dim=1)
    assert out.sequences.equal(ids)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generate_on_left_padded_batch_matches_single_prompts(arch):
    wrapped = peftlab.wrap(FACTORIES[arch](), prefix_config())
    perturb(wrapped)
    prompts = [batch(seed=20, size=1, length=7)["input_ids"][0], batch(seed=21, size=1, length=4)["input_ids"][0]]
    ids = torch.zeros(2, 7, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, prompt in enumerate(prompts):
        ids[i, 7 - len(prompt):], mask[i, 7 - len(prompt):] = prompt, 1
    together = wrapped.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    for i, prompt in enumerate(prompts):
        alone = wrapped.generate(input_ids=prompt[None], max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert together[i, 7:].equal(alone[0, len(prompt):])


def test_user_cache_mid_generation_and_static_cache():
    wrapped = peftlab.wrap(make_llama(), prefix_config())
    perturb(wrapped)
    inputs = batch(seed=6, length=8)
    settings = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    expected = wrapped.generate(**inputs, **settings)
    prompt = {k: v[:, :5] for k, v in inputs.items()}
    cache = wrapped(**prompt, use_cache=True).past_key_values
    assert cache.get_seq_length() == 5  # the prefix never enters the cache: positions stay 0..n-1
    assert wrapped.generate(**inputs, past_key_values=cache, **settings).equal(expected)
    assert wrapped.generate(**inputs, cache_implementation="static", **settings).equal(expected)


# --- save, load, fold ----------------------------------------------------------------------------
@pytest.mark.parametrize("arch", sorted(FACTORIES))
def test_save_load_round_trip_folds_the_mlp(arch, tmp_path):
    wrapped = peftlab.wrap(FACTORIES[arch](), prefix_config())
    perturb(wrapped)
    inputs = batch()
    expected = wrapped(**inputs).logits
    wrapped.save(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["peft_type"] == "PREFIX_TUNING" and config["peftlab"]["method"] == "prefix"
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    cfg = wrapped.base_model.config
    kv_width = getattr(cfg, "num_key_value_heads", cfg.num_attention_heads) * (cfg.hidden_size // cfg.num_attention_heads)
    assert tensors["prompt_embeddings"].shape == (P, cfg.num_hidden_layers * 2 * kv_width)
    copies = {"base_model.classifier.weight", "base_model.classifier.bias"} if arch == "bert" else set()
    assert set(tensors) == {"prompt_embeddings"} | copies
    reloaded = peftlab.load(FACTORIES[arch](), tmp_path)
    adapter = reloaded.adapters["default"]
    assert isinstance(adapter.prefix, PrefixTable) and reloaded.summary().trainable == 0
    assert reloaded(**inputs).logits.equal(expected)


def test_loaded_adapter_trains_further(tmp_path):
    peftlab.wrap(make_llama(), prefix_config()).save(tmp_path)
    model = peftlab.load(make_llama(), tmp_path, trainable=True)
    assert model.summary().trainable == model.adapters["default"].prefix.table.numel()
    model.train()
    loss_of(model, batch()).backward()
    assert model.adapters["default"].prefix.table.grad.abs().sum() > 0


def test_fold_keeps_outputs_and_drops_the_mlp():
    wrapped = peftlab.wrap(make_llama(), prefix_config())
    inputs = batch()
    expected = wrapped(**inputs).logits
    adapter = wrapped.adapters["default"]
    adapter.fold()
    assert isinstance(adapter.prefix, PrefixTable) and adapter.prefix.table.requires_grad
    assert wrapped(**inputs).logits.equal(expected)


def test_two_active_prefixes_equal_one_concatenated_prefix():
    wrapped = peftlab.wrap(make_llama(), prefix_config(), name="a")
    wrapped.add_adapter("b", prefix_config(prefix_length=2, reparametrize=False))
    wrapped.set_adapter(["a", "b"])
    inputs = batch()
    both = wrapped(**inputs).logits
    tables = [wrapped.adapters[n].prefix_table() for n in ("a", "b")]
    single = peftlab.wrap(make_llama(), prefix_config(prefix_length=P + 2, reparametrize=False))
    with torch.no_grad():  # per layer: [prefix of a; prefix of b]
        single.adapters["default"].prefix.table.copy_(torch.cat(tables))
    torch.testing.assert_close(single(**inputs).logits, both, rtol=1e-6, atol=1e-6)


def test_disable_and_delete_restore_the_base_model():
    model = make_llama()
    inputs = batch()
    base = model(**inputs).logits
    wrapped = peftlab.wrap(model, prefix_config())
    assert not wrapped(**inputs).logits.equal(base)
    with wrapped.disable_adapters():
        assert wrapped(**inputs).logits.equal(base)
    wrapped.delete_adapter("default")
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert model(**inputs).logits.equal(base)


def test_deepcopy_gives_an_independent_consistent_model():
    wrapped = peftlab.wrap(make_llama(), prefix_config())
    inputs = batch()
    expected = wrapped(**inputs).logits
    twin = copy.deepcopy(wrapped)
    assert twin(**inputs).logits.equal(expected)
    with torch.no_grad():
        twin.adapters["default"].prefix.up.bias.add_(1.0)
    assert not twin(**inputs).logits.equal(expected) and wrapped(**inputs).logits.equal(expected)
    twin.delete_adapter("default")
    assert all(not m._forward_pre_hooks for m in twin.base_model.modules())
    assert wrapped(**inputs).logits.equal(expected)


def test_bf16_model_runs_with_fp32_prefix():
    full = peftlab.wrap(make_llama(), prefix_config())
    perturb(full)
    half = peftlab.wrap(make_llama(dtype=torch.bfloat16), prefix_config(reparametrize=False))
    with torch.no_grad():
        half.adapters["default"].prefix.table.copy_(full.adapters["default"].prefix_table())
    inputs = batch()
    logits = half(**inputs).logits
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), full(**inputs).logits, rtol=0, atol=0.05)
    assert half.generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=0).shape == (2, 11)


# --- HF PEFT interop -----------------------------------------------------------------------------
@pytest.mark.parametrize("arch", sorted(FACTORIES))
def test_hf_peft_runs_a_peftlab_prefix_identically(arch, tmp_path):
    wrapped = peftlab.wrap(FACTORIES[arch](), prefix_config())
    perturb(wrapped)
    inputs = batch()
    inputs["attention_mask"][1, 7:] = 0
    wrapped.save(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(FACTORIES[arch](), str(tmp_path))
    theirs.eval()
    # PEFT numbers the real tokens from P; ours match it given the same positions
    ours = wrapped(**inputs, position_ids=shifted(P, inputs)).logits
    assert theirs(**inputs).logits.equal(ours)


@pytest.mark.parametrize("arch", sorted(FACTORIES))
def test_peftlab_runs_an_hf_peft_prefix_identically(arch, tmp_path):
    task = "SEQ_CLS" if arch == "bert" else "CAUSAL_LM"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(FACTORIES[arch](), peft.PrefixTuningConfig(
            task_type=task, num_virtual_tokens=P, prefix_projection=True, encoder_hidden_size=8))
    perturb(theirs)
    theirs.eval()
    inputs = batch()
    inputs["attention_mask"][0, 6:] = 0
    expected = theirs(**inputs).logits
    theirs.save_pretrained(str(tmp_path))
    with pytest.warns(UserWarning, match=r"HF PEFT places real tokens after the prefix"):
        ours = peftlab.load(FACTORIES[arch](), tmp_path)
    # PEFT's live MLP runs batched; the saved (folded) prefix differs from it by fp32 rounding only
    torch.testing.assert_close(ours(**inputs, position_ids=shifted(P, inputs)).logits, expected, rtol=1e-5, atol=1e-6)


# --- refusals -----------------------------------------------------------------------------------
@pytest.mark.parametrize("field,value,message", [
    ("prefix_length", 0, "'prefix_length' is 0; it must be a positive integer"),
    ("bottleneck", 2.5, "'bottleneck' is 2.5; it must be a positive integer"),
    ("embedding_dim", -1, "'embedding_dim' is -1; it must be a positive integer or None"),
    ("reparametrize", "yes", "'reparametrize' is 'yes'; it must be true or false"),
    ("modules_to_save", "classifier", "'modules_to_save' is 'classifier'; it must be a list"),
])
def test_config_errors_name_the_field(field, value, message):
    with pytest.raises(ConfigError, match=message):
        PrefixTuningConfig(**{field: value})


def tiny_t5():
    return T5ForConditionalGeneration(T5Config(vocab_size=32, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2))


def tiny_mistral(**overrides):
    return MistralForCausalLM(MistralConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                            num_attention_heads=2, num_key_value_heads=1, **overrides))


def with_config(model, **attrs):
    for key, value in attrs.items():
        setattr(model.config, key, value)
    return model


@pytest.mark.parametrize("make_model,message", [
    (tiny_t5, r"T5ForConditionalGeneration is an encoder-decoder model"),
    (lambda: make_gpt2(add_cross_attention=True), r"has cross-attention layers \(config.add_cross_attention=True\)"),
    (tiny_mistral, r"uses sliding-window attention \(config.sliding_window=4096\)"),
    (lambda: with_config(make_llama(), layer_types=["full_attention", "sliding_attention"]),
     r"has sliding_attention layers \(config.layer_types\)"),
    (lambda: BloomForCausalLM(BloomConfig(vocab_size=32, hidden_size=16, n_layer=1, n_head=2)), r"uses ALiBi"),
    (lambda: with_config(make_bert_classifier(), position_embedding_type="relative_key"),
     r"uses 'relative_key' position embeddings"),
    (lambda: with_config(make_llama(), _attn_implementation="flex_attention"),
     r"uses attention implementation 'flex_attention'; prefix tuning supports 'eager' and 'sdpa'"),
])
def test_unsupported_architectures_are_refused(make_model, message):
    model = make_model()
    with pytest.raises(PrefixUnsupportedError, match=message):
        peftlab.wrap(model, prefix_config())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_old_transformers_is_refused(monkeypatch):
    monkeypatch.setattr(prefix_attention, "transformers_version", lambda: "4.55.0")
    with pytest.raises(PrefixUnsupportedError, match=r"prefix tuning needs transformers >= 5.0; 4.55.0 is installed"):
        peftlab.wrap(make_llama(), prefix_config())


def test_sliding_window_model_works_once_the_window_is_off():
    wrapped = peftlab.wrap(tiny_mistral(sliding_window=None), prefix_config())
    assert wrapped(input_ids=torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 32)


def sliding_cache():
    from transformers.cache_utils import Cache
    return Cache(layers=[DynamicSlidingWindowLayer(sliding_window=4) for _ in range(2)])


@pytest.mark.parametrize("make_cache,message", [
    (lambda: EncoderDecoderCache(DynamicCache(), DynamicCache()), r"received past_key_values of type EncoderDecoderCache"),
    (sliding_cache, r"Cache gives layer 0 a DynamicSlidingWindowLayer; prefix tuning supports DynamicCache and StaticCache"),
])
def test_unsupported_caches_are_refused(make_cache, message):
    wrapped = peftlab.wrap(make_llama(), prefix_config())
    with pytest.raises(PrefixUnsupportedError, match=rf"attention module 'model.layers.0.self_attn'.*{message}"):
        wrapped(input_ids=torch.tensor([[1, 2, 3]]), past_key_values=make_cache(), use_cache=True)


def test_switching_to_an_unsupported_attention_kernel_is_refused_at_forward():
    wrapped = peftlab.wrap(make_llama(), prefix_config())
    wrapped.base_model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(PrefixUnsupportedError, match=r"attention module 'model.layers.0.self_attn' uses attention "
                                                     r"implementation 'flash_attention_2'"):
        wrapped(input_ids=torch.tensor([[1, 2, 3]]))


class ToyAttention(nn.Module):
    """Looks like a self-attention module but reads keys/values its own way."""

    def __init__(self, config, kv_shape):
        super().__init__()
        self.config, self.layer_idx, self.kv_shape = config, 0, kv_shape
        self.proj = nn.Linear(8, 8)

    def forward(self, hidden_states, attention_mask=None, past_key_values=None):
        if self.kv_shape is not None:
            states = hidden_states.new_zeros(self.kv_shape)
            past_key_values.update(states, states, self.layer_idx)
        return self.proj(hidden_states)


class ToyModel(nn.Module):
    def __init__(self, kv_shape=None):
        super().__init__()
        self.config = LlamaConfig(hidden_size=8, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=1,
                                  attn_implementation="eager")
        self.attn = ToyAttention(self.config, kv_shape)

    def forward(self, x):
        return self.attn(x, attention_mask=None, past_key_values=None)


@pytest.mark.parametrize("kv_shape,message", [
    (None, r"attention module 'attn' \(ToyAttention\) called past_key_values.update\(\) 0 times"),
    ((1, 2, 3, 4), r"attention module 'attn' produced keys of shape \[1, 2, 3, 4\], but the prefix was made for "
                   r"\[batch, 1 key/value heads, tokens, head_dim 4\]"),
])
def test_attention_that_bypasses_the_cache_is_refused(kv_shape, message):
    wrapped = peftlab.wrap(ToyModel(kv_shape), prefix_config())
    with pytest.raises(PrefixUnsupportedError, match=message):
        wrapped(torch.zeros(1, 3, 8))


def test_merging_is_refused_with_the_reason():
    wrapped = peftlab.wrap(make_llama(), prefix_config())
    with pytest.raises(MergeError, match=r"'default' \(prefix\) cannot be merged: prefix tuning adds key/value vectors"):
        wrapped.merge()
    with pytest.raises(MergeError, match=r"cannot be merged: prefix tuning adds key/value vectors"):
        wrapped.merge_and_unload()


def saved(tmp_path, model_factory=make_llama):
    peftlab.wrap(model_factory(), prefix_config()).save(tmp_path)
    return json.loads((tmp_path / CONFIG_NAME).read_text()), load_file(tmp_path / WEIGHTS_NAME)


def test_checkpoint_tensor_errors(tmp_path):
    config, tensors = saved(tmp_path)
    save_file({"other": torch.ones(2)}, tmp_path / WEIGHTS_NAME)
    with pytest.raises(CheckpointError, match=r"tensor 'prompt_embeddings' \(the prefix\) is missing"):
        peftlab.load(make_llama(), tmp_path)
    save_file({**tensors, "base_model.extra.weight": torch.ones(2)}, tmp_path / WEIGHTS_NAME)
    with pytest.raises(CheckpointError, match=r"tensor 'base_model.extra.weight' is neither the prefix nor a module"):
        peftlab.load(make_llama(), tmp_path)
    save_file(tensors, tmp_path / WEIGHTS_NAME)
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**config, "num_virtual_tokens": 4}))
    with pytest.raises(CheckpointError, match=r"'prompt_embeddings' has shape \[3, 128\], but the base model needs "
                                              r"\[4, 128\] \(4 virtual tokens x 2 layers x 2 x 2 key/value heads"):
        peftlab.load(make_llama(), tmp_path)


def test_checkpoint_config_errors(tmp_path):
    config, _ = saved(tmp_path)
    path = tmp_path / CONFIG_NAME
    with pytest.raises(ConfigError, match=r"prefix adapter was made for num_layers=2, but LlamaForCausalLM has "
                                          r"num_layers=3"):
        peftlab.load(make_llama(num_hidden_layers=3), tmp_path)
    path.write_text(json.dumps({**config, "num_transformer_submodules": 2}))
    with pytest.raises(ConfigError, match=r"num_transformer_submodules is 2; it was saved for an encoder-decoder"):
        peftlab.load(make_llama(), tmp_path)
    path.write_text(json.dumps({k: v for k, v in config.items() if k != "num_virtual_tokens"}))
    with pytest.raises(ConfigError, match=r"'num_virtual_tokens' is missing"):
        peftlab.load(make_llama(), tmp_path)
    path.write_text(json.dumps({**config, "num_virtual_tokens": 0}))
    with pytest.raises(ConfigError, match=r"adapter_config.json: prefix config field 'prefix_length' is 0"):
        peftlab.load(make_llama(), tmp_path)
    newer = {**config, "future_option": 1, "peftlab": {**config["peftlab"], "format_version": 99}}
    path.write_text(json.dumps(newer))
    with pytest.warns(UserWarning) as record:
        peftlab.load(make_llama(), tmp_path)
    messages = " ".join(str(w.message) for w in record)
    assert "ignoring unknown key(s) ['future_option']" in messages and "newer peftlab (format 99)" in messages
