"""Request and response bodies of the OpenAI-compatible API (pydantic). Validation errors become
HTTP 400 with an OpenAI error body; fields fastllm does not implement yet are rejected by name
rather than ignored."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fastllm.guided.params import GuidedDecodingParams, normalize_backend
from fastllm.sampling_params import SamplingParams


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class OpenAIModel(BaseModel):
    # Unknown fields are kept so they can be reported; see unsupported_fields().
    model_config = ConfigDict(extra="allow")


def _check_text(value: Any, path: str = "") -> None:
    """Raises ValueError for a string anywhere in value that is not valid Unicode text (a lone
    surrogate such as "\\ud800", which JSON can spell but UTF-8 cannot encode): tokenizers,
    templates and the response encoder all fail on one."""
    if isinstance(value, str):
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                where = f" in {path}" if path else ""
                raise ValueError(f"invalid Unicode{where}: lone surrogate at character "
                                 f"{e.start}") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_text(key, path)
            _check_text(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_text(item, f"{path}[{i}]")


class RequestModel(OpenAIModel):
    """A request body: every string in it must be valid Unicode text (checked once, here)."""

    @model_validator(mode="before")
    @classmethod
    def _valid_text(cls, data: Any) -> Any:
        _check_text(data)
        return data


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class StreamOptions(OpenAIModel):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class ResponseFormat(OpenAIModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


# Request fields passed to SamplingParams under the same name when the request gives them.
_PASSED_ON = ("n", "best_of", "presence_penalty", "frequency_penalty", "repetition_penalty",
              "temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids",
              "ignore_eos", "min_tokens", "skip_special_tokens", "spaces_between_special_tokens",
              "include_stop_str_in_output", "priority", "prompt_logprobs", "allowed_token_ids")


class SamplingFields(RequestModel):
    """Fields shared by completions and chat completions. A sampling field defaults to None,
    "not given": to_sampling_params passes on only what the request gave, so every default comes
    from SamplingParams (the one table of them). OpenAI-specific defaults that differ on purpose
    are applied where the endpoint is served and say so there (completions' max_tokens 16)."""

    model: str | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    max_tokens: int | None = None
    n: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    user: str | None = None
    response_format: ResponseFormat | None = None
    # extra sampling parameters
    best_of: int | None = None
    use_beam_search: bool | None = False
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    length_penalty: float | None = 1.0
    early_stopping: bool | None = False
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    min_tokens: int | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    truncate_prompt_tokens: int | None = Field(default=None, ge=1)
    allowed_token_ids: list[int] | None = None
    prompt_logprobs: int | None = None
    priority: int | None = None
    return_tokens_as_token_ids: bool | None = False
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None
    guided_whitespace_pattern: str | None = None
    # false: a JSON schema's objects may hold keys it does not list (default: strict)
    guided_json_strict: bool | None = None
    request_id: str | None = None

    def unsupported(self) -> list[str]:
        """Names of the given fields whose behaviour fastllm does not implement yet."""
        bad = []
        return bad

    def guided_decoding(self) -> GuidedDecodingParams | None:
        """The request's output constraint from guided_* or response_format. ValueError when
        it gives more than one or a malformed one."""
        fmt = self.response_format
        json_schema: Any = self.guided_json
        json_object = None
        # Schemas are strict unless the request relaxes them (see GuidedDecodingParams).
        strict = self.guided_json_strict is not False
        if fmt is not None and fmt.type != "text":
            if json_schema is not None:
                raise ValueError("give either response_format or guided_json, not both")
            if fmt.type == "json_object":
                json_object = True
            else:
                spec = fmt.json_schema or {}
                schema = spec.get("schema", spec.get("json_schema"))
                if not isinstance(schema, dict):
                    raise ValueError("response_format of type json_schema needs "
                                     "json_schema.schema (a JSON schema object)")
                json_schema = schema
                if spec.get("strict") is False:
                    strict = False
        given = [name for name, value in (
            ("guided_json/response_format", json_schema if json_object is None else True),
            ("guided_regex", self.guided_regex), ("guided_choice", self.guided_choice),
            ("guided_grammar", self.guided_grammar)) if value is not None]
        if len(given) > 1:
            raise ValueError(f"give only one guided decoding constraint, got {', '.join(given)}")
        params = GuidedDecodingParams.from_optional(
            json=json_schema, regex=self.guided_regex, choice=self.guided_choice,
            grammar=self.guided_grammar, json_object=json_object,
            backend=self.guided_decoding_backend,
            whitespace_pattern=self.guided_whitespace_pattern, json_strict=strict)
        if params is None and self.guided_decoding_backend is not None:
            normalize_backend(self.guided_decoding_backend)  # an unknown name is still an error
        return params

    def unknown_fields(self) -> list[str]:
        return sorted((self.model_extra or {}).keys())

    def to_sampling_params(self, max_tokens: int | None, logprobs: int | None
                           ) -> SamplingParams:
        """The request's sampling parameters: the fields it gave (not None), SamplingParams'
        defaults for the rest. Nothing is checked here: SamplingParams.validate is the one
        check, and its ValueError message is what the client sees (HTTP 400)."""
        given = {name: getattr(self, name) for name in _PASSED_ON
                 if getattr(self, name) is not None}
        return SamplingParams(
            **given,
            max_tokens=max_tokens,
            logprobs=logprobs,
            logit_bias=self.parsed_logit_bias(),
            guided_decoding=self.guided_decoding(),
        )

    def parsed_logit_bias(self) -> dict[int, float] | None:
        """OpenAI sends token ids as JSON object keys (strings)."""
        if not self.logit_bias:
            return None
        out = {}
        for key, value in self.logit_bias.items():
            try:
                out[int(key)] = float(value)
            except ValueError as e:
                raise ValueError(f"logit_bias keys must be token ids, got {key!r}") from e
        return out


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = False
    logprobs: int | None = None
    suffix: str | None = None
    add_special_tokens: bool | None = True

    def unsupported(self) -> list[str]:
        bad = super().unsupported()
        if self.suffix:
            bad.append("suffix")
        return bad


class ChatMessage(OpenAIModel):
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage]
    logprobs: bool | None = False
    top_logprobs: int | None = None
    max_completion_tokens: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    echo: bool | None = False
    add_generation_prompt: bool | None = True
    continue_final_message: bool | None = False
    add_special_tokens: bool | None = False
    documents: list[dict[str, str]] | None = None
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None



class TokenizeRequest(RequestModel):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = True
    add_generation_prompt: bool | None = True
    continue_final_message: bool | None = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None


class DetokenizeRequest(RequestModel):
    model: str | None = None
    tokens: list[int]


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: dict[str, int] | None = None


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "fastllm"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]


class LoadLoRAAdapterRequest(BaseModel):
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadLoRAAdapterRequest(BaseModel):
    lora_name: str = Field(min_length=1)
    lora_int_id: int | None = None
