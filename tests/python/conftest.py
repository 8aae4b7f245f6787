"""Shared pytest fixtures. Model fixtures are session-scoped: they are slow to build."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import model_fixtures


@pytest.fixture(scope="session")
def default_gguf_path() -> str:
    """Path of the default SmolLM2-135M-Instruct Q4_1 GGUF."""
    return model_fixtures.default_gguf_path()


@pytest.fixture(scope="session")
def hf_reference_model(default_gguf_path: str) -> model_fixtures.HFReference:
    """transformers' fp32 model and tokenizer for the default GGUF (loaded once, ~15 s)."""
    return model_fixtures.load_hf_reference(default_gguf_path)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory, default_gguf_path: str):
    """A tiny random GQA Llama saved as safetensors, sharded safetensors and .bin."""
    root = str(tmp_path_factory.mktemp("tiny_llama"))
    return model_fixtures.build_tiny_llama(root, default_gguf_path)


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_llama) -> str:
    """HF-layout dir: config.json, model.safetensors, SmolLM2 tokenizer files."""
    return tiny_llama.safetensors_dir


@pytest.fixture(scope="session")
def tiny_llama_sharded_dir(tiny_llama) -> str:
    """The same model as sharded safetensors with model.safetensors.index.json."""
    return tiny_llama.sharded_dir


@pytest.fixture(scope="session")
def tiny_llama_bin_dir(tiny_llama) -> str:
    """The same model as pytorch_model.bin."""
    return tiny_llama.bin_dir


@pytest.fixture(scope="session", params=["mixtral", "qwen3_moe"])
def tiny_moe_dir(request, tmp_path_factory: pytest.TempPathFactory, default_gguf_path: str):
    """A tiny random Mixtral / Qwen3-MoE (6 experts top-2, GQA, odd vocabulary) as safetensors."""
    root = str(tmp_path_factory.mktemp(f"tiny_{request.param}"))
    return model_fixtures.build_tiny_moe(root, request.param, default_gguf_path)
