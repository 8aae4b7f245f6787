"""Guided (constrained) decoding: JSON schemas, regexes, choices and grammars enforced on the
logits of each step. llguidance is the default backend; xgrammar is optional."""

from fastllm.guided.manager import GuidedDecodingManager
from fastllm.guided.params import GuidedDecodingParams, normalize_backend

__all__ = ["GuidedDecodingManager", "GuidedDecodingParams", "normalize_backend"]
