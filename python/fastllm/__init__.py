"""fastllm: LLM inference and serving with a compiled C++/CUDA core."""

__version__ = "0.1.0"
