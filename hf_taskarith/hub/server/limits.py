"""Request-size limits: reading bodies without ever holding more than the configured number of
bytes, and telling a truncated body from a complete one.

The HTTP server (uvicorn's h11 parser) has already removed the transfer framing: the reader sees
the body's bytes as a sequence of chunks, and checks them against ``Content-Length`` and the limit.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

from .errors import HubHTTPError

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
CHUNK = 1024 * 1024


def parse_size(text: str | int) -> int:
    """``"64MiB"`` -> 67108864; ``"5GB"`` -> 5e9; plain integers are bytes.

    Raises:
        ValueError: not a number with an optional unit (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB).
    """
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"invalid size {text!r}: expected a number with an optional unit, e.g. 64MiB, 5GB, 1048576")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


class TruncatedBody(Exception):
    """The client stopped sending before the announced end of the body (connection dropped)."""


class BodyReader:
    """Iterates over a request body in chunks, enforcing ``limit`` bytes.

    Args:
        chunks: the body's bytes as they arrive (an iterator that blocks for the next chunk and
            raises :class:`TruncatedBody` when the client goes away).
        headers: the request headers (``Content-Length``, if any, is checked against the bytes).
        limit: the most bytes accepted; a larger announced length is refused before reading.

    Raises (while iterating):
        HubHTTPError: 413 over ``limit``, 400 for a malformed ``Content-Length`` or more bytes than it said.
        TruncatedBody: the body ended before ``Content-Length`` bytes.
    """

    def __init__(self, chunks: Iterable[bytes], headers, limit: int) -> None:
        self.chunks = chunks
        self.limit = limit
        self.received = 0
        self.finished = False
        length = headers.get("Content-Length")
        if length is None:
            self.length = None
        else:
            if not length.strip().isdigit():
                raise HubHTTPError(400, f"Invalid Content-Length {length!r}")
            self.length = int(length)
            if self.length > limit:
                raise HubHTTPError(413, f"Request body of {self.length} bytes exceeds this server's limit of "
                                        f"{limit} bytes (raise it with --max-request-size / --max-upload-size).")

    def __iter__(self) -> Iterator[bytes]:
        for data in self.chunks:
            if not data:
                continue
            self.received += len(data)
            if self.received > self.limit:
                raise HubHTTPError(413, f"Request body exceeds this server's limit of {self.limit} bytes.")
            yield data
        if self.length is not None and self.received != self.length:
            raise TruncatedBody(f"body ended after {self.received} of {self.length} bytes")
        self.finished = True

    def read_all(self) -> bytes:
        return b"".join(self)

    def lines(self) -> Iterator[bytes]:
        """The body split at ``\n``, one line at a time (NDJSON), never the whole body at once."""
        parts: list[bytes] = []  # the current line's pieces (joined once: no quadratic copying)
        for data in self:
            start = 0
            while (end := data.find(b"\n", start)) >= 0:
                parts.append(data[start:end])
                yield b"".join(parts)
                parts, start = [], end + 1
            if start < len(data):
                parts.append(data[start:])
        if parts:
            yield b"".join(parts)
