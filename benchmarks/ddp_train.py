"""QLoRA data parallelism: tokens/s on one GPU and on several, each started by ``accelerate launch``.

The training setup of ``train_step.py`` (1.1B Llama shape, NF4 + double quantization, LoRA r=16 on
all 7 linear kinds, batch 4 × 1024 per GPU, gradient checkpointing, fused AdamW), run by peftlab in
two ways: eagerly with the model in ``DistributedDataParallel`` (``accelerator.prepare``), and as a
CUDA-graphed step (``GraphedStep(all_reduce=True)``: the gradient average is part of the graph).
Each GPU trains on its own batches, so N GPUs process N × 4096 tokens a step; the speed-up is
tokens/s on N GPUs over tokens/s on one, both measured in this run.

    python benchmarks/ddp_train.py --gpus 2    # table + results/e2e-<gpu>.json, section "data_parallel"
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import (  # noqa: E402
    LLAMA_1B, device_name, device_tag, print_worker_result, spawn_worker, update_result, versions)
from benchmarks.train_step import LR, load_peftlab, training_batches  # noqa: E402

BATCH, SEQ, CHUNK = 4, 1024, 1024
TARGET_SPEEDUP = {2: 1.8}


class _LossOf(torch.nn.Module):
    """The LM loss as a module's forward, so DistributedDataParallel sees the whole step."""

    def __init__(self, model: torch.nn.Module, loss_of):
        super().__init__()
        self.model, self.loss_of = model, loss_of

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.loss_of(ids)


def run_worker(mode: str, folder: str, steps: int, warmup: int) -> dict | None:
    from accelerate import Accelerator

    from peftlab.train import GraphedStep

    accelerator = Accelerator()
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    graphed = mode == "graphed"
    model, loss_of = load_peftlab("qlora", folder, device, gc=True, chunk=CHUNK, graphed=graphed)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, fused=True, capturable=graphed)
    if graphed:
        step_fn = GraphedStep(optimizer, lambda b: loss_of(b["input_ids"]), all_reduce=world > 1)
        step = lambda ids: step_fn({"input_ids": ids})  # noqa: E731
    else:
        ddp = accelerator.prepare(_LossOf(model, loss_of))

        def step(ids):
            loss = ddp(ids)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss
    data = training_batches(LLAMA_1B["vocab_size"], BATCH, SEQ, steps * world)[rank::world]
    times = []
    for ids in data:
        ids = ids.to(device)
        torch.cuda.synchronize()
        start = time.perf_counter()
        step(ids)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times[warmup:])
    if rank != 0:
        return None
    return {"status": "ok", "gpus": world, "step_ms": 1e3 * step_s, "tokens_per_s": world * BATCH * SEQ / step_s,
            "step_ms_all": [1e3 * t for t in times], "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def launcher(gpus: int) -> list[str]:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--num_processes",
               str(gpus), "--mixed_precision", "no", "--dynamo_backend", "no"]
    return command + (["--multi_gpu"] if gpus > 1 else [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=2, help="GPUs of the multi-GPU runs")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--run-timeout", type=int, default=400)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = run_worker(**json.loads(args.worker))
        if result is not None:
            print_worker_result(result)
        return
    if torch.cuda.device_count() < args.gpus:
        sys.exit(f"--gpus {args.gpus}: this machine has {torch.cuda.device_count()} CUDA GPUs.")
    device = torch.device("cuda")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        saved = spawn_worker(str(ROOT / "benchmarks" / "train_step.py"), {"task": "save", "folder": folder,
                                                                           "tiny": False}, args.run_timeout)
        if saved["status"] != "ok":
            sys.exit(f"could not build the initial model: {saved}")
        for mode in ("ddp", "graphed"):
            for gpus in (1, args.gpus):
                spec = {"mode": mode, "folder": folder, "steps": args.steps, "warmup": args.warmup}
                row = {"mode": mode, "gpus": gpus, **spawn_worker(__file__, spec, args.run_timeout, launcher(gpus))}
                print(f"{mode} on {gpus} GPU(s): {row['status']} {row.get('error', '')}", flush=True)
                rows.append(row)
    speedups = {}
    print(f"\n{'mode':8} {'GPUs':>4} {'tokens/s':>9} {'step ms':>8} {'peak GiB':>9} {'speed-up':>9}")
    for row in rows:
        if row["status"] != "ok":
            continue
        one = next((r for r in rows if r["mode"] == row["mode"] and r["gpus"] == 1 and r["status"] == "ok"), None)
        if one is not None:
            row["speedup_vs_one_gpu"] = row["tokens_per_s"] / one["tokens_per_s"]
            if row["gpus"] > 1:
                speedups[f"{row['mode']}_{row['gpus']}_gpus"] = row["speedup_vs_one_gpu"]
        print(f"{row['mode']:8} {row['gpus']:>4} {row['tokens_per_s']:>9.0f} {row['step_ms']:>8.1f} "
              f"{row['peak_gib']:>9.2f} {row.get('speedup_vs_one_gpu', float('nan')):>8.2f}x")
    checks = {key: [value, value >= TARGET_SPEEDUP.get(args.gpus, 0.9 * args.gpus)] for key, value in speedups.items()}
    for key, (value, ok) in checks.items():
        print(f"target {key}: {value:.3f} {'PASS' if ok else 'FAIL'}")
    path = update_result(f"e2e-{device_tag(device)}", "data_parallel", {
        "benchmark": "QLoRA training tokens/s on 1 and N GPUs (accelerate launch): DDP eager and graphed all-reduce",
        "device": f"{args.gpus} x {device_name(device)}", "versions": versions("accelerate", "triton"),
        "model": LLAMA_1B, "batch_per_gpu": [BATCH, SEQ], "steps": args.steps, "warmup_steps": args.warmup,
        "statistic": "tokens/s from rank 0's median step time after warm-up, all ranks' tokens counted",
        "target_speedup": TARGET_SPEEDUP, "target_checks": checks, "runs": rows,
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
