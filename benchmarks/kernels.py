"""NF4 matmul speed on one GPU: bf16 cuBLAS vs bitsandbytes vs peftlab's Triton kernels.

    python benchmarks/kernels.py            # cuBLAS, bitsandbytes and peftlab -> results/kernels-<gpu>.json
    python benchmarks/kernels.py --sweep    # ... plus every candidate kernel config the tuning tables choose from
    python benchmarks/kernels.py --merge a.json b.json --out results/kernels-h100.json
                                            # no GPU: merge per-shape runs, print the table and tuning tables

Timing: each measurement captures a CUDA graph of many calls and times its replays with CUDA
events, so Python and launch overheads drop out. A measurement is a steady window: the graph is
replayed back to back for ``--warm-ms`` untimed, then for ``--window-ms`` timed, with no host sync
in between (``--window-ms 0``: the median of 3 separately synced replays, the method of earlier
result files). Calls rotate over several independent copies of the weight (and activations) whose
total size is at least 4x the L2 cache, so even M=1 reads its weight from HBM as a real decode step
would. All variants of one shape and M (cuBLAS, bitsandbytes, peftlab, sweep candidates) are timed
in the same alternating rounds and reported as medians over them, with each round's ratio to cuBLAS
alongside: the GPU's clocks drift with power and temperature, and only measurements taken side by
side compare fairly. cuBLAS and peftlab are each timed twice per round, as separate graphs
(``*_repeat``): the two ratios show how far one config's measurements land apart in the run.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from peftlab.quant.kernels import (  # noqa: E402
    NF4Weight,
    chunked,
    gemm,
    gemv,
    nf4_matmul,
    nf4_matmul_grad_input,
    skinny,
    tuning,  # noqa: E402
)
from peftlab.quant.kernels.dequant import dequantize  # noqa: E402
from peftlab.quant.nf4 import in_tiles, quantize_nf4, tiles_fit  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096)]  # (N out_features, K in_features)
MS = [1, 4, 16, 64, 256, 1024, 4096]
DTYPE = torch.bfloat16
RESULTS = Path(__file__).resolve().parent / "results"


# ----------------------------------------------------------------------------- timing
def graph_replayer(calls: list, target_ms: float = 4.0) -> tuple:
    """``(run_once, reps)``: a CUDA graph of ``reps`` calls of ``calls`` (round-robin), replayed by
    ``run_once``; where capture fails, the same calls launched eagerly."""
    for call in calls:  # compile, autotune caches, allocator warm-up
        call()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for call in calls:
        call()
    end.record()
    torch.cuda.synchronize()
    eager_ms = start.elapsed_time(end) / len(calls)
    reps = max(len(calls), min(400, int(target_ms / max(eager_ms, 1e-3))))
    reps = math.ceil(reps / len(calls)) * len(calls)
    try:
        graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for call in calls:
                call()
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(graph):
            for i in range(reps):
                calls[i % len(calls)]()
        run_once = graph.replay
    except RuntimeError as exc:  # not capturable: time the same calls launched eagerly
        print(f"graph capture failed ({exc!r:.120}); timing eagerly", flush=True)
        torch.cuda.synchronize()
        FALLBACKS.append(repr(exc)[:200])

        def run_once():
            for i in range(reps):
                calls[i % len(calls)]()
    run_once()
    torch.cuda.synchronize()
    return run_once, reps


def _replay_ms(run_once, reps: int, replays: int) -> float:
    """Median ms per call over ``replays`` timed replays."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(replays):
        start.record()
        run_once()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return statistics.median(times)


def _window_ms(run_once, reps: int, warm_ms: float, window_ms: float) -> float:
    """ms per call over a steady window: replays back to back for ``warm_ms`` untimed, then for
    ``window_ms`` timed. No host sync between them, so the GPU never idles inside the window: short
    synced replays ran the latency-bound M=1 plan 4-9 % slower and their ratios moved more
    (results/kernels-steady-windows-h100.json)."""
    per_replay = _replay_ms(run_once, reps, 1) * reps  # sizes the windows
    for _ in range(math.ceil(warm_ms / per_replay)):
        run_once()
    timed = max(3, math.ceil(window_ms / per_replay))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(timed):
        run_once()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / (timed * reps)


def time_calls(calls: list, target_ms: float = 4.0, replays: int = 7) -> float:
    """Median ms per call of ``calls`` (run round-robin) from CUDA-graph replays."""
    return _replay_ms(*graph_replayer(calls, target_ms), replays)


WINDOW = {"warm_ms": 100.0, "window_ms": 200.0}  # set from the command line


def time_rounds(variants: dict[str, list], rounds: int) -> dict[str, list[float]]:
    """ms per call of every variant in each of ``rounds`` rounds; each round times every variant
    once (a steady window, see ``WINDOW``), in reversed order every other round. Clocks drift with
    the GPU's power and temperature (bf16 cuBLAS at M=4096 moved by up to 20 % within one run), so
    variants are only compared within a round or by their medians over the same rounds, never
    across separate stretches of a run."""
    prepared = {name: graph_replayer(calls) for name, calls in variants.items()}
    names = list(prepared)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            run_once, reps = prepared[name]
            times[name].append(_window_ms(run_once, reps, WINDOW["warm_ms"], WINDOW["window_ms"])
                               if WINDOW["window_ms"] > 0 else _replay_ms(run_once, reps, 3))
    return times


def warm_up(seconds: float) -> None:
    """Back-to-back bf16 GEMMs, so the first measurements do not run on a cool, fully boosted GPU."""
    a = torch.randn(4096, 4096, device="cuda", dtype=DTYPE)
    t0 = time.time()
    while time.time() - t0 < seconds:
        for _ in range(20):
            a @ a
        torch.cuda.synchronize()


FALLBACKS: list[str] = []  # measurements that had to be timed eagerly (reported in the JSON)


def copies_for(nbytes: int) -> int:
    """Independent copies whose total size is at least 4x L2 (at least 2)."""
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    return max(2, min(16, math.ceil(4 * l2 / max(nbytes, 1))))


# ----------------------------------------------------------------------------- data
class Operands:
    """Rotating copies of one weight shape in bf16, peftlab NF4 and bitsandbytes NF4."""

    def __init__(self, n: int, k: int, n_bf16: int, n_nf4: int, with_bnb: bool):
        self.n, self.k = n, k
        gen = torch.Generator(device="cuda").manual_seed(n * 7 + k)
        dense = [torch.randn(n, k, device="cuda", generator=gen).mul_(0.02).to(DTYPE) for _ in range(max(n_bf16, 1))]
        self.bf16 = dense[:n_bf16]
        self.nf4 = []
        self.bnb = []
        for i in range(n_nf4):
            w = dense[i % len(dense)] if i < len(dense) else torch.randn(n, k, device="cuda", generator=gen).mul_(0.02).to(DTYPE)
            packed, state = quantize_nf4(w, blocksize=64, double_quant=True)
            if tiles_fit((n, k), 64):  # as an NF4Linear on the GPU holds it
                packed, state = in_tiles(packed, state)
            self.nf4.append((packed, state, NF4Weight.from_state(packed, state)))
            if with_bnb:
                import bitsandbytes.functional as bnbf

                self.bnb.append(bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4"))


def activations(m: int, k: int, count: int) -> list[torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(m + k)
    return [torch.randn(m, k, device="cuda", generator=gen).to(DTYPE) for _ in range(count)]


# ----------------------------------------------------------------------------- measurements
FORWARD_KINDS = ("gemv1", "gemv", "mma", "fused_small", "fused", "chunked", "overlap")
BACKWARD_KINDS = ("grad_fused", "grad_chunked", "grad_overlap")
_RANGE = {"gemv1": (1, 1), "gemv": (1, 4), "mma": (1, 16), "fused_small": (1, 64), "fused": (16, 256), "chunked": (16, 4096),
          "overlap": (256, 4096), "grad_fused": (1, 64), "grad_chunked": (1, 4096), "grad_overlap": (256, 4096)}


def _kernel_fn(kind: str, cfg):
    """``fn(activation, NF4Weight)`` running one candidate kernel config."""
    if kind == "gemv1":
        return lambda x, w: gemv.gemv_row(x, w, None, cfg)
    if kind == "gemv":
        return lambda x, w: gemv.gemv(x, w, None, tuning.blocks_per_step(cfg, w.blocksize))
    if kind == "mma":
        return lambda x, w: skinny.matmul(x, w, None, cfg)
    if kind in ("fused", "fused_small"):
        return lambda x, w: gemm.matmul(x, w, None, tuning.blocks_per_step(cfg, w.blocksize))
    if kind in ("chunked", "overlap"):  # as the dispatcher runs the plan (overlap only where it pays)
        return lambda x, w: chunked.matmul(x, w, None, *chunked.plan_chunks(kind, cfg["chunk_elems"], w))
    if kind == "grad_fused":
        return lambda g, w: gemm.matmul_grad_input(g, w, tuning.blocks_per_step(cfg, w.blocksize))
    return lambda g, w: chunked.matmul_grad_input(g, w, *chunked.plan_chunks(kind.removeprefix("grad_"), cfg["chunk_elems"], w))


def _candidates(kinds, candidates, m, inputs, ops, target) -> list[tuple[dict, list | None]]:
    """``(record, calls)`` for every candidate of ``kinds`` that applies to ``m``: the record holds
    its config and error against ``target`` (or why it failed), ``calls`` what to time (or None)."""
    out = []
    for kind in kinds:
        lo, hi = _RANGE[kind]
        if not lo <= m <= hi:
            continue
        for cfg in candidates.get(kind, []):
            fn = _kernel_fn(kind, cfg)
            try:
                got = fn(inputs[0], ops.nf4[0][2])
                err = ((got.float() - target).norm() / target.norm()).item()
            except Exception as exc:  # a config that does not compile or fit is recorded, not fatal
                out.append(({"kind": kind, "config": cfg, "error": repr(exc)[:300]}, None))
                continue
            calls = [lambda i=i, w=w, fn=fn: fn(inputs[i], w) for i, (_, _, w) in enumerate(ops.nf4)]
            out.append(({"kind": kind, "config": cfg, "rel_err": err}, calls))
    return out


def _best(results: list[dict]) -> dict | None:
    """The fastest correct candidate; a whole-weight dequantize within 3% of it wins (simpler, no
    chunk loop), since repeated timings of one config spread by about that much."""
    ok = [r for r in results if "ms" in r and r["rel_err"] < 2e-2]
    best = min(ok, key=lambda r: r["ms"], default=None)
    whole = [r for r in ok if "chunked" in r["kind"] and r["config"]["chunk_elems"] is None]
    if best is not None and whole and whole[0]["ms"] <= 1.03 * best["ms"]:
        return whole[0]
    return best


BASELINES = ("cublas", "bwd_cublas", "bnb", "bwd_bnb", "peftlab", "bwd_peftlab", "cublas_repeat", "peftlab_repeat")


def run(shapes, ms, candidates: dict, with_bnb: bool, rounds: int, save) -> dict:
    """Baselines, peftlab's current plan and every candidate config, for each shape and M, all
    timed in the same alternating rounds (``time_rounds``); each row keeps every round's times."""
    rows, dequant = [], []
    family = tuning.gpu_family(torch.device("cuda", torch.cuda.current_device()))  # which table entries apply
    for n, k in shapes:
        t0 = time.time()
        ops = Operands(n, k, copies_for(n * k * 2), copies_for(n * k // 2), with_bnb)
        ref_w = dequantize(ops.nf4[0][2], torch.float32)
        saved = dict(tuning.DEQUANT_CONFIG)
        for cfg in candidates.get("dequant", []):
            tuning.DEQUANT_CONFIG.update(cfg)
            out = torch.empty(n, k, dtype=DTYPE, device="cuda")
            t = time_calls([lambda w=w: dequantize(w, DTYPE, out=out) for (_, _, w) in ops.nf4])
            dequant.append({"N": n, "K": k, "config": dict(cfg), "ms": t, "GBps": n * k * (0.5 + 1 / 64 + 2) / t / 1e6})
        tuning.DEQUANT_CONFIG.clear()
        tuning.DEQUANT_CONFIG.update(saved)
        for m in ms:
            xs, gs = activations(m, k, len(ops.nf4)), activations(m, n, len(ops.nf4))
            variants = {"cublas": [lambda i=i, w=w: torch.nn.functional.linear(xs[i], w) for i, w in enumerate(ops.bf16)],
                        "bwd_cublas": [lambda i=i, w=w: gs[i] @ w for i, w in enumerate(ops.bf16)]}
            if with_bnb:
                import bitsandbytes as bnb
                import bitsandbytes.functional as bnbf

                variants["bnb"] = [lambda i=i, p=p, s=s: bnb.matmul_4bit(xs[i], p.t(), quant_state=s)
                                   for i, (p, s) in enumerate(ops.bnb)]
                # bitsandbytes' backward for the input: dequantize the whole weight, then cuBLAS.
                variants["bwd_bnb"] = [lambda i=i, p=p, s=s: gs[i] @ bnbf.dequantize_4bit(p, s).to(DTYPE)
                                       for i, (p, s) in enumerate(ops.bnb)]
            variants["peftlab"] = [lambda i=i, p=p, s=s: nf4_matmul(xs[i], p, s) for i, (p, s, _) in enumerate(ops.nf4)]
            variants["bwd_peftlab"] = [lambda i=i, p=p, s=s: nf4_matmul_grad_input(gs[i], p, s) for i, (p, s, _) in enumerate(ops.nf4)]
            variants["cublas_repeat"], variants["peftlab_repeat"] = variants["cublas"], variants["peftlab"]  # own graphs
            row = {"N": n, "K": k, "M": m, "peftlab_plan": tuning.forward_plan(m, n, k, 64, DTYPE, family),
                   "bwd_peftlab_plan": tuning.grad_input_plan(m, n, k, 64, DTYPE)}
            forward, backward = [], []
            if candidates:
                ref = xs[0].float() @ ref_w.t()
                forward = _candidates(FORWARD_KINDS, candidates, m, xs, ops, ref)
                del ref
                ref_g = gs[0].float() @ ref_w
                backward = _candidates(BACKWARD_KINDS, candidates, m, gs, ops, ref_g)
                del ref_g
            timed = [(f"candidate{j}", record, calls) for j, (record, calls) in enumerate(forward + backward) if calls]
            variants.update({name: calls for name, _, calls in timed})
            times = time_rounds(variants, rounds)
            for name in BASELINES:
                if name in times:
                    row[f"{name}_ms"] = statistics.median(times[name])
                    row[f"{name}_rounds_ms"] = times[name]
            for name, record, _ in timed:
                record["ms"] = statistics.median(times[name])
                record["rounds_ms"] = times[name]
            if candidates:
                row["forward_candidates"] = [record for record, _ in forward]
                row["backward_candidates"] = [record for record, _ in backward]
                row["best_forward"] = _best(row["forward_candidates"])
                row["best_backward"] = _best(row["backward_candidates"])
            rows.append(row)
            save({"rows": rows, "dequant": dequant})
            print(_row_line(row), flush=True)
            del xs, gs, variants, timed, forward, backward
        print(f"{n}x{k} done in {time.time() - t0:.0f}s", flush=True)
        del ops, ref_w
        torch.cuda.empty_cache()
    return {"rows": rows, "dequant": dequant}


def _row_line(r: dict) -> str:
    nan = float("nan")
    fwd = min(r["peftlab_ms"], (r.get("best_forward") or {}).get("ms", nan))
    bwd = min(r["bwd_peftlab_ms"], (r.get("best_backward") or {}).get("ms", nan))
    bnb, bbnb = r.get("bnb_ms", nan), r.get("bwd_bnb_ms", nan)
    best = r.get("best_forward") or {}
    bbest = r.get("best_backward") or {}
    return (f"{r['N']:>5}x{r['K']:<5} M={r['M']:<4} fwd cublas {r['cublas_ms']:.4f} bnb {bnb:.4f} peftlab "
            f"{r['peftlab_ms']:.4f} best {fwd:.4f} {best.get('kind')} x{r['cublas_ms'] / fwd:.2f}cub x{bnb / fwd:.2f}bnb"
            f" | bwd cublas {r['bwd_cublas_ms']:.4f} bnb {bbnb:.4f} peftlab {r['bwd_peftlab_ms']:.4f} best {bwd:.4f}"
            f" {bbest.get('kind')} x{bbnb / bwd:.2f}bnb")


# ----------------------------------------------------------------------------- summary
TARGETS = "H100: M=1 >= 2.5x cuBLAS and >= 3x bitsandbytes (11008x4096, 4096x11008); M=16 >= 1.5x cuBLAS; M=4096 >= 0.95x cuBLAS"


def summarize(rows: list[dict]) -> list[dict]:
    """One line per shape and M: baselines and the config the tuning tables select (the best candidate)."""
    out = []
    for r in rows:
        fwd, bwd = r.get("best_forward"), r.get("best_backward")
        line = {"N": r["N"], "K": r["K"], "M": r["M"], "cublas_ms": r["cublas_ms"], "bnb_ms": r.get("bnb_ms"),
                "peftlab_ms": fwd["ms"] if fwd else r["peftlab_ms"], "peftlab_kind": fwd["kind"] if fwd else None,
                "bwd_cublas_ms": r["bwd_cublas_ms"], "bwd_bnb_ms": r.get("bwd_bnb_ms"),
                "bwd_peftlab_ms": bwd["ms"] if bwd else r["bwd_peftlab_ms"], "bwd_peftlab_kind": bwd["kind"] if bwd else None}
        line["x_vs_cublas"] = line["cublas_ms"] / line["peftlab_ms"]
        ours = fwd.get("rounds_ms") if fwd else r.get("peftlab_rounds_ms")
        if ours and r.get("cublas_rounds_ms"):  # each round's ratio: the spread behind the median
            paired = [c / p for c, p in zip(r["cublas_rounds_ms"], ours)]
            line["x_vs_cublas_rounds"] = [min(paired), max(paired)]
        if r.get("peftlab_repeat_ms"):  # the same two configs timed again in the same rounds
            line["x_vs_cublas_repeat"] = r["cublas_repeat_ms"] / r["peftlab_repeat_ms"]
        line["x_vs_bnb"] = line["bnb_ms"] / line["peftlab_ms"] if line["bnb_ms"] else None
        line["bwd_x_vs_bnb"] = line["bwd_bnb_ms"] / line["bwd_peftlab_ms"] if line["bwd_bnb_ms"] else None
        out.append(line)
    return out


def print_table(summary: list[dict]) -> None:
    print(f"{'N x K':>11} {'M':>5} | {'cuBLAS':>7} {'bnb':>7} {'peftlab':>7} {'kind':>12} {'x cuBLAS':>8} {'repeat':>6}"
          f" {'rounds':>9} {'x bnb':>6} | {'bwd cuBLAS':>10} {'bwd bnb':>7} {'bwd peft':>8} {'kind':>12} {'x bnb':>6}   (ms)")
    for s in summary:
        spread = "{:.2f}-{:.2f}".format(*s["x_vs_cublas_rounds"]) if "x_vs_cublas_rounds" in s else "-"
        print(f"{s['N']:>5}x{s['K']:<5} {s['M']:>5} | {s['cublas_ms']:7.4f} {s['bnb_ms'] or float('nan'):7.4f} "
              f"{s['peftlab_ms']:7.4f} {str(s['peftlab_kind']):>12} {s['x_vs_cublas']:8.2f}"
              f" {s.get('x_vs_cublas_repeat') or float('nan'):6.2f} {spread:>9}"
              f" {s['x_vs_bnb'] or float('nan'):6.2f} |"
              f" {s['bwd_cublas_ms']:10.4f} {s['bwd_bnb_ms'] or float('nan'):7.4f} {s['bwd_peftlab_ms']:8.4f}"
              f" {str(s['bwd_peftlab_kind']):>12} {s['bwd_x_vs_bnb'] or float('nan'):6.2f}")


def print_tuning_tables(rows: list[dict]) -> None:
    """The best configs as the ``FORWARD``/``BACKWARD`` literals of peftlab/quant/kernels/tuning.py."""
    for name, field in (("FORWARD", "best_forward"), ("BACKWARD", "best_backward")):
        table: dict = {}
        for r in rows:
            best = r.get(field)
            if best:
                kind = "fused" if best["kind"] == "fused_small" else best["kind"].replace("grad_", "")
                cfg = best["config"]["chunk_elems"] if kind in ("chunked", "overlap") else best["config"]
                table.setdefault((r["N"], r["K"]), {})[r["M"]] = (kind, cfg, best["ms"])
        print(f"{name} = {{")
        for shape in sorted(table):
            print(f"    {shape}: {{")
            for m, (kind, cfg, ms) in sorted(table[shape].items()):
                print(f"        {m}: ({kind!r}, {cfg!r}),  # {ms * 1000:.1f} us")
            print("    },")
        print("}\n")


def merge(paths: list[Path]) -> dict:
    """Per-shape result files of one benchmark run -> one payload with the summary table."""
    parts = [json.loads(p.read_text()) for p in paths]
    payload = {k: v for k, v in parts[0].items() if k not in ("rows", "dequant", "eager_fallbacks")}
    payload["rows"] = [row for part in parts for row in part["rows"]]
    payload["dequant"] = [d for part in parts for d in part.get("dequant", [])]
    payload["eager_fallbacks"] = [e for part in parts for e in part.get("eager_fallbacks", [])]
    for row in payload["rows"]:  # re-apply the selection rule to the stored candidates
        if "forward_candidates" in row:
            row["best_forward"] = _best(row["forward_candidates"])
            row["best_backward"] = _best(row["backward_candidates"])
    payload["targets"] = TARGETS
    payload["notes"] = ("rows[].peftlab_ms/peftlab_plan: the path the tables chose when the run started; "
                        "rows[].best_*: the fastest correct candidate, which the tables in "
                        "peftlab/quant/kernels/tuning.py now hold; summary[]: baselines vs best_*.")
    payload["summary"] = summarize(payload["rows"])
    return payload


# ----------------------------------------------------------------------------- main
def timing_description() -> str:
    """How ``time_rounds`` measured, for the result files."""
    each = (f"a steady window ({WINDOW['warm_ms']:g} ms of back-to-back replays untimed, then {WINDOW['window_ms']:g} ms timed)"
            if WINDOW["window_ms"] > 0 else "the median of 3 synced replays")
    return (f"CUDA graph replay; every variant of a row timed once per round, {each}, order reversed every other "
            "round; medians over the rounds; weights rotate over copies >= 4x L2 (no L2 flush); a few seconds of "
            "bf16 GEMMs before the first row")


def environment() -> dict:
    import triton

    env = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__,
           "cuda": torch.version.cuda, "python": platform.python_version(),
           "timing": timing_description()}
    try:
        import bitsandbytes

        env["bitsandbytes"] = bitsandbytes.__version__
    except Exception as exc:  # recorded: the table then has no bitsandbytes column
        env["bitsandbytes"] = f"unavailable: {exc!r}"[:200]
    return env


def _write(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", action="store_true", help="also time every candidate config (tuning.sweep_candidates)")
    parser.add_argument("--out", type=Path, default=None, help="output JSON (default: results/kernels-<gpu>.json)")
    parser.add_argument("--shapes", default=None, help="subset, e.g. 11008x4096,4096x11008")
    parser.add_argument("--ms", default=None, help="subset of M, e.g. 1,16")
    parser.add_argument("--kinds", default=None, help="with --sweep: only these kinds, e.g. gemv,fused_small")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds per row (default 5)")
    parser.add_argument("--warmup-s", type=float, default=3.0, help="seconds of bf16 GEMMs before the first row")
    parser.add_argument("--warm-ms", type=float, default=WINDOW["warm_ms"],
                        help="untimed back-to-back replays before each timed window (default 100)")
    parser.add_argument("--window-ms", type=float, default=WINDOW["window_ms"],
                        help="timed window per variant and round (default 200; 0: median of 3 synced replays)")
    parser.add_argument("--merge", nargs="+", type=Path, default=None,
                        help="no GPU: merge per-shape result files into --out and print the table")
    args = parser.parse_args()
    if args.merge:
        payload = merge(args.merge)
        _write(args.out or RESULTS / "kernels-merged.json", payload)
        print_table(payload["summary"])
        print_tuning_tables(payload["rows"])
        return
    if not torch.cuda.is_available():
        sys.exit("benchmarks/kernels.py needs a CUDA GPU.")
    WINDOW.update(warm_ms=args.warm_ms, window_ms=args.window_ms)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes else SHAPES
    ms = [int(v) for v in args.ms.split(",")] if args.ms else MS
    env = environment()
    gpu = env["device"].lower().replace("nvidia", "").strip().split()[0]
    with_bnb = not env["bitsandbytes"].startswith("unavailable")
    candidates = tuning.sweep_candidates() if args.sweep else {}
    if args.kinds:
        candidates = {k: v for k, v in candidates.items() if k in args.kinds.split(",")}
    path = args.out or RESULTS / f"kernels-{gpu}.json"
    env["rounds"] = args.rounds
    warm_up(args.warmup_s)
    payload = {**env, **run(shapes, ms, candidates, with_bnb, args.rounds,
                            lambda part: _write(path, {**env, **part, "eager_fallbacks": FALLBACKS}))}
    payload["eager_fallbacks"] = FALLBACKS
    payload["targets"] = TARGETS
    payload["summary"] = summarize(payload["rows"])
    _write(path, payload)
    print_table(payload["summary"])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
