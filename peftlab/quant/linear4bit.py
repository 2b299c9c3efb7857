"""NF4Linear: a frozen 4-bit linear layer whose state dict is bitsandbytes' ``Linear4bit`` format."""
from __future__ import annotations

import functools
import json
import math

import torch
from torch import nn

from . import nf4
from .kernels import dispatch
from .nf4 import NF4FormatError, QuantState

__all__ = ["NF4Linear", "default_compute_dtype"]

# State-dict suffixes after "<prefix>weight." — the names bitsandbytes and transformers use.
_QUANT_KEYS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
_BLOB_PREFIX = "quant_state.bitsandbytes__"
_BLOB_KEY = _BLOB_PREFIX + "nf4"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def default_compute_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 on CUDA GPUs that support it, otherwise fp32."""
    return _cuda_compute_dtype() if torch.device(device).type == "cuda" else torch.float32


@functools.cache
def _cuda_compute_dtype() -> torch.dtype:  # asked on every forward; the answer never changes
    return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32


def _layer_label(name: str | None) -> str:
    return f"NF4Linear '{name}'" if name else "NF4Linear"


def _is_conv1d(module: nn.Module) -> bool:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional for this module
        return False
    return isinstance(module, Conv1D)


class _NF4LinearFunction(torch.autograd.Function):
    """``x @ W.T + b`` with a frozen NF4 ``W``.

    Only a reference to the layer is kept for backward (its packed weight is input-independent), so
    no dequantized weight stays alive between forward and backward; grad_input re-dequantizes.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None, layer: "NF4Linear") -> torch.Tensor:
        ctx.layer = layer
        ctx.bias_dtype = None if bias is None else bias.dtype
        return dispatch.nf4_linear(x, layer)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = dispatch.nf4_linear_grad_input(grad_out, ctx.layer)
        if ctx.needs_input_grad[1]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0).to(ctx.bias_dtype)
        return grad_x, grad_bias, None


class NF4Linear(nn.Module):
    """A linear layer with a frozen NF4 (optionally double-quantized) weight.

    ``weight`` is the packed uint8 Parameter ``(out * in // 2, 1)`` (never trainable); the block
    scales and code tables are buffers, so ``.to(device)`` moves them while dtype casts such as
    ``model.to(torch.bfloat16)`` leave them untouched. The input is cast to ``compute_dtype`` and
    the output is returned in the input's dtype. ``state_dict()`` writes bitsandbytes' keys.

    On a GPU that runs peftlab's Triton kernels the packed bytes are held in tiles
    (:func:`~peftlab.quant.nf4.to_tiles`, ``tiled`` is then True) when the shape allows: the same
    bytes, reordered so that the small-batch kernels read 1 KB at a time. Moving the layer
    elsewhere puts them back in row-major order, and ``state_dict()`` always writes row-major.

    Merging an adapter never re-quantizes: the first merge dequantizes into a dense weight in the
    compute dtype (a non-persistent buffer used by forward from then on) and adds the fp32 delta;
    the packed bytes stay untouched, so unmerging the last adapter simply drops the dense weight.
    """

    peftlab_linear = True  # LoRA and other methods may target it like an nn.Linear

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = None,
        weight_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.module_name = name
        self._compute_dtype = compute_dtype
        numel = self.in_features * self.out_features
        if numel <= 0 or numel % 2:
            raise NF4FormatError(
                f"{self._label()}: NF4 packs two weights per byte, so in_features * out_features must be "
                f"even and positive; got {self.in_features} * {self.out_features} = {numel}."
            )
        nf4._check_blocksize(blocksize, self._label())
        self.blocksize = blocksize
        self.weight_dtype = weight_dtype
        self.offset: float | None = None
        self.weight = nn.Parameter(torch.zeros(numel // 2, 1, dtype=torch.uint8, device=device), requires_grad=False)
        self.tiled = False  # packed bytes in tile order (see the class docstring)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None
        self.register_buffer("merged_weight", None, persistent=False)
        self._merge_depth = 0
        self.from_conv1d = False  # dequantize back to transformers' Conv1D ([in, out] weight) for export
        n_blocks = -(-numel // blocksize)
        self.register_buffer("quant_map", nf4.NF4_CODE.to(device))
        if double_quant:
            self.register_buffer("absmax", torch.zeros(n_blocks, dtype=torch.uint8, device=device))
            self.register_buffer("nested_absmax", torch.zeros(-(-n_blocks // nf4.NESTED_BLOCKSIZE), device=device))
            self.register_buffer("nested_quant_map", nf4.DYNAMIC_CODE.to(device))
            self.offset = 0.0
        else:
            self.register_buffer("absmax", torch.zeros(n_blocks, device=device))
            self.register_buffer("nested_absmax", None)
            self.register_buffer("nested_quant_map", None)

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_linear(
        cls,
        linear: nn.Module,
        *,
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = None,
        name: str | None = None,
    ) -> "NF4Linear":
        """Quantize an ``nn.Linear`` (or transformers' GPT-2 ``Conv1D``, weight ``[in, out]``) on its device."""
        label = _layer_label(name)
        if isinstance(linear, nn.Linear):
            weight = linear.weight
        elif _is_conv1d(linear):
            weight = linear.weight.t()  # Conv1D stores [in, out]
        else:
            raise TypeError(f"{label}: from_linear needs an nn.Linear or a transformers Conv1D, "
                            f"got {type(linear).__name__}.")
        if weight.device.type == "meta":
            raise NF4FormatError(f"{label}: the weight is on the meta device; load real weights before quantizing.")
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features, bias=linear.bias is not None, blocksize=blocksize,
                    double_quant=double_quant, compute_dtype=compute_dtype, weight_dtype=weight.dtype,
                    device="meta", name=name)
        packed, state = nf4.quantize_nf4(weight.detach(), blocksize, double_quant, name=label)
        layer.set_quantized(packed, state)
        layer.from_conv1d = _is_conv1d(linear)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        return layer

    def set_quantized(self, packed: torch.Tensor, state: QuantState) -> None:
        """Install packed codes and their :class:`QuantState` (tensors are used as given, not copied,
        unless the bytes are reordered into or out of tiles for the layer's device)."""
        expected = (self.out_features, self.in_features)
        if tuple(state.shape) != expected:
            raise NF4FormatError(f"{self._label()}: quantized weight has shape {list(state.shape)}, "
                                 f"but this layer is [out_features, in_features] = {list(expected)}.")
        numel = self.out_features * self.in_features
        packed = packed.reshape(-1)
        if packed.dtype != torch.uint8:  # another quant_storage dtype holding the same bytes
            packed = packed.view(torch.uint8)
        if packed.numel() != numel // 2:
            raise NF4FormatError(f"{self._label()}: packed weight has {packed.numel()} bytes, expected "
                                 f"{numel // 2} for shape {list(expected)}.")
        nf4._check_blocksize(state.blocksize, self._label())
        n_blocks = -(-numel // state.blocksize)
        if state.absmax.numel() != n_blocks:
            raise NF4FormatError(f"{self._label()}: absmax has {state.absmax.numel()} entries, expected "
                                 f"{n_blocks} (one per block of {state.blocksize} of {numel} weights).")
        if state.double_quant:
            n_nested = -(-n_blocks // state.nested_blocksize)
            if state.nested_absmax.numel() != n_nested or state.offset is None:
                raise NF4FormatError(f"{self._label()}: nested_absmax has {state.nested_absmax.numel()} "
                                     f"entries, expected {n_nested}, and a nested offset is required.")
            if state.absmax.dtype != torch.uint8:
                raise NF4FormatError(f"{self._label()}: a double-quantized absmax must be uint8, "
                                     f"got {state.absmax.dtype}.")
        if state.nested_blocksize != nf4.NESTED_BLOCKSIZE:
            raise NF4FormatError(f"{self._label()}: nested blocksize {state.nested_blocksize} is not supported "
                                 f"(only {nf4.NESTED_BLOCKSIZE}).")
        if state.tiled:
            nf4.require_tiles_fit(expected, state.blocksize, f"{self._label()}: the quant state says the bytes are tiled")
        self.weight = nn.Parameter(packed.unsqueeze(1), requires_grad=False)
        self.tiled = state.tiled
        self.blocksize = state.blocksize
        self.weight_dtype = state.dtype
        self._buffers["absmax"] = state.absmax if state.double_quant else state.absmax.float()
        self._buffers["quant_map"] = state.code.float()
        self._buffers["nested_absmax"] = state.nested_absmax
        self._buffers["nested_quant_map"] = state.nested_code
        self.offset = state.offset
        self._arrange()

    def _arrange(self) -> None:
        """Puts the packed bytes in the order the layer's device reads fastest (see the class docstring)."""
        if self.weight.is_meta:
            return
        shape = (self.out_features, self.in_features)
        self._set_tiled(dispatch.prefers_tiles(self.weight.device) and nf4.tiles_fit(shape, self.blocksize))

    def _set_tiled(self, tiled: bool) -> None:
        if tiled != self.tiled:
            reorder = nf4.to_tiles if tiled else nf4.from_tiles
            self.weight.data = reorder(self.weight.data, (self.out_features, self.in_features)).unsqueeze(1)
            self.tiled = tiled

    def row_major_weight(self) -> torch.Tensor:
        """The packed Parameter's bytes in bitsandbytes' row-major order (a copy when tiled)."""
        if not self.tiled:
            return self.weight
        return nf4.from_tiles(self.weight.detach(), (self.out_features, self.in_features)).unsqueeze(1)

    # ----------------------------------------------------------------- properties
    @property
    def double_quant(self) -> bool:
        """Whether the block scales are 8-bit double-quantized."""
        return self.nested_absmax is not None

    @property
    def weight_numel(self) -> int:
        """Number of weights represented (out_features * in_features), for parameter counts."""
        return self.out_features * self.in_features

    @property
    def compute_dtype(self) -> torch.dtype:
        """dtype the matmul runs in: the one given, else bf16 on capable GPUs and fp32 elsewhere."""
        return self._compute_dtype or default_compute_dtype(self.weight.device)

    @compute_dtype.setter
    def compute_dtype(self, dtype: torch.dtype | None) -> None:
        self._compute_dtype = dtype

    @property
    def quant_state(self) -> QuantState:
        """A :class:`QuantState` view of this layer's buffers (no copies)."""
        return QuantState(
            shape=(self.out_features, self.in_features), dtype=self.weight_dtype, blocksize=self.blocksize,
            absmax=self.absmax, code=self.quant_map, nested_absmax=self.nested_absmax,
            nested_code=self.nested_quant_map, offset=self.offset, tiled=self.tiled,
        )

    def _label(self) -> str:
        return _layer_label(self.module_name)

    # ----------------------------------------------------------------- compute
    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The full weight ``[out_features, in_features]`` in ``dtype`` (default: its original dtype)."""
        return dispatch.nf4_dequantize(self, dtype or self.weight_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged_weight is not None:
            bias = None if self.bias is None else self.bias.to(self.merged_weight.dtype)
            return nn.functional.linear(x.to(self.merged_weight.dtype), self.merged_weight, bias).to(x.dtype)
        out = _NF4LinearFunction.apply(x.to(self.compute_dtype), self.bias, self)
        return out.to(x.dtype)

    # ----------------------------------------------------------------- merging (see peftlab.adapters.exact)
    def merge_delta(self, delta: torch.Tensor):
        """Add an fp32 delta ``[out, in]`` into the dense merged weight (created on the first merge)."""
        from ..adapters.exact import add_delta_

        label = self.module_name or "NF4Linear"
        if self.merged_weight is None:
            dense = self.dequantize(self.compute_dtype)
            add_delta_(dense, delta, label)  # raises before anything changes if the result is not finite
            self.merged_weight = dense
            self._merge_depth = 1
            return None
        residual = add_delta_(self.merged_weight, delta, label)
        self._merge_depth += 1
        return residual

    def unmerge_delta(self, delta: torch.Tensor, residual) -> None:
        """Undo :meth:`merge_delta`; the last unmerge drops the dense weight, leaving the packed bytes as they were."""
        from ..adapters.exact import remove_delta_

        self._merge_depth -= 1
        if self._merge_depth == 0:
            self.merged_weight = None
        else:
            remove_delta_(self.merged_weight, delta, residual, self.module_name or "NF4Linear")

    def to_linear(self) -> nn.Module:
        """A dense layer in the compute dtype (``nn.Linear``, or ``Conv1D`` if quantized from one): the merged
        weight if adapters were merged, else the dequantized one. Never re-quantized."""
        weight = self.merged_weight if self.merged_weight is not None else self.dequantize(self.compute_dtype)
        if self.from_conv1d:
            from transformers.pytorch_utils import Conv1D

            dense = Conv1D(self.out_features, self.in_features).to(device="meta", dtype=weight.dtype)
            dense.weight = nn.Parameter(weight.t().contiguous(), requires_grad=False)
        else:
            dense = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                              device="meta", dtype=weight.dtype)
            dense.weight = nn.Parameter(weight, requires_grad=False)
        if self.bias is not None:
            dense.bias = nn.Parameter(self.bias.detach().to(weight.dtype), requires_grad=self.bias.requires_grad)
        return dense

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"blocksize={self.blocksize}, double_quant={self.double_quant}, "
                f"compute_dtype={str(self.compute_dtype).removeprefix('torch.')}")

    def _apply(self, fn, recurse=True):
        # The block scales and code tables follow device moves but never dtype casts:
        # `model.to(torch.bfloat16)` must not round them. The packed uint8 weight is never cast,
        # so after the move its device is where the constants belong.
        constants = {k: self._buffers[k] for k in _QUANT_KEYS if self._buffers.get(k) is not None}
        for k in constants:
            self._buffers[k] = None
        before = self.weight.device
        try:
            super()._apply(fn, recurse)
        finally:
            device = self.weight.device
            for k, t in constants.items():  # meta constants (e.g. under to_empty) get storage, not data
                self._buffers[k] = torch.empty_like(t, device=device) if t.is_meta else t.to(device)
        if device != before:
            if before.type == "meta":
                self.tiled = False  # fresh storage (to_empty) holds no bytes yet; loading fills it row-major
            self._arrange()
        return self

    # ----------------------------------------------------------------- bitsandbytes state dict
    def _quant_state_blob(self) -> torch.Tensor:
        info = {"quant_type": "nf4", "blocksize": self.blocksize,
                "dtype": str(self.weight_dtype).removeprefix("torch."),
                "shape": [self.out_features, self.in_features]}
        if self.double_quant:
            info.update(nested_blocksize=nf4.NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=self.offset)
        return torch.tensor(list(json.dumps(info).encode("utf-8")), dtype=torch.uint8)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        def out(t):
            return t if keep_vars else t.detach()

        destination[prefix + "weight"] = out(self.row_major_weight())
        if self.bias is not None:
            destination[prefix + "bias"] = out(self.bias)
        for key in _QUANT_KEYS:
            if self._buffers.get(key) is not None:
                destination[prefix + "weight." + key] = out(self._buffers[key])
        destination[prefix + "weight." + _BLOB_KEY] = self._quant_state_blob()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        label = _layer_label(self.module_name or prefix.rstrip(".") or None)
        assign = bool(local_metadata.get("assign_to_params_buffers", False))
        known = {prefix + "weight", prefix + "bias", prefix + "weight." + _BLOB_KEY}
        known.update(prefix + "weight." + k for k in _QUANT_KEYS)
        for key in state_dict:
            if key.startswith(prefix + "weight." + _BLOB_PREFIX) and key not in known:
                kind = key.rsplit("__", 1)[-1]
                raise NF4FormatError(f"{label}: state dict key '{key}' holds quant_type '{kind}'; "
                                     f"only 'nf4' is supported.")
            if strict and key.startswith(prefix) and key not in known:
                head = key[len(prefix):].split(".", 1)[0]
                if head not in self._modules:
                    unexpected_keys.append(key)

        if prefix + "weight" not in state_dict:
            missing_keys.append(prefix + "weight")
        elif prefix + "weight." + _BLOB_KEY in state_dict:
            parts = {k: state_dict[prefix + "weight." + k] for k in _QUANT_KEYS if prefix + "weight." + k in state_dict}
            packed, state = quant_state_from_tensors(state_dict[prefix + "weight"],
                                                     state_dict[prefix + "weight." + _BLOB_KEY], parts, label)
            self._install(packed, state, assign)
        else:
            self._load_full_precision(state_dict[prefix + "weight"], label)

        if self.bias is not None:
            key = prefix + "bias"
            if key not in state_dict:
                missing_keys.append(key)
            else:
                self._load_bias(state_dict[key], label, assign)
        elif prefix + "bias" in state_dict and strict:
            unexpected_keys.append(prefix + "bias")

    def _install(self, packed: torch.Tensor, state: QuantState, assign: bool) -> None:
        # Like torch's loading: copy onto this layer's device, or take the tensors as given with assign=True.
        device = packed.device if assign or self.weight.device.type == "meta" else self.weight.device
        self.set_quantized(packed.to(device, copy=not assign), state.to(device, copy=not assign))

    def _load_full_precision(self, weight: torch.Tensor, label: str) -> None:
        # A plain nn.Linear state dict: quantize it with this layer's settings.
        if not weight.is_floating_point() or tuple(weight.shape) != (self.out_features, self.in_features):
            raise NF4FormatError(f"{label}: 'weight' is {weight.dtype} {list(weight.shape)} but has no "
                                 f"'weight.{_BLOB_KEY}'; expected a packed NF4 weight with its quant state or "
                                 f"a float weight of shape {[self.out_features, self.in_features]}.")
        device = weight.device if self.weight.device.type == "meta" else self.weight.device
        packed, state = nf4.quantize_nf4(weight.to(device), self.blocksize, self.double_quant, name=label)
        self.set_quantized(packed, state)

    def _load_bias(self, bias: torch.Tensor, label: str, assign: bool) -> None:
        if tuple(bias.shape) != (self.out_features,):
            raise NF4FormatError(f"{label}: 'bias' has shape {list(bias.shape)}, expected [{self.out_features}].")
        if assign or self.bias.device.type == "meta":
            self.bias = nn.Parameter(bias.detach(), requires_grad=self.bias.requires_grad)
        else:
            with torch.no_grad():
                if self.bias.dtype != bias.dtype:
                    self.bias.data = self.bias.data.to(bias.dtype)
                self.bias.copy_(bias)


def quant_state_from_tensors(
    packed: torch.Tensor, blob: torch.Tensor, parts: dict[str, torch.Tensor], label: str = "NF4Linear"
) -> tuple[torch.Tensor, QuantState]:
    """Parse bitsandbytes' serialized 4-bit state -> (packed uint8, :class:`QuantState`).

    ``blob`` is the uint8 ``weight.quant_state.bitsandbytes__nf4`` tensor (UTF-8 JSON); ``parts``
    maps ``absmax``, ``quant_map`` and, when double-quantized, ``nested_absmax`` and
    ``nested_quant_map`` to their tensors. Errors name ``label`` and the offending field.
    """
    where = f"{label}: 'weight.{_BLOB_KEY}'"
    try:
        info = json.loads(bytes(blob.detach().cpu().to(torch.uint8).reshape(-1).tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise NF4FormatError(f"{where} is not valid UTF-8 JSON ({exc}).") from None
    if not isinstance(info, dict):
        raise NF4FormatError(f"{where} must hold a JSON object, got {type(info).__name__}.")
    for field in ("quant_type", "blocksize", "dtype", "shape"):
        if field not in info:
            raise NF4FormatError(f"{where} lacks the field '{field}'.")
    if info["quant_type"] != "nf4":
        raise NF4FormatError(f"{where} has quant_type {info['quant_type']!r}; only 'nf4' is supported.")
    if info["dtype"] not in _DTYPES:
        raise NF4FormatError(f"{where} has dtype {info['dtype']!r}; expected one of {sorted(_DTYPES)}.")
    shape = info["shape"]
    if not (isinstance(shape, list) and shape and all(isinstance(d, int) and d > 0 for d in shape)):
        raise NF4FormatError(f"{where} has shape {shape!r}; expected a list of positive integers.")
    if not isinstance(info["blocksize"], int):
        raise NF4FormatError(f"{where} has blocksize {info['blocksize']!r}; expected an integer.")
    nf4._check_blocksize(info["blocksize"], where)
    for key in ("absmax", "quant_map"):
        if key not in parts:
            raise NF4FormatError(f"{label}: state dict lacks 'weight.{key}'.")

    nested = "nested_absmax" in parts or "nested_offset" in info
    if nested:
        for key in ("nested_absmax", "nested_quant_map"):
            if key not in parts:
                raise NF4FormatError(f"{label}: double-quantized state lacks 'weight.{key}'.")
        for field in ("nested_offset", "nested_blocksize"):
            if not isinstance(info.get(field), (int, float)):
                raise NF4FormatError(f"{where} needs a numeric '{field}' for double quantization.")
        if info.get("nested_dtype", "float32") != "float32":
            raise NF4FormatError(f"{where} has nested_dtype {info['nested_dtype']!r}; only 'float32' is supported.")
    absmax = parts["absmax"]
    state = QuantState(
        shape=tuple(shape), dtype=_DTYPES[info["dtype"]], blocksize=info["blocksize"],
        absmax=absmax if nested else absmax.float(), code=parts["quant_map"].float(),
    )
    if nested:
        state.nested_absmax = parts["nested_absmax"].float()
        state.nested_code = parts["nested_quant_map"].float()
        state.nested_blocksize = int(info["nested_blocksize"])
        state.offset = float(info["nested_offset"])
    if state.code.shape != nf4.NF4_CODE.shape or not torch.equal(state.code.cpu(), nf4.NF4_CODE):
        raise NF4FormatError(f"{label}: 'weight.quant_map' is not the 16-level NF4 code table.")
    numel = math.prod(shape)
    n_blocks = -(-numel // state.blocksize)
    if absmax.numel() != n_blocks:
        raise NF4FormatError(f"{label}: 'weight.absmax' has {absmax.numel()} entries but shape {shape} with "
                             f"blocksize {state.blocksize} needs {n_blocks}.")
    packed = packed.detach().reshape(-1)
    if packed.dtype != torch.uint8:
        packed = packed.view(torch.uint8)
    return packed.unsqueeze(1), state
