"""Peak GPU memory of a finetuning run, from the model's config alone (meta device, no weights).

The estimate is the largest of four moments of a training step, each a sum of parts:

    loss      weights + adapters + optimizer states + stored activations + logits
              (the backward of the log-softmax: every layer's activations are still stored)
    backward  weights + adapters + optimizer states + stored activations + the top block's
              recomputed activations (gradient checkpointing) + its backward working set
    end       weights + adapters + optimizer states + all gradients + the bottom block's
              activations and working set (the last moment of backward)
    step      weights + adapters + optimizer states + all gradients

Parts, in bytes (T = batch x sequence tokens, a = bytes of the compute dtype):

* weights: every base parameter and buffer at its dtype, NF4 layers at their packed size with
  all quantization constants (read off NF4 shells built on the meta device); fp32 master weights
  trained under bf16/fp16 autocast add the low-precision copies autocast keeps for backward.
* adapters: the adapters' own parameters (fp32 for LoRA and bottlenecks; trained copies at the
  base dtype). gradients: one per trainable parameter, at its dtype; LOMO/AdaLomo keep none, only
  the gradient being used at the moment (AdaLomo also squares it into an fp32 chunk).
* optimizer states: AdamW 2 per trainable parameter at its dtype; paged 8-bit AdamW 2 bytes per
  parameter plus fp32 block scales (paged memory lives outside torch's allocator, so it is listed
  but not part of the peak torch reports); SGD and LOMO none; AdaLomo fp32 row + column second
  moments per matrix (``shape[0] + numel / shape[0]``) and a full fp32 vector per vector.
* activations: what autograd keeps from forward for backward (``block_activations`` states the
  per-block formula); with gradient checkpointing only each block's input (a * T * hidden) is
  kept, and one block at a time is recomputed during backward.
* logits (causal LM): ``peftlab finetune`` computes the loss in slices of S tokens
  (``train.loss.slice_tokens``) and never builds the whole ``T x vocab`` logits: at its backward
  one slice exists in fp32 and in the matmul's 16-bit output (S * vocab * (4 + a)), with the
  hidden-state gradient (a * T * hidden) and, when the head trains, its gradient. With the
  model's own loss (``train.chunked_loss: false``, or a head the chunked loss cannot read),
  transformers upcasts the logits to fp32 and takes a log-softmax that backward keeps; at its
  backward three fp32 copies exist at once (the saved log-softmax, its incoming gradient, the
  gradient it produces): 12 * T * vocab bytes.
* overhead: cuBLAS workspaces, which torch allocates through its caching allocator: one per thread
  that runs matmuls (the forward thread and the autograd thread), 32 MiB each by torch's default on
  Hopper GPUs (``CUBLAS_WORKSPACE_CONFIG`` is read when set). Fragmentation is not counted: it shows
  in ``torch.cuda.max_memory_reserved`` (and nvidia-smi), not in the allocated peak estimated here.

``peftlab.inspect`` builds the model; the method injects itself on the meta device, so every
parameter count and dtype is exact. Adapter contributions to the activations are measured by
running each adapter hook on meta tensors of one and two tokens.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import targeting
from .adapters.layout import BlockLayout, block_layouts, is_norm
from .adapters.sites import _ATTR as _SITE_ATTR
from .errors import PeftlabError
from .inspect import (
    build_skeleton,
    load_model_config,
    method_run_config,
    prepare_skeleton,
    split_wrapped,
)
from .targeting import is_under

__all__ = ["EstimateError", "MemoryEstimate", "block_activations", "estimate_memory", "estimate_run"]

GIB = 2**30
CUBLAS_WORKSPACE = 32 * 2**20  # torch's default cuBLAS workspace on Hopper (sm90), ":4096:8" (4096 KiB x 8)
MATMUL_THREADS = 2  # forward thread + autograd thread: each gets its own cuBLAS handle and workspace
LOGIT_COPIES_FP32 = 3  # saved log-softmax, its gradient, the gradient it returns
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Activation functions: (number of [T, I] tensors they save, whether their output is one of them).
_ACTIVATIONS = {"silu": (1, False), "swish": (1, False), "gelu": (1, False), "gelu_pytorch_tanh": (1, False),
                "gelu_new": (4, False), "relu": (1, True), "quick_gelu": (2, False)}
_PAGED_MIN_NUMEL = 4096  # bitsandbytes keeps 32-bit states for smaller parameters
_PAGED_BLOCK = 256  # bitsandbytes' blockwise 8-bit optimizer block


class EstimateError(PeftlabError, ValueError):
    """A setup the estimator cannot describe."""


# ----------------------------------------------------------------------------- result
@dataclass
class MemoryEstimate:
    """Peak memory of a training step, with the parts of its largest moment (bytes)."""

    setup: dict[str, Any]
    parts: dict[str, int]  # weights, adapters, gradients, optimizer, activations, logits, overhead
    phases: dict[str, int]  # total bytes of each moment of the step
    peak_phase: str
    totals: dict[str, int]  # each part at its largest (gradients all at once, activations at the end of forward)
    notes: dict[str, str] = field(default_factory=dict)
    outside_allocator: dict[str, int] = field(default_factory=dict)  # e.g. paged optimizer states

    @property
    def peak_bytes(self) -> int:
        """What ``torch.cuda.max_memory_allocated`` should report."""
        return self.phases[self.peak_phase]

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GIB

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "peak_bytes": self.peak_bytes, "peak_gib": self.peak_gib}

    def text(self) -> str:
        """A table of the parts at the peak, the moments of the step, and the setup."""
        s = self.setup
        unit, scale = ("GiB", GIB) if self.peak_bytes >= GIB else ("MiB", 2**20)
        lines = [(f"{s['model']}: {s['method']}, batch {s['batch_size']} x {s['seq_len']} tokens, "
                  f"{s['optimizer']}, {s['precision']}, gradient checkpointing "
                  f"{'on' if s['gradient_checkpointing'] else 'off'}"), ""]
        width = max(len(k) for k in self.parts)
        lines.append(f"  {'part':<{width}}  {unit:>9}  how")
        for key, value in self.parts.items():
            lines.append(f"  {key:<{width}}  {value / scale:>9.3f}  {self.notes.get(key, '')}".rstrip())
        lines.append(f"  {'peak':<{width}}  {self.peak_bytes / scale:>9.3f}  at the {self.peak_phase} moment "
                     "(torch.cuda.max_memory_allocated)")
        for key, value in self.outside_allocator.items():
            lines.append(f"  + {key}: {value / scale:.3f} {unit} outside torch's allocator (not in the peak)")
        lines.append("")
        lines.append("  moments: " + ", ".join(f"{k} {v / scale:.3f}" for k, v in self.phases.items()) + f" {unit}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- parameters
def _unique_parameters(module: nn.Module) -> list[tuple[nn.Module, str, nn.Parameter]]:
    seen: set[int] = set()
    out = []
    for sub in module.modules():
        for name, param in sub.named_parameters(recurse=False):
            if id(param) not in seen:
                seen.add(id(param))
                out.append((sub, name, param))
    return out


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _weight_bytes(base: nn.Module) -> int:
    """Every base parameter and buffer (NF4 constants included) at its dtype; tied weights once."""
    seen: set[int] = set()
    total = 0
    for sub in base.modules():
        for t in list(sub.parameters(recurse=False)) + [b for b in sub.buffers(recurse=False) if b is not None]:
            if id(t) not in seen:
                seen.add(id(t))
                total += _nbytes(t)
    return total


def _autocast_copies(base: nn.Module, weight_dtype: torch.dtype, compute_dtype: torch.dtype) -> int:
    """fp32 master weights under autocast: each linear weight is cast once per forward and the copy is
    kept for backward (its gradient with respect to the input needs it)."""
    if weight_dtype == compute_dtype or compute_dtype == torch.float32:
        return 0
    size = torch.tensor([], dtype=compute_dtype).element_size()
    return sum(m.weight.numel() * size for m in base.modules() if targeting.is_linear(m)
               and m.weight.is_floating_point())


def _optimizer_bytes(trainable: list[nn.Parameter], optimizer: str) -> tuple[int, int]:
    """(bytes in torch's allocator, paged bytes outside it) of the optimizer states."""
    if optimizer == "adamw":  # exp_avg and exp_avg_sq at the parameter's dtype
        return sum(2 * _nbytes(p) for p in trainable), 0
    if optimizer == "adalomo":  # factored second moments, fp32
        total = 0
        for p in trainable:
            if p.dim() >= 2:
                rows = p.shape[0]
                total += 4 * (rows + p.numel() // rows)
            else:
                total += 4 * p.numel()
        return total, 0
    if optimizer == "paged_adamw_8bit":
        paged = 0
        for p in trainable:
            if p.numel() >= _PAGED_MIN_NUMEL:  # two uint8 states and their fp32 block scales
                paged += 2 * p.numel() + 2 * 4 * math.ceil(p.numel() / _PAGED_BLOCK)
            else:
                paged += 2 * 4 * p.numel()
        return 0, paged
    return 0, 0  # sgd (no momentum), lomo


def _in_flight_gradient(params: list[nn.Parameter], optimizer: str) -> int:
    """LOMO/AdaLomo keep no gradients, but each exists until its hook has used it: the largest one of
    ``params`` (AdaLomo also squares it into an fp32 chunk). On CUDA the LOMO update is one Triton
    kernel without temporaries."""
    from .optim.fused_update import CHUNK_ELEMENTS

    trainable = [p for p in params if p.requires_grad]
    if not trainable:
        return 0
    largest = max(trainable, key=lambda p: p.numel())
    extra = 4 * min(largest.numel(), CHUNK_ELEMENTS) if optimizer == "adalomo" else 0
    return _nbytes(largest) + extra


def _gradient_groups(base: nn.Module, layouts: list[BlockLayout]) -> tuple[list[nn.Parameter], list[list],
                                                                           list[nn.Parameter]]:
    """Trainable base parameters before the blocks (embeddings), in each block, and after (head)."""
    before: list[nn.Parameter] = []
    blocks: list[list[nn.Parameter]] = [[] for _ in layouts]
    after: list[nn.Parameter] = []
    seen_block = False
    for name, param in base.named_parameters():
        index = next((i for i, lay in enumerate(layouts) if name.startswith(lay.path + ".")), None)
        if index is not None:
            seen_block = True
            blocks[index].append(param)
        elif param.requires_grad:
            (after if seen_block else before).append(param)
    blocks = [[p for p in group if p.requires_grad] for group in blocks]
    return before, blocks, after


# ----------------------------------------------------------------------------- adapter hooks
@dataclass
class _HookCost:
    """What the adapter hooks on one module keep for backward: its input (shared with other
    consumers of the same tensor), ``per_token`` further bytes per token, and ``fixed`` bytes."""

    saves_input: bool = False
    per_token: int = 0
    fixed: int = 0
    trains: bool = False  # a trainable copy stands in for the module's own parameters


def _hook_cost(module: nn.Module, in_features: int, out_features: int, dtype: torch.dtype) -> _HookCost:
    """Run every adapter contribution on ``module`` on inputs of 1 and 2 tokens (meta tensors on a skeleton)
    and record what autograd saves: storages other than the inputs and the adapters' own parameters."""
    site = module.__dict__.get(_SITE_ATTR)
    cost = _HookCost()
    if site is None:
        return cost
    cost.trains = any(p.requires_grad for _, params in site.swaps for p in params.values())
    params = [p for adapter, _ in site.updates + site.transforms for p in adapter.parameters()]
    if not params:
        return cost
    own = {p.untyped_storage()._cdata for p in params}
    device = params[0].device  # meta on a skeleton: nothing is computed

    def saved_bytes(tokens: int) -> int:
        x = torch.empty(1, tokens, in_features, device=device, dtype=dtype, requires_grad=True)
        out = torch.empty(1, tokens, out_features, device=device, dtype=dtype, requires_grad=True)
        found: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            key = t.untyped_storage()._cdata
            if key == x.untyped_storage()._cdata:
                cost.saves_input = True
            elif key not in own:
                found[key] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            result = out
            for _, update in site.updates:
                result = update(x, result)
            for _, transform in site.transforms:
                result = transform(result)
        return sum(found.values())

    one, two = saved_bytes(1), saved_bytes(2)
    cost.per_token, cost.fixed = two - one, 2 * one - two
    return cost


def _trains(module: nn.Module, hooks: _HookCost) -> bool:
    return hooks.trains or any(p.requires_grad for p in module.parameters(recurse=False))


# ----------------------------------------------------------------------------- activations
def _width(module: nn.Module) -> int:
    weight = getattr(module, "weight", None)
    if weight is not None:
        return weight.shape[0]
    shape = getattr(module, "normalized_shape", None)
    return int(shape[0]) if shape else 0


def _activation_name(config) -> str:
    for name in ("hidden_act", "activation_function", "hidden_activation"):
        value = getattr(config, name, None)
        if isinstance(value, str):
            return value
    return "gelu"


def _norm_bytes(norm: nn.Module, elements: int, a: int, trains: bool, cuda: bool = True) -> int:
    """Bytes one norm keeps for ``elements`` normalized numbers (tokens x width, ``w`` wide each row).

    RMSNorm as transformers writes it (x.float(); x * rsqrt(mean(x^2) + eps); weight * y.to(dtype)):
    the fp32 copy of its input (4 bytes an element), the fp32 rsqrt per row, and y if the weight trains.
    LayerNorm (one fused op): its input at the compute dtype and the mean and rstd per row (fp32 on
    CUDA; the CPU kernel keeps them at the compute dtype).
    """
    rows = elements // max(1, _width(norm))
    if type(norm).__name__.endswith("RMSNorm") or isinstance(norm, nn.RMSNorm):
        return 4 * elements + 4 * rows + (a * elements if trains else 0)
    return a * elements + 2 * (4 if cuda else a) * rows


def _is_probability_dropout(name: str, layout: BlockLayout) -> bool:
    """Dropout on attention probabilities, which the fused attention kernel applies itself (keeping no mask):
    named so (GPT-2's ``attn_dropout``), or in the module that holds q/k/v but not the output projection
    (BERT's ``attention.self.dropout``)."""
    leaf = name.rsplit(".", 1)[-1]
    if "attn_dropout" in leaf or "attention_dropout" in leaf:
        return True
    parent = name.rpartition(".")[0]
    holds_inputs = any(n.rpartition(".")[0] == parent for n in layout.attention_inputs)
    holds_output = any(n.rpartition(".")[0] == parent for n in layout.attention_outputs)
    return holds_inputs and not holds_output


def block_activations(model: nn.Module, layout: BlockLayout, tokens: int, dtype: torch.dtype,
                      heads: int, activation: str, cuda: bool = True, input_needs_grad: bool = True) -> dict[str, int]:
    """Bytes one transformer block keeps for backward, by part, for ``tokens`` tokens.

    Derived from the ops of Llama-style (pre-RMSNorm, rotary attention, gated MLP), GPT-2 (pre-LN,
    fused QKV, GELU MLP) and BERT (post-LN) blocks, with fused (flash or memory-efficient) attention
    and ``a`` bytes per activation, ``h`` hidden, ``q, k, v`` the attention projection widths,
    ``I`` the MLP width, ``T`` tokens:

        norms        RMSNorm: 4·T·h (fp32 copy) + 4·T (rsqrt), + a·T·h if its weight trains;
                     LayerNorm: a·T·h (input) + 8·T (mean, rstd)
        attention    a·T·(q + k + v) (the kernel keeps q, k, v after rotary embedding, un-repeated for
                     grouped-query attention), a·T·q (its output, also the output projection's input),
                     4·T·heads (fp32 log-sum-exp)
        MLP          gated: the activation's saved inputs (silu: a·T·I) + both factors of the product
                     (2·a·T·I); plain: what the activation keeps (gelu: a·T·I, GPT-2's gelu_new: 4·a·T·I)
        linear input a·T·in for each distinct input of linear layers whose weight trains or whose
                     adapter keeps its input (LoRA's x for dA), once per tensor however many layers
                     read it (q, k, v share one); the MLP down projection's input a·T·I
        dropout      per residual dropout with p > 0 in train mode, its mask: 1·T·h on CUDA (bool, fused
                     kernel), a·T·h elsewhere (torch keeps the scaled noise tensor)
        adapters     what each adapter hook keeps besides its input, measured on meta tensors
                     (LoRA: x·Aᵀ a·T·r plus the low-precision casts of A and B)

    ``input_needs_grad=False`` (the lowest trained block, nothing trained below it): the pre-norm that
    reads the block input keeps nothing.
    """
    a = torch.tensor([], dtype=dtype).element_size()
    get = model.get_submodule
    parts = {"norms": 0, "attention": 0, "mlp": 0, "linear_inputs": 0, "dropout": 0, "adapters": 0}
    hooks = {}
    for name in layout.attention_inputs + layout.attention_outputs + layout.ffn_inputs + [layout.ffn_output]:
        if name:
            module = get(name)
            in_f, out_f = targeting.linear_features(module)
            hooks[name] = _hook_cost(module, in_f, out_f, dtype)
            parts["adapters"] += hooks[name].per_token * tokens + hooks[name].fixed

    def saves_input(name: str) -> bool:
        return hooks[name].saves_input or _trains(get(name), hooks[name])

    # norms; a norm narrower than the hidden size normalizes each head of q or k (e.g. Qwen3's q_norm)
    widths = [targeting.linear_features(get(n))[1] for n in layout.attention_inputs]
    hidden = targeting.linear_features(get(layout.attention_inputs[0]))[0] if widths else 0
    leading = layout.norms[0] if layout.norms and layout.norms[0].rpartition(".")[0] == layout.path else None
    for name in layout.norms:
        norm = get(name)
        width = per_token = _width(norm)
        if widths and width < hidden:
            per_token = widths[1] if name.rsplit(".", 1)[-1].startswith("k") and len(widths) > 1 else widths[0]
        trains = _trains(norm, _hook_cost(norm, width, width, dtype))
        if name == leading and not input_needs_grad:  # only a trained weight needs what it saw
            rms = type(norm).__name__.endswith("RMSNorm") or isinstance(norm, nn.RMSNorm)
            parts["norms"] += 0 if not trains else a * tokens * per_token if rms else \
                _norm_bytes(norm, tokens * per_token, a, trains, cuda)
            continue
        parts["norms"] += _norm_bytes(norm, tokens * per_token, a, trains, cuda)

    # attention
    if layout.attention_inputs:
        qkv = sum(targeting.linear_features(get(n))[1] for n in layout.attention_inputs)
        out_width = sum(targeting.linear_features(get(n))[0] for n in layout.attention_outputs)
        parts["attention"] += a * tokens * (qkv + out_width) + 4 * tokens * heads
        if any(saves_input(n) for n in layout.attention_inputs):
            parts["linear_inputs"] += a * tokens * targeting.linear_features(get(layout.attention_inputs[0]))[0]

    # MLP
    saved_by_act, act_keeps_output = _ACTIVATIONS.get(activation, (1, False))
    if layout.ffn_inputs:
        width = targeting.linear_features(get(layout.ffn_inputs[-1]))[1]
        product_factors = (2 - int(act_keeps_output)) if len(layout.ffn_inputs) >= 2 else 0
        parts["mlp"] += a * tokens * width * (saved_by_act + product_factors)
        if any(saves_input(n) for n in layout.ffn_inputs):
            parts["linear_inputs"] += a * tokens * targeting.linear_features(get(layout.ffn_inputs[0]))[0]
        down_input_kept = product_factors == 0 and act_keeps_output
        if layout.ffn_output and saves_input(layout.ffn_output) and not down_input_kept:
            parts["linear_inputs"] += a * tokens * targeting.linear_features(get(layout.ffn_output))[0]

    # residual dropouts (masks are bool)
    block = get(layout.path)
    for name, module in block.named_modules():
        if isinstance(module, nn.Dropout) and module.p > 0 and \
                not _is_probability_dropout(f"{layout.path}.{name}", layout):
            parts["dropout"] += tokens * hidden * (1 if cuda else a)
    return parts


def _outside_blocks(model: nn.Module, stacks: list[str], tokens: int, batch: int, dtype: torch.dtype,
                    seq_len: int, cuda: bool = True, grads_before: bool = True) -> dict[str, int]:
    """Activations kept outside the blocks: embedding/final norms and dropouts, the inputs of linear
    layers there (pooler, head), rotary cos/sin. Modules after a pooler (BERT's classifier side) see one
    row per sequence; a pooler reads a slice of every token's state, and keeping the slice keeps them
    all. Embedding-side modules keep nothing unless ``grads_before`` (something there trains)."""
    a = torch.tensor([], dtype=dtype).element_size()
    parts = {"norms": 0, "dropout": 0, "linear_inputs": 0, "rotary": 0}
    pooler: str | None = None
    after_blocks = False
    for name, module in model.named_modules():
        if not name:
            continue
        if is_under(name, stacks):
            after_blocks = True
            continue
        if not after_blocks and not grads_before and (is_norm(module) or isinstance(module, nn.Dropout)):
            continue
        if pooler is None and name.rsplit(".", 1)[-1] == "pooler":
            pooler = name
        rows = batch if pooler is not None and not is_under(name, [pooler]) else tokens
        if is_norm(module):
            width = _width(module)
            trains = _trains(module, _hook_cost(module, width, width, dtype))
            parts["norms"] += _norm_bytes(module, rows * width, a, trains, cuda)
        elif isinstance(module, nn.Dropout) and module.p > 0:
            width = getattr(model.config, "hidden_size", None) or getattr(model.config, "n_embd", 0)
            parts["dropout"] += rows * width * (1 if cuda else a)
        elif targeting.is_linear(module):
            in_f, out_f = targeting.linear_features(module)
            hooks = _hook_cost(module, in_f, out_f, dtype)
            if hooks.saves_input or _trains(module, hooks):
                parts["linear_inputs"] += a * rows * in_f
            parts["linear_inputs"] += hooks.per_token * rows + hooks.fixed
        elif "rotary" in type(module).__name__.lower():
            head_dim = getattr(model.config, "head_dim", None) or (
                model.config.hidden_size // model.config.num_attention_heads)
            parts["rotary"] += 2 * a * seq_len * head_dim  # cos and sin, shared by every layer
    return parts


def _needs_gradient(module: nn.Module) -> bool:
    """Whether ``module`` holds (or lets an adapter hook add) trainable parameters of its own."""
    if any(p.requires_grad for p in module.parameters(recurse=False)):
        return True
    site = module.__dict__.get(_SITE_ATTR)
    if site is None:
        return False
    adapters = [adapter for adapter, _ in site.updates + site.transforms + site.swaps]
    return any(p.requires_grad for adapter in adapters for p in adapter.parameters())


def _first_trained_block(model: nn.Module, layouts: list[BlockLayout]) -> tuple[int, bool]:
    """(index of the lowest block holding something trainable, whether something before the blocks trains).

    Blocks below that one keep nothing (no gradient flows there); neither do the embedding-side norms
    and dropouts unless something before the blocks (trained embeddings) needs a gradient."""
    first_block = layouts[0].path
    for name, module in model.named_modules():
        if name == first_block:
            break
        if _needs_gradient(module):
            return 0, True
    for index, lay in enumerate(layouts):
        if any(_needs_gradient(m) for m in model.get_submodule(lay.path).modules()):
            return index, False
    return len(layouts), False


def _working_set(model: nn.Module, layout: BlockLayout, tokens: int, dtype: torch.dtype) -> int:
    """Gradients in flight while one block runs backward, beyond what it keeps: the MLP's (the product's
    gradient frees the product; the two factors' gradients follow: 2 [T, I] tensors) or attention's
    (fp32 dq accumulator, dq/dk/dv, dk/dv expanded to every head for grouped-query attention),
    whichever is larger; plus, for NF4 layers, the largest weight dequantized for a moment."""
    a = torch.tensor([], dtype=dtype).element_size()
    get = model.get_submodule
    names = layout.attention_inputs + layout.attention_outputs + layout.ffn_inputs + [layout.ffn_output]
    dequantized = max((a * get(n).weight_numel for n in names if n and hasattr(get(n), "weight_numel")), default=0)
    mlp = attention = 0
    if layout.ffn_inputs:
        mlp = 2 * a * tokens * targeting.linear_features(get(layout.ffn_inputs[-1]))[1]
    if layout.attention_inputs:
        widths = [targeting.linear_features(get(n))[1] for n in layout.attention_inputs]
        q = widths[0] if len(widths) > 1 else widths[0] // 3
        grouped = len(widths) > 1 and widths[1] < q
        attention = 4 * tokens * q + (2 * a * tokens * q if grouped else 0) + a * tokens * sum(widths)
    return max(mlp, attention) + dequantized


# ----------------------------------------------------------------------------- the estimate
@dataclass
class _Parameters:
    """Sizes that follow from the parameters alone."""

    weights: int
    adapters: int
    gradients: int  # every trainable parameter's gradient at once
    optimizer: int
    paged: int  # optimizer states outside torch's allocator
    grads_top: int  # alive while the top block runs backward
    grads_bottom: int  # alive while the lowest trained block runs backward
    notes: dict[str, str]


def _parameter_sizes(run, counted: nn.Module, base: nn.Module, layouts: list[BlockLayout], first: int,
                     weight_dtype: torch.dtype, compute_dtype: torch.dtype) -> _Parameters:
    base_ids = {id(p) for p in base.parameters()}
    everything = [p for _, _, p in _unique_parameters(counted)]
    trainable = [p for p in everything if p.requires_grad]
    adapter_params = [p for p in everything if id(p) not in base_ids]
    autocast = _autocast_copies(base, weight_dtype, compute_dtype)
    optimizer = run.train.optimizer
    fused = optimizer in ("lomo", "adalomo")
    gradients = 0 if fused else sum(_nbytes(p) for p in trainable)
    states, paged = _optimizer_bytes(trainable, optimizer)

    before, in_blocks, after = _gradient_groups(base, layouts)
    bottom = min(first, len(layouts) - 1)
    if fused:  # only the gradient being used right now
        grads_top = _in_flight_gradient(in_blocks[-1], optimizer)
        grads_bottom = _in_flight_gradient(in_blocks[bottom] + before, optimizer)
    else:  # the head's and top block's are done; all but the lowest block's and the embeddings' are done
        grads_top = sum(_nbytes(p) for p in after + in_blocks[-1])
        grads_bottom = gradients - sum(_nbytes(p) for p in before + in_blocks[bottom])
    notes = {
        "weights": f"{_dtype_name(weight_dtype)} base" + (" with NF4 layers" if run.quantize else "")
        + (f" + {autocast / GIB:.3f} GiB autocast copies" if autocast else ""),
        "adapters": f"{sum(p.numel() for p in adapter_params):,} adapter parameters",
        "gradients": "none kept: each is used inside backward, the largest of the moment counted" if fused
        else f"{sum(p.numel() for p in trainable):,} trainable parameters",
        "optimizer": optimizer,
    }
    return _Parameters(_weight_bytes(base) + autocast, sum(_nbytes(p) for p in adapter_params), gradients, states,
                       paged, grads_top, grads_bottom, notes)


@dataclass
class _Activations:
    """Activation sizes of the moments of backward."""

    stored: int  # kept from forward for backward, at the end of forward
    per_block: list[int]  # what each block keeps (0 below the lowest trained block)
    top: int  # the top block's backward: recomputed activations + working set
    bottom: int  # the lowest trained block's backward: what is left + working set
    note: str


def _activation_sizes(base: nn.Module, layouts: list[BlockLayout], first: int, grads_before: bool, batch: int,
                      seq: int, dtype: torch.dtype, checkpointing: bool, cuda: bool) -> _Activations:
    config = base.config
    tokens = batch * seq
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", 1)
    activation = _activation_name(config)
    per_block = [sum(block_activations(base, lay, tokens, dtype, heads, activation, cuda,
                                       input_needs_grad=grads_before or i > first).values())
                 if i >= first else 0 for i, lay in enumerate(layouts)]
    stacks = sorted({lay.path.rsplit(".", 1)[0] for lay in layouts})
    outside = sum(_outside_blocks(base, stacks, tokens, batch, dtype, seq, cuda, grads_before).values())
    if first >= len(layouts):  # only modules after the blocks train
        return _Activations(outside, per_block, 0, 0, "outside blocks only (no block trains)")
    a = torch.tensor([], dtype=dtype).element_size()
    block_input = a * tokens * (getattr(config, "hidden_size", None) or config.n_embd)
    trained = len(layouts) - first
    work_top = _working_set(base, layouts[-1], tokens, dtype)
    work_bottom = _working_set(base, layouts[first], tokens, dtype)
    if checkpointing:  # each block keeps its input; backward recomputes one block at a time
        return _Activations(trained * block_input + outside, per_block, per_block[-1] + work_top,
                            block_input + per_block[first] + work_bottom,
                            f"{trained} block inputs (checkpointing) + outside blocks; one block recomputed "
                            "at a time")
    return _Activations(sum(per_block) + outside, per_block, work_top, per_block[first] + work_bottom,
                        f"{trained} blocks x {per_block[-1] / 2**20:,.1f} MiB + outside blocks")


def _logit_bytes(base: nn.Module, tokens: int, batch: int, chunked: bool, compute_dtype: torch.dtype
                 ) -> tuple[int, str]:
    """Bytes of the loss's logits at its backward, and how they are counted."""
    from .train.loss import chunked_loss_obstacle, slice_tokens

    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if head is not None and targeting.is_linear(head):
        hidden, vocab = targeting.linear_features(head)
        if not chunked or chunked_loss_obstacle(base) is not None:
            return 4 * LOGIT_COPIES_FP32 * tokens * vocab, (f"3 fp32 copies of {tokens:,} x {vocab:,} logits at the "
                                                             "loss backward")
        rows = min(tokens, slice_tokens(vocab))
        a = torch.empty((), dtype=compute_dtype).element_size()
        per_logit = 4 + (a if a < 4 else 0)  # the fp32 slice and the matmul's 16-bit output it came from
        head_grad = head.weight.numel() * head.weight.element_size() if head.weight.requires_grad else 0
        size = rows * vocab * per_logit + tokens * hidden * a + 4 * tokens + head_grad
        return size, (f"chunked loss: one {rows:,} x {vocab:,} slice of logits, the hidden-state gradient"
                      + (" and the head's gradient" if head_grad else ""))
    labels = getattr(base.config, "num_labels", 2)
    return 4 * LOGIT_COPIES_FP32 * batch * labels, f"{batch} x {labels} classification logits"


def estimate_run(run, config=None, task: str | None = None, cuda: bool = True) -> MemoryEstimate:
    """Estimate the peak memory of a training step as a run config describes it (see module docstring).

    ``config`` (a transformers config) is used instead of loading ``run.model``; ``task`` forces
    ``"classification"`` or ``"causal_lm"`` (default: the config's architecture); ``cuda=False``
    describes a CPU run (no cuBLAS workspaces, dropout keeps its noise in the activation dtype).
    """
    from .train.setup import weights_dtype

    precision = "bf16" if run.train.precision == "auto" else run.train.precision
    compute_dtype, weight_dtype = _DTYPES[precision], weights_dtype(run, precision)
    source = config if config is not None else load_model_config(run.model)
    counted = prepare_skeleton(build_skeleton(source, task=task, dtype=weight_dtype), run)
    counted.train()
    base, _ = split_wrapped(counted)
    layouts = block_layouts(base)
    if not layouts:
        raise EstimateError(f"estimate: {type(base).__name__} has no list of transformer blocks, so its "
                            "activations cannot be derived.")
    batch, seq, checkpointing = run.train.batch_size, run.data.max_seq_len, run.train.gradient_checkpointing
    first, grads_before = _first_trained_block(base, layouts)
    params = _parameter_sizes(run, counted, base, layouts, first, weight_dtype, compute_dtype)
    acts = _activation_sizes(base, layouts, first, grads_before, batch, seq, compute_dtype, checkpointing, cuda)
    logits, logits_note = _logit_bytes(base, batch * seq, batch, run.train.chunked_loss, compute_dtype)
    overhead = MATMUL_THREADS * _cublas_workspace() if cuda else 0

    moments = {  # (gradients, activations, logits) alive at each moment of a step
        "loss": (0, acts.stored, logits),
        "backward": (params.grads_top, acts.stored + acts.top, 0),
        "end": (params.grads_bottom, acts.bottom, 0),
        "step": (params.gradients, 0, 0),
    }
    fixed = params.weights + params.adapters + params.optimizer + overhead
    phases = {name: fixed + sum(parts) for name, parts in moments.items()}
    peak = max(phases, key=phases.get)
    grads, activations, logit_part = moments[peak]
    parts = {"weights": params.weights, "adapters": params.adapters, "gradients": grads,
             "optimizer": params.optimizer, "activations": activations, "logits": logit_part, "overhead": overhead}
    if peak == "loss" and params.gradients:
        params.notes["gradients"] += (f"; none at this moment (zero_grad(set_to_none=True) freed the last step's), "
                                      f"{params.gradients / 2**20:,.1f} MiB at the step")
    notes = {**params.notes, "activations": acts.note, "logits": logits_note,
             "overhead": f"{MATMUL_THREADS} cuBLAS workspaces of {overhead / MATMUL_THREADS / 2**20:g} MiB" if cuda
             else "none on CPU"}
    totals = {"weights": params.weights, "adapters": params.adapters, "gradients": params.gradients,
              "optimizer": params.optimizer, "stored_activations": acts.stored, "logits": logits}
    setup = {"model": run.model if config is None else getattr(source, "model_type", "model"),
             "method": run.method, "method_options": dict(run.method_options), "quantize": run.quantize,
             "batch_size": batch, "seq_len": seq, "optimizer": run.train.optimizer, "precision": precision,
             "gradient_checkpointing": checkpointing, "weights_dtype": _dtype_name(weight_dtype),
             "activations_per_block": acts.per_block[-1], "blocks": len(layouts), "first_trained_block": first}
    outside = {"paged optimizer states": params.paged} if params.paged else {}
    return MemoryEstimate(setup, parts, phases, peak, totals, notes, outside)


def _cublas_workspace() -> int:
    """Bytes of one cuBLAS workspace: ``CUBLAS_WORKSPACE_CONFIG`` (``:SIZE_KIB:COUNT`` pairs) when set."""
    setting = os.environ.get("CUBLAS_WORKSPACE_CONFIG", "")
    try:
        numbers = [int(n) for n in setting.strip(":").split(":")] if setting else []
    except ValueError:
        numbers = []
    if numbers and len(numbers) % 2 == 0:
        return sum(size * count for size, count in zip(numbers[::2], numbers[1::2])) * 1024
    return CUBLAS_WORKSPACE


def _dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in _DTYPES.items()}.get(dtype, str(dtype).removeprefix("torch."))


def estimate_memory(model, *, method: str = "lora", method_options: dict | None = None, quantize: str | None = None,
                    batch_size: int = 1, seq_len: int = 512, optimizer: str | None = None,
                    gradient_checkpointing: bool = False, precision: str = "bf16", task: str | None = None,
                    chunked_loss: bool = True, cuda: bool = True) -> MemoryEstimate:
    """Estimate the peak GPU memory of finetuning ``model`` (folder, hub id, ``pkg:`` reference or a
    transformers config) with ``method`` (any ``peftlab finetune`` method) on ``batch_size`` x
    ``seq_len`` tokens. ``optimizer`` defaults as in ``peftlab finetune`` (adamw; the fused optimizer
    for lomo/adalomo); ``chunked_loss=False`` counts the model's own loss instead of the chunked one
    (``train.chunked_loss``). See the module docstring for what is counted."""
    train: dict[str, Any] = {"batch_size": batch_size, "gradient_checkpointing": gradient_checkpointing,
                             "precision": precision, "chunked_loss": chunked_loss}
    if optimizer is not None:
        train["optimizer"] = optimizer
    run = method_run_config(model if isinstance(model, str) else "(config)", method=method,
                            method_options=method_options, quantize=quantize, train=train, seq_len=seq_len)
    return estimate_run(run, config=None if isinstance(model, str) else model, task=task, cuda=cuda)
