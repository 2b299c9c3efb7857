"""Forward latency: base model vs LoRA unmerged vs merged (peftlab and HF PEFT, same run).

A small Llama config, batch 1 x 128 tokens, eval mode, LoRA r=16 alpha=32 on all linear layers.
Rounds alternate between the variants so that machine noise hits each of them alike; we report
the median per variant and its ratio to the base model.

    python benchmarks/latency.py [--device cuda] [--rounds 15]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import warnings

import torch
from common import device_name, device_tag, median_ms, versions, write_result
from transformers import LlamaConfig, LlamaForCausalLM

import peftlab

SMALL_LLAMA = dict(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                   num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512)


def build_variants(device: torch.device, dtype: torch.dtype) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**SMALL_LLAMA)).to(device, dtype).eval()
    lora = peftlab.LoraConfig(r=16, alpha=32, target_modules="all-linear", init="random")
    unmerged = peftlab.wrap(copy.deepcopy(base), lora).eval()
    merged = copy.deepcopy(unmerged)
    merged.merge()
    variants = {"base": base, "peftlab unmerged": unmerged, "peftlab merged": merged}
    try:
        import peft

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
                r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False))
        variants["HF PEFT unmerged"] = theirs.eval()
    except ImportError:
        pass
    return variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=15, help="alternating rounds per variant")
    parser.add_argument("--repeats", type=int, default=5, help="timed forwards per round")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    variants = build_variants(device, dtype)
    ids = torch.randint(0, SMALL_LLAMA["vocab_size"], (args.batch, args.seq), device=device)

    rounds: dict[str, list[float]] = {name: [] for name in variants}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for name, model in variants.items():
                rounds[name].append(median_ms(lambda: model(input_ids=ids), device, args.repeats, warmup=1))
    ms = {name: statistics.median(values) for name, values in rounds.items()}

    print(f"{'variant':<20} {'median ms':>10} {'vs base':>8}")
    for name, value in ms.items():
        print(f"{name:<20} {value:>10.2f} {value / ms['base']:>7.3f}x")
    path = write_result(f"latency-{device_tag(device)}", {
        "benchmark": "forward latency, LoRA r=16 on all linear layers",
        "device": device_name(device), "dtype": str(dtype), "versions": versions("peft"),
        "model": SMALL_LLAMA, "batch": args.batch, "seq": args.seq, "rounds": args.rounds, "repeats": args.repeats,
        "median_ms": ms, "ratio_to_base": {name: value / ms["base"] for name, value in ms.items()},
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
