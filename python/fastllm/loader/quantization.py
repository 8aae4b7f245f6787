"""Which quantization a model uses: ``detect_quantization`` reads it from the checkpoint (GGUF
block types, or ``quantization_config`` in an HF ``config.json``) and checks it against
``--quantization``. No torch.

    scheme = detect_quantization(source, hf_config, args.quantization)  # None: float weights
    scheme.method        # "gptq" | "awq" | "compressed-tensors" | "fp8"
    scheme.config        # the checkpoint's quantization_config

A GGUF file's quantization lives in its tensors (``-q gguf`` only confirms it) and is read by the
GGUF loader, so it gives None here. The HF formats are read by ``loader.hf_quant``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .source import ModelSource

# The methods a checkpoint's quant_method (or --quantization) may name (fastllm.config's
# QUANTIZATION_CHOICES lists the same with the aliases below: vLLM's kernel names).
QUANTIZATION_METHODS = ("gguf", "gptq", "awq", "compressed-tensors", "fp8")
_ALIASES = {"gptq_marlin": "gptq", "marlin": "gptq",
            "awq_marlin": "awq", "compressed_tensors": "compressed-tensors"}


def _supported() -> str:
    return ", ".join(QUANTIZATION_METHODS)


def canonical_method(name: str, where: str) -> str:
    """The method ``name`` stands for; ValueError naming the supported ones otherwise."""
    key = str(name).strip().lower()
    method = _ALIASES.get(key, key)
    if method not in QUANTIZATION_METHODS:
        raise ValueError(f"{where}: quantization method {name!r} is not supported; supported: "
                         f"{_supported()}")
    return method


@dataclass(frozen=True)
class QuantScheme:
    """An HF checkpoint's quantization: its method and its ``quantization_config``."""

    method: str
    config: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        c = self.config
        if self.method in ("gptq", "awq"):
            return (f"{self.method} {c.get('bits', '?')}-bit, group {c.get('group_size', '?')}"
                    + (", desc_act" if c.get("desc_act") else ""))
        if self.method == "compressed-tensors":
            return f"compressed-tensors ({c.get('format', '?')})"
        return self.method


def detect_quantization(source: ModelSource, hf_config: dict[str, Any],
                        requested: str | None) -> QuantScheme | None:
    """The quantization ``source`` is stored in (None: GGUF or float weights), checked against
    ``requested`` (``--quantization``; None: whatever the checkpoint says). ValueError when the
    two disagree or a method is unknown, naming the supported ones."""
    wanted = None if requested in (None, "") else canonical_method(requested, "--quantization")
    if source.load_format == "dummy":
        if wanted not in (None,):
            raise ValueError(f"--quantization {requested}: dummy weights are not quantized")
        return None
    if source.is_gguf:
        if wanted not in (None, "gguf"):
            raise ValueError(f"--quantization {requested}: {source.gguf_path} is a GGUF file "
                             "(its quantization is read from the file; use -q gguf or nothing)")
        return None
    config = hf_config.get("quantization_config") or hf_config.get("compression_config")
    if config is None:
        if wanted is not None:
            raise ValueError(f"--quantization {requested}: {source.model_dir}/config.json has "
                             "no quantization_config (the checkpoint holds float weights)")
        return None
    if not isinstance(config, dict) or "quant_method" not in config:
        raise ValueError(f"{source.model_dir}/config.json: quantization_config has no "
                         "quant_method")
    method = canonical_method(config["quant_method"], f"{source.model_dir}/config.json")
    if method == "gguf":
        raise ValueError(f"{source.model_dir}/config.json: quant_method 'gguf' in an HF "
                         "directory; pass the .gguf file itself")
    if wanted is not None and wanted != method:
        raise ValueError(f"--quantization {requested} does not match the checkpoint's "
                         f"quantization_config ({method}); supported: {_supported()}")
    return QuantScheme(method, dict(config))
