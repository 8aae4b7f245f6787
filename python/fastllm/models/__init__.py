"""Model definitions, keyed by the architecture name of the model's config (the table is
``fastllm.models.registry``). The torch model classes are imported on first use, so the
torch-free CPU path can use this package."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastllm.models.registry import (
    ARCHITECTURES,
    ModelSpec,
    model_spec,
    moe_architectures,
    native_cpu_architectures,
    supported_architectures,
)

if TYPE_CHECKING:
    from fastllm.config import ModelConfig

__all__ = ["ARCHITECTURES", "ModelSpec", "get_model_class", "load_checkpoint", "model_spec",
           "moe_architectures", "native_cpu_architectures", "supported_architectures"]


def get_model_class(config: ModelConfig):
    """The torch class of ``config.architecture``; ValueError naming the supported ones."""
    return model_spec(config.architecture).load_class()


def load_checkpoint(model, weights):
    """``model.load_weights`` over checkpoint ``(name, tensor)`` pairs, names first moved under
    the row's ``weight_prefixes`` (checkpoints saved without the LM wrapper: ``decoder.*`` of
    a bare OPTModel, ``h.*`` of a bare GPT2Model)."""
    prefixes = model_spec(model.config.architecture).weight_prefixes

    def renamed():
        for name, tensor in weights:
            for theirs, ours in prefixes:
                if name.startswith(theirs):
                    name = ours + name[len(theirs):]
                    break
            yield name, tensor

    model.load_weights(renamed() if prefixes else weights)
