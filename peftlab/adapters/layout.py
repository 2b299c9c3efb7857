"""Where the sublayers of a transformer block are, found from module structure (not a table of names).

In every block of the model's outermost ``nn.ModuleList`` of blocks, each submodule named like
``*attn*``/``*attention*`` is an attention sublayer whose last linear layer is its output
projection; the last linear layer outside the attention sublayers is the feed-forward output.
Used by methods that place themselves by role (bottleneck adapters, BitFit's bias groups).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from .. import targeting
from ..targeting import is_under

_ATTENTION_NAME = re.compile(r"attn|attention", re.IGNORECASE)


@dataclass
class BlockLayout:
    """The sublayers of one transformer block, as module paths in registration order."""

    path: str
    index: int
    attention_inputs: list[str]  # q/k/v projections (or fused ones) of every attention sublayer
    attention_outputs: list[str]  # one output projection per attention sublayer
    ffn_inputs: list[str]  # up/gate/fc1/intermediate projections
    ffn_output: str | None
    norms: list[str]


def is_norm(module: nn.Module) -> bool:
    """LayerNorm or RMSNorm, torch's or a model's own class."""
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or type(module).__name__.endswith(("LayerNorm", "RMSNorm"))


def _has_linear(module: nn.Module) -> bool:
    return any(targeting.is_linear(m) for m in module.modules())


def block_lists(model: nn.Module) -> list[str]:
    """Names of the outermost ``nn.ModuleList``s that hold linear layers (the stacks of blocks)."""
    found: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and not is_under(name, found) and _has_linear(module):
            found.append(name)
    return found


def _layout(path: str, index: int, block: nn.Module) -> BlockLayout:
    """Attention sublayers are the outermost submodules named like ``*attn*``/``*attention*`` that hold
    linear layers; the last linear layer registered in each is its output projection (o_proj, c_proj,
    attention.output.dense, out_proj, dense, o). The last one outside them is the feed-forward output."""
    linears = [n for n, m in block.named_modules() if n and targeting.is_linear(m)]
    roots: list[str] = []
    for name, module in block.named_modules():
        last = name.rsplit(".", 1)[-1]
        if (name and _ATTENTION_NAME.search(last) and not targeting.is_linear(module)
                and not is_under(name, roots) and _has_linear(module)):
            roots.append(name)
    attention_inputs, attention_outputs = [], []
    for root in roots:
        inside = [n for n in linears if is_under(n, [root])]
        attention_inputs += inside[:-1]
        attention_outputs.append(inside[-1])
    ffn = [n for n in linears if not is_under(n, roots)]
    norms = [n for n, m in block.named_modules() if n and is_norm(m)]

    def full(names: list[str]) -> list[str]:
        return [f"{path}.{n}" for n in names]

    return BlockLayout(path, index, full(attention_inputs), full(attention_outputs), full(ffn[:-1]),
                       f"{path}.{ffn[-1]}" if ffn else None, full(norms))


def block_layouts(model: nn.Module) -> list[BlockLayout]:
    """The layout of every transformer block (empty if the model has no list of blocks)."""
    return [_layout(f"{stack}.{i}", i, block)
            for stack in block_lists(model) for i, block in enumerate(model.get_submodule(stack))]
