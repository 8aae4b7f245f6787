"""Model definitions, keyed by the architecture name of the model's config. The torch model
classes are imported on first use, so the torch-free CPU path can use this package."""

from __future__ import annotations

from fastllm.config import ModelConfig

# Architectures run by fastllm.models.llama.LlamaForCausalLM (and by the native CPU decoder).
LLAMA_FAMILY = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


def supported_architectures() -> list[str]:
    return sorted(LLAMA_FAMILY)


def get_model_class(config: ModelConfig):
    if config.architecture not in LLAMA_FAMILY:
        raise ValueError(
            f"architecture {config.architecture!r} is not supported; supported: "
            f"{', '.join(supported_architectures())}"
        )
    from fastllm.models.llama import LlamaForCausalLM

    return LlamaForCausalLM
