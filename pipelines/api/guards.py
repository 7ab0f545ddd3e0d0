"""What one request may cost the inference API, and the guards that hold it there.

Uvicorn takes a request body of any size, at any pace, and waits for a request's head as long as
the client likes; a few slow or huge requests then hold every connection and all the memory. The
guards: a body over `max_body_bytes` is refused by its Content-Length before it is read, or as soon
as the bytes read pass the limit; a body that takes longer than `body_timeout_s` is refused; a
connection whose request head has not arrived within `head_timeout_s` is closed.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import HTTPException
from fastapi.responses import JSONResponse
from uvicorn.protocols.http.h11_impl import H11Protocol

from pipelines.api.settings import Limits, mib

# The rest of a refused body is never read: the connection cannot carry another request.
CLOSE = {"Connection": "close"}


class BodyGuard:
    """ASGI middleware: a body over the limit or slower than the timeout is refused while it arrives
    (413 or 408, one line) instead of being read, spooled and parsed whole."""

    def __init__(self, app: Any, limits: Limits) -> None:
        self.app = app
        self.limits = limits

    def too_large(self, what: str) -> str:
        return (f"the request body {what} more than the {mib(self.limits.max_body_bytes)} this server takes; "
                "send fewer or smaller images")

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limits.max_body_bytes):
            refusal = JSONResponse({"detail": self.too_large(f"is {declared.decode(errors='replace')} bytes,")}, 413,
                                   headers=CLOSE)
            await refusal(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        received, deadline = 0, None

        async def guarded_receive() -> dict:
            nonlocal received, deadline
            if deadline is None:  # the clock starts when the app first asks for the body
                deadline = loop.time() + self.limits.body_timeout_s
            try:
                message = await asyncio.wait_for(receive(), timeout=max(0.0, deadline - loop.time()))
            except TimeoutError:
                raise HTTPException(408, f"the request body took longer than {self.limits.body_timeout_s:g} s "
                                         "to arrive; send it at once", headers=CLOSE) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limits.max_body_bytes:
                    raise HTTPException(413, self.too_large("holds"), headers=CLOSE)
            return message

        await self.app(scope, guarded_receive, send)


class HeadDeadlineProtocol(H11Protocol):
    """Uvicorn's h11 protocol with a deadline for each request head: a connection that has not sent
    a whole request line and headers within `head_timeout_s` (of opening, or of its last response)
    is closed, so clients that trickle headers cannot hold connections. Uvicorn takes it as
    `functools.partial(HeadDeadlineProtocol, head_timeout_s=...)`, which pickles for its workers."""

    def __init__(self, *args: Any, head_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.head_timeout_s = head_timeout_s

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_deadline()

    def _arm_head_deadline(self) -> None:
        waiting_since = self.cycle  # a new request head replaces the cycle

        def close_if_still_waiting() -> None:
            idle = self.cycle is None or self.cycle.response_complete
            if self.cycle is waiting_since and idle and not self.transport.is_closing():
                self.transport.close()

        self._head_deadline = self.loop.call_later(self.head_timeout_s, close_if_still_waiting)

    def on_response_complete(self) -> None:
        self._head_deadline.cancel()
        super().on_response_complete()
        self._arm_head_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_deadline.cancel()
        super().connection_lost(exc)
