"""`Tokenizer`: the text <-> token id interface the engine uses, over a `tokenizers.Tokenizer`.

`load_tokenizer(source)` builds one without importing transformers:

* GGUF: the backend from the file's metadata (see `gguf_tokenizer`), special ids and the
  chat template from `tokenizer.ggml.*` / `tokenizer.chat_template`;
* HF directory: `tokenizer.json`, plus `tokenizer_config.json` (special tokens, chat template,
  also `chat_template.jinja` / `chat_template.json`) and `generation_config.json` (extra EOS ids).

Decoding follows HF's fast tokenizers: `tokenizers.decode`, no cleanup of tokenization spaces.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tokenizers import Tokenizer as BackendTokenizer
from tokenizers.decoders import ByteLevel as ByteLevelDecoder

from ..loader.gguf_file import open_gguf
from ..loader.source import ModelSource, default_gguf_path, resolve_model
from .chat_template import render_chat_template
from .gguf_tokenizer import byte_alphabet, load_gguf_backend

# Characters from which encode() takes the GIL-releasing batch path (and a server encodes on a
# worker thread): below it, encoding takes microseconds.
LONG_TEXT = 4096


@dataclass
class SpecialTokens:
    """Token strings a chat template may use, and the ids that end generation."""

    bos_token: str | None = None
    eos_token: str | None = None
    unk_token: str | None = None
    pad_token: str | None = None
    extra_eos_ids: set[int] = field(default_factory=set)


class Tokenizer:
    """Encode, decode and chat templates for one model.

    Invariants: `eos_token_id in eos_token_ids` when an EOS exists; `all_special_ids` holds
    every id whose token is marked special (and bos/eos/unk/pad); ids returned by `encode` are
    below `vocab_size`.
    """

    def __init__(
        self,
        backend: BackendTokenizer,
        special: SpecialTokens,
        chat_template: str | None = None,
        name: str = "",
    ) -> None:
        self.backend = backend
        self.name = name
        self.chat_template = chat_template
        self._special = special
        self.bos_token_id = self._id_of(special.bos_token)
        self.eos_token_id = self._id_of(special.eos_token)
        self.unk_token_id = self._id_of(special.unk_token)
        self.pad_token_id = self._id_of(special.pad_token)
        eos = set(special.extra_eos_ids)
        if self.eos_token_id is not None:
            eos.add(self.eos_token_id)
        self.eos_token_ids: frozenset[int] = frozenset(eos)
        special_ids = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
        for token_id in (
            self.bos_token_id,
            self.eos_token_id,
            self.unk_token_id,
            self.pad_token_id,
        ):
            if token_id is not None:
                special_ids.add(token_id)
        self.all_special_ids: list[int] = sorted(special_ids)
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self._byte_pieces: dict[bool, list[bytes] | None] = {}

    def byte_pieces(self, skip_special_tokens: bool = True) -> list[bytes] | None:
        """Each id's bytes as a byte-level decoder joins them (a skipped special token: none),
        when the backend's decoder is ByteLevel: `decode(ids)` is then the lossy UTF-8 decoding
        of the ids' pieces joined, which lets a stream decode a token with a list index and an
        incremental UTF-8 decoder. None for any other decoder (sentencepiece-style decoders
        change a token's text by what precedes it). Built on first use, then cached."""
        if skip_special_tokens not in self._byte_pieces:
            self._byte_pieces[skip_special_tokens] = (
                self._without_special(self.byte_pieces(False)) if skip_special_tokens
                else self._build_byte_pieces())
        return self._byte_pieces[skip_special_tokens]

    def _build_byte_pieces(self) -> list[bytes] | None:
        if not isinstance(self.backend.decoder, ByteLevelDecoder):
            return None
        pieces = [b""] * self.vocab_size
        for token, token_id in self.backend.get_vocab(with_added_tokens=True).items():
            if token_id < len(pieces):
                pieces[token_id] = _byte_level_bytes(token)
        return pieces

    def _without_special(self, pieces: list[bytes] | None) -> list[bytes] | None:
        """The pieces with every special token's emptied (decoding with skip_special_tokens)."""
        if pieces is None:
            return None
        pieces = list(pieces)
        for token_id, token in self.backend.get_added_tokens_decoder().items():
            if token.special and token_id < len(pieces):
                pieces[token_id] = b""
        return pieces

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_token(self) -> str | None:
        return self._special.bos_token

    @property
    def eos_token(self) -> str | None:
        return self._special.eos_token

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special tokens written in the text (e.g. `<|im_start|>`) map to
        their ids; `add_special_tokens` adds BOS/EOS where the tokenizer is configured to."""
        if len(text) < LONG_TEXT:
            return self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        # The batch call releases the GIL while it works (a server encodes long prompts on a
        # worker thread, and the event loop keeps streaming meanwhile); the single call holds it
        # for tens of milliseconds on a long text. Same ids.
        return self.backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(
        self,
        ids: Sequence[int],
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
    ) -> str:
        """Text of `ids`. Invalid or incomplete UTF-8 shows as U+FFFD.

        `spaces_between_special_tokens` is accepted for API compatibility; like HF's (and
        vLLM's) fast tokenizers, this tokenizer never inserts spaces around special tokens.
        """
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str | None]:
        """Vocabulary strings of `ids` (byte-level tokens in their `Ġ`-style spelling)."""
        return [self.backend.id_to_token(int(i)) for i in ids]

    def convert_tokens_to_ids(self, tokens: Sequence[str]) -> list[int | None]:
        return [self.backend.token_to_id(t) for t in tokens]

    def get_vocab(self) -> dict[str, int]:
        return self.backend.get_vocab(with_added_tokens=True)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        documents: list[dict[str, Any]] | None = None,
        continue_final_message: bool = False,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> str:
        """The prompt text for `messages`, rendered in a sandbox (see `chat_template`).

        `chat_template` overrides the model's. The template sees `messages`, `tools`,
        `documents`, `add_generation_prompt`, `bos_token`, `eos_token`, `unk_token`,
        `pad_token` and `kwargs`. ValueError when there is no template or rendering fails.
        """
        template = chat_template if chat_template is not None else self.chat_template
        if template is None:
            raise ValueError(
                f"the tokenizer of {self.name or 'this model'} has no chat template; "
                "pass chat_template="
            )
        variables = {
            "bos_token": self._special.bos_token,
            "eos_token": self._special.eos_token,
            "unk_token": self._special.unk_token,
            "pad_token": self._special.pad_token,
        }
        variables = {k: v for k, v in variables.items() if v is not None}
        variables.update(kwargs)
        return render_chat_template(
            template,
            messages,
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            documents=documents,
            continue_final_message=continue_final_message,
            **variables,
        )


# The byte-level alphabet read backwards: character -> byte.
_BYTE_OF_CHAR = {c: b for b, c in byte_alphabet().items()}


def _byte_level_bytes(token: str) -> bytes:
    """A token's bytes as the ByteLevel decoder reads it: every character through the alphabet,
    or, when one is outside it (an added token such as "<|im_start|>" may be), the token's own
    UTF-8."""
    try:
        return bytes([_BYTE_OF_CHAR[c] for c in token])
    except KeyError:
        return token.encode("utf-8")


def load_tokenizer(source: ModelSource | str | os.PathLike[str] | None) -> Tokenizer:
    """The tokenizer of a model: a `ModelSource`, a .gguf file, a directory with
    `tokenizer.json` (weights and config.json not required), or None for the default GGUF.

    ValueError naming the file when the tokenizer files are missing or unreadable.
    """
    if isinstance(source, ModelSource):
        if source.gguf_path is not None:
            return _gguf_tokenizer(source.gguf_path)
        return _hf_dir_tokenizer(source.model_dir)
    if source is None:
        return _gguf_tokenizer(default_gguf_path())
    path = os.path.abspath(os.fspath(source))
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "tokenizer.json")):
            return _hf_dir_tokenizer(path)
        return load_tokenizer(resolve_model(path, load_format="dummy"))
    if os.path.isfile(path) and path.endswith(".gguf"):
        return _gguf_tokenizer(path)
    raise ValueError(f"tokenizer path {path} is neither a model directory nor a .gguf file")


def _gguf_tokenizer(path: str) -> Tokenizer:
    gguf = open_gguf(path)
    md = gguf.metadata
    backend = load_gguf_backend(gguf)
    tokens: list[str] = md["tokenizer.ggml.tokens"]

    def token(key: str) -> str | None:
        token_id = md.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is None or not 0 <= int(token_id) < len(tokens):
            return None
        return tokens[int(token_id)]

    # llama.cpp's end-of-turn / end-of-message ids also stop generation.
    extra = {
        int(md[k])
        for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
        if k in md
    }
    special = SpecialTokens(
        bos_token=token("bos"),
        eos_token=token("eos"),
        unk_token=token("unknown"),
        pad_token=token("padding"),
        extra_eos_ids=extra,
    )
    template = md.get("tokenizer.chat_template")
    return Tokenizer(backend, special, template if isinstance(template, str) else None, path)


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc


def _token_content(value: Any) -> str | None:
    """A special token in tokenizer_config.json: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _hf_dir_tokenizer(model_dir: str) -> Tokenizer:
    tokenizer_path = os.path.join(model_dir, "tokenizer.json")
    if not os.path.isfile(tokenizer_path):
        raise ValueError(
            f"missing file {tokenizer_path}: fastllm needs a fast-tokenizer tokenizer.json "
            "(convert a slow tokenizer once with transformers' save_pretrained)"
        )
    try:
        backend = BackendTokenizer.from_file(tokenizer_path)
    except Exception as exc:
        raise ValueError(f"cannot read tokenizer file {tokenizer_path}: {exc}") from exc

    config_path = os.path.join(model_dir, "tokenizer_config.json")
    config = _read_json(config_path) if os.path.isfile(config_path) else {}
    special = SpecialTokens(
        bos_token=_token_content(config.get("bos_token")),
        eos_token=_token_content(config.get("eos_token")),
        unk_token=_token_content(config.get("unk_token")),
        pad_token=_token_content(config.get("pad_token")),
    )
    extra_eos: set[int] = set()
    for name in ("generation_config.json", "config.json"):
        path = os.path.join(model_dir, name)
        if os.path.isfile(path):
            eos = _read_json(path).get("eos_token_id")
            if isinstance(eos, int):
                extra_eos.add(eos)
            elif isinstance(eos, list):
                extra_eos.update(int(e) for e in eos)
            if name == "generation_config.json" and eos is not None:
                break
    special.extra_eos_ids = extra_eos
    if special.eos_token is None and len(extra_eos) == 1:
        special.eos_token = backend.id_to_token(next(iter(extra_eos)))
    return Tokenizer(backend, special, _hf_chat_template(model_dir, config), model_dir)


def _hf_chat_template(model_dir: str, config: dict[str, Any]) -> str | None:
    """The default chat template: tokenizer_config.json's `chat_template` (a string, or a list
    of {"name", "template"} from which "default" is taken), else chat_template.jinja, else
    chat_template.json."""
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    if isinstance(template, str):
        return template
    jinja_path = os.path.join(model_dir, "chat_template.jinja")
    if os.path.isfile(jinja_path):
        with open(jinja_path, encoding="utf-8") as f:
            return f.read()
    json_path = os.path.join(model_dir, "chat_template.json")
    if os.path.isfile(json_path):
        template = _read_json(json_path).get("chat_template")
        if isinstance(template, str):
            return template
    return None
