"""The lane mapping of the compiled skinny kernel, checked without a GPU.

The kernel's segment PTX runs warp-wide ``mma`` instructions, so it is only correct if every
thread holds one whole pair of its ``[NW * 32, 2]`` tensors: row r on lane r % 32 of warp r // 32,
elements 0 and 1 in that order. Triton chooses that mapping itself. Here the kernel is compiled
for sm_80 and sm_90 with the argument alignment :func:`skinny.matmul` guarantees (16 bytes for
activations and packed codes, 64 for the codebook, fresh output) and the layout Triton gave the
PTX's operands is read from the compiled TTGIR.
"""
from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from peftlab.quant.kernels import skinny, tuning  # noqa: E402

_TYPES = {"x_ptr": "*i64", "packed_ptr": "*i64", "code_ptr": "*fp32", "absmax_ptr": "*u8",
          "nested_absmax_ptr": "*fp32", "nested_code_ptr": "*fp32", "offset": "fp32", "bias_ptr": "*bf16",
          "out_ptr": "*bf16", "ws_ptr": "*fp32", "count_ptr": "*i32"}
_ALIGNED = ("x_ptr", "packed_ptr", "code_ptr", "out_ptr")  # what the launcher guarantees


def _compile(nw: int, tiles: int, table: bool, depth: int, x_ahead: bool, shared: bool, rows: int, steady: bool,
             groups: int, hint: bool, capability: int, maxnreg: int | None = None, unroll: int = 1,
             scale_ahead: bool = False, tiled: bool = False, tail: int = 0):
    kernel = skinny._skinny_kernel
    constants = dict(TAIL=tail, BS=64, NW=nw, TILES=tiles, SPLIT=1, HAS_BIAS=True, NESTED=True, F16=False, TABLE=table,
                     DEPTH=depth, X_AHEAD=x_ahead, SHARED_SCALES=shared, SCALE_BLOCKS=4,
                     SCALE_DECL=skinny.scale_table_decl(4) if shared else "",
                     SEGMENT_ASM=skinny.segment_asm("bf16", tiles, table, shared, rows, groups),
                     CONSTRAINTS=skinny.segment_constraints(tiles, shared, groups), ROWS=rows,
                     STEADY=steady, GROUPS=groups, L2_HINT=hint, UNROLL=unroll,
                     SCALE_AHEAD=scale_ahead and not shared, TILED=tiled)
    signature = {name: "constexpr" if name in constants else _TYPES.get(name, "i32") for name in kernel.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names) if name in _ALIGNED}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attrs)
    options = {"num_warps": nw, **({"maxnreg": maxnreg} if maxnreg else {})}
    return triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options)


def _ttgir(*args) -> str:
    return _compile(*args).asm["ttgir"]


def segment_operand_layouts(ttgir: str, rows: int) -> set[tuple[str, str, str, str]]:
    """(sizePerThread, threadsPerWarp, warpsPerCTA, order) of every ``[rows, 2]`` operand and
    result of the segment PTX (the inline asm that issues ``mma``) in ``ttgir``."""
    layouts = dict(re.findall(r"^(#\w+) = #\w+\.blocked<\{(.*?)\}>", ttgir, re.M))
    calls = [line for line in ttgir.splitlines() if "elementwise_inline_asm" in line and "mma.sync" in line]
    assert calls, "the segment PTX is missing from the compiled kernel"
    found = set()
    for call in calls:
        for name in re.findall(rf"tensor<{rows}x2x\w+, (#\w+)>", call):
            assert name in layouts, f"operand layout {name} is not a blocked layout"
            fields = dict(re.findall(r"(\w+) = \[([\d, ]*)\]", layouts[name]))
            found.add(tuple(fields[key].replace(" ", "") for key in
                            ("sizePerThread", "threadsPerWarp", "warpsPerCTA", "order")))
    return found


def whole_pairs(nw: int) -> set[tuple[str, str, str, str]]:
    """The one layout the PTX's operands may have: a whole pair per thread, row r on lane r % 32 of
    warp r // 32."""
    return {("1,2", "32,1", f"{nw},1", "1,0")}


@pytest.mark.parametrize("capability", [80, 90])
@pytest.mark.parametrize("nw,tiles,table,depth,x_ahead,shared,rows,steady,groups,hint", [
    (1, 1, False, 1, True, False, 16, False, 0, False), (2, 1, True, 2, False, False, 8, True, 0, True),
    (4, 2, False, 2, True, True, 16, True, 0, False), (8, 2, True, 3, True, True, 8, False, 0, True),
    (4, 1, False, 1, True, True, 8, True, 0, False), (2, 2, False, 2, False, False, 16, True, 0, True),
    (2, 1, True, 2, True, False, 16, False, 2, True), (4, 2, False, 2, False, False, 8, True, 2, True),
    (8, 2, True, 1, True, False, 16, True, 1, False), (2, 1, True, 2, True, False, 16, False, 0, True),
    (8, 1, True, 1, True, False, 8, False, 2, True)])
@pytest.mark.parametrize("tiled", [False, True])
def test_every_thread_holds_whole_pairs(nw, tiles, table, depth, x_ahead, shared, rows, steady, groups, hint,
                                        capability, tiled):
    """Every variant, weights loaded by Triton or by the L2-hinted PTX (``hint``), row-major or in
    tiles, gets whole pairs."""
    ttgir = _ttgir(nw, tiles, table, depth, x_ahead, shared, rows, steady, groups, hint, capability, None, 1, False,
                   tiled)
    assert segment_operand_layouts(ttgir, nw * 32) == whole_pairs(nw)


def loop_conversions_of_words(ttgir: str, rows: int) -> list[str]:
    """The ``convert_layout`` ops on ``[rows, 2]`` int64 tensors (queued weight words) inside loops."""
    found, depth = [], 0
    for line in ttgir.splitlines():
        depth += line.count("scf.for")
        if depth and "ttg.convert_layout" in line and f"tensor<{rows}x2xi64" in line:
            found.append(line.strip())
        if line.strip().startswith("scf.yield"):
            depth = max(0, depth - 1)
    return found


@pytest.mark.parametrize("nw,tiles,table,shared,rows,steady,groups,hint", [
    (2, 2, False, True, 16, True, 0, True), (4, 2, False, False, 16, True, 0, True),
    (2, 1, True, False, 16, True, 2, False), (2, 1, True, False, 16, True, 2, True),
    (8, 1, True, False, 8, False, 2, True)])
@pytest.mark.parametrize("unroll,scale_ahead", [(1, False), (2, False), (2, True)])
def test_queued_words_keep_their_layout_through_the_loops(nw, tiles, table, shared, rows, steady, groups, hint, unroll,
                                                          scale_ahead):
    """Words loaded as halves (hinted PTX, or the two halves of 64-code late-scale blocks) are queued
    apart and joined at use. Joined at load, Triton 3.6 carried the steady loop's queue in another
    layout and converted it through shared memory every step (188 instead of 147 registers). Checked
    with the masked loop run one and two steps per iteration, and with scales decoded a step ahead."""
    ttgir = _ttgir(nw, tiles, table, 2, True, shared, rows, steady, groups, hint, 90, None, unroll, scale_ahead)
    assert loop_conversions_of_words(ttgir, nw * 32) == []


def _compile_plan(m: int, config: dict, tail: int = 0):
    """A plan of the forward tables compiled for sm_90 as the dispatcher runs it on the tables' shapes
    (64-code blocks, the weight in tiles); ``tail``: the parts of a balanced grid's split row groups
    (4 where the plan balances and no shape says otherwise)."""
    return _compile(config["num_warps"], 1 if m <= 8 else 2, config["TABLE"], config["DEPTH"], config["X_AHEAD"],
                    config["SHARED_SCALES"], config["ROWS"], config["STEADY"],
                    skinny.late_scale_groups(64) if config["LATE_SCALE"] else 0, config["L2_HINT"], 90,
                    config["MAXNREG"], config["UNROLL"], config["SCALE_AHEAD"], True,
                    tail or (4 if config["BALANCE"] else 0))


@pytest.mark.parametrize("m,config", tuning.mma_plans())
def test_shipped_plans_hold_whole_pairs_and_keep_their_queue_layout(m, config):
    """What the dispatcher runs, compiled as it runs (64-code blocks): whole pairs for the PTX, and no
    queued words converted inside the loops."""
    nw = config["num_warps"]
    ttgir = _compile_plan(m, config).asm["ttgir"]
    assert segment_operand_layouts(ttgir, nw * 32) == whole_pairs(nw)
    assert loop_conversions_of_words(ttgir, nw * 32) == []


def test_the_check_sees_a_spread_pair():
    """The layout Triton picks for unaligned pointers: pairs spread over two lanes."""
    ttgir = ("#blocked = #ttg.blocked<{sizePerThread = [1, 1], threadsPerWarp = [16, 2], warpsPerCTA = [2, 1], "
             "order = [1, 0]}>\n"
             '%0:2 = tt.elementwise_inline_asm "mma.sync" %a : tensor<64x2xi64, #blocked> -> '
             "tensor<64x2xf32, #blocked>")
    assert segment_operand_layouts(ttgir, 64) == {("1,1", "16,2", "2,1", "1,0")}


def _resources(compiled) -> tuple[int, int]:
    """(registers per thread, shared bytes: static and Triton's own) of a compiled kernel, as the
    cuobjdump Triton ships reads them from its cubin."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([str(tool), "--dump-resource-usage", str(cubin)], capture_output=True, text=True,
                               check=True).stdout
    static = int(re.search(r"SHARED:(\d+)", usage).group(1))
    return int(re.search(r"REG:(\d+)", usage).group(1)), static + compiled.metadata.shared


# An H100's SM: 65536 registers (allocated per warp in units of 8 per thread) and 228 KB of shared
# memory, 1 KB of it reserved per program; 132 SMs.
H100_SMS, H100_REGISTERS, H100_SHARED = 132, 65536, 233472


@pytest.mark.parametrize("n,k,m,config", [(n, k, m, cfg) for (n, k), row in tuning.FORWARD.items()
                                          for m, (kind, cfg) in row.items() if kind == "mma" and cfg["MAXNREG"]])
def test_register_capped_plans_run_in_one_wave(n, k, m, config):
    """A register cap exists to fit the whole grid on an H100 at once: the compiled kernel keeps
    within it, and as many programs as the weight's rows need (with ``BALANCE``, the whole row
    groups and the parts of the split ones) fit on each SM."""
    nw, rows = config["num_warps"], config["ROWS"]
    groups = -(-n // rows)
    plan = skinny.tail_plan(groups, -(-k // skinny.SEGMENT), nw, H100_SMS) if config["BALANCE"] else None
    programs = plan[0] + (groups - plan[0]) * plan[1] if plan else groups
    registers, shared = _resources(_compile_plan(m, config, plan[1] if plan else 0))
    assert registers <= config["MAXNREG"]
    per_sm = min(H100_REGISTERS // (nw * 32 * -(-registers // 8) * 8), H100_SHARED // (shared + 1024))
    assert per_sm * H100_SMS >= programs, (registers, shared, per_sm, programs)


@pytest.mark.parametrize("groups,segments,warps,sms,expect", [
    (688, 32, 4, 132, (660, 4, 8)),  # 11008 x 4096: 28 groups left over, 4 parts of 8 segments each
    (688, 32, 8, 132, (660, 4, 8)),
    (150, 33, 4, 132, (132, 7, 5)),  # 18 groups left: 7 parts (of 5 segments; 33 // 5 rounds up to 7)
    (20, 9, 2, 8, (16, 2, 5)),  # 4 left on 8 SMs: 2 parts (5 and 4 segments)
    (896, 32, 4, 132, None),  # 14336 x 4096: 104 left over, one part each: nothing to gain
    (256, 86, 8, 132, None),  # 4096 x 11008: 124 left over
    (660, 32, 4, 132, None),  # already even
    (100, 32, 4, 132, None),  # fewer groups than SMs
])
def test_tail_plan_evens_out_the_last_programs(groups, segments, warps, sms, expect):
    """The balanced grid's arithmetic, worked by hand: whole groups on every SM alike, the rest split
    into at most one part per SM and at least one segment per warp."""
    assert skinny.tail_plan(groups, segments, warps, sms) == expect
