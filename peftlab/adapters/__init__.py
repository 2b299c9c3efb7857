"""Built-in methods; importing a method's module registers it (see ``peftlab.registry``)."""
from .base import Adapter, AdapterConfig
from .bitfit import BitFit, BitFitConfig
from .houlsby import Houlsby, HoulsbyConfig, Pfeiffer, PfeifferConfig
from .lora import Lora, LoraConfig
from .prefix import PrefixTuning, PrefixTuningConfig

__all__ = ["Adapter", "AdapterConfig", "BitFit", "BitFitConfig", "Houlsby", "HoulsbyConfig", "Lora", "LoraConfig",
           "Pfeiffer", "PfeifferConfig", "PrefixTuning", "PrefixTuningConfig"]
