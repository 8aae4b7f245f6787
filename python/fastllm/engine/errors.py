"""Errors the engine reports for one request (the others keep running)."""

from __future__ import annotations


class RequestFailedError(RuntimeError):
    """The engine or its executor failed while running this request. Offline it is raised from
    ``LLM.generate``; the server answers it with HTTP 500 (or an SSE error event)."""

    def __init__(self, request_id: str, message: str):
        super().__init__(f"request {request_id} failed: {message}")
        self.request_id = request_id
        self.message = message
