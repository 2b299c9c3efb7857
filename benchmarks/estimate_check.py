"""Check ``peftlab estimate`` against the peak GPU memory that training really takes.

The 1.1B Llama shape (hidden 2048, 22 layers, 32/4 heads, intermediate 5632, vocab 32000), random
init, batch 4 x 1024 random tokens, train() mode, non-reentrant gradient checkpointing, the model's
own loss (``labels=input_ids``), three training steps:

    LoRA    r=16, alpha=32 on all 7 linear kinds, bf16 base, fused AdamW on the adapters
    QLoRA   the same on a ``peftlab.quantize``d base (NF4 + double quantization, bf16 compute)
    LOMO    full finetuning of the bf16 weights with ``peftlab.optim.Lomo``

plus LoRA and QLoRA without checkpointing (extra rows: they test the per-block activation formula
at full size). Each run happens in its own subprocess, so each peak (``torch.cuda.max_memory_allocated``
after the model is built, weights included) is clean. The estimate for the same setup comes from
``peftlab.estimate.estimate_memory``; the check passes when every required run is within ±15%.

    python benchmarks/estimate_check.py          # GPU: table + benchmarks/results/estimate-<gpu>.json
    python benchmarks/estimate_check.py --tiny   # CPU: tiny Llama, estimates only (no measurement)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import (  # noqa: E402
    LLAMA_1B, LLAMA_TINY, build_bf16_llama, device_name, device_tag, print_worker_result, spawn_worker, versions,
    write_result)

LORA = {"r": 16, "alpha": 32}
TOLERANCE = 0.15
STEPS = 3  # AdamW creates its states in step 1; steps 2-3 show the steady-state peak

# (name, method, method options, gradient checkpointing, chunked loss, required for the check)
RUNS = [
    ("LoRA", "lora", LORA, True, True, True),
    ("QLoRA", "qlora", LORA, True, True, True),
    ("LOMO", "lomo", {}, True, True, True),
    ("LoRA, model loss", "lora", LORA, True, False, True),
    ("QLoRA, model loss", "qlora", LORA, True, False, True),
    ("LOMO, model loss", "lomo", {}, True, False, True),
    ("LoRA, no checkpointing", "lora", LORA, False, True, False),
    ("QLoRA, no checkpointing", "qlora", LORA, False, True, False),
]


# ---------------------------------------------------------------------- one run (in a subprocess)
def make_step(method: str, options: dict, model):
    """``(model to call, step(loss))`` for a method, set up as ``peftlab finetune`` does."""
    import peftlab

    if method == "lomo":
        from peftlab.optim import Lomo

        model.requires_grad_(True)
        optimizer = Lomo(model, lr=1e-3)
        return model, optimizer.backward
    if method == "qlora":
        peftlab.quantize(model, compute_dtype=torch.bfloat16)
    wrapped = peftlab.wrap(model, peftlab.LoraConfig(**options))
    optimizer = torch.optim.AdamW(wrapped.trainable_parameters(), lr=1e-4, fused=True)

    def step(loss):
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return wrapped, step


def measure(method: str, options: dict, checkpointing: bool, chunked: bool, batch: int, seq: int) -> dict:
    """Peak memory of ``STEPS`` training steps on the GPU, with the loss ``peftlab finetune`` uses
    (chunked: ``causal_lm_loss`` in ``slice_tokens`` slices) or transformers' own."""
    from peftlab.train.loss import causal_lm_loss, slice_tokens

    device = torch.device("cuda")
    model = build_bf16_llama(LLAMA_1B, device, checkpointing)
    model, step = make_step(method, options, model)
    model.train()
    gen = torch.Generator(device="cpu").manual_seed(1)
    data = [torch.randint(0, LLAMA_1B["vocab_size"], (batch, seq), generator=gen).to(device) for _ in range(STEPS)]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    chunk = slice_tokens(LLAMA_1B["vocab_size"])
    for ids in data:
        step(causal_lm_loss(model, ids, chunk_size=chunk) if chunked
             else model(input_ids=ids, labels=ids, use_cache=False).loss)
    torch.cuda.synchronize()
    return {"status": "ok", "measured_bytes": torch.cuda.max_memory_allocated(),
            "reserved_bytes": torch.cuda.max_memory_reserved(), "seconds": time.perf_counter() - start}


# ---------------------------------------------------------------------- the driver
def estimate(config: dict, method: str, options: dict, checkpointing: bool, chunked: bool, batch: int, seq: int,
             cuda: bool):
    from transformers import LlamaConfig

    from peftlab.estimate import estimate_memory

    return estimate_memory(LlamaConfig(**config, architectures=["LlamaForCausalLM"]), method=method,
                           method_options=options, batch_size=batch, seq_len=seq,
                           gradient_checkpointing=checkpointing, precision="bf16", chunked_loss=chunked, cuda=cuda)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny Llama on CPU, estimates only")
    parser.add_argument("--run-timeout", type=int, default=300, help="seconds per measured run")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        print_worker_result(measure(**spec))
        return

    on_gpu = torch.cuda.is_available() and not args.tiny
    config = LLAMA_TINY if args.tiny else LLAMA_1B
    batch, seq = (2, 32) if args.tiny else (4, 1024)
    rows = []
    for name, method, options, checkpointing, chunked, required in RUNS:
        est = estimate(config, method, options, checkpointing, chunked, batch, seq, cuda=on_gpu)
        row = {"run": name, "method": method, "method_options": options, "gradient_checkpointing": checkpointing,
               "chunked_loss": chunked, "required": required, "estimate_bytes": est.peak_bytes, "estimate_gib": est.peak_gib,
               "estimate_phase": est.peak_phase, "estimate_parts": est.parts, "estimate_phases": est.phases}
        if on_gpu:
            spec = {"method": method, "options": options, "checkpointing": checkpointing, "chunked": chunked,
                    "batch": batch, "seq": seq}
            result = spawn_worker(__file__, spec, args.run_timeout)
            row.update(result)
            if result["status"] == "ok":
                row["measured_gib"] = result["measured_bytes"] / 2**30
                row["ratio"] = est.peak_bytes / result["measured_bytes"]
                row["within_tolerance"] = abs(row["ratio"] - 1) <= TOLERANCE
        else:
            row["status"] = "estimate only (no CUDA)" if not args.tiny else "estimate only (--tiny)"
        rows.append(row)
        print_row(row)

    checked = [r for r in rows if r["required"] and "ratio" in r]
    passed = bool(checked) and len(checked) == sum(r["required"] for r in rows) and all(
        r["within_tolerance"] for r in checked)
    device = torch.device("cuda" if on_gpu else "cpu")
    data = {"benchmark": "peftlab estimate vs measured peak memory (torch.cuda.max_memory_allocated)",
            "device": device_name(device), "versions": versions("bitsandbytes"), "model": config,
            "batch": [batch, seq], "steps": STEPS, "tolerance": TOLERANCE,
            "setup": "random init, bf16 weights, train() mode, labels=input_ids; loss: peftlab's chunked "
                     "causal_lm_loss (peftlab finetune's default) or transformers' own ('model loss'); LoRA/QLoRA: "
                     "fused AdamW on the adapters; LOMO: peftlab.optim.Lomo on every weight",
            "required_runs_within_tolerance": passed if on_gpu else None, "runs": rows}
    tag = "cpu-tiny" if args.tiny else device_tag(device)
    path = write_result(f"estimate-{tag}", data)
    verdict = ("all required runs within ±15%" if passed else "NOT all required runs within ±15%") if on_gpu \
        else "no measurement on this machine"
    print(f"\n{verdict}; wrote {path}")


def print_row(row: dict) -> None:
    unit, scale = ("GiB", 2**30) if row["estimate_bytes"] >= 2**30 else ("MiB", 2**20)
    measured = f"{row['measured_bytes'] / scale:8.3f}" if "measured_bytes" in row else "     n/a"
    ratio = f"{row['ratio']:.3f}" if "ratio" in row else row["status"]
    print(f"{row['run']:<24} estimate {row['estimate_bytes'] / scale:8.3f} {unit} (at {row['estimate_phase']:<8}) "
          f" measured {measured} {unit}  estimate/measured {ratio}", flush=True)


if __name__ == "__main__":
    main()
