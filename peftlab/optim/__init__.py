"""Optimizers that update parameters inside the backward pass (LOMO, AdaLomo)."""
from .lomo import (
    AdaLomo,
    DynamicLossScaler,
    Lomo,
    LomoConfigError,
    LomoUsageError,
    state_dict_from_safetensors,
    state_dict_to_safetensors,
)

__all__ = [
    "AdaLomo",
    "DynamicLossScaler",
    "Lomo",
    "LomoConfigError",
    "LomoUsageError",
    "state_dict_from_safetensors",
    "state_dict_to_safetensors",
]
