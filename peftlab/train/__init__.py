"""Training: the ``peftlab finetune`` engine (``trainer``), the chunked LM loss and the CUDA-graphed step."""
from .graphed import GraphedStep
from .loss import causal_lm_loss, chunked_linear_cross_entropy

__all__ = ["GraphedStep", "causal_lm_loss", "chunked_linear_cross_entropy"]
