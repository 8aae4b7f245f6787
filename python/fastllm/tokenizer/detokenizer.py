"""Incremental detokenization: turning a stream of output ids into a stream of final text.

Decoding token by token is wrong in two ways: a character's UTF-8 bytes may span several
tokens (each alone decodes to U+FFFD), and some decoders change a token's text depending on
what precedes it (sentencepiece drops the leading space of the first token). So, as in vLLM,
we decode a short window of ids twice::

    ids:   ... | prefix_offset ........ read_offset ........ len(ids)
                 \\_ context, already emitted _/ \\_ not yet emitted _/

    new text = decode(ids[prefix:]) minus decode(ids[prefix:read])

and emit it only when it does not end in U+FFFD (which may still be an unfinished character).
After emitting, the window slides: prefix <- read, read <- len(ids). Both offsets always sit at
character boundaries, so each step decodes only a few tokens: O(1) per token.

Invariant: "".join(step(...) for each chunk) + flush() == decoded text of the output ids in the
context of the prompt. For byte-level BPE tokenizers (GPT-2 style, the default model) that is
exactly `tokenizer.decode(output_ids, skip_special_tokens)`.

Byte-level tokenizers take a shorter road to the same text: their decoder joins the tokens'
bytes and decodes the whole as UTF-8 (lossy), so a stream needs only each token's bytes
(`Tokenizer.byte_pieces`) and an incremental UTF-8 decoder, which holds an unfinished character
back exactly as the window does. A server runs this once per token between decode steps that
stream the model's weights through the caches; a list index and one decoder call touch far less
memory than a tokenizer call.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence

from .tokenizer import Tokenizer

_REPLACEMENT = "\ufffd"
# Prompt tokens kept as decoding context for the first output tokens.
_PROMPT_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Per-request streaming decoder. Not thread-safe; one per sequence."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int] = (),
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        # Accepted for API compatibility; see `Tokenizer.decode`.
        self.spaces_between_special_tokens = spaces_between_special_tokens
        # Byte-level tokenizers: each id's bytes, and the decoder of the bytes so far.
        self._pieces = tokenizer.byte_pieces(skip_special_tokens)
        if self._pieces is not None:
            self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
            prompt_ids = ()  # decoding needs no context
        self._ids: list[int] = list(prompt_ids[-_PROMPT_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._num_context = len(self._ids)
        self._text_parts: list[str] = []
        self._prefix_text = self._decode(0, self._read_offset)
        if self._prefix_text.endswith(_REPLACEMENT):
            # The prompt ends inside a character: start the window at the output instead,
            # so an output token completing it cannot rewrite already-counted context text.
            self._prefix_offset = self._read_offset
            self._prefix_text = ""

    @property
    def output_ids(self) -> list[int]:
        return self._ids[self._num_context :]

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return "".join(self._text_parts)

    def _decode(self, start: int, end: int) -> str:
        if start >= end:
            return ""
        return self.tokenizer.decode(
            self._ids[start:end], skip_special_tokens=self.skip_special_tokens
        )

    def step(self, new_ids: Sequence[int]) -> str:
        """Append `new_ids` (one or more) and return the text that became final ("" if none)."""
        if self._pieces is not None:
            return self._step_bytes([int(i) for i in new_ids])
        self._ids.extend(int(i) for i in new_ids)
        full = self._decode(self._prefix_offset, len(self._ids))
        if len(full) <= len(self._prefix_text) or full.endswith(_REPLACEMENT):
            return ""
        new_text = full[len(self._prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._prefix_text = self._decode(self._prefix_offset, self._read_offset)
        self._text_parts.append(new_text)
        return new_text

    def _step_bytes(self, new_ids: list[int]) -> str:
        self._ids.extend(new_ids)
        pieces, n = self._pieces, len(self._pieces)
        # An id past the tokenizer's vocabulary (a model's padded rows) decodes to nothing.
        if len(new_ids) == 1:
            data = pieces[new_ids[0]] if 0 <= new_ids[0] < n else b""
        else:
            data = b"".join(pieces[i] for i in new_ids if 0 <= i < n)
        text = self._utf8.decode(data)
        if text:
            self._text_parts.append(text)
        return text

    def flush(self) -> str:
        """At the end of the stream: the held-back text (e.g. a final invalid byte as U+FFFD)."""
        if self._pieces is not None:
            new_text = self._utf8.decode(b"", final=True)
            if new_text:
                self._text_parts.append(new_text)
            return new_text
        full = self._decode(self._prefix_offset, len(self._ids))
        new_text = full[len(self._prefix_text) :]
        self._prefix_offset = self._read_offset = len(self._ids)
        self._prefix_text = ""
        if new_text:
            self._text_parts.append(new_text)
        return new_text
