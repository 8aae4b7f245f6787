"""LoRA adapters: requests name one (``LoRARequest``), ``adapter`` reads PEFT and GGUF adapter
files into float32 A/B matrices per layer and projection, ``manager`` keeps the loaded ones and
hands them to the executor. The engine runs every adapter of a step in one batch: see
cpp/kernels/include/fastllm/kernels/lora.h and README's "LoRA adapters"."""

from fastllm.lora.adapter import LORA_TARGETS, LoraAdapter, load_adapter
from fastllm.lora.request import LoRARequest

__all__ = ["LORA_TARGETS", "LoRARequest", "LoraAdapter", "load_adapter"]
