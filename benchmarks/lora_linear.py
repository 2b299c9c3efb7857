"""One adapted linear layer at inference: cuBLAS base alone vs base + two LoRA GEMMs vs Triton paths.

The shapes are the 1.1B Llama's projections (q/o, k/v, gate/up, down), LoRA r=16, bf16. Each
variant is timed as CUDA-graph replays over weight copies that exceed L2 (see ``kernels.time_calls``).
Triton paths: ``lora_linear`` (base and LoRA in one kernel) and ``lora_add`` (cuBLAS base and
``h``, the output updated in one pass) and ``merge`` (``lora_add`` writes ``W + s·B @ A`` for the
call, cuBLAS runs the layer on it). ``--sweep`` times every candidate config of both and prints
the ``LORA_FORWARD`` table for ``peftlab/quant/kernels/tuning.py``.

    python benchmarks/lora_linear.py --sweep      # -> results/lora_linear-<gpu>.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, device_name, device_tag, require_cuda, versions, write_result  # noqa: E402
from benchmarks.kernels import copies_for, time_calls  # noqa: E402
from peftlab.quant.kernels import tuning  # noqa: E402
from peftlab.quant.kernels.lora_linear import lora_add, lora_linear, lora_transient_merge  # noqa: E402

SHAPES = [(2048, 2048), (256, 2048), (5632, 2048), (2048, 5632)]  # (N, K): q/o, k/v, gate/up, down
MS = [1, 16, 128, 512, 2048, 4096]
RANK = 16
DTYPE = torch.bfloat16


def separate(x, w, a16, b16):
    """What runs without the fused kernel: the base GEMM, then h = x @ A.T and an in-place addmm."""
    out = F.linear(x, w)
    return out.addmm_(F.linear(x, a16), b16.t())


def _timed(fn, copies: int, ref: torch.Tensor) -> dict:
    """``fn(i)`` on copy ``i``: relative error on copy 0 and the replayed time."""
    err = ((fn(0).float() - ref).norm() / ref.norm()).item()
    return {"ms": time_calls([lambda i=i: fn(i) for i in range(copies)]), "rel_err": err}


def measure(n: int, k: int, m: int, sweep: bool) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(n + k + m)
    copies = copies_for(n * k * 2)
    ws = [torch.randn(n, k, device="cuda", generator=gen, dtype=DTYPE) * 0.02 for _ in range(copies)]
    a16s = [torch.randn(RANK, k, device="cuda", generator=gen, dtype=DTYPE) * 0.02 for _ in range(copies)]
    b16s = [torch.randn(n, RANK, device="cuda", generator=gen, dtype=DTYPE) * 0.1 for _ in range(copies)]
    xs = [torch.randn(m, k, device="cuda", generator=gen, dtype=DTYPE) for _ in range(copies)]
    ref = (xs[0].float() @ ws[0].float().t() + (xs[0].float() @ a16s[0].float().t()) @ b16s[0].float().t())
    row = {"N": n, "K": k, "M": m}
    row["base_ms"] = time_calls([lambda i=i: F.linear(xs[i], ws[i]) for i in range(copies)])
    row["separate_ms"] = time_calls([lambda i=i: separate(xs[i], ws[i], a16s[i], b16s[i]) for i in range(copies)])
    if sweep:
        plans = [("fused", c) for c in tuning.lora_candidates(m)]
        plans += [(kind, c) for kind in ("add", "merge") for c in tuning.lora_add_candidates()]
    else:
        plans = [p for p in [tuning.lora_plan(m, n, k)] if p[0] != "separate"]
    kernels = {
        "fused": lambda i, c: lora_linear(xs[i], ws[i], None, a16s[i], b16s[i], c),
        "add": lambda i, c: lora_add(F.linear(xs[i], ws[i]), F.linear(xs[i], a16s[i]), b16s[i], c),
        "merge": lambda i, c: lora_transient_merge(xs[i], ws[i], None, a16s[i], b16s[i], c),
    }
    row["candidates"] = []
    for kind, cfg in plans:
        try:
            timing = _timed(lambda i, kind=kind, cfg=cfg: kernels[kind](i, cfg), copies, ref)
        except Exception as exc:  # a config that does not compile or fit is recorded, not fatal
            row["candidates"].append({"kind": kind, "config": cfg, "error": repr(exc)[:300]})
            continue
        row["candidates"].append({"kind": kind, "config": cfg, **timing})
    ok = [c for c in row["candidates"] if "ms" in c and c["rel_err"] < 1e-2]
    row["best"] = min(ok, key=lambda c: c["ms"], default=None)
    return row


def print_row(r: dict) -> None:
    best = r["best"]
    fused = f"{best['ms'] * 1e3:8.1f}" if best else "       -"
    ratio = f"{best['ms'] / r['base_ms']:6.3f}" if best else "     -"
    print(f"{r['N']:>5}x{r['K']:<5} M={r['M']:<5} base {r['base_ms'] * 1e3:8.1f} us  separate "
          f"{r['separate_ms'] * 1e3:8.1f} ({r['separate_ms'] / r['base_ms']:5.3f}x)  best {fused} ({ratio}x)"
          f"  {(best['kind'], best['config']) if best else ''}", flush=True)


def _literal(kind: str, c: dict) -> str:
    """A config as tuning.py writes it (its helpers where they fit)."""
    if kind in ("add", "merge") and c["num_warps"] == 4:
        return f"_lora_add({c['BM']}, {c['BN']})"
    if kind == "fused" and c == tuning._lora_fused(c["BM"], c["BN"], c["BK"], c["num_stages"]):
        return f"_lora_fused({c['BM']}, {c['BN']}, {c['BK']}, {c['num_stages']})"
    return repr(c)


def print_table_literal(rows: list[dict]) -> None:
    print("LORA_FORWARD = {")
    for shape in sorted({(r["N"], r["K"]) for r in rows}):
        print(f"    {shape}: {{")
        for r in sorted((r for r in rows if (r["N"], r["K"]) == shape), key=lambda r: r["M"]):
            best = r["best"]
            if best and best["ms"] < r["separate_ms"]:
                print(f"        {r['M']}: (\"{best['kind']}\", {_literal(best['kind'], best['config'])}),"
                      f"  # {best['ms'] * 1e3:.1f} us vs {r['separate_ms'] * 1e3:.1f}")
            else:
                print(f"        {r['M']}: (\"separate\", None),  # {r['separate_ms'] * 1e3:.1f} us")
        print("    },")
    print("}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="time every candidate config")
    parser.add_argument("--ms", default=None, help="subset of M, e.g. 128,4096")
    args = parser.parse_args()
    device = require_cuda("benchmarks/lora_linear.py")
    import triton

    ms = [int(v) for v in args.ms.split(",")] if args.ms else MS
    rows = []
    for n, k in SHAPES:
        for m in ms:
            rows.append(measure(n, k, m, args.sweep))
            print_row(rows[-1])
    path = RESULTS / f"lora_linear-{device_tag(device)}.json"
    if args.ms and path.exists():  # a partial run replaces only the rows it measured
        measured = {(r["N"], r["K"], r["M"]) for r in rows}
        rows = [r for r in json.loads(path.read_text())["rows"] if (r["N"], r["K"], r["M"]) not in measured] + rows
    print_table_literal(rows)
    payload = {"benchmark": "adapted linear (LoRA r=16), inference, bf16", "device": device_name(device),
               "versions": {**versions(), "triton": triton.__version__},
               "timing": "CUDA graph replay, median of 7 replays; weights rotate over copies >= 4x L2",
               "rows": rows}
    print(f"wrote {write_result(f'lora_linear-{device_tag(device)}', payload)}")


if __name__ == "__main__":
    main()
