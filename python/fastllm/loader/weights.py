"""`iterate_weights`: stream (HF parameter name, torch tensor) pairs from any `ModelSource`.

Tensors are yielded one at a time so a caller can copy each into its model and drop it; peak
memory stays near one tensor beyond the model itself. Floating-point tensors are cast to the
requested dtype; integer tensors pass through unchanged. Rotary `inv_freq` buffers that old
checkpoints carry are skipped (models recompute them).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from fastllm.torch_extra import torch

from .config import load_config
from .dummy import iterate_dummy_weights
from .gguf_weights import iterate_gguf_weights
from .source import ModelSource
from .tensor_cast import cast_weight


def iterate_weights(
    source: ModelSource,
    load_format: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) for every weight of `source`.

    `load_format` None or "auto" uses `source.load_format`; "dummy" works for any source.
    Errors reading a file raise ValueError naming it.
    """
    fmt = source.load_format if load_format in (None, "auto") else load_format
    if fmt == "dummy":
        yield from iterate_dummy_weights(load_config(source), dtype)
    elif fmt == "gguf":
        if source.gguf_path is None:
            raise ValueError(f"load_format 'gguf' needs a .gguf file, got {source.model_dir}")
        yield from iterate_gguf_weights(source.gguf_path, dtype)
    elif fmt == "safetensors" and source.quant is not None:
        # An HF quantized checkpoint on the float path: its linears dequantized.
        from .hf_quant import iterate_dequantized

        for name, values in iterate_dequantized(source, source.quant):
            yield name, cast_weight(torch.from_numpy(np.ascontiguousarray(values)), dtype)
    elif fmt in ("safetensors", "pt"):
        if fmt != source.load_format:
            raise ValueError(
                f"load_format {fmt!r} differs from the resolved {source.load_format!r}; "
                "pass it to resolve_model instead"
            )
        reader = _iterate_safetensors if fmt == "safetensors" else _iterate_pt
        for path in source.weight_files:
            for name, tensor in reader(path):
                if name.endswith("rotary_emb.inv_freq"):
                    continue
                yield name, cast_weight(tensor, dtype)
    else:
        raise ValueError(f"unknown load_format {fmt!r}")


def _iterate_safetensors(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Memory-mapped tensors of one safetensors file, in the file's key order."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                yield name, f.get_tensor(name)
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise ValueError(f"cannot read safetensors file {path}: {exc}") from exc


def _iterate_pt(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors of a torch-saved state dict, loaded with weights_only (no pickle code runs) and
    memory-mapped where the file format allows it."""
    try:
        state: Any = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "mmap" not in str(exc):
            raise ValueError(f"cannot read PyTorch weight file {path}: {exc}") from exc
        # Legacy (non-zip) files cannot be memory-mapped; read them whole.
        state = _load_pt_unmapped(path)
    except Exception as exc:  # pickle/zip errors come in many types
        raise ValueError(f"cannot read PyTorch weight file {path}: {exc}") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"PyTorch weight file {path} does not hold a state dict")  # noqa: TRY004
    for name, tensor in state.items():
        if isinstance(tensor, torch.Tensor):
            yield name, tensor


def _load_pt_unmapped(path: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"cannot read PyTorch weight file {path}: {exc}") from exc
