"""Where the time of the large-M NF4 path goes: a kernel timeline of one call inside a CUDA graph.

    python benchmarks/overlap_timeline.py            # -> results/overlap_timeline-<gpu>.json

For each shape at M=4096 this replays a CUDA graph of one ``nf4_matmul`` call (the shipped plan:
the next row chunk dequantized on a side stream while cuBLAS multiplies the current one) under
the profiler, and one of the bf16 cuBLAS GEMM on the same shape. From the kernels' start and end
times it reports how long the GEMMs ran, how long a dequantize ran with no GEMM beside it (the
first chunk, and each later chunk's overrun past the GEMM it hides behind), and the gaps between.
The medians over several replays make the table; every replay's kernels are in the JSON.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import device_name, device_tag, require_cuda, versions, write_result  # noqa: E402
from benchmarks.kernels import SHAPES, graph_replayer  # noqa: E402
from peftlab.quant.kernels import nf4_matmul, tuning  # noqa: E402
from peftlab.quant.nf4 import quantize_nf4  # noqa: E402


def kernel_spans(replay) -> list[dict]:
    """``{"name", "start", "end"}`` (µs from the first kernel) of every kernel of one ``replay()``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        replay()
        torch.cuda.synchronize()
    with tempfile.NamedTemporaryFile(suffix=".json") as trace:
        prof.export_chrome_trace(trace.name)
        events = [e for e in json.loads(Path(trace.name).read_text())["traceEvents"] if e.get("cat") == "kernel"]
    t0 = min(e["ts"] for e in events)
    return sorted(({"name": e["name"], "start": e["ts"] - t0, "end": e["ts"] + e["dur"] - t0} for e in events),
                  key=lambda s: s["start"])


def breakdown(spans: list[dict]) -> dict:
    """Total span, time with a GEMM running, time with only a dequantize running, idle gaps (µs)."""
    def union(intervals):
        total, end = 0.0, float("-inf")
        for a, b in sorted(intervals):
            if b > end:
                total += b - max(a, end)
                end = b
        return total

    gemm = [(s["start"], s["end"]) for s in spans if "dequant" not in s["name"]]
    everything = [(s["start"], s["end"]) for s in spans]
    total = max(s["end"] for s in spans)
    busy, gemm_time = union(everything), union(gemm)
    return {"total_us": total, "gemm_us": gemm_time, "dequant_alone_us": busy - gemm_time, "idle_us": total - busy,
            "kernels": len(spans)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--m", type=int, default=4096)
    parser.add_argument("--replays", type=int, default=5)
    args = parser.parse_args()
    device = require_cuda("benchmarks/overlap_timeline.py")
    rows = []
    print(f"{'N x K':>11} {'plan':>20} | {'cuBLAS':>7} {'total':>7} {'GEMMs':>7} {'dequant alone':>13} {'idle':>5}   (µs)")
    for n, k in SHAPES:
        gen = torch.Generator(device=device).manual_seed(n + k)
        w = (torch.randn(n, k, device=device, generator=gen) * 0.02).to(torch.bfloat16)
        x = torch.randn(args.m, k, device=device, generator=gen).to(torch.bfloat16)
        packed, state = quantize_nf4(w, blocksize=64, double_quant=True)
        # target_ms=0: a graph of exactly one call
        ours, _ = graph_replayer([lambda: nf4_matmul(x, packed, state)], target_ms=0)
        theirs, _ = graph_replayer([lambda: torch.nn.functional.linear(x, w)], target_ms=0)
        replays = [(kernel_spans(ours), kernel_spans(theirs)) for _ in range(args.replays)]
        parts = [breakdown(a) for a, _ in replays]
        cublas = [max(s["end"] for s in b) for _, b in replays]
        row = {"N": n, "K": k, "M": args.m, "plan": list(tuning.forward_plan(args.m, n, k, 64, torch.bfloat16)),
               "cublas_us": statistics.median(cublas),
               **{key: statistics.median(p[key] for p in parts) for key in parts[0]},
               "replays": [{"peftlab": a, "cublas": b} for a, b in replays]}
        rows.append(row)
        print(f"{n:>5}x{k:<5} {str(row['plan']):>20} | {row['cublas_us']:7.1f} {row['total_us']:7.1f} "
              f"{row['gemm_us']:7.1f} {row['dequant_alone_us']:13.1f} {row['idle_us']:5.1f}", flush=True)
        del ours, theirs, w, x, packed, state
        torch.cuda.empty_cache()
    path = write_result(f"overlap_timeline-{device_tag(device)}", {
        "device": device_name(device), "versions": versions("triton"), "M": args.m,
        "what": "kernel spans of one CUDA-graph replay of nf4_matmul (shipped plan) and of bf16 cuBLAS; medians over replays",
        "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
