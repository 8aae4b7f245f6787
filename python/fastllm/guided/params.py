"""What a guided request asks for: one constraint (a JSON schema, any JSON object, a regex, a
choice among strings or a grammar) and optionally the backend that enforces it."""

from __future__ import annotations

import importlib.util
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


def backend_installed(name: str) -> bool:
    """Whether the package of a backend (a normalized name) is importable; nothing is imported
    (the server checks its --guided-decoding-backend with it before loading the model)."""
    module = {"guidance": "llguidance", "xgrammar": "xgrammar"}[name]
    return importlib.util.find_spec(module) is not None


_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SUBSCHEMA_VALUES = ("items", "additionalItems", "not", "if", "then", "else", "contains",
                     "propertyNames", "unevaluatedItems")


def strict_schema(schema: Any) -> Any:
    """A copy of a JSON schema in which every object that does not say otherwise allows only its
    listed properties (``additionalProperties: false``), as OpenAI's structured outputs do. A
    small model given an open object tends to invent keys until it runs out of tokens."""
    if isinstance(schema, list):
        return [strict_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SUBSCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [strict_schema(s) for s in out[key]]
    for key in _SUBSCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: strict_schema(s) for name, s in out[key].items()}
    for key in _SUBSCHEMA_VALUES:
        if key in out:
            out[key] = strict_schema(out[key])
    is_object = out.get("type") == "object" or (
        isinstance(out.get("type"), list) and "object" in out["type"]) or "properties" in out
    if is_object and "additionalProperties" not in out and \
            "unevaluatedProperties" not in out and "patternProperties" not in out:
        out["additionalProperties"] = False
    elif isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = strict_schema(out["additionalProperties"])
    return out


@dataclass
class GuidedDecodingParams:
    """Exactly one of ``json``, ``regex``, ``choice``, ``grammar`` or ``json_object`` constrains
    the output. ``json`` is a JSON schema (a dict or its JSON text); ``grammar`` is a Lark grammar
    (GBNF/EBNF is converted); ``whitespace_pattern`` is a regex for the whitespace JSON output may
    use; ``backend`` overrides the engine's default ("guidance" or "xgrammar").

    A ``json`` schema is strict by default: objects that do not set ``additionalProperties``
    allow no keys beyond their ``properties`` (see :func:`strict_schema`);
    ``json_strict=False`` keeps JSON Schema's default (any extra key)."""

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    backend: str | None = None
    whitespace_pattern: str | None = None
    json_strict: bool = True

    @classmethod
    def from_optional(cls, json: str | dict | None = None, regex: str | None = None,
                      choice: list[str] | None = None, grammar: str | None = None,
                      json_object: bool | None = None, backend: str | None = None,
                      whitespace_pattern: str | None = None, json_strict: bool = True
                      ) -> GuidedDecodingParams | None:
        if all(x is None for x in (json, regex, choice, grammar)) and not json_object:
            return None
        return cls(json=json, regex=regex, choice=choice, grammar=grammar,
                   json_object=json_object or None, backend=backend,
                   whitespace_pattern=whitespace_pattern, json_strict=json_strict)

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
            if self.json_strict:
                value = strict_schema(value)
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
