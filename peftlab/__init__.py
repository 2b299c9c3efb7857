"""peftlab: parameter-efficient finetuning for Hugging Face transformers.

>>> import peftlab
>>> model = peftlab.wrap(hf_model, peftlab.LoraConfig(r=16, alpha=32))
>>> model.save("my-adapter")            # HF PEFT format
>>> merged = model.merge_and_unload()    # a plain transformers model again
"""

__version__ = "0.1.0"

from . import registry
from .adapters import Adapter, AdapterConfig, LoraConfig
from .errors import AdapterStateError, CheckpointError, ConfigError, MergeError, PeftlabError, TargetError
from .model import PeftModel, load, wrap

__all__ = [
    "Adapter", "AdapterConfig", "AdapterStateError", "CheckpointError", "ConfigError", "LoraConfig", "MergeError",
    "PeftModel", "PeftlabError", "TargetError", "load", "registry", "wrap",
]
