"""Peak memory and speed of full finetuning with LOMO/AdaLomo against their peers.

The 1.1B Llama shape (hidden 2048, 22 layers, 32/4 heads, intermediate 5632, vocab 32000), random
init, bf16 weights, batch 4 × 1024 random tokens, train() mode, non-reentrant gradient
checkpointing. Every run happens in its own subprocess so each peak (torch.cuda.max_memory_allocated,
weights included) is clean. All optimizers use the same chunked LM loss
(``peftlab.train.loss.causal_lm_loss``); AdamW, SGD and peftlab LOMO also run with the plain
full-logits loss for comparison.

    python benchmarks/lomo_memory.py            # GPU: table + benchmarks/results/lomo-<gpu>.json
    python benchmarks/lomo_memory.py --tiny     # CPU, tiny config: results/lomo-cpu-tiny.json
    python benchmarks/lomo_memory.py --interleave sgd,peftlab_lomo,peftlab_adalomo
                                                # speed only: the models live in one process and take
                                                # steps in turn, so drift of the machine hits all alike
                                                # -> results/lomo-interleaved-<gpu>.json

Peers that need CUDA (bitsandbytes paged AdamW, lomo-optim) are skipped with a reason on CPU;
lomo-optim or bitsandbytes missing is recorded as "not installed".
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import (  # noqa: E402
    LLAMA_1B, LLAMA_TINY, build_bf16_llama, device_name, device_tag, print_worker_result, spawn_worker, versions,
    write_result)


# (run name, optimizer, loss); the reference for ratios is SGD with the same (chunked) loss.
RUNS = [
    ("AdamW (plain loss)", "adamw", "plain"),
    ("SGD (plain loss)", "sgd", "plain"),
    ("peftlab LOMO (plain loss)", "peftlab_lomo", "plain"),
    ("AdamW", "adamw", "chunked"),
    ("SGD", "sgd", "chunked"),
    ("bnb PagedAdamW8bit", "bnb_paged_adamw8bit", "chunked"),
    ("lomo-optim LOMO", "lomo_optim_lomo", "chunked"),
    ("lomo-optim AdaLomo", "lomo_optim_adalomo", "chunked"),
    ("peftlab LOMO", "peftlab_lomo", "chunked"),
    ("peftlab AdaLomo", "peftlab_adalomo", "chunked"),
    ("peftlab LOMO + clip 1.0 (two backward passes)", "peftlab_lomo_clip", "chunked"),
    ("peftlab LOMO, one launch per parameter (bucket_mb=0)", "peftlab_lomo_per_param", "chunked"),
    ("peftlab AdaLomo, one parameter at a time (bucket_mb=0)", "peftlab_adalomo_per_param", "chunked"),
]
LR = {"adamw": 1e-5, "sgd": 1e-3, "bnb_paged_adamw8bit": 1e-5, "lomo_optim_lomo": 1e-3,
      "lomo_optim_adalomo": 1e-3, "peftlab_lomo": 1e-3, "peftlab_adalomo": 1e-3, "peftlab_lomo_clip": 1e-3,
      "peftlab_lomo_per_param": 1e-3, "peftlab_adalomo_per_param": 1e-3}
CUDA_ONLY = {"bnb_paged_adamw8bit": "bitsandbytes", "lomo_optim_lomo": "lomo_optim",
             "lomo_optim_adalomo": "lomo_optim"}
TARGETS = {"lomo_peak_gib_max": 3.2, "lomo_speed_vs_sgd_min": 0.9, "adalomo_vs_lomo_min": 0.9}


# ---------------------------------------------------------------------- one run (in a subprocess)


def make_step(kind: str, model):
    """Return ``step(loss)`` that applies one optimizer step for ``kind``."""
    lr = LR[kind]
    if kind in ("adamw", "sgd", "bnb_paged_adamw8bit"):
        if kind == "adamw":
            opt = torch.optim.AdamW(model.parameters(), lr=lr)
        elif kind == "sgd":
            opt = torch.optim.SGD(model.parameters(), lr=lr)
        else:
            import bitsandbytes as bnb

            opt = bnb.optim.PagedAdamW8bit(model.parameters(), lr=lr)

        def step(loss):
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step
    if kind.startswith("lomo_optim"):
        import lomo_optim

        opt = (lomo_optim.Lomo if kind == "lomo_optim_lomo" else lomo_optim.AdaLomo)(model, lr=lr)
        return lambda loss: opt.fused_backward(loss, lr)
    from peftlab.optim import AdaLomo, Lomo

    if kind.startswith("peftlab_adalomo"):
        opt = AdaLomo(model, lr=lr, bucket_mb=0 if kind.endswith("per_param") else 64)
    else:
        opt = Lomo(model, lr=lr, clip_grad_norm=1.0 if kind == "peftlab_lomo_clip" else None,
                   bucket_mb=0 if kind == "peftlab_lomo_per_param" else 64)
    return opt.backward


def run_one(kind: str, loss_kind: str, tiny: bool, warmup: int, steps: int, chunk: int) -> dict:
    """Train ``warmup + steps`` steps; report tokens/s over the timed steps and the peak memory."""
    from peftlab.train.loss import causal_lm_loss

    device = torch.device("cuda" if torch.cuda.is_available() and not tiny else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)  # tiny CPU runs: thread pools only add noise
    batch, seq = (2, 32) if tiny else (4, 1024)
    config = LLAMA_TINY if tiny else LLAMA_1B
    model = build_bf16_llama(config, device)
    step = make_step(kind, model)
    gen = torch.Generator(device="cpu").manual_seed(1)
    data = [torch.randint(0, config["vocab_size"], (batch, seq), generator=gen).to(device)
            for _ in range(warmup + steps)]

    def loss_of(ids):
        if loss_kind == "chunked":
            return causal_lm_loss(model, ids, chunk_size=chunk)
        return model(input_ids=ids, labels=ids).loss

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    losses = []
    start = None
    for i, ids in enumerate(data):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        loss = loss_of(ids)
        step(loss)
        losses.append(loss.detach())
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    result = {"status": "ok", "tokens_per_s": steps * batch * seq / elapsed,
              "step_ms": 1e3 * elapsed / steps, "loss_first": losses[0].item(), "loss_last": losses[-1].item()}
    if device.type == "cuda":
        result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    else:
        result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def interleaved(kinds: list[str], rounds: int, warmup: int, chunk: int) -> list[dict]:
    """Median step time of each optimizer kind, the kinds taking one step each in turn (chunked loss)."""
    from peftlab.train.loss import causal_lm_loss

    device = torch.device("cuda")
    runs = []
    for kind in kinds:
        model = build_bf16_llama(LLAMA_1B, device)
        runs.append((kind, model, make_step(kind, model), []))
    gen = torch.Generator(device="cpu").manual_seed(1)
    for i in range(warmup + rounds):
        ids = torch.randint(0, LLAMA_1B["vocab_size"], (4, 1024), generator=gen).to(device)
        for kind, model, step, times in runs:
            torch.cuda.synchronize()
            start = time.perf_counter()
            step(causal_lm_loss(model, ids, chunk_size=chunk))
            torch.cuda.synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - start)
    results = []
    for kind, _, _, times in runs:
        step_s = sorted(times)[len(times) // 2]
        results.append({"optimizer": kind, "step_ms": 1e3 * step_s, "tokens_per_s": 4096 / step_s,
                        "step_ms_all": [1e3 * t for t in times]})
    sgd = next((r for r in results if r["optimizer"] == "sgd"), None)
    for r in results:
        if sgd is not None:
            r["speed_vs_sgd"] = r["tokens_per_s"] / sgd["tokens_per_s"]
        print(f"{r['optimizer']:28} {r['step_ms']:8.1f} ms/step {r['tokens_per_s']:9.0f} tok/s"
              f"  x{r.get('speed_vs_sgd', float('nan')):.2f} SGD", flush=True)
    return results


# ---------------------------------------------------------------------- the driver


def skip_reason(kind: str, on_cuda: bool) -> str | None:
    """Why a run cannot happen here, or None."""
    module = CUDA_ONLY.get(kind)
    if module is None:
        return None
    try:
        __import__(module)
    except ImportError:
        return "not installed"
    except Exception as exc:  # a package that fails at import time on this machine
        return f"import failed: {exc}"
    return None if on_cuda else "needs CUDA"


def spawn(kind: str, loss_kind: str, args) -> dict:
    """Run one configuration in a fresh Python process and return its result record."""
    spec = dict(kind=kind, loss_kind=loss_kind, tiny=args.tiny, warmup=args.warmup, steps=args.steps, chunk=args.chunk)
    return spawn_worker(__file__, spec, args.run_timeout)

def ratios(results: list[dict]) -> None:
    """Add speed/memory ratios against SGD with the same loss."""
    by_key = {(r["optimizer"], r["loss"]): r for r in results}
    for r in results:
        ref = by_key.get(("sgd", r["loss"]))
        if r["status"] != "ok" or ref is None or ref["status"] != "ok":
            continue
        r["speed_vs_sgd"] = r["tokens_per_s"] / ref["tokens_per_s"]
        if "peak_gib" in r:
            r["peak_vs_sgd"] = r["peak_gib"] / ref["peak_gib"]


def check_targets(results: list[dict]) -> dict:
    by_key = {(r["optimizer"], r["loss"]): r for r in results}
    lomo, adalomo, sgd = (by_key.get((k, "chunked")) for k in ("peftlab_lomo", "peftlab_adalomo", "sgd"))
    checks = {}
    if all(r and r["status"] == "ok" for r in (lomo, adalomo, sgd)):
        if "peak_gib" in lomo:
            checks["lomo_peak_gib"] = [lomo["peak_gib"], lomo["peak_gib"] <= TARGETS["lomo_peak_gib_max"]]
        speed = lomo["tokens_per_s"] / sgd["tokens_per_s"]
        checks["lomo_speed_vs_sgd"] = [speed, speed >= TARGETS["lomo_speed_vs_sgd_min"]]
        ada = adalomo["tokens_per_s"] / lomo["tokens_per_s"]
        checks["adalomo_speed_vs_lomo"] = [ada, ada >= TARGETS["adalomo_vs_lomo_min"]]
        if "peak_gib" in adalomo:
            mem = adalomo["peak_gib"] / lomo["peak_gib"]
            checks["adalomo_peak_vs_lomo"] = [mem, mem <= 1 / TARGETS["adalomo_vs_lomo_min"]]
    return checks


def print_table(results: list[dict], on_cuda: bool) -> None:
    mem_col = "peak GiB" if on_cuda else "peak RSS MiB"
    header = f"{'run':48} {'tokens/s':>10} {mem_col:>12} {'speed/SGD':>10} {'mem/SGD':>8} {'loss':>14}  status"
    print(header)
    print("-" * len(header))
    for r in results:
        if r["status"] != "ok":
            print(f"{r['run']:48} {'':>10} {'':>12} {'':>10} {'':>8} {'':>14}  {r['status']}"
                  + (f": {r['error']}" if "error" in r else ""))
            continue
        mem = r.get("peak_gib", r.get("peak_rss_mib"))
        print(f"{r['run']:48} {r['tokens_per_s']:>10.0f} {mem:>12.2f} {r.get('speed_vs_sgd', float('nan')):>10.2f} "
              f"{r.get('peak_vs_sgd', float('nan')):>8.2f} {r['loss_first']:>6.3f}->{r['loss_last']:<6.3f}  ok")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny config on CPU (seconds)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (default 3; tiny 1)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 8; tiny 2)")
    parser.add_argument("--chunk", type=int, default=None, help="tokens per loss chunk (default 512; tiny 16)")
    parser.add_argument("--only", default="", help="comma-separated optimizer kinds to run (default: all)")
    parser.add_argument("--run-timeout", type=int, default=300, help="seconds allowed per run")
    parser.add_argument("--interleave", default="", help="comma-separated kinds: speed only, in one process (GPU)")
    parser.add_argument("--rounds", type=int, default=8, help="with --interleave: timed rounds")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.interleave:
        if not torch.cuda.is_available():
            sys.exit("--interleave needs a CUDA GPU.")
        kinds = args.interleave.split(",")
        device = torch.device("cuda")
        results = interleaved(kinds, args.rounds, args.warmup or 3, args.chunk or 512)
        by_kind = {r["optimizer"]: r for r in results}
        data = {"benchmark": "LOMO/AdaLomo speed, optimizers stepping in turn in one process", "device":
                device_name(device), "versions": versions("bitsandbytes", "lomo-optim", "triton"), "model": LLAMA_1B,
                "batch": [4, 1024], "gradient_checkpointing": "non-reentrant", "loss_chunk_tokens": args.chunk or 512,
                "warmup_rounds": args.warmup or 3, "timed_rounds": args.rounds,
                "statistic": "median step time per optimizer", "runs": results}
        if "peftlab_lomo" in by_kind and "peftlab_adalomo" in by_kind:
            data["adalomo_speed_vs_lomo"] = by_kind["peftlab_adalomo"]["tokens_per_s"] / by_kind["peftlab_lomo"]["tokens_per_s"]
            print(f"AdaLomo / LOMO: {data['adalomo_speed_vs_lomo']:.3f}")
        print(f"wrote {write_result(f'lomo-interleaved-{device_tag(device)}', data)}")
        return

    if args.worker is not None:
        spec = json.loads(args.worker)
        try:
            result = run_one(**spec)
        except torch.cuda.OutOfMemoryError:
            result = {"status": "out of memory"}
        print_worker_result(result)
        return

    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    args.steps = args.steps if args.steps is not None else (2 if args.tiny else 8)
    args.chunk = args.chunk if args.chunk is not None else (16 if args.tiny else 512)
    on_cuda = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda" if on_cuda else "cpu")
    only = set(filter(None, args.only.split(",")))
    results = []
    for name, kind, loss_kind in RUNS:
        if only and kind not in only:
            continue
        entry = {"run": name, "optimizer": kind, "loss": loss_kind}
        reason = skip_reason(kind, on_cuda)
        entry.update({"status": reason} if reason else spawn(kind, loss_kind, args))
        print(f"{name}: {entry['status']}", flush=True)
        results.append(entry)
    ratios(results)
    print()
    print_table(results, on_cuda)
    checks = check_targets(results) if on_cuda else {}  # the targets are for the 1.1B model on a GPU
    for key, (value, ok) in checks.items():
        print(f"target {key}: {value:.3f} {'PASS' if ok else 'FAIL'}")

    data = {
        "benchmark": "full finetuning memory/speed: LOMO and AdaLomo vs AdamW, SGD, paged AdamW 8-bit, lomo-optim",
        "device": device_name(device),
        "versions": versions("bitsandbytes", "lomo-optim", "triton"),
        "model": LLAMA_TINY if args.tiny else LLAMA_1B,
        "batch": [2, 32] if args.tiny else [4, 1024],
        "gradient_checkpointing": "non-reentrant",
        "dtype": "bfloat16 weights",
        "loss_chunk_tokens": args.chunk,
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "targets": TARGETS,
        "target_checks": checks,
        "notes": "peak = torch.cuda.max_memory_allocated over the whole run, weights included; paged "
                 "optimizer states live outside torch's allocator. speed_vs_sgd/peak_vs_sgd compare with SGD "
                 "using the same loss. On CPU (--tiny) memory is the worker's peak RSS.",
        "runs": results,
    }
    path = write_result(f"lomo-{device_tag(device)}" + ("-tiny" if args.tiny else ""), data)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
