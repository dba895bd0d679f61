"""The embedded Hub as an ASGI application (served by uvicorn, responses built with Starlette).

Each request's synchronous work (:func:`.dispatch.handle`: ``git`` subprocesses, file I/O) runs
in a bounded pool of worker threads (``max_workers``); idle and slow connections cost no thread.
The body is not read up front: the endpoint pulls it chunk by chunk from the event loop
(:class:`BodyChannel`) after its credentials and route are checked, so a refused request never
has its body read, and an LFS upload streams to disk without being held in memory.

Deadlines on a body: no data for ``read_timeout_s``, a rate below ``min_body_rate`` bytes/s after
the first ``read_timeout_s`` seconds, or longer than ``request_deadline_s`` in all: 408, and the
connection is closed. (Request *headers* have their own deadline in :mod:`.protocol`.)
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qs

import anyio
import anyio.from_thread
import anyio.to_thread
from starlette.concurrency import iterate_in_threadpool
from starlette.datastructures import Headers
from starlette.responses import Response as StarletteResponse
from starlette.responses import StreamingResponse

from .dispatch import ClientGone, handle, has_body, new_request
from .errors import HubHTTPError
from .limits import CHUNK, TruncatedBody
from .messages import FileResponse, JSONResponse, Response, StreamResponse, TextResponse

if TYPE_CHECKING:
    from .app import HubServer


class BodyChannel:
    """The request body as a blocking iterator of chunks, for the worker thread that handles it.

    Each ``next()`` asks the event loop for the next ASGI ``http.request`` message.

    Raises (while iterating):
        TruncatedBody: the client disconnected.
        HubHTTPError: 408 when a deadline passed (see the module docstring).
    """

    def __init__(self, receive, *, read_timeout_s: float, deadline_s: float, min_rate: float) -> None:
        self._receive = receive
        self.read_timeout_s = read_timeout_s
        self.deadline_s = deadline_s
        self.min_rate = min_rate
        self.started = time.monotonic()
        self.received = 0
        self.done = False

    async def _next(self) -> bytes:
        with anyio.fail_after(self.read_timeout_s):
            message = await self._receive()
        if message["type"] == "http.disconnect":
            raise TruncatedBody(f"client disconnected after {self.received} bytes")
        if not message.get("more_body", False):
            self.done = True
        return message.get("body", b"")

    def __iter__(self) -> Iterator[bytes]:
        while not self.done:
            try:
                chunk = anyio.from_thread.run(self._next)
            except TimeoutError:
                raise HubHTTPError(408, f"No request data for {self.read_timeout_s:g} s; closing.") from None
            self.received += len(chunk)
            self._check_pace()
            yield chunk

    def _check_pace(self) -> None:
        elapsed = time.monotonic() - self.started
        if elapsed > self.deadline_s:
            raise HubHTTPError(408, f"Request body took longer than {self.deadline_s:g} s; closing.")
        if elapsed > self.read_timeout_s and self.received < self.min_rate * elapsed:
            raise HubHTTPError(408, f"Request body arrives at {self.received / elapsed:.0f} bytes/s, below this "
                                    f"server's minimum of {self.min_rate:g}; closing.")


async def _file_chunks(path: Path, offset: int, length: int) -> AsyncIterator[bytes]:
    async with await anyio.open_file(path, "rb") as f:
        await f.seek(offset)
        remaining = length
        while remaining:
            data = await f.read(min(CHUNK, remaining))
            if not data:
                return  # shorter than announced: the server closes the connection
            remaining -= len(data)
            yield data


def to_starlette(response: Response, *, close: bool, head: bool = False) -> StarletteResponse:
    """Our endpoint's answer as a Starlette response (``close``: end the connection after it;
    ``head``: headers only, the body's length announced but nothing opened or read)."""
    headers = dict(response.headers)
    if close:
        headers["Connection"] = "close"
    if head and isinstance(response, (StreamResponse, FileResponse)):
        headers["Content-Length"] = str(response.length)
        return StarletteResponse(b"", response.status, headers)
    if isinstance(response, JSONResponse):
        return StarletteResponse(response.encode(), response.status, headers, media_type=response.content_type)
    if isinstance(response, TextResponse):
        return StarletteResponse(response.text.encode(), response.status, headers, media_type=response.content_type)
    if isinstance(response, StreamResponse):
        headers["Content-Length"] = str(response.length)
        return StreamingResponse(iterate_in_threadpool(iter(response.chunks)), response.status, headers)
    if isinstance(response, FileResponse):
        headers["Content-Length"] = str(response.length)
        if response.file is None or not response.length:
            return StarletteResponse(b"", response.status, headers)
        return StreamingResponse(_file_chunks(response.file, response.offset, response.length),
                                 response.status, headers)
    return StarletteResponse(b"", response.status, headers)


class HubASGIApp:
    """ASGI entry point of a :class:`~.app.HubServer` (``http`` scopes only; lifespan is off)."""

    def __init__(self, server: HubServer) -> None:
        self.server = server
        self.limiter = anyio.CapacityLimiter(server.config.max_workers)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        cfg = self.server.config
        headers = Headers(scope=scope)
        raw_path = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        channel = BodyChannel(receive, read_timeout_s=cfg.read_timeout_s, deadline_s=cfg.request_deadline_s,
                              min_rate=cfg.min_body_rate)
        req = new_request(self.server, scope["method"], raw_path, query, headers, channel)
        try:
            response = await anyio.to_thread.run_sync(handle, self.server, req, limiter=self.limiter)
        except ClientGone:
            return  # nobody to answer; uvicorn closes the connection
        unread = has_body(headers) and not channel.done  # would be parsed as the next request: close
        await to_starlette(response, close=unread, head=scope["method"] == "HEAD")(scope, receive, send)
