"""The HTTP server: routing, credentials, limits, and writing responses (standard library only).

Routes match the *raw* (still percent-encoded) path, one URL segment per group, and each group
is decoded once afterwards; the decoded names are then validated (:mod:`.names`), so
``%2F`` in a revision (``refs%2Fpr%2F1``) or a tree path works while ``%2e%2e`` is refused
like ``..``.
"""

from __future__ import annotations

import contextlib
import logging
import re
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from . import api, files, lfs
from .auth import Authenticator, Caller
from .config import HubServerConfig
from .errors import HubHTTPError, repo_not_found
from .git import GitError, git_executable
from .guard import allowed_hosts, check_request, check_write_body
from .limits import TruncatedBody
from .messages import FileResponse, JSONResponse, Request, Response, StreamResponse
from .names import REPO_TYPES, repo_type_from_plural, validate_repo_id
from .storage import RepoStore

logger = logging.getLogger(__name__)

_T = r"(?P<type>models|datasets|spaces)"
_R = r"(?P<ns>[^/]+)/(?P<name>[^/]+)"
_REV = r"(?P<revision>[^/]+)"
_PREFIX = r"(?:(?P<prefix>datasets|spaces)/)?"
_LFS = rf"/{_PREFIX}(?P<ns>[^/]+)/(?P<name>[^/]+?)\.git/info/lfs/objects"


@dataclass(frozen=True)
class Route:
    methods: tuple[str, ...]
    pattern: re.Pattern
    endpoint: Callable[[Request], Response]
    read_only: bool = False  # allowed to anonymous readers when public_read is on
    no_auth: bool = False  # carries its own credential (signed URL) or touches no data


def _route(methods: str, pattern: str, endpoint, **kw) -> Route:
    return Route(tuple(methods.split("|")), re.compile(pattern), endpoint, **kw)


ROUTES = [
    _route("GET", r"/api/whoami-v2", api.whoami),
    _route("POST", r"/api/repos/create", api.create_repo),
    _route("DELETE", r"/api/repos/delete", api.delete_repo),
    _route("POST", r"/api/validate-yaml", api.validate_yaml, no_auth=True),
    _route("GET", rf"/api/{_T}/{_R}", api.repo_info, read_only=True),
    _route("GET", rf"/api/{_T}/{_R}/revision/{_REV}", api.repo_info, read_only=True),
    _route("GET", rf"/api/{_T}/{_R}/refs", api.list_refs, read_only=True),
    _route("GET", rf"/api/{_T}/{_R}/commits/{_REV}", api.list_commits, read_only=True),
    _route("GET", rf"/api/{_T}/{_R}/tree/{_REV}(?:/(?P<path>.+))?", api.list_tree, read_only=True),
    _route("POST", rf"/api/{_T}/{_R}/paths-info/{_REV}", api.paths_info, read_only=True),
    _route("POST", rf"/api/{_T}/{_R}/preupload/{_REV}", api.preupload),
    _route("POST", rf"/api/{_T}/{_R}/commit/{_REV}", api.commit),
    _route("POST", rf"/api/{_T}/{_R}/tag/{_REV}", api.create_tag),
    _route("DELETE", rf"/api/{_T}/{_R}/tag/{_REV}", api.delete_tag),
    _route("POST", rf"/api/{_T}/{_R}/branch/(?P<branch>[^/]+)", api.create_branch),
    _route("DELETE", rf"/api/{_T}/{_R}/branch/(?P<branch>[^/]+)", api.delete_branch),
    _route("PUT", rf"/api/{_T}/{_R}/settings", api.update_settings),
    _route("GET|POST", rf"/api/{_T}/{_R}/xet-(?:read|write)-token(?:/.*)?", api.xet_not_supported),
    _route("GET|HEAD", rf"/{_PREFIX}{_R}/resolve/{_REV}/(?P<path>.+)", files.resolve, read_only=True),
    _route("POST", rf"{_LFS}/batch", lfs.batch),
    _route("POST", rf"{_LFS}/verify", lfs.verify),
    _route("PUT", rf"{_LFS}/(?P<oid>[^/]+)", lfs.upload, no_auth=True),
]
_PATH_PARAMS = ("path",)  # may span several segments: decoded segment by segment


def _decode(value: str, *, multi_segment: bool) -> str:
    try:
        if multi_segment:
            return "/".join(unquote(part, errors="strict") for part in value.split("/"))
        return unquote(value, errors="strict")
    except UnicodeDecodeError:
        raise HubHTTPError(400, f"URL part {value[:80]!r} is not valid percent-encoded UTF-8.") from None


def match_route(method: str, raw_path: str) -> tuple[Route, dict[str, str]]:
    """The route and its decoded parameters (repo type and id normalized and validated).

    Raises:
        HubHTTPError: 404 no such endpoint, 405 wrong method, 400 invalid repo id.
    """
    allowed: set[str] = set()
    for route in ROUTES:
        m = route.pattern.fullmatch(raw_path)
        if not m:
            continue
        if method not in route.methods:
            allowed.update(route.methods)
            continue
        raw = {k: v for k, v in m.groupdict().items() if v is not None}
        params = {k: _decode(v, multi_segment=k in _PATH_PARAMS) for k, v in raw.items()}
        if "ns" in params:
            params["repo_id"] = validate_repo_id(params.pop("ns"), params.pop("name"))
            plural = params.pop("type", None) or params.pop("prefix", None) or "models"
            params["repo_type"] = repo_type_from_plural(plural)
        return route, params
    if allowed:
        raise HubHTTPError(405, f"{method} is not allowed on {raw_path}; use {' or '.join(sorted(allowed))}.",
                           headers={"Allow": ", ".join(sorted(allowed))})
    raise HubHTTPError(404, f"No such endpoint: {method} {raw_path[:200]} (this embedded Hub implements the "
                            "repo, commit, LFS, tag, branch, refs, tree and download endpoints of huggingface_hub).")


def _header_safe(text: str, limit: int = 1000) -> str:
    return re.sub(r"[\r\n\t]+", " ", text).encode("latin-1", errors="replace").decode("latin-1")[:limit]


def _error_response(e: HubHTTPError) -> JSONResponse:
    """The JSON answer to a refused request, with the headers huggingface_hub reads."""
    return JSONResponse(e.status, {**e.headers, "X-Error-Message": _header_safe(e.message),
                                   **({"X-Error-Code": e.code} if e.code else {})},
                        body={**e.body, "error": e.message})


class HubRequestHandler(BaseHTTPRequestHandler):
    server: "HubServer"
    protocol_version = "HTTP/1.1"
    server_version = "hf-taskarith-hub/1"

    def setup(self) -> None:
        self.timeout = self.server.config.read_timeout_s
        super().setup()
        with contextlib.suppress(OSError):  # headers and body are separate writes: no Nagle delay between them
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (signature of the base class)
        logger.debug("%s %s", self.address_string(), format % args)

    def log_error(self, format: str, *args) -> None:  # noqa: A002
        logger.warning("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        self._handle("GET")

    def do_HEAD(self) -> None:
        self._handle("HEAD")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    # -- dispatch -------------------------------------------------------------------------------

    def _handle(self, method: str) -> None:
        req: Request | None = None
        try:
            url = urlsplit(self.path)
            query = parse_qs(url.query, keep_blank_values=True)
            req = Request(method, url.path, query, self.headers, self.rfile, self.server,
                          Caller(authenticated=False, anonymous_reader=False))
            check_request(method, self.headers, self.server.allowed_hosts)
            try:
                route, params = match_route(method, url.path)
            except HubHTTPError:
                self.server.auth.check(self.headers.get("Authorization"))  # unknown routes: credentials first
                raise
            if not route.no_auth:
                req.caller = self.server.auth.check(self.headers.get("Authorization"))
                if not req.caller.authenticated and not route.read_only:
                    self.server.auth.require_write(req.caller)
            if not route.read_only:
                check_write_body(method, self.headers, has_body=self._has_body())
            req.params = params
            response = route.endpoint(req)
        except HubHTTPError as e:
            response = _error_response(e)
        except TruncatedBody as e:
            logger.info("%s: client went away mid-request (%s)", self.path.split("?")[0], e)
            self.close_connection = True
            return
        except (ConnectionError, TimeoutError, socket.timeout):
            self.close_connection = True
            return
        except (FileNotFoundError, NotADirectoryError, GitError) as e:
            response = self._vanished_repo(req, e)
        except Exception:
            logger.exception("internal error while serving %s %s", method, self.path.split("?")[0])
            response = JSONResponse(500, {"X-Error-Message": "Internal server error (see the server log)."},
                                    body={"error": "Internal server error (see the server log)."})
        if req is None or (not req.body_consumed and self._has_body()):
            self._drain_or_close()  # an unread body would be parsed as the next request
        try:
            self._send(method, response)
        except (ConnectionError, TimeoutError, socket.timeout):
            self.close_connection = True

    def _vanished_repo(self, req: Request | None, error: Exception) -> Response:
        """A repo deleted while a request on it ran: 404 ``RepoNotFound`` (the answer the request gets
        a moment later), not a server error. Any other such failure is one, and is logged."""
        params = req.params if req is not None else {}
        repo_type, repo_id = params.get("repo_type"), params.get("repo_id")
        if repo_type and repo_id and not (self.server.store.path_for(repo_type, repo_id) / ".git" / "HEAD").is_file():
            return _error_response(repo_not_found(repo_id))
        logger.error("internal error while serving %s: %s", self.path.split("?")[0], error, exc_info=error)
        return JSONResponse(500, {"X-Error-Message": "Internal server error (see the server log)."},
                            body={"error": "Internal server error (see the server log)."})

    def _drain_or_close(self, limit: int = 4 * 1024 * 1024) -> None:
        """Read and drop a small unread body (so the client sees our answer); close on a large one."""
        length = self.headers.get("Content-Length") or ""
        if not self.headers.get("Transfer-Encoding") and length.isdigit() and int(length) <= limit:
            try:
                self.rfile.read(int(length))
                return
            except (ConnectionError, TimeoutError, socket.timeout):
                pass
        self.close_connection = True

    def _has_body(self) -> bool:
        return bool(self.headers.get("Transfer-Encoding")) or (self.headers.get("Content-Length") or "0") != "0"

    def _send(self, method: str, response: Response) -> None:
        if isinstance(response, JSONResponse):
            data = response.encode()
            length, content_type = len(data), response.content_type
        elif isinstance(response, (StreamResponse, FileResponse)):
            data, length, content_type = None, response.length, None
        else:
            data, length, content_type = b"", 0, None
        self.send_response(response.status)
        if content_type:
            self.send_header("Content-Type", content_type)
        for key, value in response.headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(length))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if method == "HEAD":
            return
        if data:
            self.wfile.write(data)
        elif isinstance(response, StreamResponse):
            sent = 0
            for chunk in response.chunks:
                self.wfile.write(chunk)
                sent += len(chunk)
            if sent != length:
                logger.error("%s: sent %d of %d bytes", self.path, sent, length)
                self.close_connection = True
        elif isinstance(response, FileResponse) and length:
            with open(response.file, "rb") as f:
                self.wfile.flush()
                self.connection.sendfile(f, offset=response.offset, count=length)


class HubServer(ThreadingHTTPServer):
    """A Hub-compatible HTTP server storing repos as git repositories under ``config.root``.

    Args:
        config: see :class:`~.config.HubServerConfig`.

    Example:
        >>> server = HubServer(HubServerConfig(root="/srv/hub", token="s3cret-token", port=8090))
        >>> server.serve_forever()  # doctest: +SKIP

    Note:
        One thread per connection (``ThreadingHTTPServer``); each request runs a few ``git``
        subprocesses (~1-2 ms each). Fine for a team or a test suite, not for thousands of
        clients. Pull requests, Xet storage, discussions and search are not implemented.
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, config: HubServerConfig) -> None:
        git_executable()  # fail now, not at the first request
        self.config = config
        self.store = RepoStore(config.root, user=config.user)
        leftovers = self.store.clean_leftovers()  # before any request: nothing is in flight yet
        if leftovers:
            logger.info("removed %d leftovers of an earlier, interrupted run (spools, partial uploads)", len(leftovers))
        self.auth = Authenticator(config.token, public_read=config.public_read)
        self.allowed_hosts = allowed_hosts(config.host, config.allow_hosts)
        if ":" in config.host:
            self.address_family = socket.AF_INET6
        super().__init__((config.host, config.port), HubRequestHandler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}" if ":" in str(host) else f"http://{host}:{port}"

    def base_url_for(self, host_header: str | None) -> str:
        """``http://<Host header>`` when it is a plain host[:port], else the bound address."""
        if host_header and re.fullmatch(r"[A-Za-z0-9.\-]+(:\d{1,5})?|\[[0-9A-Fa-f:.]+\](:\d{1,5})?", host_header):
            return f"http://{host_header}"
        return self.url


@contextlib.contextmanager
def serve_in_thread(root: str | Path, token: str | None = None, host: str = "127.0.0.1", port: int = 0,
                    **options) -> Iterator[str]:
    """Run a :class:`HubServer` in a background thread; yields its base URL, stops it on exit.

    Args:
        root: folder for the repos (created if missing).
        token: required bearer token (``None``: trust every caller; loopback only).
        host, port: where to listen (``port=0`` picks a free port).
        **options: other :class:`~.config.HubServerConfig` fields (``public_read``, ``user``,
            ``max_upload_bytes`` ...).

    Example:
        >>> from huggingface_hub import HfApi
        >>> with serve_in_thread("/tmp/hub", token="secret-token") as url:  # doctest: +SKIP
        ...     HfApi(endpoint=url, token="secret-token").create_repo("team/tv")

    Note:
        Clients that have ``hf_xet`` installed must run with ``HF_HUB_DISABLE_XET=1`` to upload
        LFS files (read at import of ``huggingface_hub``; in-process, also set
        ``huggingface_hub.constants.HF_HUB_DISABLE_XET = True``).
    """
    server = HubServer(HubServerConfig(root=Path(root), token=token, host=host, port=port, **options))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                              name=f"hf-taskarith-hub:{server.server_address[1]}", daemon=True)
    thread.start()
    try:
        yield server.url
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


__all__ = ["HubServer", "HubRequestHandler", "ROUTES", "match_route", "serve_in_thread", "REPO_TYPES"]
