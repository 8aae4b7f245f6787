"""Tokenizer: ids and text equal transformers', chat templates, the sandbox, and incremental
detokenization."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest

from fastllm.loader import open_gguf, resolve_model
from fastllm.tokenizer import IncrementalDetokenizer, Tokenizer, load_tokenizer
from fastllm.tokenizer.gguf_tokenizer import gguf_tokenizer_cache_key

CORPUS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    " leading space and trailing space ",
    "it's, don't, we'll, I'M, they'RE, you've",
    "Numbers: 0 7 42 123 4567 89012 3.14159 -2.5e10 1,000,000 2024-06-01",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    'for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }  // dot\n\tprintf("%d\\n", sum);',
    '<html><body class="x">&amp; &lt;tag&gt;</body></html>',
    "    four spaces\n\n\n\nnewlines\r\nwindows\t\ttabs   \u00a0nbsp",
    "日本語のテキストと中文字符，以及한국어 문장。",
    "Emoji: 😀 👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️ ✨",
    "Ünïcödé àçcénts, ß, ø, Ω≈ç√∫, Привет мир, مرحبا, שלום, नमस्ते",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n",
    "<|endoftext|><repo_name>fastllm<file_sep>main.py<|im_end|>",
    "Mixed<|im_start|>special<|im_end|>tokens inside text",
    "URL https://example.com/path?q=1&r=two#frag and e-mail a.b@c.io",
    "",
    " ",
    "\n",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "!!!???...;;;:::---___===+++",
    "ﬁ ligature, zero\u200bwidth, combining e\u0301, replacement \ufffd",
]

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "system", "content": "You are a pirate."},
        {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": "Arr, ahoy!"},
        {"role": "user", "content": "Where is the treasure? 🏴‍☠️"},
    ],
    [
        {"role": "user", "content": "Write code"},
        {"role": "assistant", "content": "def f():\n    return 1\n"},
    ],
]


@pytest.fixture(scope="module")
def tokenizer(default_gguf_path: str) -> Tokenizer:
    return load_tokenizer(resolve_model(default_gguf_path))


@pytest.fixture(scope="module")
def hf_tokenizer(hf_reference_model):
    return hf_reference_model.tokenizer


def _hf_ids(hf_tok, text: str, add_special_tokens: bool = True) -> list[int]:
    return list(hf_tok(text, add_special_tokens=add_special_tokens)["input_ids"])


# -- ids and text equal transformers' ----------------------------------------------------------


def test_gguf_ids_equal_transformers(tokenizer: Tokenizer, hf_tokenizer) -> None:
    for text in CORPUS:
        for add in (True, False):
            assert tokenizer.encode(text, add_special_tokens=add) == _hf_ids(
                hf_tokenizer, text, add
            )


def test_decode_equals_transformers(tokenizer: Tokenizer, hf_tokenizer) -> None:
    for text in CORPUS:
        ids = tokenizer.encode(text)
        for skip in (True, False):
            assert tokenizer.decode(ids, skip_special_tokens=skip) == hf_tokenizer.decode(
                ids, skip_special_tokens=skip
            )
        assert tokenizer.decode(ids, skip_special_tokens=False) == text


def test_gguf_special_tokens(tokenizer: Tokenizer, hf_tokenizer) -> None:
    assert tokenizer.vocab_size == len(hf_tokenizer) == 49152
    assert tokenizer.bos_token_id == hf_tokenizer.bos_token_id == 1
    assert tokenizer.eos_token_id == hf_tokenizer.eos_token_id == 2
    assert tokenizer.eos_token_ids == {2}
    assert set(hf_tokenizer.all_special_ids) <= set(tokenizer.all_special_ids)
    assert tokenizer.all_special_ids == list(range(17))  # the file's CONTROL tokens
    assert tokenizer.convert_ids_to_tokens([1, 2, 19556]) == ["<|im_start|>", "<|im_end|>", "Hello"]


def test_hf_dir_tokenizer_equals_gguf_tokenizer(tiny_llama_dir: str, tokenizer: Tokenizer) -> None:
    hf_dir = load_tokenizer(resolve_model(tiny_llama_dir))
    assert load_tokenizer(tiny_llama_dir).vocab_size == hf_dir.vocab_size
    for text in CORPUS:
        assert hf_dir.encode(text) == tokenizer.encode(text)
    assert (hf_dir.bos_token_id, hf_dir.eos_token_id) == (1, 2)
    assert hf_dir.eos_token_ids == {2}
    assert hf_dir.chat_template == tokenizer.chat_template is not None


def test_generation_config_eos_ids(tmp_path, tiny_llama_dir: str) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(tiny_llama_dir, name), tmp_path / name)
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [2, 0]}')
    tok = load_tokenizer(str(tmp_path))  # a tokenizer-only directory is enough
    assert tok.eos_token_id == 2 and tok.eos_token_ids == {0, 2}


def _write_gguf_tokenizer(path: str, source_gguf: str, pre: str, add_bos: bool) -> None:
    """A GGUF holding only the default model's vocabulary, under another pre-tokenizer name."""
    import gguf

    md = open_gguf(source_gguf).metadata
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(md["tokenizer.ggml.tokens"])
    writer.add_token_types([int(t) for t in md["tokenizer.ggml.token_type"]])
    writer.add_token_merges(md["tokenizer.ggml.merges"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(add_bos)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize(("pre", "add_bos"), [("llama-bpe", True), ("qwen2", False)])
def test_other_pre_tokenizers_equal_transformers(tmp_path, default_gguf_path, pre, add_bos):
    from transformers import AutoTokenizer

    path = str(tmp_path / f"{pre}.gguf")
    _write_gguf_tokenizer(path, default_gguf_path, pre, add_bos)
    ours = load_tokenizer(path)
    hf = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=os.path.basename(path))
    for text in CORPUS:
        assert ours.encode(text) == _hf_ids(hf, text), (pre, text)
    assert (ours.encode("hi")[0] == 1) is add_bos


def test_tokenizer_json_cache(tmp_path, monkeypatch, default_gguf_path: str) -> None:
    monkeypatch.setenv("FASTLLM_CACHE_DIR", str(tmp_path))
    first = load_tokenizer(default_gguf_path)
    cached = tmp_path / "tokenizers" / (gguf_tokenizer_cache_key(default_gguf_path) + ".json")
    assert cached.is_file()
    assert load_tokenizer(default_gguf_path).encode(CORPUS[5]) == first.encode(CORPUS[5])
    cached.write_text("{corrupt")  # a broken entry is rebuilt, not fatal
    assert load_tokenizer(default_gguf_path).encode(CORPUS[9]) == first.encode(CORPUS[9])


def test_loading_does_not_import_transformers_or_torch(default_gguf_path: str) -> None:
    code = (
        "import sys; from fastllm.tokenizer import load_tokenizer; "
        f"t = load_tokenizer({default_gguf_path!r}); assert t.encode('hi'); "
        "bad = [m for m in ('transformers', 'torch') if m in sys.modules]; "
        "assert not bad, bad"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)


def test_missing_tokenizer_files(tmp_path) -> None:
    with pytest.raises(ValueError, match="tokenizer.json"):
        load_tokenizer(_source_dir(tmp_path))
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(ValueError, match="tokenizer.json"):
        load_tokenizer(str(tmp_path))


def _source_dir(path):
    from fastllm.loader import ModelSource

    return ModelSource(model_dir=str(path), gguf_path=None, weight_files=(), load_format="dummy")


# -- chat templates ----------------------------------------------------------------------------


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_equals_transformers(tokenizer, hf_tokenizer, add_generation_prompt):
    for messages in CONVERSATIONS:
        ours = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        theirs = hf_tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=False
        )
        assert ours == theirs
    assert ours.startswith("<|im_start|>user") is False  # a system prompt was supplied


def test_continue_final_message_equals_transformers(tokenizer, hf_tokenizer) -> None:
    messages = CONVERSATIONS[2]
    ours = tokenizer.apply_chat_template(
        messages, add_generation_prompt=False, continue_final_message=True
    )
    theirs = hf_tokenizer.apply_chat_template(
        messages, add_generation_prompt=False, continue_final_message=True, tokenize=False
    )
    assert ours == theirs and ours.endswith("return 1\n")


def test_custom_template_sees_tools_documents_and_specials(tokenizer, hf_tokenizer) -> None:
    template = (
        "{{ bos_token }}{% for t in tools %}{{ t | tojson }}{% endfor %}"
        "{% for d in documents %}[{{ d.title }}]{% endfor %}"
        "{% for m in messages %}{{ m.role }}:{{ m.content }}{{ eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}{{ extra }}"
    )
    tools = [{"type": "function", "function": {"name": "get", "parameters": {"a": "é<"}}}]
    documents = [{"title": "Doc", "text": "body"}]
    kwargs = {"tools": tools, "documents": documents, "chat_template": template, "extra": "!"}
    ours = tokenizer.apply_chat_template(CONVERSATIONS[0], **kwargs)
    theirs = hf_tokenizer.apply_chat_template(
        CONVERSATIONS[0], add_generation_prompt=True, tokenize=False, **kwargs
    )
    assert ours == theirs
    assert '"é<"' in ours and ours.endswith("assistant:!")


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{{ ''.__class__ }}", "unsafe"),
        ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "unsafe"),
        ("{{ messages.append({'role': 'x'}) }}", "unsafe"),
        ("{{ raise_exception('no system role allowed') }}", "no system role allowed"),
        ("{% for m in messages %}", "template"),
        ("{{ messages[0].content.upper().x.y }}", "chat template error"),
    ],
)
def test_template_errors_are_value_errors(tokenizer, template, message) -> None:
    with pytest.raises(ValueError, match=message):
        tokenizer.apply_chat_template(CONVERSATIONS[0], chat_template=template)


def test_template_helpers(tokenizer) -> None:
    out = tokenizer.apply_chat_template(
        CONVERSATIONS[0],
        chat_template="{{ strftime_now('%Y') | length }}{% for m in messages %}"
        "{% if loop.first %}{% continue %}{% endif %}{% endfor %}"
        "{% generation %}gen{% endgeneration %}",
    )
    assert out == "4gen"


# -- incremental detokenization ----------------------------------------------------------------


class _WindowOnly(Tokenizer):
    """The same tokenizer without its byte pieces: the detokenizer then takes the decode window,
    the road of every tokenizer whose decoder is not ByteLevel."""

    def byte_pieces(self, skip_special_tokens: bool = True) -> None:
        return None


def _window_only(tokenizer: Tokenizer) -> Tokenizer:
    window = _WindowOnly.__new__(_WindowOnly)
    window.__dict__.update(tokenizer.__dict__)
    return window


@pytest.fixture(scope="module", params=["byte pieces", "window"])
def detok_tokenizer(request, tokenizer: Tokenizer) -> Tokenizer:
    if request.param == "byte pieces":
        assert tokenizer.byte_pieces() is not None  # the default model's decoder is ByteLevel
        return tokenizer
    return _window_only(tokenizer)


def test_byte_pieces_decode_as_the_tokenizer_does(tokenizer: Tokenizer) -> None:
    """Every id alone and random runs of ordinary, single-byte and special ids: the pieces joined
    and decoded as lossy UTF-8 give the backend's text, with and without special tokens."""
    rng = random.Random(0)
    for skip in (True, False):
        pieces = tokenizer.byte_pieces(skip)
        assert len(pieces) == tokenizer.vocab_size
        assert all(
            pieces[i].decode("utf-8", "replace") == tokenizer.decode([i], skip_special_tokens=skip)
            for i in range(tokenizer.vocab_size))
        for _ in range(500):
            ids = [rng.choice([rng.randrange(tokenizer.vocab_size), rng.randrange(17, 300),
                               rng.randrange(17)]) for _ in range(rng.randrange(1, 24))]
            joined = b"".join(pieces[i] for i in ids).decode("utf-8", "replace")
            assert joined == tokenizer.decode(ids, skip_special_tokens=skip), ids
    special = tokenizer.all_special_ids[0]
    assert tokenizer.byte_pieces(True)[special] == b""
    assert tokenizer.byte_pieces(False)[special] != b""


def test_byte_pieces_of_added_tokens(tokenizer: Tokenizer) -> None:
    """Added tokens, as HF tokenizers add them: spelled in the byte-level alphabet, plain text,
    characters outside the alphabet (taken as their own UTF-8), special or not."""
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as Backend

    backend = Backend.from_str(tokenizer.backend.to_str())
    added = ["Ġzzq", "<tool_call>", "  ", "é½", "naïve ☃"]
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in added])
    backend.add_special_tokens([AddedToken("<|sep|>", special=True)])
    with_added = Tokenizer(backend, tokenizer._special)
    ids = [backend.token_to_id(t) for t in [*added, "<|sep|>"]]
    for skip in (True, False):
        pieces = with_added.byte_pieces(skip)
        for run in ([i] for i in ids), [ids + [100, 200, 300]]:
            for seq in run:
                assert b"".join(pieces[i] for i in seq).decode("utf-8", "replace") == \
                    backend.decode(seq, skip_special_tokens=skip), seq


def test_byte_pieces_are_none_for_other_decoders(tokenizer: Tokenizer) -> None:
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders

    backend = Backend.from_str(tokenizer.backend.to_str())
    backend.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    assert Tokenizer(backend, tokenizer._special).byte_pieces() is None


def _stream(
    tokenizer: Tokenizer, prompt: list[int], ids: list[int], chunk_sizes, **kw
) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, prompt, **kw)
    pieces, i = [], 0
    sizes = iter(chunk_sizes)
    while i < len(ids):
        n = next(sizes, 1)
        pieces.append(detok.step(ids[i : i + n]))
        i += n
    pieces.append(detok.flush())
    assert detok.output_ids == ids
    assert detok.text == "".join(pieces)
    return pieces


@pytest.mark.parametrize("skip", [True, False])
def test_detokenizer_text_streams(detok_tokenizer: Tokenizer, skip: bool) -> None:
    tokenizer = detok_tokenizer
    prompt = tokenizer.encode(tokenizer.apply_chat_template(CONVERSATIONS[0]))
    for text in CORPUS:
        ids = tokenizer.encode(text)
        pieces = _stream(tokenizer, prompt, ids, [], skip_special_tokens=skip)
        full = tokenizer.decode(ids, skip_special_tokens=skip)
        assert "".join(pieces) == full
        if "\ufffd" not in full:
            assert not any("\ufffd" in p for p in pieces), text


def test_detokenizer_holds_split_characters(detok_tokenizer: Tokenizer) -> None:
    tokenizer = detok_tokenizer
    # 😀 is F0 9F 98 80: as single-byte tokens it arrives in four pieces.
    byte_ids = [tokenizer.backend.token_to_id(c) for c in ["ðŁ", "ĺ", "Ģ"]]
    if None in byte_ids:  # vocabulary spells these bytes differently; build from bytes
        pytest.skip("vocabulary lacks single-byte tokens")
    ids = tokenizer.encode("a") + byte_ids + tokenizer.encode(" b")
    detok = IncrementalDetokenizer(tokenizer, [])
    outputs = [detok.step([i]) for i in ids]
    assert outputs[0] == "a"
    assert outputs[1] == outputs[2] == ""  # incomplete: held back, no U+FFFD
    assert outputs[3] == "😀"
    assert outputs[4] == " b"
    assert detok.flush() == ""


@pytest.mark.parametrize("seed", range(6))
def test_detokenizer_random_streams(detok_tokenizer: Tokenizer, seed: int) -> None:
    tokenizer = detok_tokenizer
    rng = random.Random(seed)
    # Mix ordinary ids, byte-fragment ids (< 300 holds the single bytes) and special ids.
    ids = [
        rng.choice([rng.randrange(tokenizer.vocab_size), rng.randrange(17, 300), rng.randrange(17)])
        for _ in range(200)
    ]
    prompt = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randrange(0, 12))]
    chunks = [rng.choice([1, 1, 1, 2, 3, 7]) for _ in range(200)]
    skip = seed % 2 == 0
    pieces = _stream(tokenizer, prompt, ids, chunks, skip_special_tokens=skip)
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=skip)


def test_detokenizer_emoji_and_cjk_token_by_token(detok_tokenizer: Tokenizer) -> None:
    tokenizer = detok_tokenizer
    text = "用户说：你好！😀👍🏽 日本語 🇫🇷 done"
    ids = tokenizer.encode(text)
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode("Q: "))
    emitted = [detok.step([i]) for i in ids]
    assert all("\ufffd" not in piece for piece in emitted)
    assert "".join(emitted) + detok.flush() == text
    assert sum(1 for piece in emitted if piece == "") > 0  # some tokens were held


def test_detokenizer_window_stays_small(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode(" ".join(CORPUS) * 4)
    detok = IncrementalDetokenizer(_window_only(tokenizer), [])
    widths = []
    for token_id in ids:
        detok.step([token_id])
        widths.append(len(detok._ids) - detok._prefix_offset)
    assert max(widths) <= 8 and len(ids) > 500
    assert np.mean(widths) < 3


def test_long_text_takes_the_batch_path_with_the_same_ids(tokenizer: Tokenizer) -> None:
    """A long text goes through the backend's batch call, which releases the GIL while it works
    (benchmarks/long_prompt_stall.py measures what that does for streams): same ids as the
    single call, with and without special tokens, special tokens written in the text included."""
    text = " ".join(f"word{i % 997} <|im_start|>" if i % 500 == 0 else f"word{i % 997}"
                    for i in range(6000))
    for special in (True, False):
        expected = tokenizer.backend.encode(text, add_special_tokens=special).ids
        assert len(expected) > 20000
        assert tokenizer.encode(text, add_special_tokens=special) == expected
