"""Guided decoding backends. A backend compiles a constraint once (thread-safe, off the engine
loop) into a grammar; a grammar hands out one matcher per sequence. Matchers fill a next-token
bitmask (one bit per token id, little-endian in int32 words, as llguidance and xgrammar write
them) and consume the sampled tokens.

* ``guidance``: llguidance (a core dependency, the default).
* ``xgrammar``: optional (``pip install 'fastllm[xgrammar]'``); a request naming it without the
  package installed is refused with a message saying so.
"""

from __future__ import annotations

import json
import threading
from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from fastllm.guided.params import GuidedDecodingParams, backend_installed


class Matcher(ABC):
    """One sequence's position in a grammar."""

    @abstractmethod
    def fill_bitmask(self, bitmask: np.ndarray, row: int) -> None:
        ...

    @abstractmethod
    def accept(self, token_id: int) -> bool:
        ...

    @abstractmethod
    def rollback(self, num_tokens: int) -> None:
        ...

    @abstractmethod
    def is_terminated(self) -> bool:
        """True when the grammar accepts nothing more than an end of sequence (or has failed)."""
        ...


class CompiledGrammar(ABC):
    @abstractmethod
    def new_matcher(self) -> Matcher:
        ...


class Backend(ABC):
    name = ""

    @abstractmethod
    def compile(self, params: GuidedDecodingParams) -> CompiledGrammar:
        """ValueError names what is wrong with the constraint."""
        ...


def _choice_lark(choices: list[str]) -> str:
    # JSON string literals are valid Lark string literals.
    return "start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


# ---- llguidance --------------------------------------------------------------------------------

class _GuidanceMatcher(Matcher):
    def __init__(self, matcher, eos_ids: list[int]):
        self.m = matcher
        self.eos_ids = eos_ids

    def fill_bitmask(self, bitmask: np.ndarray, row: int) -> None:
        if self.m.is_error():
            # A failed matcher lets the sequence end rather than wander.
            words = bitmask.view(np.uint32)
            words[row] = 0
            for t in self.eos_ids:
                words[row, t >> 5] |= np.uint32(1 << (t & 31))
            return
        v = bitmask[row]
        self.m.unsafe_compute_mask_ptr(v.ctypes.data, v.nbytes)

    def accept(self, token_id: int) -> bool:
        return self.m.consume_token(token_id)

    def rollback(self, num_tokens: int) -> None:
        self.m.rollback(num_tokens)

    def is_terminated(self) -> bool:
        return self.m.is_stopped()


class _GuidanceGrammar(CompiledGrammar):
    def __init__(self, template, eos_ids: list[int]):
        self.template = template
        self.eos_ids = eos_ids

    def new_matcher(self) -> Matcher:
        return _GuidanceMatcher(self.template.deep_copy(), self.eos_ids)


class GuidanceBackend(Backend):
    name = "guidance"

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: list[int]):
        import llguidance

        self.ll = llguidance
        n_vocab = max(int(vocab_size), int(tokenizer.vocab_size))
        self.eos_ids = sorted(eos_token_ids) or (
            [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
        self.tokenizer = llguidance.LLTokenizer(tokenizer.backend.to_str(), n_vocab=n_vocab,
                                                eos_token=self.eos_ids or None)
        self.vocab_size = n_vocab

    def grammar_text(self, params: GuidedDecodingParams) -> str:
        LLMatcher = self.ll.LLMatcher
        kind = params.kind()
        spec = params.spec()
        if kind in ("json", "json_object"):
            overrides: dict[str, Any] = {}
            if params.whitespace_pattern == "":
                overrides["whitespace_flexible"] = False  # no whitespace at all
            elif params.whitespace_pattern is not None:
                overrides["whitespace_pattern"] = params.whitespace_pattern
            try:
                return LLMatcher.grammar_from_json_schema(spec, overrides=overrides or None)
            except ValueError as e:
                raise ValueError(f"invalid JSON schema in guided_json: {e}") from None
        if kind == "regex":
            return LLMatcher.grammar_from_regex(spec)
        if kind == "choice":
            return LLMatcher.grammar_from_lark(_choice_lark(json.loads(spec)))
        try:
            return self.ll.grammar_from("grammar", spec)
        except ValueError as e:
            raise ValueError(f"invalid grammar in guided_grammar: {e}") from None

    def compile(self, params: GuidedDecodingParams) -> CompiledGrammar:
        grammar = self.grammar_text(params)
        is_error, messages = self.ll.LLMatcher.validate_grammar_with_warnings(
            grammar, self.tokenizer)
        if is_error:
            what = {"json": "JSON schema in guided_json", "json_object": "JSON object grammar",
                    "regex": "regex in guided_regex", "choice": "guided_choice",
                    "grammar": "grammar in guided_grammar"}[params.kind()]
            detail = messages[0].strip() if messages else "rejected"
            raise ValueError(f"invalid {what}: {detail}")
        matcher = self.ll.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(f"guided decoding grammar rejected: {matcher.get_error()}")
        return _GuidanceGrammar(matcher, self.eos_ids)


# ---- xgrammar (optional) -----------------------------------------------------------------------

class _XGrammarMatcher(Matcher):
    def __init__(self, xgr, compiled):
        self.m = xgr.GrammarMatcher(compiled)
        self.failed = False

    def fill_bitmask(self, bitmask: np.ndarray, row: int) -> None:
        from fastllm.torch_extra import torch

        view = torch.from_numpy(bitmask)
        self.m.fill_next_token_bitmask(view, row)

    def accept(self, token_id: int) -> bool:
        ok = bool(self.m.accept_token(token_id))
        self.failed = self.failed or not ok
        return ok

    def rollback(self, num_tokens: int) -> None:
        self.m.rollback(num_tokens)

    def is_terminated(self) -> bool:
        return self.failed or bool(self.m.is_terminated())


class _XGrammarGrammar(CompiledGrammar):
    def __init__(self, xgr, compiled):
        self.xgr = xgr
        self.compiled = compiled

    def new_matcher(self) -> Matcher:
        return _XGrammarMatcher(self.xgr, self.compiled)


class XGrammarBackend(Backend):
    name = "xgrammar"

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: list[int]):
        import xgrammar as xgr

        self.xgr = xgr
        n_vocab = max(int(vocab_size), int(tokenizer.vocab_size))
        vocab = tokenizer.get_vocab()
        encoded = [""] * n_vocab
        for token, idx in vocab.items():
            if idx < n_vocab:
                encoded[idx] = token
        info = xgr.TokenizerInfo(encoded, vocab_type=xgr.VocabType.BYTE_LEVEL,
                                 vocab_size=n_vocab, stop_token_ids=sorted(eos_token_ids))
        self.compiler = xgr.GrammarCompiler(info)
        self.vocab_size = n_vocab

    def compile(self, params: GuidedDecodingParams) -> CompiledGrammar:
        kind = params.kind()
        spec = params.spec()
        try:
            if kind == "json":
                compiled = self.compiler.compile_json_schema(
                    spec, any_whitespace=params.whitespace_pattern is not None)
            elif kind == "json_object":
                compiled = self.compiler.compile_builtin_json_grammar()
            elif kind == "regex":
                compiled = self.compiler.compile_regex(spec)
            elif kind == "choice":
                alts = " | ".join(json.dumps(c, ensure_ascii=False) for c in json.loads(spec))
                compiled = self.compiler.compile_grammar(f"root ::= {alts}")
            else:
                compiled = self.compiler.compile_grammar(spec)
        except Exception as e:  # noqa: BLE001 - xgrammar raises RuntimeError for bad input
            raise ValueError(f"invalid guided_{'json' if kind == 'json_object' else kind} "
                             f"for xgrammar: {e}") from None
        return _XGrammarGrammar(self.xgr, compiled)


_BACKENDS = {"guidance": GuidanceBackend, "xgrammar": XGrammarBackend}
_PIP = {"guidance": "llguidance", "xgrammar": "'fastllm[xgrammar]'"}


class BackendSet:
    """The backends of one engine, each built on first use (building llguidance's tokenizer
    takes ~0.4 s for a 49k vocabulary)."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: list[int]):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self._built: dict[str, Backend] = {}
        self._lock = threading.Lock()

    def get(self, name: str) -> Backend:
        backend = self._built.get(name)
        if backend is not None:
            return backend
        if not backend_installed(name):
            raise ValueError(f"guided decoding backend {name!r} is not installed "
                             f"(pip install {_PIP[name]})")
        with self._lock:
            backend = self._built.get(name)
            if backend is None:
                backend = _BACKENDS[name](self.tokenizer, self.vocab_size, self.eos_token_ids)
                self._built[name] = backend
        return backend
