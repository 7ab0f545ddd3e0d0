"""What one request may cost the inference API, and the guards that hold it there.

Uvicorn takes a request body of any size, at any pace, and waits for a request's head as long as
the client likes; a few slow or huge requests then hold every connection and all the memory. The
guards: a body over `max_body_bytes` is refused by its Content-Length before it is read, or as soon
as the bytes read pass the limit; a body that takes longer than `body_timeout_s` is refused; a
connection whose request head has not arrived within `head_timeout_s` is closed.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

# Imported where used: the CLI reads Limits' defaults without loading the web stack.
if TYPE_CHECKING:
    from uvicorn.protocols.http.h11_impl import H11Protocol

MIB = 1024 * 1024


@dataclass(frozen=True)
class Limits:
    max_files: int = 64  # images per request
    max_file_bytes: int = 10 * MIB  # per image; a 32x32 model gains nothing from larger uploads
    max_body_bytes: int = 32 * MIB
    # Decoded pixels per request: decoding costs time and memory by pixels, not by file size (a
    # 16-bit PNG of 9000x9000 zeros is a small file and 81 million pixels).
    max_pixels: int = 4096 * 4096
    head_timeout_s: float = 10.0
    body_timeout_s: float = 30.0


# The rest of a refused body is never read: the connection cannot carry another request.
CLOSE = {"Connection": "close"}


def mib(n_bytes: int) -> str:
    return f"{n_bytes / MIB:g} MiB"


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
        from fastapi import HTTPException
        from fastapi.responses import JSONResponse

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


def head_deadline_protocol(timeout_s: float) -> type[H11Protocol]:
    """Uvicorn's h11 protocol with a deadline for each request head: a connection that has not sent
    a whole request line and headers within `timeout_s` (of opening, or of its last response) is
    closed, so clients that trickle headers cannot hold connections."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeadDeadlineProtocol(H11Protocol):
        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_head_deadline()

        def _arm_head_deadline(self) -> None:
            waiting_since = self.cycle  # a new request head replaces the cycle

            def close_if_still_waiting() -> None:
                idle = self.cycle is None or self.cycle.response_complete
                if self.cycle is waiting_since and idle and not self.transport.is_closing():
                    self.transport.close()

            self._head_deadline = self.loop.call_later(timeout_s, close_if_still_waiting)

        def on_response_complete(self) -> None:
            self._head_deadline.cancel()
            super().on_response_complete()
            self._arm_head_deadline()

        def connection_lost(self, exc: Exception | None) -> None:
            self._head_deadline.cancel()
            super().connection_lost(exc)

    return HeadDeadlineProtocol
