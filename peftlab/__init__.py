"""peftlab: parameter-efficient finetuning for Hugging Face transformers.

>>> import peftlab
>>> model = peftlab.wrap(hf_model, peftlab.LoraConfig(r=16, alpha=32))
>>> model.save("my-adapter")            # HF PEFT format
>>> merged = model.merge_and_unload()    # a plain transformers model again
"""

__version__ = "0.1.0"

from . import registry
from .adapters import (
                       Adapter,
                       AdapterConfig,
                       BitFitConfig,
                       HoulsbyConfig,
                       LoraConfig,
                       PfeifferConfig,
                       PrefixTuningConfig,
)
from .errors import (
                       AdapterStateError,
                       CheckpointError,
                       ConfigError,
                       MergeError,
                       PeftlabError,
                       TargetError,
)
from .export import export
from .model import PeftModel, load, wrap
from .quant import NF4Linear, from_pretrained
from .quant import quantize_model as quantize

__all__ = [
    "Adapter", "AdapterConfig", "AdapterStateError", "BitFitConfig", "CheckpointError", "ConfigError",
    "HoulsbyConfig", "LoraConfig", "MergeError", "NF4Linear", "PeftModel", "PeftlabError", "PfeifferConfig",
    "PrefixTuningConfig", "TargetError", "export", "from_pretrained", "load", "quantize", "registry", "wrap",
]
