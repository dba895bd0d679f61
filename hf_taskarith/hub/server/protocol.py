"""uvicorn's h11 protocol with a deadline on request headers.

uvicorn times out idle keep-alive connections, but not a client that opens a connection and
never completes its request line and headers (or trickles them a byte at a time): each such
connection would stay open for good. This subclass closes a connection whose next request has
not been fully received ``header_timeout_s`` after the connection opened or the previous
response ended. Requests in flight (body uploads, long downloads) are not affected; their
bodies have deadlines of their own (:mod:`.asgi`).

Written here because uvicorn has no such setting; it overrides three documented protocol hooks
(``connection_made``, ``connection_lost``, ``on_response_complete``) of the protocol class
that ``uvicorn.Config(http=...)`` accepts.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.h11_impl import H11Protocol


def header_deadline_protocol(header_timeout_s: float) -> type[H11Protocol]:
    """An :class:`H11Protocol` subclass that enforces ``header_timeout_s``."""

    class HeaderDeadlineH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_header_deadline()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_header_deadline()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            super().connection_lost(exc)

        def _arm_header_deadline(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            self._header_timer = self.loop.call_later(header_timeout_s, self._header_deadline_passed)

        def _header_deadline_passed(self) -> None:
            waiting_for_request = self.cycle is None or self.cycle.response_complete
            if waiting_for_request and not self.transport.is_closing():
                self.transport.close()

    return HeaderDeadlineH11Protocol
