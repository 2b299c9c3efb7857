"""Export: merged adapters as a plain transformers model folder, checked by reloading it without peftlab."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import bitsandbytes.functional as bnbf
import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    MistralConfig,
    MistralForCausalLM,
)
from typer.testing import CliRunner

import peftlab
from peftlab import BitFitConfig, HoulsbyConfig, LoraConfig, PrefixTuningConfig
from peftlab.cli import merge as _register_merge  # noqa: F401
from peftlab.cli.app import app
from peftlab.export import ExportError, export, generic_bnb_cpu_path
from peftlab.quant import quantize_model
from tests.conftest import bnb_dequantize, make_bert_classifier, make_gpt2, make_llama, one_line_error

FIXTURES = Path(__file__).parent / "fixtures"
REPO = Path(__file__).resolve().parents[1]
IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(7))
runner = CliRunner()


def randomize(wrapped: peftlab.PeftModel, seed: int = 0) -> peftlab.PeftModel:
    """Give every adapter parameter a non-trivial value, so merging changes the model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in wrapped.adapters.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * 0.05)
    return wrapped


def saved_pair(tmp_path: Path, base, config, name: str = "a") -> tuple[Path, Path, peftlab.PeftModel]:
    """Save ``base`` to a folder, wrap it with a randomized adapter saved to another: (base dir, adapter dir, model)."""
    base_dir, adapter_dir = tmp_path / f"{name}-base", tmp_path / f"{name}-adapter"
    base.save_pretrained(base_dir)
    wrapped = randomize(peftlab.wrap(base, config))
    wrapped.save(adapter_dir)
    return base_dir, adapter_dir, wrapped


@torch.no_grad()
def logits(model, ids=IDS) -> torch.Tensor:
    return model(input_ids=ids).logits.float()


def close(value: torch.Tensor, reference: torch.Tensor, rel: float) -> None:
    scale = reference.abs().max()
    assert (value - reference).abs().max() <= rel * scale, ((value - reference).abs().max() / scale).item()


def no_peftlab_hooks(model) -> bool:
    return not any("_peftlab_site" in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("factory, loader", [(make_llama, AutoModelForCausalLM), (make_gpt2, AutoModelForCausalLM),
                                             (make_bert_classifier, AutoModelForSequenceClassification)])
def test_lora_export_reloads_with_plain_transformers(tmp_path, factory, loader):
    base_dir, adapter_dir, wrapped = saved_pair(tmp_path, factory(), LoraConfig(r=4))
    expected = logits(wrapped)  # the unmerged adapter model (BERT: with its trained classifier copy)
    report = export(adapter_dir, tmp_path / "out", base=base_dir)
    reloaded = loader.from_pretrained(tmp_path / "out")
    assert no_peftlab_hooks(reloaded)
    close(logits(reloaded), expected, 1e-5)
    assert report.max_relative_error <= 1e-5 and report.dtype == "fp32"
    assert "config.json" in report.files and "model.safetensors" in report.files
    assert ("generation_config.json" in report.files) == (loader is AutoModelForCausalLM)


def test_export_loads_in_a_process_that_never_imports_peftlab(tmp_path):
    base_dir, adapter_dir, wrapped = saved_pair(tmp_path, make_llama(), LoraConfig(r=4))
    export(adapter_dir, tmp_path / "out", base=base_dir)
    save_file({"logits": logits(wrapped)}, tmp_path / "expected.safetensors")
    code = ("import sys, torch\nfrom safetensors.torch import load_file\n"
            "from transformers import AutoModelForCausalLM\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'out')!r})\n"
            f"ids = torch.tensor({IDS.tolist()})\n"
            "out = m(input_ids=ids).logits\n"
            f"ref = load_file({str(tmp_path / 'expected.safetensors')!r})['logits']\n"
            "assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()\n"
            "assert not [k for k in sys.modules if k.startswith('peftlab')]\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]


def test_bf16_export_is_bf16_and_within_its_rounding(tmp_path):
    base_dir, adapter_dir, wrapped = saved_pair(tmp_path, make_llama(), LoraConfig(r=4))
    expected = logits(wrapped)
    report = export(adapter_dir, tmp_path / "out", base=base_dir, dtype="bf16")
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert reloaded.dtype == torch.bfloat16
    close(logits(reloaded), expected, 3e-2)
    assert 0 < report.max_relative_error <= 3e-2


def test_peft_model_api_merges_a_copy_and_shards(tmp_path):
    wrapped = randomize(peftlab.wrap(make_gpt2(), LoraConfig(r=4)))
    before = logits(wrapped)
    report = export(wrapped, tmp_path / "out", max_shard_size="100KB")
    assert not any(a.merged for a in wrapped.adapters.values()) and logits(wrapped).equal(before)
    assert "model.safetensors.index.json" in report.files and len(report.files) > 4
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert reloaded.lm_head.weight.data_ptr() == reloaded.transformer.wte.weight.data_ptr()  # still tied
    close(logits(reloaded), before, 1e-5)


def test_bitfit_biases_created_on_llama_are_declared_in_the_config(tmp_path):
    for name, biases in (("all", "all"), ("query", ["query"])):
        base_dir, adapter_dir, wrapped = saved_pair(tmp_path, make_llama(), BitFitConfig(biases=biases,
                                                                                         add_missing=True), name)
        expected = logits(wrapped)
        report = export(adapter_dir, tmp_path / f"{name}-out", base=base_dir)
        config = json.loads((tmp_path / f"{name}-out" / "config.json").read_text())
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / f"{name}-out")
        close(logits(reloaded), expected, 1e-6)
        q = reloaded.model.layers[1].self_attn.q_proj
        offset = wrapped.adapters["default"].biases.offsets["model/layers/1/self_attn/q_proj"].delta
        assert q.bias is not None and q.bias.equal(offset)
        assert config["attention_bias"] is True
        if name == "all":
            assert config["mlp_bias"] is True and not report.zero_biases
        else:  # k/v/o had no bias trained: they load as zeros
            assert not config["mlp_bias"] and len(report.zero_biases) == 2 * 3
            assert not reloaded.model.layers[0].self_attn.k_proj.bias.any()


def test_qlora_adapter_merges_into_the_dequantized_nf4_base(tmp_path):
    base = make_llama()
    base.save_pretrained(tmp_path / "base")
    qlora = randomize(peftlab.wrap(quantize_model(base), LoraConfig(r=4)))
    expected = logits(qlora)  # what was trained: LoRA on the NF4 weights
    run = tmp_path / "run"
    qlora.save(run / "adapter")
    (run / "config.yaml").write_text(yaml.safe_dump({"model": str(tmp_path / "base"), "method": {"name": "qlora"}}))
    report = export(run / "adapter", tmp_path / "out", base=tmp_path / "base")  # auto: the run says qlora
    assert report.base_was_nf4 and report.quantize is None
    close(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "out")), expected, 1e-5)
    dense = export(run / "adapter", tmp_path / "dense", base=tmp_path / "base", base_quantize="none",
                   max_error=1.0)  # into the original weights: a different model
    assert not dense.base_was_nf4
    assert (logits(AutoModelForCausalLM.from_pretrained(tmp_path / "dense")) - expected).abs().max() > 1e-3


def test_nf4_export_loads_through_transformers_and_bitsandbytes(tmp_path):
    import bitsandbytes as bnb

    # rows of whole 64-blocks: bitsandbytes' CPU forward is only right for those on every host
    base_dir, adapter_dir, wrapped = saved_pair(tmp_path, make_llama(intermediate_size=128), LoraConfig(r=4))
    unmerged = logits(wrapped)
    merged = wrapped.merge_and_unload()
    report = export(adapter_dir, tmp_path / "out", base=base_dir, quantize="nf4")
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes" and qc["load_in_4bit"] and qc["bnb_4bit_quant_type"] == "nf4"
    assert qc["bnb_4bit_use_double_quant"] and qc["bnb_4bit_compute_dtype"] == "float32"
    assert qc["bnb_4bit_quant_storage"] == "uint8" and qc["llm_int8_skip_modules"] == ["lm_head"]
    # exact fp32 on every CPU: CPUs with AVX512-BF16 would take bitsandbytes' bf16 kernel (see the helper)
    reloaded = generic_bnb_cpu_path(AutoModelForCausalLM.from_pretrained(tmp_path / "out"))
    assert isinstance(reloaded.model.layers[0].mlp.down_proj, bnb.nn.Linear4bit)
    # independent reference: the dense merged weights quantized and dequantized by bitsandbytes itself
    with torch.no_grad():
        for module in merged.modules():
            if isinstance(module, torch.nn.Linear) and module is not merged.lm_head:
                packed, state = bnbf.quantize_4bit(module.weight, blocksize=64, quant_type="nf4",
                                                   compress_statistics=True)
                module.weight.copy_(bnb_dequantize(packed, state))
    close(logits(reloaded), logits(merged), 1e-5)
    # the report measures the re-quantization error against the unmerged model (large on a tiny random model)
    assert 0 < report.mean_relative_error <= report.max_relative_error
    assert not logits(reloaded).allclose(unmerged)


def test_the_check_keeps_bitsandbytes_on_its_generic_cpu_path(tmp_path):
    """The flag bitsandbytes reads before repacking for its AVX512-BF16 kernel is off on every 4-bit
    layer, so that the check runs (and measures) alike on every CPU."""
    base_dir, adapter_dir, _ = saved_pair(tmp_path, make_llama(), LoraConfig(r=4))
    export(adapter_dir, tmp_path / "out", base=base_dir, quantize="nf4")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    layers = [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    assert len(layers) == 14  # 7 projections in each of 2 layers; lm_head stays dense
    for module in layers:  # as on a CPU that has the instructions; only the flags are read, no forward
        module.support_avx512bf16_for_cpu = True
    generic_bnb_cpu_path(model)
    assert not any(module.support_avx512bf16_for_cpu for module in layers)


def test_resized_vocabularies_and_trained_embeddings_survive(tmp_path):
    base = make_llama()
    base.resize_token_embeddings(160)  # a base saved after adding tokens
    config = LoraConfig(r=4, modules_to_save=["lm_head", "embed_tokens"])
    base_dir, adapter_dir, wrapped = saved_pair(tmp_path, base, config, "resized")
    ids = torch.randint(0, 160, (2, 16), generator=torch.Generator().manual_seed(3))
    expected = logits(wrapped, ids)
    export(adapter_dir, tmp_path / "out", base=base_dir)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert reloaded.config.vocab_size == 160
    close(logits(reloaded, ids), expected, 1e-5)
    # an adapter trained after resizing, exported onto the original base folder: the base is resized to fit
    original = make_llama()
    original.save_pretrained(tmp_path / "original")
    export(adapter_dir, tmp_path / "onto-original", base=tmp_path / "original")
    close(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "onto-original"), ids), expected, 1e-5)


def test_merge_cli_writes_tokenizer_and_json_report(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(FIXTURES / "bpe_tokenizer")
    base = make_llama(vocab_size=len(tokenizer))
    base_dir, adapter_dir, _ = saved_pair(tmp_path, base, LoraConfig(r=4))
    tokenizer.save_pretrained(base_dir)
    result = runner.invoke(app, ["merge", str(adapter_dir), "--base", str(base_dir), "--out", str(tmp_path / "out"),
                                 "--probe", "hello world", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["probe_shape"][0] == 1 and report["max_relative_error"] <= 1e-5
    assert "tokenizer.json" in report["files"]
    assert AutoTokenizer.from_pretrained(tmp_path / "out")("hello world")["input_ids"] == \
        tokenizer("hello world")["input_ids"]



def test_errors_are_one_line_and_leave_nothing_behind(tmp_path):
    base_dir, adapter_dir, _ = saved_pair(tmp_path, make_llama(), LoraConfig(r=4))
    out = tmp_path / "out"
    args = ["merge", str(adapter_dir), "--base", str(base_dir), "--out", str(out)]
    for config, name in ((HoulsbyConfig(), "houlsby"), (PrefixTuningConfig(prefix_length=4, bottleneck=8), "prefix")):
        folder = tmp_path / name
        peftlab.wrap(make_llama(), config).save(folder)
        message = one_line_error(["merge", str(folder), "--base", str(base_dir), "--out", str(out)])
        assert str(folder) in message and "cannot be merged" in message and "unmerged" in message
    assert "name at least one adapter" in one_line_error(["merge", "--out", str(out)])
    assert "--out is required" in one_line_error(["merge", str(adapter_dir)])
    assert "does-not-exist" in one_line_error(["merge", str(tmp_path / "does-not-exist"), "--out", str(out)])
    assert "'fp8' is not one of" in one_line_error(args + ["--dtype", "fp8"])
    assert "quantize 'int8'" in one_line_error(args + ["--quantize", "int8"])
    assert "base_quantize 'nf8'" in one_line_error(args + ["--base-quantize", "nf8"])
    assert "cannot read a model config from" in one_line_error(args[:2] + ["--base", str(tmp_path / "nope"),
                                                                          "--out", str(out)])
    unnamed = tmp_path / "unnamed"
    saved = json.loads((adapter_dir / "adapter_config.json").read_text())
    unnamed.mkdir()
    (unnamed / "adapter_config.json").write_text(json.dumps({**saved, "base_model_name_or_path": None}))
    (unnamed / "adapter_model.safetensors").write_bytes((adapter_dir / "adapter_model.safetensors").read_bytes())
    assert "no base model" in one_line_error(["merge", str(unnamed), "--out", str(out)])
    (unnamed / "adapter_model.safetensors").write_bytes(b"\x00" * 16)
    assert "adapter_model.safetensors" in one_line_error(["merge", str(unnamed), "--base", str(base_dir), "--out",
                                                          str(out)])
    assert "more than the allowed" in one_line_error(args + ["--dtype", "bf16", "--max-error", "0"])
    assert not out.exists() and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]

    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert "--overwrite" in one_line_error(args)
    assert (out / "keep.txt").read_text() == "mine"
    assert runner.invoke(app, args + ["--overwrite"]).exit_code == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_biases_the_config_cannot_declare_are_refused(tmp_path):
    torch.manual_seed(0)
    mistral = MistralForCausalLM(MistralConfig(vocab_size=128, hidden_size=64, intermediate_size=96,
                                               num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
    base_dir, adapter_dir, _ = saved_pair(tmp_path, mistral, BitFitConfig(add_missing=True))
    with pytest.raises(ExportError, match=r"created the bias 'model\.layers\.0\.[a-z_.]+\.bias', which "
                                          "MistralForCausalLM's config cannot declare"):
        export(adapter_dir, tmp_path / "out", base=base_dir)
    assert not (tmp_path / "out").exists()


def test_modules_to_save_on_a_tied_weight_is_refused():
    """GPT-2's input embedding shares its weight with lm_head: a trained copy could not keep the tie."""
    import peftlab
    from peftlab.errors import TargetError
    from tests.conftest import make_gpt2

    model = make_gpt2()
    with pytest.raises(TargetError, match=r"'transformer.wte' shares its weight with 'lm_head.weight' \(tied"):
        peftlab.wrap(model, peftlab.LoraConfig(r=4, modules_to_save=["wte"]))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
