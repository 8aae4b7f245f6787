"""Model loading: find a model on disk, read its config, stream its weights.

    source = resolve_model(None)                 # the default SmolLM2 GGUF
    config = load_config(source)                 # HF-style config dict
    for name, tensor in iterate_weights(source, dtype=torch.float32):
        params[name].copy_(tensor)               # HF parameter names

Formats: safetensors (memory-mapped), PyTorch .bin/.pt (weights_only), GGUF (F32, F16, BF16,
Q8_0, Q4_0, Q4_1, Q4_K, Q6_K dequantized, or raw via `iterate_gguf_raw`) and dummy.
"""

from .config import load_config
from .dummy import expected_parameter_shapes
from .gguf_dequant import dequantize
from .gguf_file import GGUFFile, open_gguf
from .gguf_weights import RawGGUFTensor, iterate_gguf_raw
from .source import LOAD_FORMATS, ModelSource, default_gguf_path, resolve_model
from .weights import iterate_weights

__all__ = [
    "LOAD_FORMATS",
    "GGUFFile",
    "ModelSource",
    "RawGGUFTensor",
    "default_gguf_path",
    "dequantize",
    "expected_parameter_shapes",
    "iterate_gguf_raw",
    "iterate_weights",
    "load_config",
    "open_gguf",
    "resolve_model",
]
