"""What a guided request asks for: one constraint (a JSON schema, any JSON object, a regex, a
choice among strings or a grammar) and optionally the backend that enforces it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

# Names a request may give; "auto" and the empty name mean the engine's default.
BACKEND_ALIASES = {"auto": None, "guidance": "guidance", "llguidance": "guidance",
                   "xgrammar": "xgrammar"}
KNOWN_BACKENDS = ("guidance", "xgrammar")


def normalize_backend(name: str | None) -> str | None:
    """The canonical backend name ("guidance" or "xgrammar"), None for the default.
    ValueError names an unknown backend. Options after a colon (``xgrammar:no-fallback``, as
    vLLM writes them) are ignored."""
    if name is None:
        return None
    base = str(name).split(":", 1)[0].strip().lower()
    if base == "":
        return None
    if base not in BACKEND_ALIASES:
        raise ValueError(f"unknown guided decoding backend {name!r}; fastllm supports "
                         f"'guidance' (llguidance, the default; also 'auto') and 'xgrammar'")
    return BACKEND_ALIASES[base]


@dataclass
class GuidedDecodingParams:
    """Exactly one of ``json``, ``regex``, ``choice``, ``grammar`` or ``json_object`` constrains
    the output. ``json`` is a JSON schema (a dict or its JSON text); ``grammar`` is a Lark grammar
    (GBNF/EBNF is converted); ``whitespace_pattern`` is a regex for the whitespace JSON output may
    use; ``backend`` overrides the engine's default ("guidance" or "xgrammar")."""

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    backend: str | None = None
    whitespace_pattern: str | None = None

    @classmethod
    def from_optional(cls, json: str | dict | None = None, regex: str | None = None,
                      choice: list[str] | None = None, grammar: str | None = None,
                      json_object: bool | None = None, backend: str | None = None,
                      whitespace_pattern: str | None = None) -> GuidedDecodingParams | None:
        if all(x is None for x in (json, regex, choice, grammar)) and not json_object:
            return None
        return cls(json=json, regex=regex, choice=choice, grammar=grammar,
                   json_object=json_object or None, backend=backend,
                   whitespace_pattern=whitespace_pattern)

    def kind(self) -> str:
        given = [name for name in ("json", "regex", "choice", "grammar")
                 if getattr(self, name) is not None]
        if self.json_object:
            given.append("json_object")
        if len(given) != 1:
            raise ValueError("guided decoding needs exactly one of json, regex, choice, grammar "
                             f"or json_object, got {', '.join(given) or 'none'}")
        return given[0]

    def spec(self) -> str:
        """The constraint as text: the cache key together with the kind, backend and
        whitespace pattern."""
        kind = self.kind()
        if kind == "json":
            value: Any = self.json
            if isinstance(value, str):
                try:
                    value = json.loads(value)
                except json.JSONDecodeError as e:
                    raise ValueError(f"guided_json is not valid JSON: {e}") from None
            if not isinstance(value, (dict, bool)):
                raise ValueError("guided_json must be a JSON schema (an object)")
            return json.dumps(value, sort_keys=True)
        if kind == "json_object":
            return '{"type": "object"}'
        if kind == "choice":
            if not isinstance(self.choice, (list, tuple)) or not self.choice or not all(
                    isinstance(c, str) for c in self.choice):
                raise ValueError("guided_choice must be a non-empty list of strings")
            return json.dumps(list(self.choice))
        value = getattr(self, kind)
        if not isinstance(value, str) or not value:
            raise ValueError(f"guided_{kind} must be a non-empty string")
        return value

    def validate(self) -> None:
        self.spec()
        normalize_backend(self.backend)
