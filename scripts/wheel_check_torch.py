"""Run by scripts/wheel_check.sh inside a fresh venv that holds the repaired wheel with its
`torch` extra (and transformers, for the reference): LLM() on a tiny random Llama saved as
safetensors must take the torch executor and give transformers' greedy tokens.

The tiny model comes from tests/python/model_fixtures.py; fastllm itself must come from the venv,
never from the checkout (python/ is not on sys.path: this script's folder is scripts/).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "python"))

import torch
from transformers import AutoModelForCausalLM

import fastllm
import model_fixtures  # sets HF_HUB_OFFLINE
from fastllm import LLM, SamplingParams
from fastllm.worker.model_runner import ModelExecutor

NEW_TOKENS = 16
PROMPTS = [[1, 5, 9, 200, 3000, 47], list(range(100, 140))]


def hf_greedy(model, prompt: list[int]) -> list[int]:
    """Argmax decoding through EOS (as ignore_eos does), the whole sequence each step: the
    reference needs no cache API, and a tiny model makes that cheap."""
    tokens: list[int] = []
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            logits = model(torch.tensor([prompt + tokens])).logits
            tokens.append(int(logits[0, -1].argmax()))
    return tokens


def main() -> None:
    if not Path(fastllm.__file__).resolve().is_relative_to(Path(sys.prefix).resolve()):
        sys.exit(f"fastllm was imported from {fastllm.__file__}, not from this venv's wheel")
    with tempfile.TemporaryDirectory() as root:
        tiny = model_fixtures.build_tiny_llama(root, model_fixtures.default_gguf_path())
        llm = LLM(model=tiny.safetensors_dir, max_model_len=256)
        core = llm.llm_engine.core
        assert core.source.load_format == "safetensors", core.source
        assert isinstance(core.executor, ModelExecutor), type(core.executor)  # the torch one
        params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
        hf = AutoModelForCausalLM.from_pretrained(tiny.safetensors_dir,
                                                  dtype=torch.float32).eval()
        for prompt, out in zip(PROMPTS, outs):
            ours = list(out.outputs[0].token_ids)
            expected = hf_greedy(hf, prompt)
            assert ours == expected, (prompt, ours, expected)
    print(f"[wheel] LLM() on a tiny safetensors Llama (torch {torch.__version__}, fastllm from "
          f"{os.path.dirname(fastllm.__file__)}): {len(PROMPTS)} prompts x {NEW_TOKENS} greedy "
          "tokens equal transformers'")


if __name__ == "__main__":
    main()
