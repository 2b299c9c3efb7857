"""`peftlab inspect`: condensed module tree, targetable linear layers and exact counts, from config.json alone.

Expected counts are written out by hand from the tiny models' shapes (tests/conftest.py):
Llama V=128 h=64 FF=96 L=2, 4 heads / 2 kv heads of 16 (k/v width 32), untied head;
GPT-2 V=128 h=64 L=2, 256 positions, MLP 4h, tied head; BERT V=128 h=64 FF=96 L=2, 256 positions, 3 labels.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from peftlab.cli import inspect as _register_inspect  # noqa: F401
from peftlab.cli.app import app
from peftlab.inspect import inspect_model
from peftlab.quant import quantize_model
from tests.conftest import make_bert_classifier, make_gpt2, make_llama, one_line_error

runner = CliRunner()
V, H, FF, L, KV = 128, 64, 96, 2, 32  # vocab, hidden, MLP width, layers, k/v width
LLAMA_LINEARS = [(H, H), (H, KV), (H, KV), (H, H), (H, FF), (H, FF), (FF, H)]  # q k v o gate up down (in, out)
LLAMA_BASE = V * H + L * (sum(i * o for i, o in LLAMA_LINEARS) + 2 * H) + H + V * H
GPT2_LAYER = (2 * H) + (H * 3 * H + 3 * H) + (H * H + H) + (2 * H) + (H * 4 * H + 4 * H) + (4 * H * H + H)
GPT2_BASE = V * H + 256 * H + L * GPT2_LAYER + 2 * H  # wte (tied with lm_head), wpe, blocks, ln_f
BERT_LAYER = 4 * (H * H + H) + 2 * H + (H * FF + FF) + (FF * H + H) + 2 * H
BERT_BASE = (V * H + 256 * H + 2 * H + 2 * H) + L * BERT_LAYER + (H * H + H) + (H * 3 + 3)


def config_only(tmp_path: Path, factory, name: str) -> Path:
    """A model folder holding config.json and nothing else: inspect must not need weights."""
    folder = tmp_path / name
    factory().config.save_pretrained(folder)
    return folder


@pytest.fixture
def llama_dir(tmp_path):
    path = config_only(tmp_path, make_llama, "llama")
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "architectures": ["LlamaForCausalLM"]}))
    return path


def counts(model, task=None, **method):
    report = inspect_model(model, task=task, **method)
    return report.summary.trainable, report.summary.total, report


def test_llama_tree_linears_and_lora_counts(llama_dir):
    trainable, total, report = counts(str(llama_dir), method="lora", method_options={"r": 4})
    assert trainable == 4 * L * sum(i + o for i, o in LLAMA_LINEARS)
    assert total == LLAMA_BASE + trainable
    text = report.text()
    assert "layers.{0..1}: LlamaDecoderLayer ×2" in text
    assert text.split("linear modules")[0].count("q_proj") == 1  # the repeated block is shown once
    groups = {g.suffix: g for g in report.linears}
    assert [(groups[s].count, groups[s].shapes) for s in ("q_proj", "k_proj", "down_proj")] == \
        [(L, [(H, H)]), (L, [(H, KV)]), (L, [(FF, H)])]
    assert groups["lm_head"].head and not groups["q_proj"].head
    assert report.tree.parameters == LLAMA_BASE
    qv, _, _ = counts(str(llama_dir), method="lora", method_options={"r": 8, "target_modules": ["q_proj", "v_proj"]})
    assert qv == 8 * L * ((H + H) + (H + KV))


def test_qlora_counts_represented_weights_and_nf4_bytes(llama_dir):
    trainable, total, report = counts(str(llama_dir), method="qlora", method_options={"r": 4})
    assert (trainable, total) == (4 * L * sum(i + o for i, o in LLAMA_LINEARS), LLAMA_BASE + trainable)

    def nf4_bytes(n: int) -> int:  # packed codes, uint8 block scales, fp32 scales of scales, both code tables
        blocks = n // 64
        return n // 2 + blocks + 4 * math.ceil(blocks / 256) + 16 * 4 + 256 * 4

    bf16_rest = 2 * (V * H + L * 2 * H + H + V * H)
    assert report.weight_bytes == L * sum(nf4_bytes(i * o) for i, o in LLAMA_LINEARS) + bf16_rest
    # the same sum over a really quantized model: every parameter, and each NF4 layer's constants (on CPU the
    # layers share one code table object; on a GPU each holds its own copy, which is what is counted)
    real = quantize_model(make_llama(dtype=torch.bfloat16))
    actual = sum(p.numel() * p.element_size() for p in real.parameters())
    actual += sum(b.numel() * b.element_size() for m in real.modules() if type(m).__name__ == "NF4Linear"
                  for b in m.buffers(recurse=False))
    assert report.weight_bytes == actual
    assert {g.kind for g in report.linears if not g.head} == {"NF4Linear"}


def test_gpt2_tied_counts_and_bitfit():
    model = make_gpt2()
    trainable, total, report = counts(model.config, method="bitfit")
    assert trainable == L * (H + 3 * H + H + H + 4 * H + H) + H  # every bias: 2 norms + 4 Conv1D per block, ln_f
    assert total == GPT2_BASE + trainable
    assert total - trainable == sum(p.numel() for p in model.parameters())  # torch counts the tied weight once
    groups = {g.suffix: g for g in report.linears}
    assert groups["c_proj"].count == 2 * L and groups["c_proj"].shapes == [(H, H), (4 * H, H)]
    assert groups["c_attn"].kind == "Conv1D" and groups["c_attn"].shapes == [(H, 3 * H)]


def test_bert_classifier_houlsby_pfeiffer_prefix_and_full():
    bert = make_bert_classifier().config
    m = H // 16  # AdapterHub's reduction factor 16
    bottleneck = (H * m + m) + (m * H + H)
    trainable, total, _ = counts(bert, task="classification", method="houlsby")
    norms = (1 + 2 * L) * 2 * H  # embedding LayerNorm + 2 per block, weight and bias
    assert trainable == 2 * L * bottleneck + norms + (H * 3 + 3)  # + the trained classifier copy
    assert total == BERT_BASE + trainable
    full, full_total, _ = counts(bert, task="classification", method="full")
    assert full == full_total == BERT_BASE

    llama = make_llama().config
    pfeiffer, _, _ = counts(llama, method="pfeiffer")
    assert pfeiffer == L * bottleneck
    p, width = 5, 16
    prefix, _, _ = counts(llama, method="prefix", method_options={"prefix_length": p, "bottleneck": width})
    assert prefix == p * H + (H * width + width) + (width * L * 2 * KV + L * 2 * KV)


def test_cli_text_json_and_depth(llama_dir):
    result = runner.invoke(app, ["inspect", str(llama_dir), "--method", "lora", "--method.r", "4", "--depth", "1"])
    assert result.exit_code == 0, result.output
    assert "layers.{0..1}" not in result.output and "model: LlamaModel" in result.output
    assert f"trainable params: {4 * L * 928:,}" in result.output
    result = runner.invoke(app, ["inspect", str(llama_dir), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert "method" not in data and data["model_class"] == "LlamaForCausalLM"
    assert data["tree"]["parameters"] == LLAMA_BASE
    result = runner.invoke(app, ["inspect", str(llama_dir), "method.name=qlora", "--json"])
    assert json.loads(result.output)["method"]["name"] == "qlora"



def test_errors_name_the_problem(llama_dir, tmp_path):
    assert "did you mean 'lora'" in one_line_error(["inspect", str(llama_dir), "--method", "lroa"])
    assert "did you mean 'method.r'" in one_line_error(["inspect", str(llama_dir), "--method.rr", "4"])
    assert "'r'" in one_line_error(["inspect", str(llama_dir), "--method.r", "0"])
    assert "put MODEL first" in one_line_error(["inspect", "--method", "lora", str(llama_dir)])
    assert str(tmp_path / "missing") in one_line_error(["inspect", str(tmp_path / "missing")])
    assert "task 'seq2seq'" in one_line_error(["inspect", str(llama_dir), "--task", "seq2seq"])
    assert "target 'q_prj'" in one_line_error(["inspect", str(llama_dir), "--method.target_modules", "[q_prj]"])
