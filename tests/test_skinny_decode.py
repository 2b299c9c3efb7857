"""The decodes of the tensor-core skinny kernel, run on a model of the PTX they are built from.

The kernel's PTX is built from ``skinny.selector_ops`` and ``skinny.lookup_ops`` (register
codebook) or ``skinny.table_fill_ops`` and ``skinny.table_lookup_ops`` (shared pair table); here
the same instruction lists run on an emulator written from the PTX ISA's definitions (``prmt``
default mode: selector nibble bits 0-2 pick one of 8 bytes, bit 3 replicates that byte's sign;
``tests/ptx_model.py``'s, shared with the whole-kernel test), and every byte value at every
position must decode to the codebook's values in bf16 and fp16.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from peftlab.quant.kernels import skinny
from peftlab.quant.nf4 import NF4_CODE
from tests import ptx_model

MASK = 0xFFFFFFFF


def _prmt(a: int, b: int, c: int) -> int:
    """``prmt.b32`` on one lane, through the whole-kernel PTX model's definition."""
    lane = [np.array([v], dtype=np.uint32) for v in (a, b, c)]
    return int(ptx_model._prmt(*lane)[0])


def _run(ops: list[tuple], regs: dict, shared: dict | None = None) -> None:
    def val(name):
        return regs[name] if name in regs else int(name, 0)

    for op, dst, *args in ops:
        if op == "st.shared.b32":  # (op, "[address register]", value)
            shared[regs[dst.strip("[]")]] = val(args[0])
            continue
        if op == "ld.shared.b32":
            regs[dst] = shared[regs[args[0].strip("[]")]]
            continue
        a = [val(x) for x in args]
        if op == "add.u32":
            regs[dst] = (a[0] + a[1]) & MASK
        elif op == "shl.b32":
            regs[dst] = (a[0] << a[1]) & MASK
        elif op == "mad.lo.u32":
            regs[dst] = (a[0] * a[1] + a[2]) & MASK
        elif op == "and.b32":
            regs[dst] = a[0] & a[1]
        elif op == "or.b32":
            regs[dst] = a[0] | a[1]
        elif op == "shr.u32":
            regs[dst] = (a[0] & MASK) >> a[1]
        elif op == "prmt.b32":
            regs[dst] = _prmt(a[0], a[1], a[2])
        else:
            raise AssertionError(f"emulator lacks {op}")


def _planes(dtype: torch.dtype) -> dict:
    bits = [int(v) & 0xFFFF for v in NF4_CODE.to(dtype).view(torch.int16).tolist()]
    planes = {}
    for i in range(4):
        planes[f"L{i}"] = sum((bits[4 * i + j] & 0xFF) << (8 * j) for j in range(4))
        planes[f"H{i}"] = sum((bits[4 * i + j] >> 8) << (8 * j) for j in range(4))
    return planes, bits


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_byte_decodes_to_its_two_codebook_values(dtype):
    planes, bits = _planes(dtype)
    for b in range(256):
        word_bytes = [b, 255 - b, (7 * b + 3) % 256, (13 * b + 5) % 256]
        regs = dict(planes, w=sum(v << (8 * i) for i, v in enumerate(word_bytes)))
        ops = skinny.selector_ops("w", "g")
        ops += skinny.lookup_ops("gi3", "gsl", "p0", "p1") + skinny.lookup_ops("gi3u", "gslu", "p2", "p3")
        _run(ops, regs)
        for i, byte in enumerate(word_bytes):
            assert regs[f"p{i}"] == _pair(bits, byte), (dtype, b, i)


def test_the_emulator_follows_the_ptx_definition_of_prmt():
    # Default mode: nibble i picks byte i of {b, a}; bit 3 replicates the picked byte's sign bit.
    assert _prmt(0x33221100, 0x77665544, 0x3210) == 0x33221100
    assert _prmt(0x33221100, 0x77665544, 0x7654) == 0x77665544
    assert _prmt(0x80221100, 0x77665544, 0x000B) == 0x000000FF
    assert _prmt(0x80221100, 0x77665544, 0x0009) == 0x00000000


def _pair(bits: list[int], byte: int) -> int:
    """Byte's pair as the A fragment takes it: element 2i (high nibble) low, 2i + 1 high."""
    return bits[byte >> 4] | (bits[byte & 15] << 16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_shared_table_is_filled_conflict_free_and_read_back_per_lane(dtype):
    _, bits = _planes(dtype)
    table, shared = 1 << 12, {}
    for entry in range(256):  # each thread fills whole entries; which lane does it does not matter
        lane = entry % 32
        regs = {"e": entry, "lane": lane, "tab": table, "v": _pair(bits, entry)}
        _run(skinny.table_fill_ops("e", "lane", "tab", "v"), regs, shared)
    assert sorted(shared) == [table + 4 * i for i in range(256 * 32)]  # 32 KB, every word once
    # At every store step the 32 lanes of a warp (entries 0-31) write 32 different banks.
    for step in range(32):
        banks = set()
        for lane in range(32):
            regs = {"e": lane, "lane": lane, "tab": table, "v": 0}
            ops = skinny.table_fill_ops("e", "lane", "tab", "v")
            _run(ops[:2 + 4 * step + 3], regs, {})  # up to the address of store ``step``
            banks.add((regs["a"] // 4) % 32)
        assert len(banks) == 32
    for b in range(256):
        word_bytes = [b, 255 - b, (7 * b + 3) % 256, (13 * b + 5) % 256]
        for lane in (0, 5, 31):
            regs = {"w": sum(v << (8 * i) for i, v in enumerate(word_bytes)), "lane": table + 4 * lane}
            for i, byte in enumerate(word_bytes):
                _run(skinny.table_lookup_ops("w", i, f"p{i}", "lane", "t"), regs, shared)
                assert regs[f"p{i}"] == _pair(bits, byte), (dtype, b, i)
                assert (regs["t"] // 4) % 32 == lane  # a lane reads only its own bank
