"""Rendering chat templates (Jinja2, as in Hugging Face tokenizer configs) safely.

Templates come with model files and are untrusted code, so they run in jinja2's
`ImmutableSandboxedEnvironment`: attribute access to dunders/internals, mutation of inputs and
unsafe callables raise `SecurityError`, which we report as `ValueError`. The environment
matches transformers' (`trim_blocks`, `lstrip_blocks`, the `loopcontrols` extension, a
`{% generation %}` block that renders its body, the `raise_exception` and `strftime_now`
globals and a `tojson` filter that does not escape HTML), so templates render identically.
One deliberate difference: touching an unsafe attribute raises at once instead of yielding an
undefined value that prints as "".
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, ClassVar

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Appended to the final message's text so the render can be cut right after it.
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (used to mark assistant text): renders the body."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return str(caller())


class _StrictSandbox(ImmutableSandboxedEnvironment):
    """Raises on unsafe attribute access itself: jinja2's sandbox returns an undefined value
    there, which prints as "" and would let `{{ ''.__class__ }}` pass silently."""

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        raise jinja2.exceptions.SecurityError(
            f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe"
        )


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def compile_chat_template(source: str) -> jinja2.Template:
    """Compile `source` once (cached); ValueError on a syntax error."""
    env = _StrictSandbox(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationBlock, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateError as exc:
        raise ValueError(f"invalid chat template: {exc}") from exc


def plain_data(value: Any) -> Any:
    """A copy of `value` built only from JSON types (dict, list, tuple, str, int, float, bool,
    None); dataclasses and pydantic models become dicts, anything else a "<TypeName>" string.

    Objects the sandbox does not know could expose unsafe methods to a template; this keeps
    everything the template sees inert.
    """
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {plain_data(k): plain_data(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain_data(v) for v in value]
    if isinstance(value, tuple):
        return tuple(plain_data(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain_data(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return plain_data(value.model_dump())
    if callable(getattr(value, "item", None)):  # numpy scalars
        return plain_data(value.item())
    return f"<{type(value).__name__}>"


def render_chat_template(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool = True,
    tools: list[dict[str, Any]] | None = None,
    documents: list[dict[str, Any]] | None = None,
    continue_final_message: bool = False,
    **variables: Any,
) -> str:
    """Render `messages` with `template`.

    `variables` (special token strings, `enable_thinking`, ...) are visible to the template.
    With `continue_final_message` the output ends right after the last message's content,
    ready for the model to continue it (and `add_generation_prompt` must be false).
    Every failure (syntax, `raise_exception`, a sandbox violation, a missing variable used in
    an unsupported way) raises ValueError with the template's message.
    """
    if continue_final_message and add_generation_prompt:
        raise ValueError("continue_final_message and add_generation_prompt cannot both be set")
    chat = plain_data(list(messages))
    if not all(isinstance(m, dict) for m in chat):
        raise ValueError("chat messages must be mappings with 'role' and 'content'")
    final_text = None
    if continue_final_message:
        if not chat:
            raise ValueError("continue_final_message is set but there are no messages")
        final_text = chat[-1].get("content")
        if isinstance(final_text, list):  # content parts: continue the last text part
            parts = [p for p in final_text if isinstance(p, dict) and "text" in p]
            if not parts:
                raise ValueError("continue_final_message: the final message has no text")
            final_text = parts[-1]["text"]
            parts[-1]["text"] = final_text + _CONTINUE_TAG
        elif isinstance(final_text, str):
            chat[-1]["content"] = final_text + _CONTINUE_TAG
        else:
            raise ValueError("continue_final_message: the final message has no content")
    compiled = compile_chat_template(template)
    try:
        rendered = compiled.render(
            messages=chat,
            tools=plain_data(tools),
            documents=plain_data(documents),
            add_generation_prompt=add_generation_prompt,
            **plain_data(variables),
        )
    except jinja2.TemplateError as exc:  # includes SecurityError and raise_exception
        raise ValueError(f"chat template error: {exc}") from exc
    except (TypeError, AttributeError, KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"chat template error: {type(exc).__name__}: {exc}") from exc
    if final_text is not None:
        tag = _CONTINUE_TAG.strip()
        if tag not in rendered or final_text.strip() not in rendered:
            raise ValueError(
                "continue_final_message: the template does not reproduce the final message"
            )
        cut = rendered.rindex(tag)
        if rendered[cut : cut + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
            rendered = rendered[:cut]
        else:  # the template trimmed whitespace after the content
            rendered = rendered[:cut].rstrip()
    return rendered
