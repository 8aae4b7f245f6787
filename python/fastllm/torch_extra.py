"""PyTorch is optional. The base install serves GGUF models on the CPU through the C++ executor
and never imports it; HF-format models, float weights and GPUs run the torch executor, which the
`torch` extra brings (``pip install "fastllm[torch]"``, any torch from the minimum on, CPU or CUDA
build). The modules of that path take torch from here,

    from fastllm.torch_extra import torch

so that without it the error names the extra, not just "No module named 'torch'". Importing this
module never imports torch; reading its ``torch`` attribute does.
"""

from __future__ import annotations

import types
from typing import TYPE_CHECKING

INSTALL_HINT = 'pip install "fastllm[torch]"'

if TYPE_CHECKING:  # type checkers see the real module behind the lazy attribute
    import torch  # noqa: F401 (the lazy attribute, as type checkers should see it)


class TorchMissingError(ModuleNotFoundError):
    """torch is not installed and the requested path needs it (an ImportError, as a missing
    import would be, whose message says what needs torch and how to get it)."""


def require_torch(purpose: str) -> types.ModuleType:
    """The torch module, or TorchMissingError saying that ``purpose`` needs it."""
    try:
        import torch
    except ModuleNotFoundError as exc:
        if exc.name != "torch":  # torch is there but broken: its own error says more
            raise
        raise TorchMissingError(
            f"{purpose} needs PyTorch, which the base install of fastllm leaves out (it serves "
            f"GGUF models on the CPU without it): {INSTALL_HINT}", name="torch") from None
    return torch


def __getattr__(name: str) -> types.ModuleType:
    if name == "torch":
        module = require_torch("fastllm's torch path (HF-format models, float weights, GPUs)")
        globals()["torch"] = module  # later lookups skip this function
        return module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
