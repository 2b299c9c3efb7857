"""Built-in methods; importing a method's module registers it (see ``peftlab.registry``)."""
from .base import Adapter, AdapterConfig
from .lora import Lora, LoraConfig

__all__ = ["Adapter", "AdapterConfig", "Lora", "LoraConfig"]
