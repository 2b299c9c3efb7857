"""LoRA and QLoRA training speed, peak memory and loss: peftlab against HF PEFT, in one run.

The 1.1B Llama shape (hidden 2048, 22 layers, GQA 32/4, intermediate 5632, vocab 32000), random
init saved once as a safetensors folder that every run loads, batch 4 × 1024, every model in
train() mode, non-reentrant gradient checkpointing on (and, in a second set of runs, off). LoRA
r=16, alpha=32, no dropout on all 7 linear kinds, with the same initial A (seeded by module name)
and B = 0 in both libraries; fused AdamW (lr 1e-3) on the adapters. peftlab runs twice: an eager
step, and the same step replayed as a CUDA graph (``peftlab.train.GraphedStep``). QLoRA: NF4 with double
quantization, blocksize 64, bf16 compute; HF PEFT's base is quantized by transformers +
bitsandbytes from the same folder (PEFT's fastest setup, without ``prepare_model_for_kbit_training``).

Each run is a fresh process (clean peak memory, ``torch.cuda.max_memory_allocated`` after loading,
weights included) on the same data: sequences counting in a random stride from a random start,
which the model learns, so the 50-step loss trajectories can be compared step by step.
Tokens/s come from the median step time after the warm-up steps.

    python benchmarks/train_step.py               # GPU: table + results/e2e-<gpu>.json, section "training"
    python benchmarks/train_step.py --tiny        # CPU smoke run on a tiny Llama
    python benchmarks/train_step.py --only peftlab_qlora --gc on --profile
                                                  # one run, with a profiler summary of 3 steps
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import (  # noqa: E402
    LLAMA_1B, LLAMA_TINY, build_bf16_llama, device_name, device_tag, print_worker_result, spawn_worker,
    update_result, versions)

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
R, ALPHA, LR = 16, 32, 1e-3
# run -> (library, method, CUDA-graphed step); HF PEFT first: it is the reference
RUNS = {
    "hf_peft_lora": ("hf_peft", "lora", False),
    "peftlab_lora": ("peftlab", "lora", False),
    "peftlab_lora_graphed": ("peftlab", "lora", True),
    "hf_peft_qlora": ("hf_peft", "qlora", False),
    "peftlab_qlora": ("peftlab", "qlora", False),
    "peftlab_qlora_graphed": ("peftlab", "qlora", True),
}
NAMES = {"hf_peft_lora": "HF PEFT LoRA", "peftlab_lora": "peftlab LoRA", "peftlab_lora_graphed": "peftlab LoRA, graphed",
         "hf_peft_qlora": "HF PEFT QLoRA", "peftlab_qlora": "peftlab QLoRA",
         "peftlab_qlora_graphed": "peftlab QLoRA, graphed"}
TARGETS = {"qlora_speed": 2.0, "qlora_memory": 0.7, "lora_speed": 1.8, "lora_memory": 0.8, "loss_rel_diff": 0.02}


# ---------------------------------------------------------------------- one run (in a subprocess)
def initial_lora_a(path: str, rank: int, in_features: int) -> torch.Tensor:
    """The same kaiming-uniform-like A for module ``path`` in both libraries (seeded by its name)."""
    gen = torch.Generator().manual_seed(zlib.crc32(path.encode()))
    bound = 1 / in_features ** 0.5
    return (torch.rand(rank, in_features, generator=gen) * 2 - 1) * bound


def training_batches(vocab: int, batch: int, seq: int, steps: int) -> list[torch.Tensor]:
    """Sequences ``start + stride * i (mod vocab)``: random starts and strides 1-8, learnable from context."""
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps):
        start = torch.randint(0, vocab, (batch, 1), generator=gen)
        stride = torch.randint(1, 9, (batch, 1), generator=gen)
        out.append((start + stride * torch.arange(seq)) % vocab)
    return out


def load_hf_peft(method: str, folder: str, device: torch.device, gc: bool):
    import peft
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from peftlab.model import enable_gradient_checkpointing

    kwargs = {}
    if method == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map={"": device}, **kwargs)
    if gc:
        enable_gradient_checkpointing(model)
    model = peft.get_peft_model(model, peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0,
                                                       target_modules=TARGET_MODULES, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, module in model.named_modules():
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                path = name.removeprefix("base_model.model.")
                weight = module.lora_A["default"].weight
                weight.copy_(initial_lora_a(path, *weight.shape))
    return model, (lambda ids: model(input_ids=ids, labels=ids).loss)


def load_peftlab(method: str, folder: str, device: torch.device, gc: bool, chunk: int, graphed: bool):
    import peftlab
    from peftlab.adapters.base import module_path
    from peftlab.model import enable_gradient_checkpointing
    from peftlab.train.loss import causal_lm_loss

    model = peftlab.from_pretrained(folder, quantize="nf4" if method == "qlora" else None, dtype=torch.bfloat16,
                                    compute_dtype=torch.bfloat16, device=device)
    if gc:  # no dropout here, so skipping the RNG bookkeeping changes nothing
        enable_gradient_checkpointing(model, preserve_rng_state=not graphed)
    wrapped = peftlab.wrap(model, peftlab.LoraConfig(r=R, alpha=ALPHA, target_modules=TARGET_MODULES))
    with torch.no_grad():
        for key, weights in wrapped.adapters["default"].layers.items():
            weights.lora_A.copy_(initial_lora_a(module_path(key), *weights.lora_A.shape))
    return wrapped, (lambda ids: causal_lm_loss(model, ids, chunk_size=chunk))


def run_one(run: str, folder: str, tiny: bool, gc: bool, steps: int, warmup: int, chunk: int,
            profile: bool) -> dict:
    """Train ``steps`` steps; return the losses, median step time and peak memory."""
    from peftlab.train import GraphedStep

    device = torch.device("cuda" if torch.cuda.is_available() and not tiny else "cpu")
    library, method, graphed = RUNS[run]
    if library == "hf_peft":
        model, loss_of = load_hf_peft(method, folder, device, gc)
    else:
        model, loss_of = load_peftlab(method, folder, device, gc, chunk, graphed)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    cuda = device.type == "cuda"
    optimizer = torch.optim.AdamW(params, lr=LR, fused=cuda, capturable=cuda and graphed)
    config = LLAMA_TINY if tiny else LLAMA_1B
    batch, seq = (2, 32) if tiny else (4, 1024)
    data = [ids.to(device) for ids in training_batches(config["vocab_size"], batch, seq, steps)]
    graphed_step = GraphedStep(optimizer, lambda b: loss_of(b["input_ids"]), enabled=graphed)

    def step(ids: torch.Tensor) -> torch.Tensor:
        return graphed_step({"input_ids": ids}).clone()

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    losses, times = [], []
    for ids in data:
        sync()
        start = time.perf_counter()
        losses.append(step(ids))
        sync()
        times.append(time.perf_counter() - start)
    result = {"status": "ok", "losses": [loss.item() for loss in losses], "step_ms_all": [1e3 * t for t in times],
              "trainable_params": sum(p.numel() for p in params)}
    step_s = statistics.median(times[warmup:])
    result.update(step_ms=1e3 * step_s, tokens_per_s=batch * seq / step_s)
    if device.type == "cuda":
        result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if profile:
        result["profile"] = profile_steps(step, data[:3], device)
    return result


def profile_steps(step, batches: list[torch.Tensor], device: torch.device) -> str:
    """A profiler table (top operators by device time) of a few more steps, for finding where time goes."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for ids in batches:
            step(ids)
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=60)


def save_initial_model(folder: str, tiny: bool) -> dict:
    """Build the random-init bf16 Llama once and save it, so every run starts from the same weights."""
    device = torch.device("cuda" if torch.cuda.is_available() and not tiny else "cpu")
    model = build_bf16_llama(LLAMA_TINY if tiny else LLAMA_1B, device, checkpointing=False)
    model.save_pretrained(folder)
    return {"status": "ok"}


# ---------------------------------------------------------------------- the driver
def skip_reason(run: str, on_cuda: bool) -> str | None:
    needs = ["peft"] if run.startswith("hf_peft") else []
    if run == "hf_peft_qlora":
        needs.append("bitsandbytes")
    for module in needs:
        try:
            __import__(module)
        except ImportError:
            return f"{module} not installed"
    if run == "hf_peft_qlora" and not on_cuda:
        return "needs CUDA (bitsandbytes)"
    return None


def compare(results: list[dict]) -> dict:
    """Speed and memory ratios of peftlab to HF PEFT, and the largest relative loss difference."""
    by = {(r["run"], r["gc"]): r for r in results if r["status"] == "ok"}
    out = {}
    for method in ("lora", "qlora"):
        for gc in (True, False):
            theirs = by.get((f"hf_peft_{method}", gc))
            for suffix, variant in (("", "_graphed"), ("_eager", "")):
                ours = by.get((f"peftlab_{method}{variant}", gc))
                if not (ours and theirs):
                    continue
                tag = f"{method}_gc_{'on' if gc else 'off'}{suffix}"
                out[f"{tag}_speed"] = ours["tokens_per_s"] / theirs["tokens_per_s"]
                if "peak_gib" in ours:
                    out[f"{tag}_memory"] = ours["peak_gib"] / theirs["peak_gib"]
                out[f"{tag}_loss_rel_diff"] = max(abs(a - b) / abs(b) for a, b in zip(ours["losses"], theirs["losses"]))
    return out


def check_targets(ratios: dict) -> dict:
    checks = {}
    for method in ("lora", "qlora"):
        tag = f"{method}_gc_on"
        if f"{tag}_speed" in ratios:
            checks[f"{method}_speed"] = [ratios[f"{tag}_speed"], ratios[f"{tag}_speed"] >= TARGETS[f"{method}_speed"]]
        if f"{tag}_memory" in ratios:
            checks[f"{method}_memory"] = [ratios[f"{tag}_memory"], ratios[f"{tag}_memory"] <= TARGETS[f"{method}_memory"]]
        for gc in ("on", "off"):
            key = f"{method}_gc_{gc}_loss_rel_diff"
            if key in ratios:
                checks[key] = [ratios[key], ratios[key] <= TARGETS["loss_rel_diff"]]
    return checks


def print_table(results: list[dict]) -> None:
    header = f"{'run':24} {'GC':>3} {'tokens/s':>9} {'step ms':>8} {'peak GiB':>9} {'loss 1 -> last':>16}  status"
    print(header)
    print("-" * len(header))
    for r in results:
        gc = "on" if r["gc"] else "off"
        if r["status"] != "ok":
            print(f"{NAMES[r['run']]:24} {gc:>3} {'':>9} {'':>8} {'':>9} {'':>16}  {r['status']} {r.get('error', '')}")
            continue
        peak = f"{r['peak_gib']:.2f}" if "peak_gib" in r else "-"
        print(f"{NAMES[r['run']]:24} {gc:>3} {r['tokens_per_s']:>9.0f} {r['step_ms']:>8.1f} {peak:>9} "
              f"{r['losses'][0]:>7.3f}->{r['losses'][-1]:<7.3f}  ok")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny Llama on CPU (seconds)")
    parser.add_argument("--only", default="", help=f"comma-separated runs out of {','.join(RUNS)}")
    parser.add_argument("--gc", choices=["on", "off", "both"], default="both", help="gradient checkpointing")
    parser.add_argument("--steps", type=int, default=50, help="steps per run (all in the loss trajectory)")
    parser.add_argument("--warmup", type=int, default=10, help="first steps left out of the timing")
    parser.add_argument("--chunk", type=int, default=1024, help="tokens per chunk of peftlab's LM loss")
    parser.add_argument("--profile", action="store_true", help="print a profiler table of 3 more steps per run")
    parser.add_argument("--run-timeout", type=int, default=400, help="seconds allowed per run")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        try:
            task = spec.pop("task")
            result = save_initial_model(**spec) if task == "save" else run_one(**spec)
        except torch.cuda.OutOfMemoryError:
            result = {"status": "out of memory"}
        print_worker_result(result)
        return

    on_cuda = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda" if on_cuda else "cpu")
    runs = [r for r in RUNS if not args.only or r in args.only.split(",")]
    unknown = set(filter(None, args.only.split(","))) - set(RUNS)
    if unknown:
        sys.exit(f"--only: unknown run(s) {sorted(unknown)}; choose from {', '.join(RUNS)}")
    gcs = {"on": [True], "off": [False], "both": [True, False]}[args.gc]
    results = []
    with tempfile.TemporaryDirectory() as folder:
        saved = spawn_worker(__file__, {"task": "save", "folder": folder, "tiny": args.tiny}, args.run_timeout)
        if saved["status"] != "ok":
            sys.exit(f"could not build the initial model: {saved}")
        for gc in gcs:
            for run in runs:
                entry = {"run": run, "gc": gc}
                reason = skip_reason(run, on_cuda)
                spec = {"task": "train", "run": run, "folder": folder, "tiny": args.tiny, "gc": gc, "steps": args.steps,
                        "warmup": args.warmup, "chunk": args.chunk, "profile": args.profile}
                entry.update({"status": reason} if reason else spawn_worker(__file__, spec, args.run_timeout))
                print(f"{NAMES[run]} (GC {'on' if gc else 'off'}): {entry['status']}", flush=True)
                if "profile" in entry:
                    print(entry.pop("profile"), flush=True)
                results.append(entry)
    print()
    print_table(results)
    ratios = compare(results)
    checks = check_targets(ratios) if on_cuda else {}
    for key, value in ratios.items():
        print(f"{key}: {value:.3f}")
    for key, (value, ok) in checks.items():
        print(f"target {key}: {value:.3f} {'PASS' if ok else 'FAIL'}")
    if args.only or args.profile:
        return  # partial or profiled runs are diagnostics, not results
    name = f"e2e-{device_tag(device)}" + ("-tiny" if args.tiny else "")
    path = update_result(name, "training", {
        "benchmark": "LoRA/QLoRA training step: peftlab vs HF PEFT (+ bitsandbytes), one run, same data and init",
        "device": device_name(device), "versions": versions("peft", "bitsandbytes", "triton", "accelerate"),
        "model": LLAMA_TINY if args.tiny else LLAMA_1B, "batch": [2, 32] if args.tiny else [4, 1024],
        "lora": {"r": R, "alpha": ALPHA, "dropout": 0.0, "target_modules": TARGET_MODULES},
        "optimizer": f"torch AdamW (fused on CUDA), lr {LR}", "steps": args.steps, "warmup_steps": args.warmup,
        "loss": {"HF PEFT": "model(input_ids, labels=input_ids).loss",
                 "peftlab": f"peftlab.train.loss.causal_lm_loss, chunks of {args.chunk} tokens"},
        "statistic": "tokens/s from the median step time after warm-up; peak = torch.cuda.max_memory_allocated",
        "targets": TARGETS, "ratios": ratios, "target_checks": checks, "runs": results,
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
