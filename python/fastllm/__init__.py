"""fastllm: LLM inference and serving with a compiled C++/CUDA core."""

from __future__ import annotations

from fastllm.cpp_package import cmake_dir as cmake_dir
from fastllm.version import __version__ as __version__

__all__ = ["LLM", "CompletionOutput", "EngineArgs", "LoRARequest", "RequestOutput",
           "SamplingParams", "cmake_dir"]


def __getattr__(name: str):
    # Lazy, so `import fastllm` (and the CLI's --help) stays fast and torch-free.
    if name == "LLM":
        from fastllm.entrypoints.llm import LLM

        return LLM
    if name == "SamplingParams":
        from fastllm.sampling_params import SamplingParams

        return SamplingParams
    if name in ("RequestOutput", "CompletionOutput"):
        from fastllm import outputs

        return getattr(outputs, name)
    if name == "BeamSearchParams":
        from fastllm.engine.beam_search import BeamSearchParams

        return BeamSearchParams
    if name == "LoRARequest":
        from fastllm.lora.request import LoRARequest

        return LoRARequest
    if name == "EngineArgs":
        from fastllm.config import EngineArgs

        return EngineArgs
    raise AttributeError(f"module 'fastllm' has no attribute {name!r}")
