"""Building a `tokenizers.Tokenizer` straight from a GGUF file's metadata, without transformers.

A GGUF stores the vocabulary (`tokenizer.ggml.tokens`), merges, token types and special ids.
For `tokenizer.ggml.model == "gpt2"` (byte-level BPE: SmolLM2, Llama 3, Qwen2, ...) we build
the same tokenizer transformers' GGUF converter builds, so ids agree with
`AutoTokenizer.from_pretrained(dir, gguf_file=...)`:

* model: BPE over the vocabulary with tokens respelled in GPT-2's byte alphabet when the file
  spells them in plain UTF-8; merges from the file; no unk token, no prefixes/suffixes;
* pre-tokenizer: a `Split` on the regex named by `tokenizer.ggml.pre` (llama-bpe, qwen2, ...)
  followed by `ByteLevel(use_regex=False)`, or GPT-2's `ByteLevel` regex for any other name
  (smollm, gpt2, ...); decoder: `ByteLevel`;
* special tokens: tokens typed CONTROL (3), plus bos/eos/unk/pad, as special added tokens;
  USER_DEFINED (4) tokens as ordinary added tokens; BOS/EOS added per `add_bos_token`/
  `add_eos_token`.

Other tokenizer models (sentencepiece "llama", "t5", ...) are converted once with transformers
when it is installed (slow, seconds). Either way the result is cached as a `tokenizer.json`
under `$FASTLLM_CACHE_DIR/tokenizers` (default `~/.cache/fastllm/tokenizers`), keyed by a
hash of the file's first and last MiB and its size, so later loads skip the conversion.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Any

from tokenizers import Tokenizer

from ..loader.gguf_file import GGUFFile

# Bump when the conversion changes, so stale cache entries are ignored.
_CONVERTER_VERSION = "1"
_HASH_CHUNK = 1 << 20

CONTROL_TOKEN = 3
USER_DEFINED_TOKEN = 4

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# `tokenizer.ggml.pre` -> split regex. Names not listed use GPT-2's byte-level regex, as
# transformers does.
PRE_TOKENIZER_SPLITS: dict[str, str] = {
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "falcon3": _LLAMA3_SPLIT,
    "pixtral": _LLAMA3_SPLIT,
    "dbrx": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
    "megrez": _QWEN2_SPLIT,
}


def byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes (controls, space, ...)
    take the code points 256, 257, ... in byte order.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\xa1"), ord("\xac") + 1))
        + list(range(ord("\xae"), ord("\xff") + 1))
    )
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def gguf_tokenizer_cache_key(path: str) -> str:
    """sha256 hex of (converter version, file size, first MiB, last MiB)."""
    size = os.path.getsize(path)
    digest = hashlib.sha256(f"fastllm-tokenizer-v{_CONVERTER_VERSION}:{size}:".encode())
    with open(path, "rb") as f:
        digest.update(f.read(_HASH_CHUNK))
        f.seek(max(0, size - _HASH_CHUNK))
        digest.update(f.read(_HASH_CHUNK))
    return digest.hexdigest()


def tokenizer_cache_dir() -> str:
    base = os.environ.get("FASTLLM_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "fastllm"
    )
    return os.path.join(base, "tokenizers")


def load_gguf_backend(gguf: GGUFFile, use_cache: bool = True) -> Tokenizer:
    """The `tokenizers.Tokenizer` a GGUF file describes, from the cache when possible.

    Raises ValueError naming the file when it carries no tokenizer or one we cannot build.
    """
    cache_path = None
    if use_cache:
        cache_path = os.path.join(
            tokenizer_cache_dir(), gguf_tokenizer_cache_key(gguf.path) + ".json"
        )
        if os.path.isfile(cache_path):
            try:
                return Tokenizer.from_file(cache_path)
            except Exception:  # noqa: BLE001, S110 (a corrupt cache entry is rebuilt below)
                pass
    tokenizer_json = build_gguf_tokenizer_json(gguf)
    backend = Tokenizer.from_str(tokenizer_json)
    if cache_path is not None:
        _write_atomically(cache_path, tokenizer_json)
    return backend


def _write_atomically(path: str, text: str) -> None:
    """Best effort: a read-only or full disk only costs the next load a rebuild."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError:
        pass


def build_gguf_tokenizer_json(gguf: GGUFFile) -> str:
    """A `tokenizer.json` document for the GGUF's tokenizer (see the module docstring)."""
    md = gguf.metadata
    model = md.get("tokenizer.ggml.model")
    if "tokenizer.ggml.tokens" not in md:
        raise ValueError(f"GGUF file {gguf.path} carries no tokenizer (tokenizer.ggml.tokens)")
    if model == "gpt2":
        return json.dumps(_byte_level_bpe(gguf), ensure_ascii=False)
    return _convert_with_transformers(gguf, model)


def _byte_level_bpe(gguf: GGUFFile) -> dict[str, Any]:
    md = gguf.metadata
    tokens: list[str] = md["tokenizer.ggml.tokens"]
    token_types = md.get("tokenizer.ggml.token_type")
    token_types = list(token_types) if token_types is not None else [1] * len(tokens)
    merges: list[str] = md.get("tokenizer.ggml.merges") or []
    alphabet = byte_alphabet()
    spelled = set(alphabet.values())

    def respell(token: str) -> str:
        if set(token) <= spelled:
            return token
        return "".join(alphabet[b] for b in token.encode("utf-8"))

    vocab = {respell(token): index for index, token in enumerate(tokens)}

    special_ids = {i for i, t in enumerate(token_types) if t == CONTROL_TOKEN}
    for key in ("bos", "eos", "unknown", "padding"):
        token_id = md.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None and 0 <= int(token_id) < len(tokens):
            special_ids.add(int(token_id))
    added: list[dict[str, Any]] = []
    for i in sorted(special_ids):
        # A control token spelled outside the byte alphabet is a llama.cpp mislabel; adding it
        # would create a new id past the model's vocabulary.
        if set(tokens[i]) <= spelled:
            added.append(_added_token(i, tokens[i], special=True))
    for i, t in enumerate(token_types):
        if t == USER_DEFINED_TOKEN and tokens[i] in vocab and i not in special_ids:
            added.append(_added_token(vocab[tokens[i]], tokens[i], special=False))

    split = PRE_TOKENIZER_SPLITS.get(str(md.get("tokenizer.ggml.pre", "")))
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True}
    if split is None:
        pre_tokenizer: dict[str, Any] = {**byte_level, "use_regex": True}
    else:
        pre_tokenizer = {
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": {"Regex": split},
                    "behavior": "Isolated",
                    "invert": False,
                },
                {**byte_level, "use_regex": False},
            ],
        }
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": _post_processor(md, tokens),
        "decoder": {**byte_level, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [merge.split(" ", 1) for merge in merges],
        },
    }


def _added_token(token_id: int, content: str, special: bool) -> dict[str, Any]:
    return {
        "id": token_id,
        "content": content,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": special,
    }


def _post_processor(md: dict[str, Any], tokens: list[str]) -> dict[str, Any]:
    """TemplateProcessing that adds BOS/EOS as the file's add_bos/add_eos flags say."""
    specials: dict[str, dict[str, Any]] = {}

    def edge(flag: str, key: str) -> list[dict[str, Any]]:
        token_id = md.get(f"tokenizer.ggml.{key}_token_id")
        if not md.get(f"tokenizer.ggml.{flag}") or token_id is None:
            return []
        token = tokens[int(token_id)]
        specials[token] = {"id": token, "ids": [int(token_id)], "tokens": [token]}
        return [{"SpecialToken": {"id": token, "type_id": 0}}]

    bos = edge("add_bos_token", "bos")
    eos = edge("add_eos_token", "eos")

    def seq(name: str, type_id: int) -> list[dict[str, Any]]:
        return [{"Sequence": {"id": name, "type_id": type_id}}]

    return {
        "type": "TemplateProcessing",
        "single": bos + seq("A", 0) + eos,
        "pair": bos + seq("A", 0) + eos + seq("B", 1),
        "special_tokens": specials,
    }


def _convert_with_transformers(gguf: GGUFFile, model: Any) -> str:
    """Slow fallback for non-byte-level vocabularies: let transformers convert the file."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ValueError(
            f"GGUF file {gguf.path} has tokenizer model {model!r}; fastllm builds 'gpt2' "
            "(byte-level BPE) tokenizers itself and needs transformers for others"
        ) from None
    directory, name = os.path.split(gguf.path)
    try:
        hf = AutoTokenizer.from_pretrained(directory, gguf_file=name, local_files_only=True)
    except Exception as exc:
        raise ValueError(f"cannot build the tokenizer of GGUF file {gguf.path}: {exc}") from exc
    return hf.backend_tokenizer.to_str()
