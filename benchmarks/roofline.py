"""Roofline of the NF4 matmul benchmark: how close each kernel is to what the GPU allows.

    python benchmarks/roofline.py --measure-ceilings   # GPU: copy bandwidth and bf16 matmul rate
                                                       #   -> results/ceilings-<gpu>.json
    python benchmarks/roofline.py                      # no GPU needed: reads results/kernels-h100.json
                                                       #   and results/ceilings-h100.json, prints the
                                                       #   table, writes results/roofline-h100.json

For each shape and M, the fewest bytes a kernel must move (weight once, activations once, output
once) and the FLOPs (2·M·N·K) give the floor time ``max(bytes / copy bandwidth, FLOPs / matmul
rate)`` for bf16 and for NF4 with double quantization. Against the measured times this shows the
achieved GB/s and TFLOP/s, and the largest speedup over cuBLAS that NF4 could ever show.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import device_name, device_tag, versions, write_result  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
NF4_BYTES_PER_WEIGHT = 0.5 + 1 / 64 + 4 / (64 * 256)  # packed codes, uint8 absmax, fp32 nested absmax (blocksize 64)


def measure_ceilings() -> dict:
    """Device-to-device copy bandwidth (bytes read + written) and an 8192³ bf16 matmul rate."""
    from triton.testing import do_bench

    src = torch.randn(1 << 28, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    copy_ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    mm_ms = do_bench(lambda: a @ b, return_mode="median")
    return {"copy_GBps": 2 * src.numel() * 4 / copy_ms / 1e6, "bf16_matmul_TFLOPs": 2 * 8192 ** 3 / mm_ms / 1e9}


def roofline(rows: list[dict], ceilings: dict) -> list[dict]:
    bw, rate = ceilings["copy_GBps"] * 1e9, ceilings["bf16_matmul_TFLOPs"] * 1e12
    out = []
    for r in rows:
        m, n, k = r["M"], r["N"], r["K"]
        io = 2 * (m * k + m * n)
        flops = 2 * m * n * k
        bf16_bytes, nf4_bytes = 2 * n * k + io, NF4_BYTES_PER_WEIGHT * n * k + io
        floor_bf16 = max(bf16_bytes / bw, flops / rate) * 1e3
        floor_nf4 = max(nf4_bytes / bw, flops / rate) * 1e3
        line = {"N": n, "K": k, "M": m, "bf16_MB": bf16_bytes / 1e6, "nf4_MB": nf4_bytes / 1e6, "GFLOP": flops / 1e9,
                "floor_bf16_ms": floor_bf16, "floor_nf4_ms": floor_nf4,
                "max_nf4_speedup_vs_cublas": r["cublas_ms"] / floor_nf4}
        for name, key, nbytes in (("cublas", "cublas_ms", bf16_bytes), ("bnb", "bnb_ms", nf4_bytes),
                                  ("peftlab", "peftlab_ms", nf4_bytes)):
            if r.get(key):
                line[f"{name}_ms"] = r[key]
                line[f"{name}_GBps"] = nbytes / r[key] / 1e6
                line[f"{name}_TFLOPs"] = flops / r[key] / 1e9
        out.append(line)
    return out


def print_table(lines: list[dict], ceilings: dict) -> None:
    print(f"ceilings: copy {ceilings['copy_GBps']:.0f} GB/s, bf16 matmul {ceilings['bf16_matmul_TFLOPs']:.0f} TFLOP/s")
    print(f"{'N x K':>12} {'M':>5} {'NF4 floor':>10} {'cuBLAS':>8} {'max x':>6} | {'bnb GB/s':>9} "
          f"{'peftlab GB/s':>12} {'TFLOP/s':>8} {'% of floor':>10}")
    for line in lines:
        pct = 100 * line["floor_nf4_ms"] / line["peftlab_ms"]
        print(f"{line['N']:>6}x{line['K']:<5} {line['M']:>5} {line['floor_nf4_ms'] * 1e3:>8.1f}us "
              f"{line['cublas_ms'] * 1e3:>6.1f}us {line['max_nf4_speedup_vs_cublas']:>6.2f} | "
              f"{line.get('bnb_GBps', float('nan')):>9.0f} {line['peftlab_GBps']:>12.0f} "
              f"{line['peftlab_TFLOPs']:>8.1f} {pct:>9.0f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure-ceilings", action="store_true", help="measure copy bandwidth and matmul rate (GPU)")
    parser.add_argument("--gpu", default="h100", help="which results/<name>-<gpu>.json files to read")
    args = parser.parse_args()
    if args.measure_ceilings:
        device = torch.device("cuda")
        data = {"device": device_name(device), "versions": versions("triton"), **measure_ceilings()}
        print(data)
        print(f"wrote {write_result(f'ceilings-{device_tag(device)}', data)}")
        return
    kernels = json.loads((RESULTS / f"kernels-{args.gpu}.json").read_text())
    ceilings = json.loads((RESULTS / f"ceilings-{args.gpu}.json").read_text())
    lines = roofline(kernels["summary"], ceilings)
    print_table(lines, ceilings)
    data = {"device": kernels["device"], "kernels_from": f"kernels-{args.gpu}.json",
            "ceilings_from": f"ceilings-{args.gpu}.json", "ceilings": ceilings,
            "bytes_model": "bf16 weight 2 B/param; NF4 0.5 B + uint8 absmax per 64 + fp32 nested absmax per "
                           "64*256; plus activations in and out once (bf16)", "rows": lines}
    print(f"wrote {write_result(f'roofline-{args.gpu}', data)}")


if __name__ == "__main__":
    main()
