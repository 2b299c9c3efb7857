"""Skinny NF4 matmul for 1-16 activation rows on tensor cores (``mma.sync``), decoding in registers.

A warp owns 16 weight rows (the A operand of ``m16n8k16``) and all activation rows (the B
operand: rows 0-7, and 8-15 as a second tile). Thread ``(g, c) = (lane // 4, lane % 4)`` loads 16
packed bytes of rows ``g`` and ``g + 8`` per 128-column segment (codes ``32c .. 32c + 31``) and
decodes them without memory lookups: the 16 codebook values sit in eight registers as byte
planes, and ``prmt`` selects bytes by code (two lookups of eight entries and a select per plane,
then one ``prmt`` interleaving low and high bytes into a bf16x2/f16x2 pair). The pairs are the A
fragments of eight k-steps as they come, because the dot product may visit k in any order: a
thread's k-step ``j`` takes its bytes ``2j`` and ``2j + 1``, so the matching B fragment is one
8-byte load of four consecutive activations. Each pair is scaled by its block's absmax
(bf16x2/f16x2) before the ``mma``; warps split K and add their fp32 results once at the end.

With ``TABLE`` the codes are decoded through shared memory instead: each program first writes a
table of the 256 possible packed bytes' pairs, 32 copies of it with copy ``l`` on bank ``l``, so a
lane's lookups never conflict (32 KB). A packed byte then costs one ``prmt`` (extract), one
``mad`` (address) and one ``ld.shared``, which leaves the integer pipe a third of the work of the
register decode; the table is faster at 1-4 rows, the register decode where B tiles are full.
With ``SHARED_SCALES`` each program first decodes its rows' block scales (double quantization
included) into shared memory, one bf16/f16 pair (rows g and g + 8) per lane row and block (2 KB
for 64 blocks), so a segment reads them with one ``ld.shared`` and two ``prmt``: about 40 fewer
instructions per segment, and no dependent code-table gather. It pays at 16 rows and, measured
shape by shape, at some smaller row counts (4096×11008 at 2-4 rows with the pair table); at others
it loses (11008×4096 at 1-4 rows), so the tables decide.

With ``ROWS=8`` a program takes 8 weight rows and leaves the mma's rows 8-15 empty: twice the
programs for weights with few rows (4096×4096 at 1-4 activation rows). With ``STEADY`` the steps
in which every warp's segment is whole and in range load without masks (rows past N and tokens
past M clamped, never stored); only the last steps mask. With ``LATE_SCALE`` (blocks of 64 or
more) the codes enter the mma unscaled and each block's sum is scaled once, in fp32: the k-steps
of one block accumulate into zeroed partials that one ``fma`` per accumulator adds in, 2-4 per
block instead of 8-16 ``bf16x2`` multiplies, and the products are no longer rounded to bf16. For
64-code blocks a thread then loads 8 bytes from each half of the segment (columns ``16c ..`` and
``64 + 16c ..``) rather than 16 contiguous, so that the four lanes of every k-step share a block.
With ``L2_HINT`` the packed codes are loaded by inline PTX with the ``L2::256B`` prefetch-size
qualifier: a miss brings the next 256 bytes of the row into L2 (four segments), so the following
segments of a row wait on L2 rather than HBM. Weights held in tiles (``NF4Weight.tiled``, see
``peftlab.quant.nf4.to_tiles``) are read the same way, only from other addresses: a warp's 16 rows
of a segment are then 1 KB of contiguous memory (``_word_offset``). With ``UNROLL=2`` the masked loop takes two steps
per iteration, so the loads queued for the next segment land in the registers the step before
last used, instead of being moved into the queue's registers at every step (at one segment in
flight, 20 register moves per segment, the first waiting on the load). The tables take it where
it measured faster. With ``SCALE_AHEAD`` (scales not in shared memory) each queued segment carries
the block-scale bytes of the warp's next segment, whose nested-code gather then runs during the
current one: a segment no longer waits on a gather that depends on its own loads, for two more
registers (the decoded scales) carried between steps.

Against the CUDA-core GEMVs there are no codebook gathers through L1 and no per-element FMA
(about five instructions per weight in the compiled loop, two of them ``prmt``), and the
multiply-adds of up to eight activation rows cost the same one ``mma``. Needs sm_80+, bf16/fp16
activations and whole blocks per row; the inline PTX cannot run in Triton's interpreter, so it
is CUDA-only (on the CPU the tests run the whole kernel with a model of its PTX).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from peftlab.quant.kernels.decode import decode_scales, scale_bytes
from peftlab.quant.kernels.gemm import finish_split_k
from peftlab.quant.kernels.weights import NF4Weight

SEGMENT = 128  # columns one warp decodes per step: 4 threads x 32 codes
MAX_ROWS = 16  # activation rows: two B tiles of 8
_TABLE = ("L0", "L1", "L2", "L3", "H0", "H1", "H2", "H3")  # byte planes: entries 4i..4i+3 of each


def selector_ops(word: str, row: str) -> list[tuple]:
    """PTX (op, dst, a, b) preparing the ``prmt`` selectors of one 32-bit word of 8 codes.

    ``{row}i3`` holds each code's low three bits (a ``prmt`` selector nibble with its sign-mode
    bit clear); ``{row}sl`` picks, per output byte i, byte i of the first lookup (codes 0-7) or
    byte i + 4 of the second (codes 8-15). ``{row}i3u``/``{row}slu`` serve the upper four codes.
    """
    i3, sl = f"{row}i3", f"{row}sl"
    return [("and.b32", i3, word, "0x77777777"), ("shr.u32", "t", word, "1"),
            ("and.b32", "t", "t", "0x44444444"), ("or.b32", sl, "t", "0x32103210"),
            ("shr.u32", f"{i3}u", i3, "16"), ("shr.u32", f"{sl}u", sl, "16")]


def lookup_ops(sel: str, pick: str, first: str, second: str) -> list[tuple]:
    """PTX (``prmt.b32``, dst, a, b, c) decoding the 4 codes of selectors ``sel``/``pick``.

    ``first`` gets the pair of the selectors' byte 0 (its high nibble, element 2i, in the low
    half), ``second`` the pair of byte 1; ``L*``/``H*`` name the codebook's byte planes.
    """
    return [("prmt.b32", "la", "L0", "L1", sel), ("prmt.b32", "lb", "L2", "L3", sel),
            ("prmt.b32", "L", "la", "lb", pick), ("prmt.b32", "ha", "H0", "H1", sel),
            ("prmt.b32", "hb", "H2", "H3", sel), ("prmt.b32", "H", "ha", "hb", pick),
            ("prmt.b32", first, "L", "H", "0x4051"), ("prmt.b32", second, "L", "H", "0x6273")]


def table_lookup_ops(word: str, byte: int, dst: str, lane: str, t: str) -> list[tuple]:
    """PTX decoding packed byte ``byte`` of ``word`` into pair ``dst`` through the shared table:
    the byte (zero-extended), its entry's address for this lane (``lane`` = table + 4 * lane), the load."""
    return [("prmt.b32", t, word, "0", hex(0x4440 + byte)), ("mad.lo.u32", t, t, "128", lane),
            ("ld.shared.b32", dst, f"[{t}]")]


def table_fill_ops(entry: str, lane: str, table: str, pair: str) -> list[tuple]:
    """PTX storing the 32 copies of one table entry: copy ``(lane + i) % 32`` at step i, so the
    lanes of a warp write 32 different banks at every step."""
    ops = [("shl.b32", "l4", lane, "2"), ("mad.lo.u32", "base", entry, "128", table)]
    for i in range(32):
        ops += [("add.u32", "c", "l4", str(4 * i)), ("and.b32", "c", "c", "127"), ("add.u32", "a", "c", "base"),
                ("st.shared.b32", "[a]", pair)]
    return ops


def _format(ops: list[tuple], names: dict) -> str:
    return " ".join(f"{op[0]} {', '.join(names.get(a, a) for a in op[1:])};" for op in ops)


@functools.cache  # asked on every launch; the same string object keeps Triton's key hashing cheap
def segment_asm(kind: str, tiles: int, table: bool, shared_scales: bool, rows: int = 16, groups: int = 0) -> str:
    """PTX for one 128-column segment: decode rows g and g + 8, scale, 8 k-steps of mma per tile.
    With ``rows=8`` only row g is decoded and the A fragments of rows 8-15 stay zero. With
    ``groups`` (1 or 2) the decoded codes go into the mma unscaled: each group of ``8 // groups``
    k-steps (one quantization block) sums into zeroed partials, which one fp32 ``fma`` per
    accumulator then scales into the running sums; ``groups=0`` scales the pairs before the mma.

    Operands (``pack=2``): outputs are ``tiles`` x (row g, row g + 8) fp32 accumulator pairs;
    inputs the packed words of row g and of row g + 8 (2 x int64 each), the activations (per tile
    8 x int64, k-step j in operand j), the byte planes (8 x b32; with ``table``, the lane's table
    address in the first, the rest unused), the two rows' block scales (fp32, per group with
    ``groups``; with ``shared_scales``, the address of their pair in ``_fill_scales``' table, in
    both operands) and the accumulators again.
    """
    words, acts = 4 * tiles, 4 * tiles + 4
    decode = acts + 8 * tiles
    scale = decode + 8
    acc = scale + 2 * max(groups, 1)
    planes = {name: f"${decode + i}" for i, name in enumerate(_TABLE)}
    decoded = "gh" if rows == 16 else "g"
    selectors = ", ".join(f"{row}{name}{upper}" for row in "gh" for name in ("i3", "sl") for upper in ("", "u"))
    partials = "".join(f", p{i}" for i in range(4 * tiles)) + ", z" if groups else ""
    lines = [f"{{ .reg .b32 wg<4>, wh<4>, t, t<4>, {selectors}, la, lb, L, ha, hb, H, b0, b1, a<4>, sg, sh, nz;",
             ".reg .f32 " + ", ".join(f"d{i}" for i in range(4 * tiles)) + partials + ";",
             f"mov.b64 {{wg0, wg1}}, ${words}; mov.b64 {{wg2, wg3}}, ${words + 1};",
             f"mov.b64 {{wh0, wh1}}, ${words + 2}; mov.b64 {{wh2, wh3}}, ${words + 3}; mov.b32 nz, 0x80008000;",
             " ".join(f"mov.f32 d{i}, ${acc + i};" for i in range(4 * tiles))]
    if groups:
        lines.append("mov.f32 z, 0f00000000;")
    elif shared_scales:
        lines.append(f"ld.shared.b32 sg, [${scale}]; prmt.b32 sh, sg, 0, 0x3232; prmt.b32 sg, sg, 0, 0x1010;")
    else:
        lines.append(f"cvt.rn.{kind}x2.f32 sg, ${scale}, ${scale}; cvt.rn.{kind}x2.f32 sh, ${scale + 1}, ${scale + 1};")
    if rows == 8:
        lines.append("mov.b32 a1, 0; mov.b32 a3, 0;")
    for w in range(4):
        # Word w of each row holds k-steps 2w (bytes 0-1) and 2w + 1 (bytes 2-3).
        if not table:
            lines.append(_format([op for row in decoded for op in selector_ops(f"w{row}{w}", row)], {}))
        for upper in ("", "u"):
            step = 2 * w + (upper == "u")
            for i, (row, first, second) in enumerate((("g", "a0", "a2"), ("h", "a1", "a3"))[:len(decoded)]):
                if table:
                    byte = 2 * (upper == "u")
                    ops = (table_lookup_ops(f"w{row}{w}", byte, first, f"${decode}", f"t{2 * i}")
                           + table_lookup_ops(f"w{row}{w}", byte + 1, second, f"${decode}", f"t{2 * i + 1}"))
                    lines.append(_format(ops, {}))
                else:
                    lines.append(_format(lookup_ops(f"{row}i3{upper}", f"{row}sl{upper}", first, second), planes))
            if not groups:
                # -0.0 as the addend: one rounding, signed zeros kept (fma has bf16x2 from sm_80 on)
                high = f" fma.rn.{kind}x2 a1, a1, sh, nz; fma.rn.{kind}x2 a3, a3, sh, nz;" if rows == 16 else ""
                lines.append(f"fma.rn.{kind}x2 a0, a0, sg, nz; fma.rn.{kind}x2 a2, a2, sg, nz;" + high)
            group, at = divmod(step, 8 // max(groups, 1))
            for tile in range(tiles):
                d = ", ".join(f"{'p' if groups else 'd'}{4 * tile + i}" for i in range(4))
                c = "z, z, z, z" if groups and at == 0 else d
                lines.append(f"mov.b64 {{b0, b1}}, ${acts + 8 * tile + step}; "
                             f"mma.sync.aligned.m16n8k16.row.col.f32.{kind}.{kind}.f32 "
                             f"{{{d}}}, {{a0, a1, a2, a3}}, {{b0, b1}}, {{{c}}};")
                if groups and at == 8 // groups - 1:  # the group's block is summed: scale it in
                    scaled = range(4) if rows == 16 else range(2)  # rows 8-15 of 8-row programs are empty
                    lines.append(" ".join(f"fma.rn.f32 d{4 * tile + i}, p{4 * tile + i}, "
                                          f"${scale + 2 * group + i // 2}, d{4 * tile + i};" for i in scaled))
    lines.append(" ".join(f"mov.f32 ${i}, d{i};" for i in range(4 * tiles)) + " }")
    return "\n".join(lines)


@functools.cache
def segment_constraints(tiles: int, shared_scales: bool, groups: int = 0) -> str:
    """The operand constraints of ``segment_asm``."""
    scales = ["r"] * 2 if shared_scales else ["f"] * 2 * max(groups, 1)
    return ",".join(["=f"] * (4 * tiles) + ["l"] * (4 + 8 * tiles) + ["r"] * 8 + scales + ["f"] * (4 * tiles))


# The table is a static shared array of the kernel; declared once (one element per thread), its
# address serves the fill and every lookup.
_DECLARE = tl.constexpr("{ .shared .align 16 .b8 nf4_pair_table[32768]; mov.u32 $0, nf4_pair_table; }")
_FILL = tl.constexpr("{ .reg .b32 a, c, l4, base;\n"
                     + _format(table_fill_ops("$1", "$2", "$3", "$4"), {}) + "\nmov.b32 $0, 0; }")


@triton.jit
def _byte_planes(code_ptr, first, DT: tl.constexpr):
    """Codebook entries ``first .. first + 7`` in DT as byte planes ``[1, 2]`` int32: element e holds
    the low (then high) bytes of entries ``first + 4e .. first + 4e + 3``, entry j in byte j."""
    e = tl.arange(0, 2)[None, :, None]
    j = tl.arange(0, 4)[None, None, :]
    bits = tl.load(code_ptr + first + 4 * e + j).to(DT).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    # the bytes do not overlap, so the sums are bitwise ors
    return tl.sum((bits & 0xFF) << (8 * j), axis=2), tl.sum((bits >> 8) << (8 * j), axis=2)


@triton.jit
def _fill_table(code_ptr, NW: tl.constexpr, DT: tl.constexpr):
    """Writes the shared pair table (every program, once); returns its address."""
    tl.static_assert(NW <= 8, "the table fill gives each thread whole entries")
    t = tl.arange(0, NW * 32)
    table = tl.inline_asm_elementwise(_DECLARE, "=r,r", [t], dtype=tl.int32, is_pure=True, pack=1)
    for j in tl.static_range(256 // (NW * 32)):
        entry = t + j * NW * 32
        hi = tl.load(code_ptr + (entry >> 4)).to(DT).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        lo = tl.load(code_ptr + (entry & 15)).to(DT).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        # a pair as the A fragment takes it: element 2j (the high nibble) in the low half
        tl.inline_asm_elementwise(_FILL, "=r,r,r,r,r", [entry, t % 32, table, hi | (lo << 16)], dtype=tl.int32,
                                  is_pure=False, pack=1)
    tl.debug_barrier()
    return tl.max(table, axis=0)


_STORE_SHARED = tl.constexpr("{ .reg .pred p; setp.ne.b32 p, $3, 0; @p st.shared.b32 [$1], $2; mov.b32 $0, 0; }")


def scale_blocks(segments: int, blocksize: int) -> int:
    """Quantization blocks a program's ``segments`` (whole 128-column segments) touch at most; a
    block longer than a segment may straddle the range's start."""
    return -(-segments * SEGMENT // blocksize) + (blocksize > SEGMENT)


@functools.cache
def scale_table_decl(blocks: int) -> str:
    """PTX declaring ``_fill_scales``' table for ``blocks`` blocks (32 bytes each; the size is fixed
    per compiled kernel) and returning its address."""
    return f"{{ .shared .align 16 .b8 nf4_scale_table[{32 * blocks}]; mov.u32 $0, nf4_scale_table; }}"


@triton.jit
def _fill_scales(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, group, seg0, seg_end, row_end, KB,
                 BS: tl.constexpr, NESTED: tl.constexpr, DT: tl.constexpr, NW: tl.constexpr, BLOCKS: tl.constexpr,
                 DECLARE: tl.constexpr, ROWS: tl.constexpr):
    """Decodes the block scales of the program's rows and segments once, into shared memory as
    DT pairs: block b's entry for lane row g is 4 bytes at ``(b * 8 + g) * 4``, row g's scale in
    the low half and row g + 8's in the high one (the segment PTX spreads each over a pair), so a
    warp's 32 lanes read 64 bytes per segment. Blocks past K or the program's rows (``row_end``)
    hold 0. All loads go out at once (``BLOCKS``: a power of two covering the blocks); returns the
    table's address."""
    g = tl.arange(0, 8)[:, None]
    b = tl.arange(0, BLOCKS)[None, :]
    # declared once per thread (a [8, BLOCKS] operand would repeat the declaration per element)
    t = tl.arange(0, NW * 32)
    table = tl.max(tl.inline_asm_elementwise(DECLARE, "=r,r", [t], dtype=tl.int32, is_pure=True, pack=1), axis=0)
    blk0 = seg0 * 128 // BS
    used = b < (seg_end * 128 + BS - 1) // BS - blk0
    bits = tl.zeros((8, BLOCKS), tl.int32)
    for half in tl.static_range(2):  # rows g, then rows g + 8
        row = group * ROWS + g + 8 * half
        ok = used & (row < row_end) & (blk0 + b < KB)
        q, outer = scale_bytes(absmax_ptr, nested_absmax_ptr, row.to(tl.int64) * KB + blk0 + b, ok, NESTED)
        scale = decode_scales(nested_code_ptr, offset, q, outer, ok, NESTED).to(DT).to(tl.int16, bitcast=True)
        bits = bits | ((scale.to(tl.int32) & 0xFFFF) << (16 * half))
    tl.inline_asm_elementwise(_STORE_SHARED, "=r,r,r,r", [table + (b * 8 + g) * 4, bits, used.to(tl.int32)],
                              dtype=tl.int32, is_pure=False, pack=1)
    tl.debug_barrier()
    return table


# Weight loads with ``L2_HINT`` (see the module docstring): Triton's loads cannot carry the PTX
# prefetch-size qualifier, hence inline PTX; a false predicate leaves the words 0, as a masked load.
_HINTED_PAIR = tl.constexpr("ld.global.L2::256B.v2.b64 {$0, $1}, [$2];")
_HINTED_PAIR_MASKED = tl.constexpr("{ .reg .pred p; setp.ne.b32 p, $3, 0; mov.b64 $0, 0; mov.b64 $1, 0; "
                                   "@p ld.global.L2::256B.v2.b64 {$0, $1}, [$2]; }")
_HINTED_WORD = tl.constexpr("ld.global.L2::256B.b64 $0, [$1];")
_HINTED_WORD_MASKED = tl.constexpr("{ .reg .pred p; setp.ne.b32 p, $2, 0; mov.b64 $0, 0; "
                                   "@p ld.global.L2::256B.b64 $0, [$1]; }")


@triton.jit
def _flat(x):
    """``[R, 1] -> [R]``: every thread keeps its rows."""
    return tl.reshape(x, (x.shape[0],))


@triton.jit
def _word(ptr, offsets, mask, L2_HINT: tl.constexpr):
    """The int64 at ``ptr + offsets`` ([R, 1]) as [R]; 0 where ``mask`` (``None``: none) is false."""
    address = ptr + _flat(offsets)
    if L2_HINT:
        if mask is None:
            word = tl.inline_asm_elementwise(_HINTED_WORD, "=l,l", [address], dtype=tl.int64, is_pure=False, pack=1)
        else:
            word = tl.inline_asm_elementwise(_HINTED_WORD_MASKED, "=l,l,r", [address, _flat(mask).to(tl.int32)],
                                             dtype=tl.int64, is_pure=False, pack=1)
    elif mask is None:
        word = tl.load(address)
    else:
        word = tl.load(address, mask=_flat(mask), other=0)
    return word


@triton.jit
def _halves(ptr, first, second, mask_first, mask_second, L2_HINT: tl.constexpr):
    """Words ``first`` and ``second`` ([R, 1] each) as two [R] halves, joined where the segment uses
    them (see ``_queued_words``); a ``None`` mask loads without one."""
    return _word(ptr, first, mask_first, L2_HINT), _word(ptr, second, mask_second, L2_HINT)


@triton.jit
def _contiguous(ptr, first, mask, L2_HINT: tl.constexpr):
    """Words ``first`` and ``first + 1`` ([R, 1], ``first`` even: one 16-byte load); ``mask=None``
    loads without one. Triton's load gives them as one [R, 2] tensor on one thread; the hinted PTX
    as two [R] halves, joined where the segment uses them (see ``_queued_words``)."""
    if L2_HINT:
        address = ptr + _flat(first)
        if mask is None:
            words = tl.inline_asm_elementwise(_HINTED_PAIR, "=l,=l,l", [address], dtype=(tl.int64, tl.int64),
                                              is_pure=False, pack=1)
        else:
            words = tl.inline_asm_elementwise(_HINTED_PAIR_MASKED, "=l,=l,l,r", [address, _flat(mask).to(tl.int32)],
                                              dtype=(tl.int64, tl.int64), is_pure=False, pack=1)
    elif mask is None:
        words = tl.load(ptr + (first + tl.arange(0, 2)[None, :]))
    else:
        words = tl.load(ptr + (first + tl.arange(0, 2)[None, :]), mask=mask, other=0)
    return words


@triton.jit
def _no_words(words, HALVES: tl.constexpr):
    """Zeros shaped like ``words`` (a [R, 2] tensor, or with ``HALVES`` two [R] halves)."""
    if HALVES:
        zeros = (tl.zeros_like(words[0]), tl.zeros_like(words[1]))
    else:
        zeros = tl.zeros_like(words)
    return zeros


@triton.jit
def _queued_words(queue, at: tl.constexpr, HALVES: tl.constexpr):
    """Rows g and g + 8's words from ``queue[at:]`` as [R, 2] pairs on one thread, the layout the
    segment PTX needs. Halves are queued apart and joined only here: joined when loaded, the
    queue of the steady loop was carried in another layout and converted through shared memory
    every step (Triton 3.6)."""
    if HALVES:
        words = tl.join(queue[at], queue[at + 1]), tl.join(queue[at + 2], queue[at + 3])
    else:
        words = queue[at], queue[at + 1]
    return words


@triton.jit
def _lane_columns(seg, c, GROUPS: tl.constexpr):
    """The thread's first columns for k-steps 0-3 and 4-7 of segment ``seg``: its 32 codes are
    columns ``32c .. 32c + 31``, or with ``GROUPS == 2`` (one 64-column block per group)
    ``16c .. 16c + 15`` of each half, so that the four lanes of a k-step read one block."""
    if GROUPS == 2:
        lower = seg * 128 + 16 * c
        upper = lower + 64
    else:
        lower = seg * 128 + 32 * c
        upper = lower + 16
    return lower, upper


@triton.jit
def _activations(x_ptr, lower, upper, ok, ok_upper):
    """A tile's B fragments for one segment: int64 ``lower + 2p + e`` (4 activations) is k-step
    2p + e for p = 0, 1, and ``upper + 2(p - 2) + e`` for p = 2, 3 (masked by ``ok_upper``);
    ``ok=None`` loads without masks."""
    e = tl.arange(0, 2)[None, :]
    if ok is None:
        out = (tl.load(x_ptr + lower + e), tl.load(x_ptr + lower + 2 + e), tl.load(x_ptr + upper + e),
               tl.load(x_ptr + upper + 2 + e))
    else:
        out = (tl.load(x_ptr + lower + e, mask=ok, other=0), tl.load(x_ptr + lower + 2 + e, mask=ok, other=0),
               tl.load(x_ptr + upper + e, mask=ok_upper, other=0),
               tl.load(x_ptr + upper + 2 + e, mask=ok_upper, other=0))
    return out


@triton.jit
def _word_offset(row, seg, word, row_words, TILED: tl.constexpr):
    """Offset of int64 ``word`` (0-7) of segment ``seg`` of weight row ``row`` in the packed codes:
    row-major, or with TILED in tile order (1 KB tiles of 16 rows x 8 words, row-major over the
    weight). ``seg`` 0 with ``word`` up to the row's end also works row-major."""
    if TILED:
        offset = ((row // 16).to(tl.int64) * (row_words // 8) + seg) * 128 + (row % 16) * 8 + word
    else:
        offset = row.to(tl.int64) * row_words + seg * 8 + word
    return offset


@triton.jit
def _fetch_weights(packed_ptr, absmax_ptr, nested_absmax_ptr, seg, scale_seg, seg_end, c, row, row_end, K, KB,
                   BS: tl.constexpr, NESTED: tl.constexpr, SHARED_SCALES: tl.constexpr, ROWS: tl.constexpr,
                   MASKED: tl.constexpr, GROUPS: tl.constexpr, L2_HINT: tl.constexpr, TILED: tl.constexpr):
    """One segment's weight loads: the packed words of rows g and g + 8 (16 bytes each; of row g
    alone with 8 rows per program) and, unless the scales come from shared memory, the
    block-scale bytes of segment ``scale_seg`` (``seg``, or with ``SCALE_AHEAD`` the warp's next
    one; see ``_segment_scale_bytes``). MASKED:
    anything past the segment range, K or the program's rows reads as 0. Otherwise no masks: rows
    past the program's end read its last row and columns past the row end its last codes, which
    meet zero activations or land in outputs never stored. The thread's columns come from
    ``_lane_columns``; L2_HINT loads the words with the L2 prefetch-size hint."""
    # Contiguous pairs' offsets are written so that the compiler can prove 16-byte alignment (rows
    # of KB * BS codes, BS >= 32): every pair then is one vector load held by one thread, the layout
    # the PTX needs. The two halves of GROUPS == 2, and hinted words, are queued as halves instead.
    row_words = KB * (BS // 16)  # int64 per weight row
    lower, upper = _lane_columns(seg, c, GROUPS)  # [R, 1]
    ok, ok_upper = (seg < seg_end) & (lower < K), (seg < seg_end) & (upper < K)
    HALVES: tl.constexpr = L2_HINT or GROUPS == 2
    apart = 64 if TILED else 8 * row_words  # from a word of row g to the same word of row g + 8
    if not MASKED:  # reads clamped to the row's last segment (tiled rows hold whole ones) or word
        if TILED:
            seg, first, second = tl.minimum(seg, row_words // 8 - 1), c, c + 4
            pair = 2 * c
        else:
            first, second = tl.minimum(lower // 16, row_words - 1), tl.minimum(upper // 16, row_words - 1)
            pair = tl.minimum(seg * 8 + 2 * c, row_words - 2)
            seg = 0
    if GROUPS == 2:
        if MASKED:
            word = _word_offset(row, seg, c, row_words, TILED)
            wg = _halves(packed_ptr, word, word + 4, ok & (row < row_end), ok_upper & (row < row_end), L2_HINT)
            wh = _no_words(wg, HALVES)  # with 8 rows per program, rows g + 8 are the next program's
            if ROWS == 16:
                wh = _halves(packed_ptr, word + apart, word + apart + 4, ok & (row + 8 < row_end),
                             ok_upper & (row + 8 < row_end), L2_HINT)
        else:
            rg = tl.minimum(row, row_end - 1)
            wg = _halves(packed_ptr, _word_offset(rg, seg, first, row_words, TILED),
                         _word_offset(rg, seg, second, row_words, TILED), None, None, L2_HINT)
            wh = _no_words(wg, HALVES)
            if ROWS == 16:
                rh = tl.minimum(row + 8, row_end - 1)
                wh = _halves(packed_ptr, _word_offset(rh, seg, first, row_words, TILED),
                             _word_offset(rh, seg, second, row_words, TILED), None, None, L2_HINT)
    else:
        if MASKED:
            word = _word_offset(row, seg, 2 * c, row_words, TILED)
            wg = _contiguous(packed_ptr, word, ok & (row < row_end), L2_HINT)
            wh = _no_words(wg, HALVES)  # with 8 rows per program, rows g + 8 are the next program's
            if ROWS == 16:
                wh = _contiguous(packed_ptr, word + apart, ok & (row + 8 < row_end), L2_HINT)
        else:
            wg = _contiguous(packed_ptr, _word_offset(tl.minimum(row, row_end - 1), seg, pair, row_words, TILED),
                             None, L2_HINT)
            wh = _no_words(wg, HALVES)
            if ROWS == 16:
                wh = _contiguous(packed_ptr, _word_offset(tl.minimum(row + 8, row_end - 1), seg, pair, row_words,
                                                          TILED), None, L2_HINT)
    loads = wg + wh if HALVES else (wg, wh)
    if not SHARED_SCALES:
        loads = loads + _segment_scale_bytes(absmax_ptr, nested_absmax_ptr, scale_seg, seg_end, c, row, row_end, K,
                                             KB, BS, NESTED, MASKED, GROUPS)
    return loads


@triton.jit
def _segment_scale_bytes(absmax_ptr, nested_absmax_ptr, seg, seg_end, c, row, row_end, K, KB, BS: tl.constexpr,
                         NESTED: tl.constexpr, MASKED: tl.constexpr, GROUPS: tl.constexpr):
    """The block-scale loads of rows g and g + 8 for segment ``seg`` (``scale_bytes``' pair; with
    GROUPS, a pair per group: the blocks of columns 0-63 and 64-127), masked or clamped as the
    words of ``_fetch_weights``."""
    rows = row + 8 * tl.arange(0, 2)[None, :]
    lower, upper = _lane_columns(seg, c, GROUPS)
    loads = ()
    for group in tl.static_range(max(GROUPS, 1)):  # group 1 (GROUPS == 2) is the upper half's block
        column = upper if group == 1 else lower
        if MASKED:
            blocks = rows * KB + column // BS
            ok_block = (seg < seg_end) & (column < K) & (rows < row_end)
        else:
            blocks = tl.minimum(rows, row_end - 1) * KB + tl.minimum(column // BS, KB - 1)
            ok_block = None
        loads = loads + scale_bytes(absmax_ptr, nested_absmax_ptr, blocks, ok_block, NESTED)
    return loads


@triton.jit
def _decoded_scales(loads, seg, seg_end, c, row, row_end, K, nested_code_ptr, offset, NESTED: tl.constexpr,
                    MASKED: tl.constexpr, GROUPS: tl.constexpr):
    """fp32 block scales of rows g and g + 8 (per group) from ``_segment_scale_bytes``' loads for
    ``seg``; MASKED: 0 past the range, K or the program's rows."""
    columns = _lane_columns(seg, c, GROUPS)
    scales = ()
    for group in tl.static_range(max(GROUPS, 1)):
        ok = None
        if MASKED:
            ok = (seg < seg_end) & (columns[group] < K) & (row + 8 * tl.arange(0, 2)[None, :] < row_end)
        scales = scales + (decode_scales(nested_code_ptr, offset, loads[2 * group], loads[2 * group + 1], ok, NESTED),)
    return scales


@triton.jit
def _fetch_activations(x_ptr, seg, seg_end, c, row, M, K, KB, BS: tl.constexpr, TILES: tl.constexpr,
                       MASKED: tl.constexpr, GROUPS: tl.constexpr):
    """One segment's B fragments, per tile four int64 pairs (see ``_activations``), for the
    thread's columns (``_lane_columns``). MASKED zeroes columns past the segment range or K
    and rows past M; otherwise rows past M read row M - 1 (outputs never stored) and columns past
    K the row's last ones (meeting weights never used)."""
    token = row % 8  # B column n = g: activation row g (tile 0), g + 8 (tile 1)
    x_row = KB * (BS // 4)  # int64 per activation row (dense rows)
    lower, upper = _lane_columns(seg, c, GROUPS)
    if MASKED:
        ok, ok_upper = (seg < seg_end) & (lower < K), (seg < seg_end) & (upper < K)
        x = token.to(tl.int64) * x_row
        x0, x1, x2, x3 = _activations(x_ptr, x + lower // 4, x + upper // 4, ok & (token < M), ok_upper & (token < M))
        if TILES == 2:
            y = x + 8 * x_row
            y0, y1, y2, y3 = _activations(x_ptr, y + lower // 4, y + upper // 4, ok & (token + 8 < M),
                                          ok_upper & (token + 8 < M))
    else:  # each half clamped to the row's last 16 activations
        lower, upper = tl.minimum(lower // 4, x_row - 4), tl.minimum(upper // 4, x_row - 4)
        x = tl.minimum(token, M - 1).to(tl.int64) * x_row
        x0, x1, x2, x3 = _activations(x_ptr, x + lower, x + upper, None, None)
        if TILES == 2:
            y = tl.minimum(token + 8, M - 1).to(tl.int64) * x_row
            y0, y1, y2, y3 = _activations(x_ptr, y + lower, y + upper, None, None)
    if TILES == 1:
        y0, y1, y2, y3 = x0, x1, x2, x3
    return x0, x1, x2, x3, y0, y1, y2, y3


@triton.jit
def _warp_sum(acc, NW: tl.constexpr):
    """One accumulator's warps' partial sums added: [32, 2], lane (g, c) as in the kernel."""
    return tl.sum(tl.reshape(acc, (NW, 32, 2)), axis=0)


@triton.jit
def _store(acc, token, row, M, N, out_ptr, bias_ptr, stride_o, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Stores one warp-summed accumulator (fp32 partials when split)."""
    mask = (token < M) & (row < N)
    if SPLIT == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + row, mask=row < N, other=0.0).to(tl.float32)
        dst = out_ptr + token.to(tl.int64) * stride_o + row
    else:
        dst = out_ptr + (tl.program_id(1) * M + token).to(tl.int64) * N + row
    tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _store_all(acc_g0, acc_h0, acc_g1, acc_h1, token, out_row, M, N, out_ptr, bias_ptr, stride_o,
               SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, ROWS: tl.constexpr, TILES: tl.constexpr):
    """Stores the program's warp-summed accumulators: weight rows g (and g + 8), activation rows
    2c + e (and + 8)."""
    _store(acc_g0, token, out_row, M, N, out_ptr, bias_ptr, stride_o, SPLIT, HAS_BIAS)
    if ROWS == 16:
        _store(acc_h0, token, out_row + 8, M, N, out_ptr, bias_ptr, stride_o, SPLIT, HAS_BIAS)
    if TILES == 2:
        _store(acc_g1, token + 8, out_row, M, N, out_ptr, bias_ptr, stride_o, SPLIT, HAS_BIAS)
        if ROWS == 16:
            _store(acc_h1, token + 8, out_row + 8, M, N, out_ptr, bias_ptr, stride_o, SPLIT, HAS_BIAS)


@triton.jit
def _tail_slot(token, row, part, row0, tail_rows):
    """Offsets of tail part ``part``'s fp32 partials, laid out [parts, tail rows, 16 activation rows]."""
    return (part * tail_rows + (row - row0)).to(tl.int64) * 16 + token


@triton.jit
def _stash(acc, token, row, M, N, ws_ptr, part, row0, tail_rows):
    tl.store(ws_ptr + _tail_slot(token, row, part, row0, tail_rows), acc, mask=(token < M) & (row < N))


@triton.jit
def _tail_total(acc, token, row, M, N, ws_ptr, row0, tail_rows, PARTS: tl.constexpr):
    """The parts' partials of one accumulator added in part order, so every run gives the same sum
    (read from L2: other programs wrote them)."""
    total = tl.zeros_like(acc)
    for part in tl.static_range(PARTS):
        total += tl.load(ws_ptr + _tail_slot(token, row, part, row0, tail_rows), mask=(token < M) & (row < N),
                         other=0.0, cache_modifier=".cg")
    return total


@triton.jit
def _finish_tail(acc_g0, acc_h0, acc_g1, acc_h1, token, out_row, M, N, out_ptr, bias_ptr, stride_o, ws_ptr,
                 count_ptr, full_groups, group, ROWS: tl.constexpr, TILES: tl.constexpr, PARTS: tl.constexpr,
                 HAS_BIAS: tl.constexpr):
    """A tail program (see :func:`matmul`'s ``BALANCE``): stashes its fp32 partials; the last of its
    row group's PARTS programs to count in adds them all and stores the rows."""
    row0 = full_groups * ROWS
    tail_rows = N - row0
    part = (tl.program_id(0) - full_groups) % PARTS
    _stash(acc_g0, token, out_row, M, N, ws_ptr, part, row0, tail_rows)
    if ROWS == 16:
        _stash(acc_h0, token, out_row + 8, M, N, ws_ptr, part, row0, tail_rows)
    if TILES == 2:
        _stash(acc_g1, token + 8, out_row, M, N, ws_ptr, part, row0, tail_rows)
        if ROWS == 16:
            _stash(acc_h1, token + 8, out_row + 8, M, N, ws_ptr, part, row0, tail_rows)
    tl.debug_barrier()  # every warp's partials are written before the count says so
    if tl.atomic_add(count_ptr + (group - full_groups), 1, sem="acq_rel", scope="gpu") == PARTS - 1:
        tl.debug_barrier()
        acc_g0 = _tail_total(acc_g0, token, out_row, M, N, ws_ptr, row0, tail_rows, PARTS)
        if ROWS == 16:
            acc_h0 = _tail_total(acc_h0, token, out_row + 8, M, N, ws_ptr, row0, tail_rows, PARTS)
        if TILES == 2:
            acc_g1 = _tail_total(acc_g1, token + 8, out_row, M, N, ws_ptr, row0, tail_rows, PARTS)
            if ROWS == 16:
                acc_h1 = _tail_total(acc_h1, token + 8, out_row + 8, M, N, ws_ptr, row0, tail_rows, PARTS)
        _store_all(acc_g0, acc_h0, acc_g1, acc_h1, token, out_row, M, N, out_ptr, bias_ptr, stride_o, 1, HAS_BIAS,
                   ROWS, TILES)
        tl.atomic_xchg(count_ptr + (group - full_groups), 0, sem="relaxed", scope="gpu")  # ready for the next launch


@triton.jit
def _segment(queue, acts, accs, slot: tl.constexpr, MASKED: tl.constexpr, seg, seg_end, c, r, row, row_end, M, K, KB,
             x_ptr, packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, planes, scales, blk0, zero,
             BS: tl.constexpr, NW: tl.constexpr, TILES: tl.constexpr, NESTED: tl.constexpr, DEPTH: tl.constexpr,
             X_AHEAD: tl.constexpr, SHARED_SCALES: tl.constexpr, STEADY: tl.constexpr, ROWS: tl.constexpr,
             GROUPS: tl.constexpr, SEGMENT_ASM: tl.constexpr, CONSTRAINTS: tl.constexpr, L2_HINT: tl.constexpr,
             SCALE_AHEAD: tl.constexpr, TILED: tl.constexpr):
    """One step of a warp's chain: segment ``seg`` from queue slot ``slot``, whose loads are then
    reissued DEPTH segments ahead. MASKED (any segment past the range or K): masked loads, the
    queue rotated, activations at use after a steady phase (its prefetches read past the range
    unmasked, and only zero activations cancel those weights). ``scales``: with SHARED_SCALES the
    shared table's address, with SCALE_AHEAD this segment's decoded block scales (the slot holds
    the scale bytes of the warp's next segment, decoded here for the next step). Returns (queue,
    acts, accs, scales)."""
    HALVES: tl.constexpr = L2_HINT or GROUPS == 2  # weight words queued as halves (see _queued_words)
    PAIRS: tl.constexpr = 4 if HALVES else 2
    WORDS: tl.constexpr = PAIRS if SHARED_SCALES else PAIRS + 2 * max(GROUPS, 1)  # tensors per queued segment
    wg, wh = _queued_words(queue, slot * WORDS, HALVES)
    if SHARED_SCALES:  # the lane's block in the table (block 0's entry past the range: x is 0 there)
        block = (seg * 128 + 32 * c) // BS - blk0
        if MASKED:
            block = tl.where(seg < seg_end, block, 0)
        scale = (zero + (scales + (block * 8 + (r % 32) // 4) * 4),)
    else:
        loads = queue[slot * WORDS + PAIRS:(slot + 1) * WORDS]
        if SCALE_AHEAD:  # the gather behind the next segment's scales runs during this one
            scale = scales
            scales = _decoded_scales(loads, seg + NW, seg_end, c, row, row_end, K, nested_code_ptr, offset, NESTED,
                                     MASKED, GROUPS)
        else:
            scale = _decoded_scales(loads, seg, seg_end, c, row, row_end, K, nested_code_ptr, offset, NESTED, MASKED,
                                    GROUPS)
    # From HBM each warp's chain of segments is bound by load latency: DEPTH stay in flight.
    ahead = _fetch_weights(packed_ptr, absmax_ptr, nested_absmax_ptr, seg + DEPTH * NW,
                           seg + (DEPTH + SCALE_AHEAD) * NW, seg_end, c, row, row_end, K, KB, BS, NESTED, SHARED_SCALES,
                           ROWS, MASKED, GROUPS, L2_HINT, TILED)
    if MASKED:
        queue = queue[WORDS:] + ahead
    else:
        queue = queue[:slot * WORDS] + ahead + queue[(slot + 1) * WORDS:]
    if X_AHEAD and not (MASKED and STEADY):
        x0, x1, x2, x3, y0, y1, y2, y3 = acts
        acts = _fetch_activations(x_ptr, seg + NW, seg_end, c, row, M, K, KB, BS, TILES, MASKED, GROUPS)
    else:
        x0, x1, x2, x3, y0, y1, y2, y3 = _fetch_activations(x_ptr, seg, seg_end, c, row, M, K, KB, BS, TILES, MASKED,
                                                            GROUPS)
    low01, low23, high01, high23 = planes
    acc_g0, acc_h0, acc_g1, acc_h1 = accs
    operands = (wg, wh, x0, x1, x2, x3)
    if TILES == 2:
        operands = operands + (y0, y1, y2, y3)
    operands = operands + (low01, low23, high01, high23) + scale
    if TILES == 1:
        acc_g0, acc_h0 = tl.inline_asm_elementwise(SEGMENT_ASM, CONSTRAINTS, operands + (acc_g0, acc_h0),
                                                   dtype=(tl.float32,) * 2, is_pure=True, pack=2)
    else:
        acc_g0, acc_h0, acc_g1, acc_h1 = tl.inline_asm_elementwise(
            SEGMENT_ASM, CONSTRAINTS, operands + (acc_g0, acc_h0, acc_g1, acc_h1), dtype=(tl.float32,) * 4,
            is_pure=True, pack=2)
    return queue, acts, (acc_g0, acc_h0, acc_g1, acc_h1), scales


@triton.jit(do_not_specialize=["M", "N", "K", "KB", "stride_o", "segments_per_split", "full_groups"])
def _skinny_kernel(x_ptr, packed_ptr, code_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, bias_ptr,
                   out_ptr, M, N, K, KB, stride_o, segments_per_split, ws_ptr, count_ptr, full_groups,
                   TAIL: tl.constexpr, BS: tl.constexpr, NW: tl.constexpr, TILES: tl.constexpr, SPLIT: tl.constexpr,
                   HAS_BIAS: tl.constexpr, NESTED: tl.constexpr, F16: tl.constexpr, TABLE: tl.constexpr,
                   DEPTH: tl.constexpr, X_AHEAD: tl.constexpr, SHARED_SCALES: tl.constexpr, SCALE_BLOCKS: tl.constexpr,
                   SCALE_DECL: tl.constexpr, SEGMENT_ASM: tl.constexpr, CONSTRAINTS: tl.constexpr,
                   ROWS: tl.constexpr, STEADY: tl.constexpr, GROUPS: tl.constexpr, L2_HINT: tl.constexpr,
                   UNROLL: tl.constexpr, SCALE_AHEAD: tl.constexpr, TILED: tl.constexpr):
    # x_ptr and packed_ptr are int64 views (4 activations, 16 codes). A thread's tensors are
    # [NW * 32, 2], row r on lane r % 32 of warp r // 32 (the layout the PTX relies on), a pair per
    # thread: element e of the scales is weight row g + 8e's, of an accumulator activation row 2c + e.
    # Program -> row group and segment range: along K with SPLIT; with TAIL, the programs past
    # full_groups share the last row groups, TAIL programs (parts of segments_per_split) each.
    group, seg0 = tl.program_id(0), tl.program_id(1) * segments_per_split
    seg_end = tl.minimum(seg0 + segments_per_split, (K + 127) // 128)
    if TAIL > 0:
        tail = tl.program_id(0) >= full_groups
        t = tl.maximum(tl.program_id(0) - full_groups, 0)
        group = tl.where(tail, full_groups + t // TAIL, group)
        seg0 = tl.where(tail, t % TAIL * segments_per_split, 0)
        seg_end = tl.where(tail, tl.minimum(seg0 + segments_per_split, (K + 127) // 128), (K + 127) // 128)
    r = tl.arange(0, NW * 32)[:, None]
    warp = r // 32
    c = r % 4
    row = group * ROWS + (r % 32) // 4
    row_end = tl.minimum(N, group * ROWS + ROWS)  # with 8 rows, rows g + 8 are the next program's
    DT: tl.constexpr = tl.float16 if F16 else tl.bfloat16
    zero = tl.zeros((NW * 32, 2), tl.int32)
    # The first segments' loads go out before the table fills, which then run under their latency.
    # ``queue`` holds the weight loads of the next DEPTH segments (2 tensors each); activations,
    # read by every warp and so mostly L1 hits, are loaded X_AHEAD (0 or 1) segments ahead.
    # With SCALE_AHEAD each queued segment carries the scale bytes of the warp's segment after it.
    seg = seg0 + warp
    queue = _fetch_weights(packed_ptr, absmax_ptr, nested_absmax_ptr, seg, seg + SCALE_AHEAD * NW, seg_end, c, row,
                           row_end, K, KB, BS, NESTED, SHARED_SCALES, ROWS, True, GROUPS, L2_HINT, TILED)
    for j in tl.static_range(1, DEPTH):
        queue = queue + _fetch_weights(packed_ptr, absmax_ptr, nested_absmax_ptr, seg + j * NW,
                                       seg + (j + SCALE_AHEAD) * NW, seg_end, c, row, row_end, K, KB, BS, NESTED,
                                       SHARED_SCALES, ROWS, True, GROUPS, L2_HINT, TILED)
    acts = zero  # unused without X_AHEAD
    if X_AHEAD:
        acts = _fetch_activations(x_ptr, seg, seg_end, c, row, M, K, KB, BS, TILES, True, GROUPS)
    scales, blk0 = zero, 0
    if SCALE_AHEAD:  # the first segment's scales, the rest decoded a step ahead
        first = _segment_scale_bytes(absmax_ptr, nested_absmax_ptr, seg, seg_end, c, row, row_end, K, KB, BS, NESTED,
                                     True, GROUPS)
        scales = _decoded_scales(first, seg, seg_end, c, row, row_end, K, nested_code_ptr, offset, NESTED, True, GROUPS)
    if SHARED_SCALES:
        scales = _fill_scales(absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, group, seg0, seg_end, row_end, KB,
                              BS, NESTED, DT, NW, SCALE_BLOCKS, SCALE_DECL, ROWS)
        blk0 = seg0 * 128 // BS
    if TABLE:  # the segment PTX reads the lane's table address from the first decode operand
        lane_entry = zero + (_fill_table(code_ptr, NW, DT) + (r % 32) * 4)  # copy l of an entry is on bank l
        planes = (lane_entry, lane_entry, lane_entry, lane_entry)
    else:
        low01, high01 = _byte_planes(code_ptr, 0, DT)
        low23, high23 = _byte_planes(code_ptr, 8, DT)
        planes = (zero + low01, zero + low23, zero + high01, zero + high23)
    # weight row g, activation rows 0-7 (tile 0); weight row g + 8; the same for activation rows 8-15 (tile 1)
    acc = tl.zeros((NW * 32, 2), tl.float32)
    accs = (acc, acc, acc, acc)
    # With STEADY the steps in which every warp's segment is whole and in range run without masks,
    # DEPTH at a time so that each refills its own queue slot (no register moves); the rest, or all
    # steps without STEADY, mask their loads and rotate the queue.
    steady = 0
    if STEADY:
        steady = tl.maximum(tl.minimum(seg_end, K // 128) - seg0, 0) // (NW * DEPTH)
        for _ in range(steady):
            for slot in tl.static_range(DEPTH):
                queue, acts, accs, scales = _segment(
                    queue, acts, accs, slot, False, seg, seg_end, c, r, row, row_end, M, K, KB, x_ptr, packed_ptr,
                    absmax_ptr, nested_absmax_ptr, nested_code_ptr, offset, planes, scales, blk0, zero, BS, NW, TILES,
                    NESTED, DEPTH, X_AHEAD, SHARED_SCALES, STEADY, ROWS, GROUPS, SEGMENT_ASM, CONSTRAINTS, L2_HINT,
                    SCALE_AHEAD, TILED)
                seg += NW
    # The masked steps, UNROLL per iteration: with 2, the queue's two register sets take turns
    # instead of the next segment's loads being moved into place at every step.
    masked = (seg_end - seg0 + NW - 1) // NW - steady * DEPTH
    for _ in range(masked // UNROLL):
        for _u in tl.static_range(UNROLL):
            queue, acts, accs, scales = _segment(
                queue, acts, accs, 0, True, seg, seg_end, c, r, row, row_end, M, K, KB, x_ptr, packed_ptr, absmax_ptr,
                nested_absmax_ptr, nested_code_ptr, offset, planes, scales, blk0, zero, BS, NW, TILES, NESTED, DEPTH,
                X_AHEAD, SHARED_SCALES, STEADY, ROWS, GROUPS, SEGMENT_ASM, CONSTRAINTS, L2_HINT, SCALE_AHEAD, TILED)
            seg += NW
    for _ in range(masked % UNROLL):
        queue, acts, accs, scales = _segment(
            queue, acts, accs, 0, True, seg, seg_end, c, r, row, row_end, M, K, KB, x_ptr, packed_ptr, absmax_ptr,
            nested_absmax_ptr, nested_code_ptr, offset, planes, scales, blk0, zero, BS, NW, TILES, NESTED, DEPTH,
            X_AHEAD, SHARED_SCALES, STEADY, ROWS, GROUPS, SEGMENT_ASM, CONSTRAINTS, L2_HINT, SCALE_AHEAD, TILED)
        seg += NW
    acc_g0, acc_h0, acc_g1, acc_h1 = accs
    acc_g0, acc_h0 = _warp_sum(acc_g0, NW), _warp_sum(acc_h0, NW)
    acc_g1, acc_h1 = _warp_sum(acc_g1, NW), _warp_sum(acc_h1, NW)
    # Lane (g, c) of an accumulator holds weight row g (or g + 8), activation rows 2c + e (+ 8).
    lane = tl.arange(0, 32)[:, None]
    out_row = group * ROWS + lane // 4
    token = 2 * (lane % 4) + tl.arange(0, 2)[None, :]
    if TAIL > 0:
        if tl.program_id(0) >= full_groups:
            _finish_tail(acc_g0, acc_h0, acc_g1, acc_h1, token, out_row, M, N, out_ptr, bias_ptr, stride_o, ws_ptr,
                         count_ptr, full_groups, group, ROWS, TILES, TAIL, HAS_BIAS)
        else:
            _store_all(acc_g0, acc_h0, acc_g1, acc_h1, token, out_row, M, N, out_ptr, bias_ptr, stride_o, SPLIT,
                       HAS_BIAS, ROWS, TILES)
    else:
        _store_all(acc_g0, acc_h0, acc_g1, acc_h1, token, out_row, M, N, out_ptr, bias_ptr, stride_o, SPLIT, HAS_BIAS,
                   ROWS, TILES)


@functools.cache  # asked on every dispatch; a device's capability never changes
def _has_bf16_mma(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device) >= (8, 0)


# Packed codes and activations must start on 16 bytes: Triton then knows the pairs of int64 a
# thread loads are one 16-byte vector and gives each thread a whole pair, the lane mapping the
# segment PTX's mma needs. Compiled with neither pointer 16-byte aligned, it spread each pair over
# two lanes, which the mma fragments cannot use (tests/test_skinny_layout.py checks the mapping).
ALIGNMENT = 16


def late_scale_groups(blocksize: int) -> int:
    """Scale groups per segment with ``LATE_SCALE``: two 64-column blocks, one block of 128 or more
    columns, 0 (scale before the mma) for 32-column blocks, which would split a k-step's lanes."""
    return 2 if blocksize == 64 else 1 if blocksize >= 128 else 0


def supports(x: torch.Tensor, weight: NF4Weight) -> bool:
    """Whether :func:`matmul` runs ``x [m, k]`` here: CUDA sm_80+, bf16/fp16, m <= 16, whole
    blocks of at least 32 per row, packed codes 16-byte aligned."""
    return (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and 1 <= x.shape[0] <= MAX_ROWS
            and weight.row_aligned and weight.blocksize >= 32 and weight.packed.data_ptr() % ALIGNMENT == 0
            and _has_bf16_mma(x.device))


def tail_plan(groups: int, segments: int, warps: int, sms: int) -> tuple[int, int, int] | None:
    """``(full groups, parts, segments per part)`` for ``BALANCE``; None where nothing evens out.

    One program per row group leaves ``groups % sms`` SMs a program more than the rest (11008 rows:
    688 programs, 28 of 132 SMs run 6 and the others 5, which cost 0.5 us at M = 1). Balanced, the
    first ``groups // sms * sms`` programs take whole row groups and each remaining row group is
    split along K into ``parts`` programs, at most one more per SM and at least one segment per warp.
    """
    full = groups // sms * sms
    if not full or full == groups:
        return None
    parts = min(sms // (groups - full), segments // warps)
    if parts < 2:
        return None
    per = triton.cdiv(segments, parts)
    return full, triton.cdiv(segments, per), per


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


_counts: dict[tuple[torch.device, int], torch.Tensor] = {}


def _tail_counts(device: torch.device, groups: int) -> torch.Tensor:
    """Arrival counts of ``BALANCE``'s split row groups (int32, zero), at most one per SM.

    On CUDA one buffer per stream, kept for the process's life: a launch's last part resets its
    group's count, so the next launch on the stream finds zeros with no memset (which cost 1.2 us
    at M = 1, more than balancing gains), and captured graphs keep a valid address. Launches on one
    stream never overlap; graphs captured on one stream must be replayed one at a time.
    """
    if device.type != "cuda":  # the interpreter runs one program at a time on the CPU
        return torch.zeros(groups, dtype=torch.int32, device=device)
    key = (device, torch.cuda.current_stream(device).cuda_stream)
    if key not in _counts:
        _counts[key] = torch.zeros(_sm_count(device), dtype=torch.int32, device=device)
    return _counts[key]


def matmul(x: torch.Tensor, weight: NF4Weight, bias: torch.Tensor | None, config: dict) -> torch.Tensor:
    """``x [m, k] @ W.T (+ bias) -> [m, n]`` for ``m <= 16`` where :func:`supports` holds.

    ``config``: ``num_warps`` (warps of a program, each taking every ``num_warps``-th segment of
    the program's K range; at most 8), ``ROWS`` (weight rows per program: 16, or 8 for twice the
    programs, each leaving the mma's rows 8-15 empty), ``SPLIT`` (programs along K, their fp32
    partials added after), ``TABLE`` (decode through the shared pair table rather than in
    registers), ``DEPTH`` (segments whose weight loads each warp keeps in flight), ``X_AHEAD``
    (load activations one segment ahead rather than at use), ``SHARED_SCALES`` (decode the
    program's block scales once into shared memory rather than per segment), ``STEADY`` (run
    the steps where every warp's segment is whole and in range without masks), ``LATE_SCALE``
    (scale each block's fp32 mma sums rather than the decoded codes; not with ``SHARED_SCALES``,
    and ignored for 32-code blocks), ``L2_HINT`` (load the packed codes with the PTX hint that
    fills 256 bytes of L2 per miss), ``MAXNREG`` (cap the registers per thread, so that enough
    programs share an SM to run the whole grid in one wave; ``None``: the compiler's choice),
    ``UNROLL`` (masked steps per loop iteration: 1, or 2 so that the queued loads alternate between
    two register sets instead of being moved; the steady loop is not unrolled), ``SCALE_AHEAD``
    (decode each segment's block scales one step earlier, from bytes loaded a segment further
    ahead than its codes; ignored with ``SHARED_SCALES``) and ``BALANCE`` (without ``SPLIT``: even
    out the programs per SM as :func:`tail_plan` says, over the device's SMs, or over this many
    where it is an int; the split row groups' partials are added in a fixed order, so results do
    not vary between runs).
    """
    m, k = x.shape
    if x.stride(0) != k or x.stride(1) != 1 or x.data_ptr() % ALIGNMENT:
        x = x.clone(memory_format=torch.contiguous_format)  # dense rows, 16-byte aligned (see ALIGNMENT)
    out = torch.empty(m, weight.n, dtype=x.dtype, device=x.device)
    segments = triton.cdiv(k, SEGMENT)
    per_split = triton.cdiv(segments, config.get("SPLIT", 1))
    split = triton.cdiv(segments, per_split)
    tiles, table, shared = 1 if m <= 8 else 2, config.get("TABLE", False), config.get("SHARED_SCALES", False)
    rows = config.get("ROWS", 16)
    groups = late_scale_groups(weight.blocksize) if config.get("LATE_SCALE", False) else 0
    if groups and shared:
        raise ValueError("skinny config: LATE_SCALE and SHARED_SCALES cannot be combined; set one of them to False")
    blocks = scale_blocks(per_split, weight.blocksize) if shared else 1
    target = out if split == 1 else torch.empty(split, m, weight.n, dtype=torch.float32, device=x.device)
    cap = {"maxnreg": config["MAXNREG"]} if config.get("MAXNREG") else {}  # a compile option, not a kernel argument
    row_groups = triton.cdiv(weight.n, rows)
    balance = config.get("BALANCE", False)
    sms = (_sm_count(x.device) if x.is_cuda else 0) if balance is True else int(balance)
    plan = tail_plan(row_groups, segments, config["num_warps"], sms) if sms and split == 1 else None
    grid, full, parts, stash, counts = (row_groups, split), row_groups, 0, out, out
    if plan:
        full, parts, per_split = plan
        grid = (full + (row_groups - full) * parts, 1)
        stash = torch.empty(parts, weight.n - full * rows, MAX_ROWS, dtype=torch.float32, device=x.device)
        counts = _tail_counts(x.device, row_groups - full)
    _skinny_kernel[grid](
        x.view(torch.int64), weight.packed.view(torch.int64), weight.code, *weight.scale_args(),
        bias if bias is not None else x, target, m, weight.n, k, weight.k_blocks, out.stride(0), per_split,
        stash, counts, full, TAIL=parts, BS=weight.blocksize, NW=config["num_warps"], TILES=tiles, SPLIT=split,
        HAS_BIAS=bias is not None and split == 1,
        NESTED=weight.nested, F16=x.dtype == torch.float16, TABLE=table, DEPTH=config.get("DEPTH", 1),
        X_AHEAD=config.get("X_AHEAD", True), SHARED_SCALES=shared, SCALE_BLOCKS=triton.next_power_of_2(blocks),
        SCALE_DECL=scale_table_decl(blocks) if shared else "",
        SEGMENT_ASM=segment_asm("f16" if x.dtype == torch.float16 else "bf16", tiles, table, shared, rows, groups),
        CONSTRAINTS=segment_constraints(tiles, shared, groups), ROWS=rows, STEADY=config.get("STEADY", False),
        GROUPS=groups, L2_HINT=config.get("L2_HINT", False), UNROLL=config.get("UNROLL", 1),
        SCALE_AHEAD=bool(config.get("SCALE_AHEAD", False)) and not shared, TILED=weight.tiled,
        num_warps=config["num_warps"], **cap)
    return out if split == 1 else finish_split_k(target, bias, out, split)
