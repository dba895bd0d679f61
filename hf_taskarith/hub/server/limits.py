"""Request-size limits: reading bodies (``Content-Length`` or chunked) without ever holding more
than the configured number of bytes, and telling a truncated body from a complete one.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import BinaryIO

from .errors import HubHTTPError

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
CHUNK = 1024 * 1024
#: longest line accepted in a chunked body's framing (size line or trailer)
_MAX_FRAMING_LINE = 4096


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
        rfile: the connection's input stream.
        headers: the request headers (``Content-Length`` or ``Transfer-Encoding: chunked``).
        limit: the most bytes accepted; a larger announced length is refused before reading.

    Raises (while iterating):
        HubHTTPError: 411 without a length, 413 over ``limit``, 400 for malformed chunking.
        TruncatedBody: the connection ended early.
    """

    def __init__(self, rfile: BinaryIO, headers, limit: int) -> None:
        self.rfile = rfile
        self.limit = limit
        self.received = 0
        self.finished = False
        encoding = (headers.get("Transfer-Encoding") or "").lower().strip()
        length = headers.get("Content-Length")
        if encoding and encoding != "identity":
            if encoding != "chunked":
                raise HubHTTPError(400, f"Transfer-Encoding {encoding!r} is not supported (use chunked or identity)")
            self.length = None
        elif length is None:
            self.length = 0
        else:
            if not length.strip().isdigit():
                raise HubHTTPError(400, f"Invalid Content-Length {length!r}")
            self.length = int(length)
            if self.length > limit:
                raise HubHTTPError(413, f"Request body of {self.length} bytes exceeds this server's limit of "
                                        f"{limit} bytes (raise it with --max-request-size / --max-upload-size).")

    def __iter__(self) -> Iterator[bytes]:
        if self.length is not None:
            yield from self._fixed()
        else:
            yield from self._chunked()
        self.finished = True

    def _fixed(self) -> Iterator[bytes]:
        remaining = self.length
        while remaining:
            data = self.rfile.read(min(CHUNK, remaining))
            if not data:
                raise TruncatedBody(f"connection closed after {self.received} of {self.length} bytes")
            remaining -= len(data)
            self.received += len(data)
            yield data

    def _line(self) -> bytes:
        line = self.rfile.readline(_MAX_FRAMING_LINE + 1)
        if not line:
            raise TruncatedBody(f"connection closed after {self.received} bytes of a chunked body")
        if len(line) > _MAX_FRAMING_LINE:
            raise HubHTTPError(400, "Malformed chunked body: framing line too long")
        return line

    def _chunked(self) -> Iterator[bytes]:
        while True:
            size_text = self._line().split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise HubHTTPError(400, f"Malformed chunked body: bad chunk size {size_text[:20]!r}") from None
            if size == 0:
                while self._line().strip():  # trailers, then the final empty line
                    pass
                return
            if self.received + size > self.limit:
                raise HubHTTPError(413, f"Request body exceeds this server's limit of {self.limit} bytes.")
            remaining = size
            while remaining:
                data = self.rfile.read(min(CHUNK, remaining))
                if not data:
                    raise TruncatedBody(f"connection closed after {self.received} bytes of a chunked body")
                remaining -= len(data)
                self.received += len(data)
                yield data
            if self.rfile.read(2) != b"\r\n":
                raise HubHTTPError(400, "Malformed chunked body: missing CRLF after a chunk")

    def read_all(self) -> bytes:
        return b"".join(self)
