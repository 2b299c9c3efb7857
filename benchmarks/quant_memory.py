"""Parameter memory of a ~1.1B Llama in bf16, NF4 and NF4 + double quantization.

The model is built on the meta device (no memory), its linear layers are swapped for NF4Linear
shells, and memory is computed from shapes. The per-layer formulas are then checked against the
bytes of real NF4Linear layers quantized from one decoder layer's weights.

    python benchmarks/quant_memory.py        # prints a table, writes results/quant_memory-cpu.json
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import versions, write_result  # noqa: E402
from peftlab.quant.linear4bit import NF4Linear  # noqa: E402
from peftlab.quant.loading import select_targets  # noqa: E402

LLAMA_1B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                num_attention_heads=32, num_key_value_heads=4, tie_word_embeddings=False)
BLOCKSIZE = 64
NESTED = 256
GIB = 2**30


def nf4_bytes(numel: int, double_quant: bool, blocksize: int = BLOCKSIZE) -> dict[str, int]:
    """Bytes of one NF4 weight of ``numel`` values, by part (the format's arithmetic)."""
    blocks = math.ceil(numel / blocksize)
    parts = {"packed": numel // 2, "quant_map": 16 * 4}
    if double_quant:
        # uint8 scale codes, one fp32 scale per 256 of them, the fp32 offset, the 256-entry code
        parts |= {"absmax": blocks, "nested_absmax": 4 * math.ceil(blocks / NESTED), "offset": 4,
                  "nested_quant_map": 256 * 4}
    else:
        parts["absmax"] = 4 * blocks
    return parts


def payload_bits(numel: int, double_quant: bool) -> float:
    """Bits per weight of the per-block data (packed codes and scales; code tables excluded)."""
    parts = nf4_bytes(numel, double_quant)
    return 8 * sum(v for k, v in parts.items() if not k.endswith("quant_map")) / numel


def build_meta_model():
    from accelerate import init_empty_weights
    from transformers import LlamaConfig, LlamaForCausalLM

    with init_empty_weights():
        return LlamaForCausalLM(LlamaConfig(**LLAMA_1B))


def memory_from_shapes(double_quant: bool | None) -> dict:
    """Parameter bytes of the 1.1B model; ``None`` means plain bf16."""
    model = build_meta_model()
    targets, kept = select_targets(model)
    shapes = {name: tuple(model.get_submodule(name).weight.shape) for name in targets}
    quantized_numel = sum(math.prod(s) for s in shapes.values())
    other_numel = sum(p.numel() for p in model.parameters()) - quantized_numel
    if double_quant is None:
        quantized_bytes = payload = 2 * quantized_numel
    else:
        payload = sum(payload_bits(math.prod(s), double_quant) * math.prod(s) / 8 for s in shapes.values())
        formula = sum(sum(nf4_bytes(math.prod(s), double_quant).values()) for s in shapes.values())
        # the same total from NF4Linear shells of the real shapes, built on the meta device
        shells = 0
        for name, (out_f, in_f) in shapes.items():
            layer = NF4Linear(in_f, out_f, bias=False, blocksize=BLOCKSIZE, double_quant=double_quant, device="meta")
            shells += sum(t.numel() * t.element_size() for t in (layer.weight, *layer.buffers()))
            shells += 4 if double_quant else 0  # the offset is a float in the layer, 4 bytes on disk
        assert shells == formula, (shells, formula)
        quantized_bytes = formula
    return {"quantized_layers": len(targets), "kept_in_bf16": kept, "quantized_params": quantized_numel,
            "other_params": other_numel, "quantized_bytes": quantized_bytes, "other_bytes_bf16": 2 * other_numel,
            "total_bytes": quantized_bytes + 2 * other_numel,
            "bits_per_quantized_param": 8 * quantized_bytes / quantized_numel,
            "payload_bits_per_quantized_param": 8 * payload / quantized_numel}


def check_against_real_layer() -> list[dict]:
    """Quantize decoder layer 0's seven weights for real and compare their bytes to the formulas."""
    g = torch.Generator().manual_seed(0)
    hidden, inter = LLAMA_1B["hidden_size"], LLAMA_1B["intermediate_size"]
    kv = hidden // LLAMA_1B["num_attention_heads"] * LLAMA_1B["num_key_value_heads"]
    shapes = {"q_proj": (hidden, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden), "o_proj": (hidden, hidden),
              "gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
    rows = []
    for name, (out_f, in_f) in shapes.items():
        linear = torch.nn.Linear(in_f, out_f, bias=False, dtype=torch.bfloat16)
        with torch.no_grad():
            linear.weight.copy_(torch.randn(out_f, in_f, generator=g) * 0.02)
        for double_quant in (False, True):
            layer = NF4Linear.from_linear(linear, blocksize=BLOCKSIZE, double_quant=double_quant)
            measured = {"packed": layer.weight.numel() * layer.weight.element_size()}
            measured |= {k: b.numel() * b.element_size() for k, b in layer.named_buffers()}
            expected = nf4_bytes(out_f * in_f, double_quant)
            tensors_expected = {k: v for k, v in expected.items() if k != "offset"}
            assert measured == tensors_expected, (name, double_quant, measured, tensors_expected)
            assert (layer.offset is not None) == double_quant
            rows.append({"layer": name, "shape": [out_f, in_f], "double_quant": double_quant,
                         "bytes": sum(expected.values()), "payload_bits": payload_bits(out_f * in_f, double_quant)})
    return rows


def main() -> None:
    results = {name: memory_from_shapes(dq) for name, dq in (("bf16", None), ("nf4", False), ("nf4_dq", True))}
    checked = check_against_real_layer()
    n = results["bf16"]["quantized_params"] + results["bf16"]["other_params"]
    print(f"Llama ~1.1B ({n / 1e9:.3f}B parameters; {results['nf4']['quantized_layers']} linear layers quantized, "
          f"embeddings and lm_head in bf16), blocksize {BLOCKSIZE}")
    print(f"{'format':<10}{'linear GiB':>12}{'other GiB':>11}{'total GiB':>11}{'bits/param':>12}{'payload bits':>14}")
    for name, r in results.items():
        print(f"{name:<10}{r['quantized_bytes'] / GIB:>12.4f}{r['other_bytes_bf16'] / GIB:>11.4f}"
              f"{r['total_bytes'] / GIB:>11.4f}{r['bits_per_quantized_param']:>12.4f}"
              f"{r['payload_bits_per_quantized_param']:>14.4f}")
    print("bits/param counts everything stored per layer; payload bits leave out the code tables "
          "(16 + 256 fp32 values per layer, shared in principle)")
    print(f"formulas match the bytes of {len(checked)} quantized layers (layer 0, with and without double quant)")
    path = write_result("quant_memory-cpu", {
        "benchmark": "parameter memory, Llama ~1.1B, bf16 vs NF4 vs NF4 + double quant",
        "device": "cpu",
        "versions": versions("bitsandbytes"),
        "model": LLAMA_1B,
        "blocksize": BLOCKSIZE,
        "notes": "bits_per_quantized_param includes the per-layer code tables (quant_map, nested_quant_map) "
                 "and offset; payload_bits_per_quantized_param counts packed codes and block scales only",
        "results": results,
        "layer0_checked": checked,
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
