"""A model of the inline PTX in peftlab's skinny NF4 kernel, for Triton's CPU interpreter.

Triton's interpreter cannot run inline assembly. :func:`install` makes it run the subset of PTX the
skinny kernel emits, written from the PTX ISA's definitions: every register is a numpy array over
the asm block's instances (one per thread), shared memory is one word array, and ``mma.sync``
gathers each warp's fragments (instance i is lane i % 32 of warp i // 32, which is the lane
mapping the kernel requires of Triton, see ``tests/test_skinny_layout.py``). Global loads read the
interpreter's tensors at their host addresses. With it the whole kernel (indices, masks, splits,
queues, tables) runs on the CPU against the torch reference.
"""
from __future__ import annotations

import ctypes
import functools
import re

import numpy as np
import torch

_WORDS = 1 << 20  # 4 MB of modelled shared memory; each declared array gets its own 1 MB region
_BF16, _F16 = torch.bfloat16, torch.float16


def _prmt(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """``prmt.b32`` default mode: selector nibble i picks byte (nibble & 7) of {b, a}; bit 3
    replicates that byte's sign."""
    source = a.astype(np.uint64) | (b.astype(np.uint64) << np.uint64(32))
    out = np.zeros_like(a, dtype=np.uint32)
    for i in range(4):
        sel = (c >> np.uint32(4 * i)) & np.uint32(0xF)
        byte = ((source >> ((sel & np.uint32(7)).astype(np.uint64) * np.uint64(8))) & np.uint64(0xFF)).astype(np.uint32)
        byte = np.where(sel & np.uint32(8), np.where(byte & np.uint32(0x80), np.uint32(0xFF), np.uint32(0)), byte)
        out |= byte << np.uint32(8 * i)
    return out


def _halves(bits: np.ndarray, dtype: torch.dtype) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) 16-bit halves of 32-bit words as fp32 values of ``dtype``."""
    def value(half):
        return torch.from_numpy(half.astype(np.int32).astype(np.int16)).view(dtype).float().numpy()
    return value(bits & np.uint32(0xFFFF)), value(bits >> np.uint32(16))


def _pack(low: np.ndarray, high: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """fp32 values rounded to nearest-even in ``dtype`` and packed: ``low`` in bits 0-15."""
    def bits(v):
        return torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)).to(dtype).view(torch.int16).numpy()
    return (bits(low).astype(np.uint16).astype(np.uint32)) | (bits(high).astype(np.uint16).astype(np.uint32) << 16)


def _load_words(addresses: np.ndarray, active: np.ndarray, offset: int) -> np.ndarray:
    """The 64-bit words at host ``addresses + offset`` bytes where ``active``, 0 elsewhere."""
    words = np.zeros(len(addresses), dtype=np.uint64)
    for i in np.flatnonzero(active):
        words[i] = ctypes.c_uint64.from_address(int(addresses[i]) + offset).value
    return words


def _f32(bits: np.ndarray) -> np.ndarray:
    return bits.astype(np.uint32).view(np.float32)


def _split_operands(text: str) -> list[str]:
    return [part.strip() for part in re.findall(r"\s*(\{[^}]*\}|[^,]+)", text)]


@functools.cache
def _parse(asm: str) -> list[tuple]:
    """(predicate, opcode, operands) of each statement of one asm block."""
    body = asm.strip()
    if body.startswith("{") and body.endswith("}"):
        body = body[1:-1]
    statements = []
    for raw in body.replace("\n", " ").split(";"):
        text = raw.strip()
        if not text or text.startswith(".reg"):
            continue
        predicate = None
        if text.startswith("@"):
            predicate, text = text[1:].split(None, 1)
        opcode, _, rest = text.partition(" ")
        statements.append((predicate, opcode, _split_operands(rest)))
    return statements


class PTXModel:
    """Runs asm blocks over all instances at once; shared memory persists across blocks."""

    def __init__(self) -> None:
        self.shared = np.zeros(_WORDS, dtype=np.uint32)
        self.symbols: dict[str, int] = {}

    def run(self, asm: str, operands: list[np.ndarray], n_out: int) -> list[np.ndarray]:
        """``operands``: one uint32 or uint64 array per ``$i``, outputs (``n_out``, zeros) first."""
        regs: dict[str, np.ndarray] = {}
        count = len(operands[-1])

        def read(name: str) -> np.ndarray:
            if name.startswith("$"):
                return operands[int(name[1:])]
            if name in regs:
                return regs[name]
            if name in self.symbols:
                return np.full(count, self.symbols[name], dtype=np.uint32)
            if name.startswith("0f"):  # a float immediate as its bits
                return np.full(count, int(name[2:], 16), dtype=np.uint32)
            return np.full(count, int(name, 0) & 0xFFFFFFFF, dtype=np.uint32)

        def write(name: str, value: np.ndarray) -> None:
            if name.startswith("$"):
                operands[int(name[1:])] = value.astype(operands[int(name[1:])].dtype)
            else:
                regs[name] = value

        def vector(text: str) -> list[str]:
            return [part.strip() for part in text.strip("{}").split(",")]

        def address(text: str) -> np.ndarray:
            return read(text.strip("[]")).astype(np.int64) // 4

        for predicate, op, args in _parse(asm):
            if op == ".shared":  # .shared .align A .b8 name[bytes]
                name = re.match(r"(\w+)\[", args[0].split()[-1]).group(1)
                self.symbols.setdefault(name, (len(self.symbols) + 1) << 20)  # byte address of a 1 MB region
                continue
            active = read(predicate).astype(bool) if predicate else np.ones(count, dtype=bool)
            if op == "mov.b64" and args[0].startswith("{"):
                value = read(args[1]).astype(np.uint64)
                low, high = vector(args[0])
                write(low, (value & np.uint64(0xFFFFFFFF)).astype(np.uint32))
                write(high, (value >> np.uint64(32)).astype(np.uint32))
            elif op == "mov.b64":
                write(args[0], read(args[1]).astype(np.uint64))
            elif op.startswith("ld.global.") and op.endswith(".b64"):  # any cache qualifiers; .v2 or one word
                addresses = read(args[1].strip("[]")).astype(np.uint64)
                for i, name in enumerate(vector(args[0])):
                    write(name, np.where(active, _load_words(addresses, active, 8 * i), read(name)))
            elif op in ("mov.b32", "mov.u32", "mov.f32"):
                write(args[0], read(args[1]).astype(np.uint32))
            elif op in ("and.b32", "or.b32", "xor.b32", "shl.b32", "shr.u32", "add.u32"):
                a, b = read(args[1]).astype(np.uint64), read(args[2]).astype(np.uint64)
                result = {"and.b32": a & b, "or.b32": a | b, "xor.b32": a ^ b, "shl.b32": a << b,
                          "shr.u32": a >> b, "add.u32": a + b}[op]
                write(args[0], (result & np.uint64(0xFFFFFFFF)).astype(np.uint32))
            elif op == "mad.lo.u32":
                a, b, c = (read(x).astype(np.uint64) for x in args[1:])
                write(args[0], ((a * b + c) & np.uint64(0xFFFFFFFF)).astype(np.uint32))
            elif op == "prmt.b32":
                write(args[0], _prmt(*(read(x).astype(np.uint32) for x in args[1:])))
            elif op == "setp.ne.b32":
                write(args[0], (read(args[1]) != read(args[2])).astype(np.uint32))
            elif op.startswith("ld.shared."):
                words = address(args[1])
                for i, name in enumerate(vector(args[0])):
                    write(name, self.shared[words + i])
            elif op.startswith("st.shared."):
                words = address(args[0])[active]
                for i, name in enumerate(vector(args[1])):
                    self.shared[words + i] = read(name).astype(np.uint32)[active]
            elif op.startswith("cvt.rn.") and op.endswith("x2.f32"):  # d = {a -> high, b -> low}
                dtype = _BF16 if ".bf16x2" in op else _F16
                write(args[0], _pack(_f32(read(args[2])), _f32(read(args[1])), dtype))
            elif op.startswith("fma.rn.") and op.endswith("x2"):
                dtype = _BF16 if op.endswith("bf16x2") else _F16
                (al, ah), (bl, bh), (cl, ch) = (_halves(read(x), dtype) for x in args[1:])
                write(args[0], _pack(al * bl + cl, ah * bh + ch, dtype))
            elif op == "fma.rn.f32":
                a, b, c = (_f32(read(x)).astype(np.float64) for x in args[1:])
                write(args[0], (a * b + c).astype(np.float32).view(np.uint32))  # the product exact in fp64
            elif op.startswith("mma.sync.aligned.m16n8k16.row.col.f32."):
                dtype = _BF16 if ".bf16.bf16." in op else _F16
                d = vector(args[0])
                out = self._mma([read(x) for x in vector(args[1])], [read(x) for x in vector(args[2])],
                                [read(x) for x in vector(args[3])], dtype)
                for name, value in zip(d, out):
                    write(name, value)
            else:
                raise NotImplementedError(f"the PTX model lacks {op}")
        return operands[:n_out]

    @staticmethod
    def _mma(a: list, b: list, c: list, dtype: torch.dtype) -> list[np.ndarray]:
        """``m16n8k16`` D = A @ B + C per warp, fragments as the PTX ISA lays them out for 16-bit A/B:
        lane (g, t) = (lane // 4, lane % 4) holds A rows g, g + 8 at columns 2t, 2t + 1 (a0, a1) and
        2t + 8, 2t + 9 (a2, a3); B rows 2t, 2t + 1 (b0) and 2t + 8, 2t + 9 (b1) of column g; C/D
        rows g, g + 8 at columns 2t, 2t + 1."""
        count = len(a[0])
        warps = count // 32
        lane = np.arange(count) % 32
        warp = np.arange(count) // 32
        g, t = lane // 4, lane % 4
        A = np.zeros((warps, 16, 16))
        B = np.zeros((warps, 16, 8))
        for reg, (row_off, col_off) in zip(a, ((0, 0), (8, 0), (0, 8), (8, 8))):
            low, high = _halves(reg, dtype)
            A[warp, g + row_off, 2 * t + col_off] = low
            A[warp, g + row_off, 2 * t + col_off + 1] = high
        for reg, k_off in zip(b, (0, 8)):
            low, high = _halves(reg, dtype)
            B[warp, 2 * t + k_off, g] = low
            B[warp, 2 * t + k_off + 1, g] = high
        D = A @ B
        out = []
        for reg, (row_off, col_off) in zip(c, ((0, 0), (0, 1), (8, 0), (8, 1))):
            value = D[warp, g + row_off, 2 * t + col_off] + _f32(reg)
            out.append(value.astype(np.float32).view(np.uint32))
        return out


class _Call:
    def __init__(self, results: list) -> None:
        self.results = results

    def get_result(self, i: int):
        return self.results[i]


def install() -> PTXModel:
    """Makes Triton's interpreter run inline PTX through a fresh :class:`PTXModel`; returns it."""
    import triton.language as tl
    from triton.runtime import interpreter

    model = PTXModel()

    def create_inline_asm(self, asm, constraints, values, types, is_pure, pack):
        shape = values[0].data.shape
        out_types = [getattr(ty, "element_ty", ty) for ty in types]
        operands = []
        for ty in out_types:  # outputs first, one operand per packed element
            unsigned = np.uint64 if ty.primitive_bitwidth == 64 else np.uint32
            operands += [np.zeros(values[0].data.size // pack, dtype=unsigned) for _ in range(pack)]
        for handle in values:
            data = np.ascontiguousarray(handle.data).reshape(-1, pack)
            if data.dtype.itemsize < 4:
                raise NotImplementedError("the PTX model packs only 32- and 64-bit elements")
            unsigned = data.view(np.uint64 if data.dtype.itemsize == 8 else np.uint32)
            operands += [unsigned[:, e].copy() for e in range(pack)]
        outs = model.run(asm, operands, len(out_types) * pack)
        results = []
        for i, ty in enumerate(out_types):
            words = np.stack(outs[i * pack:(i + 1) * pack], axis=1).reshape(shape)
            if ty.primitive_bitwidth == 64:
                results.append(interpreter.TensorHandle(words.astype(np.uint64).view(np.int64), ty))
            else:
                words = words.astype(np.uint32)
                results.append(interpreter.TensorHandle(words.view(np.float32) if ty == tl.float32
                                                        else words.view(np.int32), ty))
        return _Call(results)

    interpreter.InterpreterBuilder.create_inline_asm = create_inline_asm
    return model
