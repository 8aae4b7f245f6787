"""The OpenAI error body and the exception the handlers raise for it: every error the server
answers (a JSON body or a stream's SSE `error` event) is built here."""

from __future__ import annotations

import json

from fastllm.engine.errors import RequestFailedError


class APIError(Exception):
    """An error answered with an OpenAI error body."""

    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 err_type: str | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.err_type = err_type or ("BadRequestError" if status == 400 else
                                     "NotFoundError" if status == 404 else
                                     "AuthenticationError" if status == 401 else
                                     "InternalServerError")


def error_body(message: str, status: int, err_type: str, param: str | None = None) -> dict:
    """The OpenAI error body; every error the server sends is built here."""
    return {"error": {"message": message, "type": err_type, "param": param, "code": status}}


def as_api_error(error: Exception) -> APIError:
    """The client-facing form of an exception raised while serving a request: a bad value is a
    400, a request the engine failed a 500."""
    if isinstance(error, APIError):
        return error
    if isinstance(error, RequestFailedError):
        return APIError(str(error), status=500)
    if isinstance(error, ValueError):
        return APIError(str(error))
    return APIError(f"internal error: {type(error).__name__}: {error}", status=500)


def error_event(error: Exception) -> str:
    """A stream's error: an SSE `error` event with the OpenAI error body, then [DONE]."""
    e = as_api_error(error)
    body = json.dumps(error_body(e.message, e.status, e.err_type, e.param), ensure_ascii=False)
    return f"event: error\ndata: {body}\n\ndata: [DONE]\n\n"
