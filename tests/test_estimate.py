"""`peftlab estimate`: each part checked against what torch really holds on CPU.

Weights, adapters and optimizer states are compared with exact sums over the tensors of real tiny
models after a real optimizer step; activations with the bytes autograd saves
(``torch.autograd.graph.saved_tensors_hooks``, unique storages, parameters excluded). The peaks of
the 1.1B Llama runs are compared with peaks measured on an H100 (REFERENCE.md §3 and
benchmarks/results/lomo-h100.json); benchmarks/estimate_check.py measures peftlab's own runs there.
"""
from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig
from typer.testing import CliRunner

import peftlab
from peftlab import BitFitConfig, HoulsbyConfig, LoraConfig
from peftlab.adapters.layout import block_layouts
from peftlab.cli import estimate as _register_estimate  # noqa: F401
from peftlab.cli.app import app
from peftlab.estimate import estimate_memory
from peftlab.optim import AdaLomo
from peftlab.quant import quantize_model
from tests.conftest import make_bert_classifier, make_gpt2, make_llama, one_line_error

runner = CliRunner()
BATCH, SEQ = 2, 32
IDS = torch.randint(0, 128, (BATCH, SEQ), generator=torch.Generator().manual_seed(5))
GIB = 2**30


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def base_bytes(model) -> int:
    """Parameters (a tied weight once) and buffers; an NF4 layer's code tables once per layer, as on a GPU."""
    total = nbytes(model.parameters()) + nbytes(b for n, b in model.named_buffers() if "quant_map" not in n)
    return total + nbytes(b for m in model.modules() if type(m).__name__ == "NF4Linear"
                          for n, b in m.named_buffers(recurse=False) if "quant_map" in n)


def one_step(model, optimizer) -> None:
    loss = model(input_ids=IDS, labels=IDS).loss
    if isinstance(optimizer, AdaLomo):
        optimizer.backward(loss)
    else:
        loss.backward()
        optimizer.step()


@pytest.mark.parametrize("method, precision", [("lora", "bf16"), ("qlora", "fp32"), ("adalomo", "bf16"),
                                               ("full", "fp32")])
def test_parameter_parts_equal_real_tensors(method, precision):
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]
    est = estimate_memory(make_llama().config, method=method, method_options={"r": 4} if "lora" in method else None,
                          batch_size=BATCH, seq_len=SEQ, precision=precision,
                          optimizer="sgd" if method == "full" else None, cuda=False)
    base = make_llama(dtype=dtype)
    if method == "qlora":
        quantize_model(base)
    if "lora" in method:
        model = peftlab.wrap(base, LoraConfig(r=4))
        params = model.trainable_parameters()
        optimizer = torch.optim.AdamW(params, lr=1e-3)
        assert est.totals["adapters"] == nbytes(params)
    elif method == "adalomo":
        model = base.requires_grad_(True)
        optimizer = AdaLomo(model, lr=1e-3)
    else:
        model = base.requires_grad_(True)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    model.train()
    one_step(model, optimizer)
    # up to the rotary frequency buffers, which a loaded model keeps in fp32 and .to(dtype) cast here
    rotary = nbytes(b for n, b in base.named_buffers() if "inv_freq" in n)
    assert 0 <= est.totals["weights"] - base_bytes(base) <= rotary
    states = [t for state in optimizer.state.values() for k, t in state.items() if torch.is_tensor(t) and k != "step"]
    assert est.totals["optimizer"] == nbytes(states)
    if method == "full":
        assert est.totals["gradients"] == nbytes(p.grad for p in base.parameters())
    if method == "adalomo":
        assert est.totals["gradients"] == 0 and all(p.grad is None for p in base.parameters())


def saved_bytes(model, wrapped, labels: bool = False) -> tuple[int, int]:
    """(bytes autograd saves in the whole forward, in block 1 beyond what block 0 also saved)."""
    own = {p.untyped_storage()._cdata for p in wrapped.parameters()} | \
        {b.untyped_storage()._cdata for b in wrapped.buffers()}
    blocks = [model.get_submodule(lay.path) for lay in block_layouts(model)]
    where: list[int | None] = [None]
    found: dict[int, tuple[int, int | None]] = {}

    def pack(t):
        key = t.untyped_storage()._cdata
        if key not in own and key not in found:
            found[key] = (t.untyped_storage().nbytes(), where[0])
        return t

    handles = []
    for i, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(lambda m, a, i=i: where.__setitem__(0, i)))
        handles.append(block.register_forward_hook(lambda m, a, o: where.__setitem__(0, None)))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        wrapped(input_ids=IDS, labels=IDS if labels else None, use_cache=False)
    for handle in handles:
        handle.remove()
    return sum(n for n, _ in found.values()), sum(n for n, block in found.values() if block == 1)


ACTIVATION_CASES = [  # (factory, factory overrides, method, config, precision)
    (make_llama, {}, "lora", LoraConfig(r=4), "bf16"),
    (make_llama, {}, "lora", LoraConfig(r=4), "fp32"),
    (make_llama, {}, "full", None, "fp32"),
    (make_llama, {}, "qlora", LoraConfig(r=4), "fp32"),
    (make_llama, {}, "bitfit", BitFitConfig(add_missing=True), "bf16"),
    (make_llama, {}, "houlsby", HoulsbyConfig(), "fp32"),
    (make_gpt2, {"attn_pdrop": 0.0}, "lora", LoraConfig(r=4), "bf16"),  # residual dropout on, in train mode
    (make_bert_classifier, {"attention_probs_dropout_prob": 0.0}, "lora", LoraConfig(r=4), "fp32"),
]


@pytest.mark.parametrize("factory, overrides, method, config, precision", ACTIVATION_CASES,
                         ids=[f"{c[0].__name__[5:]}-{c[2]}-{c[4]}" for c in ACTIVATION_CASES])
def test_activation_formula_matches_saved_tensors(factory, overrides, method, config, precision):
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]
    model = factory(dtype=dtype, **overrides)
    task = "classification" if factory is make_bert_classifier else None
    est = estimate_memory(model.config, method=method, method_options=config.to_dict() if config else None,
                          batch_size=BATCH, seq_len=SEQ, precision=precision, task=task,
                          optimizer="sgd" if method == "full" else None, cuda=False)
    if method == "qlora":
        quantize_model(model)
    wrapped = peftlab.wrap(model, config) if config is not None else model.requires_grad_(True)
    wrapped.train()
    total, block = saved_bytes(model, wrapped)
    assert est.setup["activations_per_block"] == block
    assert abs(est.totals["stored_activations"] - total) <= 0.01 * total


def test_the_loss_keeps_one_fp32_copy_of_the_logits():
    wrapped = peftlab.wrap(make_llama(dtype=torch.bfloat16), LoraConfig(r=4)).train()
    without, _ = saved_bytes(wrapped.base_model, wrapped)
    with_loss, _ = saved_bytes(wrapped.base_model, wrapped, labels=True)
    log_softmax = 4 * BATCH * SEQ * 128  # fp32 [tokens, vocab]; backward holds it, its gradient and the result
    assert log_softmax <= with_loss - without <= log_softmax + 16 * BATCH * SEQ + 64  # + the shifted labels
    est = estimate_memory(make_llama().config, method="lora", batch_size=BATCH, seq_len=SEQ, cuda=False,
                          chunked_loss=False)
    assert est.totals["logits"] == 3 * log_softmax


def test_the_chunked_loss_counts_one_slice_unless_the_head_is_hooked():
    common = dict(batch_size=4, seq_len=1024, gradient_checkpointing=True)
    model_loss = estimate_memory(LLAMA_1B, method="lora", chunked_loss=False, **common)
    chunked = estimate_memory(LLAMA_1B, method="lora", **common)
    tokens, vocab, hidden = 4 * 1024, 32000, 2048
    assert model_loss.totals["logits"] == 12 * tokens * vocab
    # one 1024-token slice in fp32 + bf16, the bf16 hidden-state gradient, the fp32 log-sum-exp
    assert chunked.totals["logits"] == 1024 * vocab * 6 + tokens * hidden * 2 + 4 * tokens
    assert "chunked loss" in chunked.notes["logits"]
    full = estimate_memory(LLAMA_1B, method="full", optimizer="sgd", precision="bf16", **common)
    # + the head's gradient, fp32 like the master weights that bf16 autocast trains
    assert full.totals["logits"] - chunked.totals["logits"] == vocab * hidden * 4
    hooked = estimate_memory(LLAMA_1B, method="lora", method_options={"modules_to_save": ["lm_head"]}, **common)
    assert hooked.totals["logits"] == model_loss.totals["logits"]  # the trainer falls back to the model's loss


LLAMA_1B = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                       num_attention_heads=32, num_key_value_heads=4, tie_word_embeddings=False,
                       architectures=["LlamaForCausalLM"])


@pytest.mark.parametrize("method, measured_gib", [
    ("lora", 4.09),   # REFERENCE.md §3: HF PEFT LoRA, bf16 base, checkpointing (same memory layout at its peak)
    ("qlora", 2.77),  # REFERENCE.md §3: HF PEFT QLoRA, bnb NF4 + double quant
    ("lomo", 3.985),  # benchmarks/results/lomo-h100.json: "peftlab LOMO (plain loss)"
])
def test_peaks_measured_on_an_h100_are_reproduced(method, measured_gib):
    est = estimate_memory(LLAMA_1B, method=method, method_options={"r": 16, "alpha": 32} if "lora" in method
                          else None, batch_size=4, seq_len=1024, gradient_checkpointing=True, chunked_loss=False)
    assert abs(est.peak_bytes / (measured_gib * GIB) - 1) <= 0.15
    assert est.peak_phase == "loss"
    assert sum(est.parts.values()) == est.peak_bytes


def test_checkpointing_and_paged_optimizer_parts():
    common = dict(method="lora", batch_size=4, seq_len=1024)
    plain = estimate_memory(LLAMA_1B, **common)
    checkpointed = estimate_memory(LLAMA_1B, gradient_checkpointing=True, **common)
    block_inputs = 22 * 2 * 4 * 1024 * 2048  # bf16 hidden states entering each block
    assert block_inputs < checkpointed.totals["stored_activations"] < block_inputs * 1.2
    assert plain.totals["stored_activations"] > 10 * checkpointed.totals["stored_activations"]
    paged = estimate_memory(LLAMA_1B, optimizer="paged_adamw_8bit", **common)
    assert paged.parts["optimizer"] == 0 and paged.outside_allocator["paged optimizer states"] > 0



def test_cli(tmp_path):
    model = make_llama()
    model.config.architectures = ["LlamaForCausalLM"]
    model.config.save_pretrained(tmp_path / "llama")  # config.json only: no weights needed
    args = ["estimate", str(tmp_path / "llama"), "--method", "lora", "--method.r", "4", "--batch", "2", "--seq", "32"]
    result = runner.invoke(app, args + ["--gradient-checkpointing", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["setup"]["gradient_checkpointing"] and data["setup"]["batch_size"] == 2
    assert set(data["parts"]) == {"weights", "adapters", "gradients", "optimizer", "activations", "logits",
                                  "overhead"}
    text = runner.invoke(app, args + ["--optimizer", "sgd"]).output
    assert "peak" in text and "sgd" in text
    assert "train.optimizer" in one_line_error(args + ["--optimizer", "adam"])
    assert "train.precision" in one_line_error(args + ["--precision", "fp8"])
    assert "train.batch_size" in one_line_error(args + ["--batch", "0"])
    assert "unknown method" in one_line_error(["estimate", str(tmp_path / "llama"), "--method", "sdg"])
    assert "did you mean 'method.alpha'" in one_line_error(args + ["--method.alhpa", "3"])
