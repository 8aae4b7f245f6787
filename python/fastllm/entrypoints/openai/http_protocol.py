"""uvicorn's httptools protocol with one change: a malformed request that arrives while earlier
requests on the same keep-alive connection still await their responses is answered (400 and
close) only after those responses went out.

uvicorn answers a parse error at once and closes the connection, so a client whose body ran past
its Content-Length (pipelined bytes that do not parse) lost the response to the request it had
just sent, and saw a transport error instead of that request's answer."""

from __future__ import annotations

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class OrderlyHttpToolsProtocol(HttpToolsProtocol):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._deferred_400: str | None = None

    def _responses_pending(self) -> bool:
        return bool(self.pipeline) or (self.cycle is not None and
                                       not self.cycle.response_complete)

    def send_400_response(self, msg: str) -> None:
        if self._responses_pending():
            self._deferred_400 = msg
            return
        super().send_400_response(msg)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._deferred_400 is not None and not self._responses_pending() and \
                not self.transport.is_closing():
            msg, self._deferred_400 = self._deferred_400, None
            super().send_400_response(msg)
