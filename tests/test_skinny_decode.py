"""The register-codebook decode of the tensor-core skinny kernel, run on a model of PTX ``prmt``.

The kernel's PTX is built from ``skinny.selector_ops`` and ``skinny.lookup_ops``; here the same
instruction lists run on an emulator written from the PTX ISA's definition of ``prmt`` (default
mode: selector nibble bits 0-2 pick one of 8 bytes, bit 3 replicates that byte's sign), and every
byte value at every position must decode to the codebook's values in bf16 and fp16.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from peftlab.quant.kernels import skinny
from peftlab.quant.nf4 import NF4_CODE

MASK = 0xFFFFFFFF


def _prmt(a: int, b: int, c: int) -> int:
    source = a | (b << 32)
    out = 0
    for i in range(4):
        sel = (c >> (4 * i)) & 0xF
        byte = (source >> (8 * (sel & 7))) & 0xFF
        if sel & 8:
            byte = 0xFF if byte & 0x80 else 0x00
        out |= byte << (8 * i)
    return out


def _run(ops: list[tuple], regs: dict) -> None:
    def val(name):
        return regs[name] if name in regs else int(name, 0)

    for op, dst, *args in ops:
        a = [val(x) for x in args]
        if op == "and.b32":
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
            # the pair of byte i: element 2i (high nibble) in the low half, 2i + 1 in the high half
            expect = bits[byte >> 4] | (bits[byte & 15] << 16)
            assert regs[f"p{i}"] == expect, (dtype, b, i)


def test_the_emulator_follows_the_ptx_definition_of_prmt():
    # Default mode: nibble i picks byte i of {b, a}; bit 3 replicates the picked byte's sign bit.
    assert _prmt(0x33221100, 0x77665544, 0x3210) == 0x33221100
    assert _prmt(0x33221100, 0x77665544, 0x7654) == 0x77665544
    assert _prmt(0x80221100, 0x77665544, 0x000B) == 0x000000FF
    assert _prmt(0x80221100, 0x77665544, 0x0009) == 0x00000000
