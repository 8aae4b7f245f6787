"""Tokenization for fastllm: fast tokenizer loading (no transformers import), sandboxed chat
templates and incremental detokenization.

    tokenizer = load_tokenizer(resolve_model(None))
    ids = tokenizer.encode(tokenizer.apply_chat_template(messages))
    detok = IncrementalDetokenizer(tokenizer, ids)
    for token_id in generated:
        print(detok.step([token_id]), end="")
    print(detok.flush())
"""

from .chat_template import render_chat_template
from .detokenizer import IncrementalDetokenizer
from .tokenizer import SpecialTokens, Tokenizer, load_tokenizer

__all__ = [
    "IncrementalDetokenizer",
    "SpecialTokens",
    "Tokenizer",
    "load_tokenizer",
    "render_chat_template",
]
