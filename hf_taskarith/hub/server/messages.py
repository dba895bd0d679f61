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
    headers: Any  # email.message.Message: case-insensitive .get()
    rfile: Any
    server: "HubServer"
    caller: "Caller"
    params: dict[str, str] = field(default_factory=dict)
    body_consumed: bool = False

    def body_reader(self, limit: int) -> BodyReader:
        self.body_consumed = True
        return BodyReader(self.rfile, self.headers, limit)

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
