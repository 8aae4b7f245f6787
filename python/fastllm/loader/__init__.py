"""Model loading: find a model on disk, read its config, stream its weights.

    source = resolve_model(None)                 # the default SmolLM2 GGUF
    config = load_config(source)                 # HF-style config dict
    for name, tensor in iterate_weights(source, dtype=torch.float32):
        params[name].copy_(tensor)               # HF parameter names

Formats: safetensors (memory-mapped), PyTorch .bin/.pt (weights_only), GGUF (F32, F16, BF16,
Q8_0, Q4_0, Q4_1, Q4_K, Q6_K dequantized, or raw via `iterate_gguf_raw`) and dummy.
"""

from __future__ import annotations

import importlib
from typing import Any

from .config import load_config
from .gguf_dequant import dequantize
from .gguf_file import GGUFFile, open_gguf
from .gguf_raw import RawGGUFTensor, dequantize_raw, iterate_gguf_raw
from .source import LOAD_FORMATS, ModelSource, default_gguf_path, resolve_model

# Names whose modules import torch (~1 s): loaded on first use, so that the tokenizer and
# config paths start without torch.
_LAZY = {
    "expected_parameter_shapes": ".dummy",
    "iterate_weights": ".weights",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "LOAD_FORMATS",
    "GGUFFile",
    "ModelSource",
    "RawGGUFTensor",
    "default_gguf_path",
    "dequantize",
    "dequantize_raw",
    "expected_parameter_shapes",
    "iterate_gguf_raw",
    "iterate_weights",
    "load_config",
    "open_gguf",
    "resolve_model",
]
