"""Model definitions, keyed by the architecture name of the model's config. The torch model
classes are imported on first use, so the torch-free CPU path can use this package."""

from __future__ import annotations

from fastllm.config import ModelConfig

# Architectures run by fastllm.models.llama.LlamaForCausalLM (and by the native CPU decoder).
LLAMA_FAMILY = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
# Mixture-of-experts architectures: fastllm.models.moe.MoeForCausalLM (native CPU decoder too).
MOE_FAMILY = ("MixtralForCausalLM", "Qwen3MoeForCausalLM")


def supported_architectures() -> list[str]:
    return sorted(LLAMA_FAMILY + MOE_FAMILY)


def get_model_class(config: ModelConfig):
    if config.architecture in MOE_FAMILY:
        from fastllm.models.moe import MoeForCausalLM

        return MoeForCausalLM
    if config.architecture not in LLAMA_FAMILY:
        raise ValueError(
            f"architecture {config.architecture!r} is not supported; supported: "
            f"{', '.join(supported_architectures())}"
        )
    from fastllm.models.llama import LlamaForCausalLM

    return LlamaForCausalLM
