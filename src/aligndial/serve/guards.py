"""HTTP-level guards, before a request reaches a route (docs/reliability.md, case 29):

- `ReadBody` (ASGI middleware): a POST body must be JSON (a JSON body sent as text/plain gets a
  415 that says which header to send), at most `max_body_bytes` (413 at once when Content-Length
  says so, else as soon as the streamed body passes it), and whole within `body_timeout` seconds
  (408). The body is then handed to the app in one piece.
- `uvicorn_config`: uvicorn with an h11 protocol that closes a connection which has not sent a
  whole request head within `header_timeout` seconds of opening (or of its previous response),
  h11's head-size limit, and the keep-alive timeout. uvicorn alone drops an idle keep-alive
  connection only while no byte arrives, and has no timeout at all for a first request, so a
  slowloris client sending a header byte every few seconds was held forever.

Refusing text/plain is deliberate rather than reading it as JSON: a web page can POST text/plain
to a server on localhost without a CORS preflight, so accepting it would let any page a user
visits spend their server's compute.
"""

from __future__ import annotations

import asyncio
import email.message

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from aligndial.serve.errors import APIError


def _is_json(content_type: bytes) -> bool:
    message = email.message.Message()
    message["content-type"] = content_type.decode("latin-1")
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (subtype == "json" or subtype.endswith("+json"))


class ReadBody:
    """ASGI middleware: checks and reads POST bodies (see the module docstring)."""

    def __init__(self, app, max_bytes: int, timeout: float, count_error):
        self.app, self.max_bytes, self.timeout, self.count_error = app, max_bytes, timeout, count_error

    async def _refuse(self, err: APIError, scope, receive, send) -> None:
        self.count_error(err.type)
        # Connection: close, so a client still sending the rest of a refused body is not read on.
        err.headers = {**(err.headers or {}), "Connection": "close"}
        await err.response()(scope, receive, send)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        content_type = headers.get(b"content-type")
        if content_type is not None and not _is_json(content_type):
            shown = content_type.decode("latin-1")[:60]
            return await self._refuse(APIError(415, f"the request body must be JSON: send the header "
                                                    f"`Content-Type: application/json` (got {shown!r})"),
                                      scope, receive, send)
        too_big = APIError(413, f"the request body is larger than this server's limit of {self.max_bytes} bytes "
                                "(--max-body-bytes); send a shorter prompt", code="request_too_large")
        length = headers.get(b"content-length", b"0")
        if length.isdigit() and int(length) > self.max_bytes:  # h11 has already refused a malformed length
            return await self._refuse(too_big, scope, receive, send)
        chunks, size = [], 0
        try:
            async with asyncio.timeout(self.timeout):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return  # the client left: nobody to answer
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > self.max_bytes:
                        return await self._refuse(too_big, scope, receive, send)
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            return await self._refuse(APIError(408, f"the request body did not arrive within {self.timeout:g} s "
                                                    "(--body-timeout)", code="request_timeout"), scope, receive, send)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # later calls wait for the disconnect, as before
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


class _TimedH11(H11Protocol):
    """uvicorn's h11 protocol, plus a deadline for each whole request head (see the module docstring)."""

    header_timeout: float  # set by `protocol_class`

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._head_timer = None
        self._arm_head_timer()

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if getattr(self, "_head_timer", None) is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()  # no complete request head in time: nothing to answer

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # a whole head has arrived
            self._cancel_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._arm_head_timer()  # the next request on this connection gets the same deadline

    def connection_lost(self, exc) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)


def protocol_class(header_timeout: float) -> type:
    return type("TimedH11Protocol", (_TimedH11,), {"header_timeout": header_timeout})


def uvicorn_config(app, settings, **kwargs):
    """A `uvicorn.Config` for `app` with the settings' connection limits; `kwargs` go to uvicorn
    (host and port default to the settings')."""
    import uvicorn

    kwargs = {"host": settings.host, "port": settings.port, **kwargs}
    return uvicorn.Config(app, http=protocol_class(settings.header_timeout),
                          timeout_keep_alive=settings.keep_alive_timeout,
                          h11_max_incomplete_event_size=settings.max_header_bytes, **kwargs)
