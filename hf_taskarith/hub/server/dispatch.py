"""Answering one request: browser protections, credentials, routing, and errors as Hub errors.

:func:`handle` is synchronous (the endpoints run ``git`` subprocesses and file I/O); the ASGI
layer (:mod:`.asgi`) runs it in a bounded pool of worker threads.
"""

from __future__ import annotations

import logging
import re
from http.cookies import CookieError, SimpleCookie
from typing import TYPE_CHECKING

from .auth import Caller
from .errors import HubHTTPError, repo_not_found
from .git import GitError
from .guard import check_request, check_write_body
from .limits import TruncatedBody
from .messages import JSONResponse, Request, Response
from .routes import match_route
from .web import TOKEN_COOKIE

if TYPE_CHECKING:
    from .app import HubServer

logger = logging.getLogger(__name__)

INTERNAL_ERROR = "Internal server error (see the server log)."


class ClientGone(Exception):
    """The client disconnected (or stalled past a deadline) mid-request: there is no one to answer."""


def _header_safe(text: str, limit: int = 1000) -> str:
    return re.sub(r"[\r\n\t]+", " ", text).encode("latin-1", errors="replace").decode("latin-1")[:limit]


def error_response(e: HubHTTPError) -> JSONResponse:
    """The JSON answer to a refused request, with the headers huggingface_hub reads."""
    return JSONResponse(e.status, {**e.headers, "X-Error-Message": _header_safe(e.message),
                                   **({"X-Error-Code": e.code} if e.code else {})},
                        body={**e.body, "error": e.message})


def internal_error() -> JSONResponse:
    return JSONResponse(500, {"X-Error-Message": INTERNAL_ERROR}, body={"error": INTERNAL_ERROR})


def has_body(headers) -> bool:
    return bool(headers.get("Transfer-Encoding")) or (headers.get("Content-Length") or "0") != "0"


def handle(server: HubServer, req: Request) -> Response:
    """The response to ``req`` (routed here; ``req.params`` and ``req.caller`` are filled in).

    Raises:
        ClientGone: the body stopped arriving (disconnect, or a read deadline passed).
    """
    try:
        check_request(req.method, req.headers, server.allowed_hosts)
        authorization = req.headers.get("Authorization") or _browser_credential(req)
        try:
            route, params = match_route(req.method, req.path)
        except HubHTTPError:
            server.auth.check(authorization)  # unknown routes: credentials first
            raise
        if route.page and not authorization and req.query.get("token"):
            authorization = f"Bearer {req.query['token'][-1]}"
        if not route.no_auth:
            req.caller = server.auth.check(authorization)
            if not req.caller.authenticated and not route.read_only:
                server.auth.require_write(req.caller)
        if not route.read_only:
            check_write_body(req.method, req.headers, has_body=has_body(req.headers))
        req.params = params
        return route.endpoint(req)
    except HubHTTPError as e:
        return error_response(e)
    except TruncatedBody as e:
        logger.info("%s: client went away mid-request (%s)", req.path, e)
        raise ClientGone(str(e)) from None
    except (FileNotFoundError, NotADirectoryError, GitError) as e:
        return _vanished_repo(server, req, e)
    except Exception:
        logger.exception("internal error while serving %s %s", req.method, req.path)
        return internal_error()


def _browser_credential(req: Request) -> str | None:
    """The token cookie that :mod:`.web` sets, as a bearer credential -- for reads only (GET/HEAD):
    a cookie rides along on requests a web page makes, so it must never authorize a write."""
    if req.method not in ("GET", "HEAD"):
        return None
    cookies = SimpleCookie()
    try:
        cookies.load(req.headers.get("Cookie") or "")
    except CookieError:
        return None
    morsel = cookies.get(TOKEN_COOKIE)
    return f"Bearer {morsel.value}" if morsel is not None and morsel.value else None


def _vanished_repo(server: HubServer, req: Request, error: Exception) -> Response:
    """A repo deleted while a request on it ran: 404 ``RepoNotFound`` (the answer the request gets
    a moment later), not a server error. Any other such failure is one, and is logged."""
    repo_type, repo_id = req.params.get("repo_type"), req.params.get("repo_id")
    if repo_type and repo_id and not (server.store.path_for(repo_type, repo_id) / ".git" / "HEAD").is_file():
        return error_response(repo_not_found(repo_id))
    logger.error("internal error while serving %s: %s", req.path, error, exc_info=error)
    return internal_error()


def new_request(server: HubServer, method: str, path: str, query: dict[str, list[str]], headers,
                chunks) -> Request:
    """A request not yet routed, with no credentials checked."""
    return Request(method, path, query, headers, chunks, server, Caller(authenticated=False, anonymous_reader=False))
