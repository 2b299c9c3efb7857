"""Forward latency: base model vs LoRA unmerged vs merged (peftlab and HF PEFT, same run).

The 1.1B Llama shape (random init, bf16 on a GPU; the tiny Llama in fp32 with ``--tiny``), eval
mode, LoRA r=16 alpha=32 on all 7 linear kinds with non-zero B (a trained adapter), batches of
1 × 128 and 8 × 512 tokens. Rounds alternate between the variants so that machine noise hits each
of them alike; we report the median per variant and its ratio to the base model. On a GPU each
variant is timed twice: eagerly (Python issues every kernel; host-bound at these sizes) and as a
replayed CUDA graph of the same forward (GPU time alone, as a server that captures its forward sees).

    python benchmarks/latency.py            # GPU: table + results/e2e-<gpu>.json, section "inference"
    python benchmarks/latency.py --tiny     # CPU smoke run (eager only)
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import peftlab  # noqa: E402
from benchmarks.common import (  # noqa: E402
    LLAMA_1B, LLAMA_TINY, device_name, device_tag, median_ms, update_result, versions)

TARGETS = {"merged_max": 1.02, "unmerged_max": {"1x128": 1.25, "8x512": 1.1}}


def build_variants(config: dict, device: torch.device, dtype: torch.dtype) -> dict[str, torch.nn.Module]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**config)).to(device, dtype).eval()
    lora = peftlab.LoraConfig(r=16, alpha=32, target_modules="all-linear", init="random")
    unmerged = peftlab.wrap(copy.deepcopy(base), lora).eval()
    merged = copy.deepcopy(unmerged)
    merged.merge()
    variants = {"base": base, "peftlab merged": merged, "peftlab unmerged": unmerged}
    try:
        import peft
    except ImportError:
        return variants
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
            r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False))
    variants["HF PEFT unmerged"] = theirs.eval()
    return variants


def graphed_forward(model: torch.nn.Module, ids: torch.Tensor):
    """``model(input_ids=ids)`` captured as a CUDA graph; returns its replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(side):
        for _ in range(2):
            model(input_ids=ids, use_cache=False)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        model(input_ids=ids, use_cache=False)
    return graph.replay


def time_variants(variants: dict, ids: torch.Tensor, rounds: int, repeats: int, graphs: bool) -> dict[str, float]:
    """Median forward time (ms) per variant, the variants taking turns."""
    if graphs:
        calls = {name: graphed_forward(model, ids) for name, model in variants.items()}
    else:
        calls = {name: (lambda m=model: m(input_ids=ids, use_cache=False)) for name, model in variants.items()}
    times: dict[str, list[float]] = {name: [] for name in variants}
    with torch.no_grad():
        for _ in range(rounds):
            for name, call in calls.items():
                times[name].append(median_ms(call, ids.device, repeats, warmup=1))
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny Llama on CPU")
    parser.add_argument("--shapes", default="1x128,8x512", help="comma-separated BATCHxSEQ")
    parser.add_argument("--rounds", type=int, default=15, help="alternating rounds per variant")
    parser.add_argument("--repeats", type=int, default=5, help="timed forwards per round")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = LLAMA_TINY if args.tiny else LLAMA_1B
    variants = build_variants(config, device, dtype)

    shapes, checks = {}, {}
    modes = ["eager", "cuda graph"] if device.type == "cuda" else ["eager"]
    for shape in args.shapes.split(","):
        batch, seq = map(int, shape.split("x"))
        ids = torch.randint(0, config["vocab_size"], (batch, seq), device=device)
        for mode in modes:
            ms = time_variants(variants, ids, args.rounds, args.repeats, graphs=mode != "eager")
            ratios = {name: value / ms["base"] for name, value in ms.items()}
            shapes[f"{shape} {mode}"] = {"median_ms": ms, "ratio_to_base": ratios}
            print(f"batch {batch} x {seq} tokens, {mode}")
            print(f"  {'variant':<20} {'median ms':>10} {'vs base':>8}")
            for name, value in ms.items():
                print(f"  {name:<20} {value:>10.2f} {ratios[name]:>7.3f}x")
            tag = f"{shape}_{mode.replace(' ', '_')}"
            checks[f"merged_{tag}"] = [ratios["peftlab merged"], ratios["peftlab merged"] <= TARGETS["merged_max"]]
            limit = TARGETS["unmerged_max"].get(shape)
            if limit is not None:
                checks[f"unmerged_{tag}"] = [ratios["peftlab unmerged"], ratios["peftlab unmerged"] <= limit]
    for key, (value, ok) in checks.items():
        print(f"target {key}: {value:.3f} {'PASS' if ok else 'FAIL'}")
    name = f"e2e-{device_tag(device)}" + ("-tiny" if args.tiny else "")
    path = update_result(name, "inference", {
        "benchmark": "forward latency, LoRA r=16 alpha=32 on all linear layers, eval mode",
        "device": device_name(device), "dtype": str(dtype), "versions": versions("peft"), "model": config,
        "rounds": args.rounds, "repeats": args.repeats, "statistic": "median over rounds of per-round medians",
        "shapes": shapes, "targets": TARGETS, "target_checks": checks,
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
