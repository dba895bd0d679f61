"""Requests as the endpoints see them, and the responses they return."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from .errors import HubHTTPError
from .limits import BodyReader

if TYPE_CHECKING:
    from .app import HubServer
    from .auth import Caller


@dataclass
class Request:
    """One HTTP request, routed: ``params`` holds the decoded URL parts the route captured."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: Any  # case-insensitive .get() (starlette.datastructures.Headers)
    chunks: Any  # the body's bytes as they arrive (see .asgi.BodyChannel)
    server: HubServer
    caller: Caller
    params: dict[str, str] = field(default_factory=dict)
    body_consumed: bool = False

    def body_reader(self, limit: int) -> BodyReader:
        self.body_consumed = True
        return BodyReader(self.chunks, self.headers, limit)

    def body(self, limit: int | None = None) -> bytes:
        return self.body_reader(limit or self.server.config.max_request_bytes).read_all()

    def json(self, limit: int | None = None) -> Any:
        raw = self.body(limit)
        if not raw.strip():
            return {}
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise HubHTTPError(400, f"Request body is not valid JSON: {e}") from None
        except RecursionError:
            raise HubHTTPError(400, "Request body is JSON nested too deeply.") from None

    def form_or_json(self, limit: int | None = None) -> dict[str, Any]:
        """A body sent either as JSON or as ``application/x-www-form-urlencoded`` (lists kept)."""
        ctype = (self.headers.get("Content-Type") or "").lower()
        if "application/x-www-form-urlencoded" in ctype:
            try:
                return dict(parse_qs(self.body(limit).decode(), strict_parsing=False))
            except UnicodeDecodeError:
                raise HubHTTPError(400, "Form body is not valid UTF-8") from None
        data = self.json(limit)
        if not isinstance(data, dict):
            raise HubHTTPError(400, f"Expected a JSON object, got {type(data).__name__}")
        return data

    def flag(self, name: str) -> bool:
        values = self.query.get(name)
        return bool(values) and values[-1].lower() in ("1", "true", "yes")

    def base_url(self) -> str:
        """The URL the client used to reach the server (for URLs inside responses)."""
        return self.server.base_url_for(self.headers.get("Host"))


@dataclass
class Response:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class JSONResponse(Response):
    body: Any = None
    content_type: str = "application/json"

    def encode(self) -> bytes:
        return json.dumps(self.body).encode()


@dataclass
class TextResponse(Response):
    """A text body (HTML pages)."""

    text: str = ""
    content_type: str = "text/plain; charset=utf-8"


@dataclass
class StreamResponse(Response):
    """A body of known ``length`` from an iterator of chunks (git blobs)."""

    length: int = 0
    chunks: Iterable[bytes] = ()


@dataclass
class FileResponse(Response):
    """``length`` bytes of ``file`` from ``offset`` (LFS objects, sent with ``sendfile``)."""

    file: Path | None = None
    offset: int = 0
    length: int = 0


def field_of(data: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
    """``data[key]`` checked to be a JSON value of ``kind`` (``default`` when absent or null).

    Raises:
        HubHTTPError: 400 naming the field, the type expected and the value received
            (``"private": "false"`` is a string, not false).
    """
    value = data.get(key)
    if value is None:
        return default
    if isinstance(value, list) and len(value) == 1 and kind is not list:  # form fields arrive as lists
        value = value[0]
    expected = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in expected:
        value = None  # bool is an int in Python; not for JSON fields
    if not isinstance(value, expected):
        names = " or ".join({bool: "true/false", str: "a string", int: "an integer", list: "a list",
                             dict: "an object"}.get(k, k.__name__) for k in expected)
        raise HubHTTPError(400, f"Field {key!r} must be {names}, got {data.get(key)!r}.")
    return value
