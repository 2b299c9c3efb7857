"""4-bit NF4 quantization: the frozen quantized base of QLoRA, in bitsandbytes' format."""
from .linear4bit import NF4Linear, default_compute_dtype
from .loading import (
    QuantizationError,
    QuantizationReport,
    from_pretrained,
    quantize_model,
)
from .nf4 import (
    NF4_CODE,
    NF4FormatError,
    QuantState,
    decode_absmax,
    dequantize_nf4,
    quantize_nf4,
)

__all__ = [
    "NF4_CODE",
    "NF4FormatError",
    "NF4Linear",
    "QuantizationReport",
    "QuantState",
    "QuantizationError",
    "decode_absmax",
    "default_compute_dtype",
    "dequantize_nf4",
    "from_pretrained",
    "quantize_model",
    "quantize_nf4",
]
