"""Browser-facing protections of the embedded Hub: Host allow-list, Origin check, JSON-only writes.

A server on the loopback is reachable from any web page the user opens: the browser is on the
loopback too. Two attacks follow, and these checks stop them before any route runs:

* **Cross-site request forgery**: a page POSTs to ``http://127.0.0.1:8090/api/...`` with a
  "simple" content type (``text/plain``, forms), which browsers send cross-origin without
  asking. Writes must carry a JSON content type (which browsers only send cross-origin after
  a CORS preflight this server never grants), and a request whose ``Origin`` is not the
  server's own is refused.
* **DNS rebinding**: a page on ``evil.example`` re-points its name at 127.0.0.1 and talks to
  the server "same-origin". The ``Host`` header then names ``evil.example``: only loopback
  names, the bound address and the hosts given with ``allow_hosts`` (CLI ``--allow-host``)
  are served.

Stock clients (``huggingface_hub``, git, curl) send their target as ``Host``, no ``Origin``,
and JSON / NDJSON bodies, so they are unaffected.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from urllib.parse import urlsplit

from .errors import HubHTTPError

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "localhost.localdomain"})
#: content types accepted for POST requests (huggingface_hub: JSON, NDJSON commits, git-lfs batch)
JSON_TYPES = re.compile(r"^application/([\w.+-]*\+)?(json|x-ndjson)\b", re.IGNORECASE)
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def host_name(value: str) -> str:
    """The host part of a ``Host`` header or URL authority, lower-cased, without port or brackets."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def allowed_hosts(bound_host: str, extra: Iterable[str]) -> frozenset[str]:
    """Loopback names, the bound address (unless a wildcard) and ``extra``, normalised."""
    hosts = set(LOOPBACK_NAMES) | {host_name(h) for h in extra}
    if bound_host not in ("0.0.0.0", "::", ""):
        hosts.add(host_name(bound_host))
    return frozenset(hosts)


def check_request(method: str, headers: Mapping[str, str], allowed: frozenset[str]) -> None:
    """Refuse a request that a web page could have made on the user's behalf (before routing).

    Raises:
        HubHTTPError: 403 for a ``Host``, or for a non-GET request's ``Origin``, outside
            ``allowed`` (unless ``allowed`` holds ``"*"``).
    """
    wildcard = "*" in allowed
    host = headers.get("Host")
    if not wildcard and (not host or host_name(host) not in allowed):
        raise HubHTTPError(403, f"Host header {host!r} is not served here (protection against DNS rebinding); "
                                f"allowed: {sorted(allowed)}. Start the server with --allow-host NAME to add one.")
    origin = headers.get("Origin")
    if origin and origin != "null" and method not in SAFE_METHODS:
        origin_host = urlsplit(origin).hostname or ""
        if not wildcard and origin_host.lower() not in allowed:
            raise HubHTTPError(403, f"cross-origin write from {origin!r} refused (protection against cross-site "
                                    "request forgery); the server accepts writes from its own origin and from "
                                    "non-browser clients only.")
    elif origin == "null" and method not in SAFE_METHODS:
        raise HubHTTPError(403, "write from an opaque origin ('null') refused (cross-site request forgery protection).")


def check_write_body(method: str, headers: Mapping[str, str], *, has_body: bool) -> None:
    """A POST to a writing route must carry JSON / NDJSON (browsers send those cross-origin only
    after a CORS preflight, which this server never grants). Read-only POSTs (``paths-info``,
    sent as a form by huggingface_hub) are not checked.

    Raises:
        HubHTTPError: 415 naming the content type received.
    """
    if method == "POST" and has_body:
        ctype = headers.get("Content-Type") or ""
        if not JSON_TYPES.match(ctype):
            raise HubHTTPError(415, f"POST bodies must be JSON or NDJSON (Content-Type application/json or "
                                    f"application/x-ndjson), got {ctype or 'none'!r}.")
