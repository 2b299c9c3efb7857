"""The LoRA term ``out + (x @ A.T) @ (s·B).T`` as one autograd node.

Written out with plain ops, every adapted layer records seven autograd nodes (two casts, a scale,
two matmuls, reshapes) per forward — and gradient checkpointing runs the forward twice. This node
does the same arithmetic with two kernels forward and four backward, saving only the input and
the ``[tokens, r]`` intermediate. The 16-bit copies of A and s·B are made once per weight update
(see ``LoraWeights``); their gradients land on the fp32 A and B directly.

A copy is stale once its fp32 weight changes. In-place tensor ops bump the weight's version
counter, but fused optimizer kernels (``AdamW(fused=True)``) do not, so every optimizer step also
advances a global generation (:func:`generation`) through torch's optimizer step hook; code that
changes the weights some other way calls :func:`weights_changed`.
"""
from __future__ import annotations

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

_generation = 0


def weights_changed(*_args) -> None:
    """Mark every cached 16-bit adapter copy stale (runs after each torch optimizer step)."""
    global _generation
    _generation += 1


def generation() -> int:
    """Advances whenever adapter weights may have changed without their version counters moving."""
    return _generation


register_optimizer_step_post_hook(weights_changed)


class LoraTerm(torch.autograd.Function):
    """``out + (x @ a16.T) @ b16.T`` where ``a16``/``b16`` are 16-bit copies of fp32 ``A``/``s·B``.

    ``A`` and ``B`` are passed only so autograd routes their gradients; the forward reads the copies.
    Shapes: ``x [..., in]``, ``out [..., out]`` contiguous and of ``x``'s dtype, ``A [r, in]``, ``B [out, r]``.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, out: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                a16: torch.Tensor, b16: torch.Tensor, scaling: float) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        h = x2 @ a16.t()
        result = torch.addmm(out.reshape(-1, out.shape[-1]), h, b16.t())
        ctx.save_for_backward(x2, h, a16, b16)
        ctx.scaling = scaling
        ctx.x_shape = x.shape
        return result.view(out.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x2, h, a16, b16 = ctx.saved_tensors
        need_x, need_out, need_a, need_b = ctx.needs_input_grad[:4]
        g2 = grad.reshape(-1, grad.shape[-1])
        gh = g2 @ b16  # d loss / d h, [tokens, r]
        grad_x = (gh @ a16).view(ctx.x_shape) if need_x else None
        grad_a = (gh.t() @ x2).float() if need_a else None
        grad_b = (g2.t() @ h).float().mul_(ctx.scaling) if need_b else None
        return grad_x, grad if need_out else None, grad_a, grad_b, None, None, None
