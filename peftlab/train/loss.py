"""Language-model loss without materialising the ``tokens × vocab`` logits.

``chunked_linear_cross_entropy`` computes ``cross_entropy(hidden @ weight.T + bias, labels)`` over
slices of tokens. The forward keeps only the per-token log-sum-exp (4 bytes a token); the backward
recomputes each slice's logits and turns them into gradients at once. Peak extra memory is one
slice's logits instead of the whole ``batch × seq × vocab`` tensor (0.49 GiB in fp32 for
4 × 1024 tokens and a 32k vocabulary, times the copies autograd keeps).
"""
from __future__ import annotations

import torch
from torch import nn

from ..model import PeftModel

__all__ = ["chunked_linear_cross_entropy", "causal_lm_loss", "chunked_loss_obstacle", "slice_tokens"]


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Mean token cross-entropy of ``hidden @ weight.T + bias``; logits recomputed in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_size, ignore_index):
        n_tokens = hidden.shape[0]
        lse = torch.empty(n_tokens, dtype=torch.float32, device=hidden.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        valid = labels != ignore_index
        for start in range(0, n_tokens, chunk_size):
            sl = slice(start, start + chunk_size)
            logits = _logits(hidden[sl], weight, bias)
            target = logits.gather(1, labels[sl].clamp(min=0).unsqueeze(1)).squeeze(1)
            # log-sum-exp in place: the chunk's fp32 logits are the only large buffer
            peak = logits.amax(dim=1, keepdim=True)
            lse[sl] = logits.sub_(peak).exp_().sum(dim=1).log_().add_(peak.squeeze(1))
            total += ((lse[sl] - target) * valid[sl]).sum()
            del logits
        n_valid = valid.sum()
        ctx.save_for_backward(hidden, weight, bias, labels, lse, n_valid)
        ctx.chunk_size, ctx.ignore_index = chunk_size, ignore_index
        return total / n_valid

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, bias, labels, lse, n_valid = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        scale = grad_loss.float() / n_valid
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            sl = slice(start, start + ctx.chunk_size)
            h, y = hidden[sl], labels[sl]
            # d loss / d logits = (softmax - onehot) * scale, zero on ignored tokens; built in place.
            dlogits = _logits(h, weight, bias).sub_(lse[sl].unsqueeze(1)).exp_()
            valid = (y != ctx.ignore_index).unsqueeze(1)
            dlogits.scatter_add_(1, y.clamp(min=0).unsqueeze(1), -valid.float())  # no host sync
            dlogits.mul_(scale * valid)
            if need_b:
                grad_b += dlogits.sum(0)
            dlogits = dlogits.to(weight.dtype)
            if need_h:
                grad_h[sl] = dlogits @ weight
            if need_w:
                grad_w.addmm_(dlogits.t(), h.to(weight.dtype))
            del dlogits
        if need_b:
            grad_b = grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None


def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out = hidden.to(weight.dtype) @ weight.t()
    if bias is not None:
        out = out + bias
    return out.float()


def chunked_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    chunk_size: int = 1024,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T (+ bias)`` against ``labels``, in token chunks.

    Args:
        hidden: ``[..., hidden_size]`` activations (any leading shape; flattened to tokens).
        weight: ``[vocab, hidden_size]`` output projection (an ``nn.Linear`` weight).
        labels: token ids with the same leading shape as ``hidden``; ``ignore_index`` is skipped.
        bias: optional ``[vocab]`` bias.
        chunk_size: tokens per slice; the slice's fp32 logits are the only large temporary.
        ignore_index: label value excluded from the loss and from the mean's denominator.

    Matches ``torch.nn.functional.cross_entropy(logits.float(), labels)`` (mean reduction),
    including NaN when no label is valid.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of tokens, got {chunk_size}")
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"labels shape {tuple(labels.shape)} must equal hidden's leading shape "
                         f"{tuple(hidden.shape[:-1])}")
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    return _ChunkedLinearCrossEntropy.apply(hidden2d, weight, bias, labels.reshape(-1), chunk_size, ignore_index)


SLICE_LOGITS = 1 << 25  # logits per loss slice: 128 MiB in fp32 (1024 tokens of a 32k vocabulary)


def slice_tokens(vocab: int) -> int:
    """Tokens per slice that ``peftlab finetune`` uses for a vocabulary of ``vocab``: a multiple of 128."""
    return max(1, SLICE_LOGITS // vocab // 128) * 128


_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale")


def _language_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a ``PeftModel`` (whose ``base_model`` is it), or ``model`` itself."""
    return model.base_model if isinstance(model, PeftModel) else model


def chunked_loss_obstacle(model: nn.Module) -> str | None:
    """Why :func:`causal_lm_loss` cannot stand in for ``model(..., labels=...).loss``, or None when it can.

    It computes ``lm_head(hidden)`` itself from the head's weight, so the model must take no more
    than that from its last hidden state: no logit transform, no auxiliary loss, and an output
    head that is a plain ``nn.Linear`` with nothing hooked onto it (an adapter's trained copy or
    offloading would be bypassed).
    """
    model = _language_model(model)
    config = getattr(model, "config", None)
    for field in _LOGIT_TRANSFORMS:
        value = getattr(config, field, None)
        if value not in (None, 1, 1.0):
            return f"config.{field}={value} transforms the logits"
    if getattr(config, "output_router_logits", False):
        return "config.output_router_logits adds the router's auxiliary loss"
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not nn.Linear:
        return f"the output embedding is {type(head).__name__}, not a plain nn.Linear"
    if head._forward_hooks or head._forward_pre_hooks or "forward" in head.__dict__:
        return "the output embedding has forward hooks (an adapter's trained copy or offloading) that it would bypass"
    return None


def causal_lm_loss(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    labels: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    chunk_size: int = 1024,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Next-token loss of a Hugging Face causal LM (or a ``PeftModel`` of one), as
    ``model(..., labels=labels).loss``, chunked.

    Runs the backbone (``model.base_model``), then the chunked cross-entropy against the output
    embedding (``model.get_output_embeddings()``), with labels shifted one position left. Labels
    default to ``input_ids`` with padding (``attention_mask == 0``) ignored; ``position_ids``
    (packed sequences) go to the backbone. Refuses, with a ``ValueError``, the models
    :func:`chunked_loss_obstacle` names a reason for.
    """
    obstacle = chunked_loss_obstacle(model)
    if obstacle is not None:
        raise ValueError(f"causal_lm_loss: {obstacle}; use the model's own loss for this model")
    model = _language_model(model)
    head = model.get_output_embeddings()
    if labels is None:
        labels = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, ignore_index)
    shifted = torch.full_like(labels, ignore_index)
    shifted[:, :-1] = labels[:, 1:]
    extra = {} if position_ids is None else {"position_ids": position_ids}
    out = model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra)
    hidden = out[0]
    return chunked_linear_cross_entropy(hidden, head.weight, shifted, bias=head.bias,
                                        chunk_size=chunk_size, ignore_index=ignore_index)
