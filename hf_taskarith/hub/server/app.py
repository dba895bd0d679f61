"""The embedded Hub server: its state (repos, credentials, allowed hosts) and the uvicorn server
that runs its ASGI application (:mod:`.asgi`) on a socket bound at construction.

Needs the ``server`` extra: ``pip install "hf_taskarith[server]"`` (Starlette and uvicorn).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

from .auth import Authenticator
from .config import HubServerConfig
from .git import git_executable
from .guard import allowed_hosts
from .names import REPO_TYPES
from .routes import ROUTES, match_route
from .storage import RepoStore

logger = logging.getLogger(__name__)

#: where a generated token is written (mode 0600), inside the server's root folder
TOKEN_FILE = ".hub-token"


def _require_server_extra():
    try:
        import starlette  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise ImportError(f"the embedded Hub server needs Starlette and uvicorn ({e.name} is missing): "
                          'pip install "hf_taskarith[server]"') from None
    return uvicorn


def write_token_file(root: Path, token: str) -> Path:
    """Write ``token`` to ``root/.hub-token``, readable by the owner only (created 0600, never wider)."""
    path = root / TOKEN_FILE
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return path


class HubServer:
    """A Hub-compatible HTTP server storing repos as git repositories under ``config.root``.

    The socket is bound when the object is made (``url`` is known at once); :meth:`serve_forever`
    runs uvicorn on it until :meth:`shutdown` (or SIGINT/SIGTERM on the main thread).

    Args:
        config: see :class:`~.config.HubServerConfig`. Without ``token`` and without
            ``no_auth=True``, a random token is generated (``self.token``) and written to
            ``root/.hub-token`` (mode 0600), as Jupyter does.

    Example:
        >>> server = HubServer(HubServerConfig(root="/srv/hub", port=8090))  # doctest: +SKIP
        >>> print(server.url, server.token)  # doctest: +SKIP
        >>> server.serve_forever()  # doctest: +SKIP

    Note:
        One event loop serves all connections (idle ones cost no thread); requests run in at most
        ``max_workers`` threads, each running a few ``git`` subprocesses (~1-2 ms each); at most
        ``max_connections`` connections and requests at once (503 beyond). Fine for a team or a
        test suite. Xet storage, discussions and search are not implemented.
    """

    def __init__(self, config: HubServerConfig) -> None:
        uvicorn = _require_server_extra()
        git_executable()  # fail now, not at the first request
        self.config = config
        self.store = RepoStore(config.root, user=config.user)
        leftovers = self.store.clean_leftovers()  # before any request: nothing is in flight yet
        if leftovers:
            logger.info("removed %d leftovers of an earlier, interrupted run (spools, partial uploads)", len(leftovers))
        self.token = config.token
        self.token_file: Path | None = None
        if self.token is None and not config.no_auth:
            self.token = secrets.token_urlsafe(32)
            self.token_file = write_token_file(config.root, self.token)
        self.auth = Authenticator(self.token, public_read=config.public_read)
        self.allowed_hosts = allowed_hosts(config.host, config.allow_hosts)
        family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.socket.bind((config.host, config.port))
            self.socket.listen(config.backlog)
        except OSError:
            self.socket.close()
            raise
        self.server_address = self.socket.getsockname()
        from .asgi import HubASGIApp
        from .protocol import header_deadline_protocol

        self._uvicorn = uvicorn.Server(uvicorn.Config(
            HubASGIApp(self), http=header_deadline_protocol(config.header_timeout_s), lifespan="off",
            log_level="warning", access_log=False, server_header=False, limit_concurrency=config.max_connections,
            backlog=config.backlog, timeout_keep_alive=config.keep_alive_s, h11_max_incomplete_event_size=64 * 1024,
            timeout_graceful_shutdown=5))

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}" if ":" in str(host) else f"http://{host}:{port}"

    def base_url_for(self, host_header: str | None) -> str:
        """``http://<Host header>`` when it is a plain host[:port], else the bound address."""
        if host_header and re.fullmatch(r"[A-Za-z0-9.\-]+(:\d{1,5})?|\[[0-9A-Fa-f:.]+\](:\d{1,5})?", host_header):
            return f"http://{host_header}"
        return self.url

    @property
    def started(self) -> bool:
        return bool(self._uvicorn.started)

    def serve_forever(self) -> None:
        """Serve until :meth:`shutdown` (or, on the main thread, SIGINT/SIGTERM: uvicorn stops
        gracefully, then re-raises the signal to the previous handler)."""
        self._uvicorn.run(sockets=[self.socket])

    def shutdown(self) -> None:
        """Ask :meth:`serve_forever` to stop (from any thread); in-flight requests get 5 s to finish."""
        self._uvicorn.should_exit = True

    def server_close(self) -> None:
        self.socket.close()


@contextlib.contextmanager
def serve_in_thread(root: str | Path, token: str | None = None, host: str = "127.0.0.1", port: int = 0,
                    **options) -> Iterator[str]:
    """Run a :class:`HubServer` in a background thread; yields its base URL, stops it on exit.

    Args:
        root: folder for the repos (created if missing).
        token: required bearer token. ``None``: a random one is generated and written to
            ``root/.hub-token`` (read it with :func:`read_token`), unless ``no_auth=True`` is
            passed to trust every local caller (tests).
        host, port: where to listen (``port=0`` picks a free port).
        **options: other :class:`~.config.HubServerConfig` fields (``no_auth``, ``public_read``,
            ``user``, ``max_upload_bytes`` ...).

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
    thread = threading.Thread(target=server.serve_forever, name=f"hf-taskarith-hub:{server.server_address[1]}",
                              daemon=True)
    thread.start()
    while not server.started and thread.is_alive():
        thread.join(timeout=0.01)
    if not server.started:
        server.server_close()
        raise RuntimeError("the embedded Hub server did not start (see the log above)")
    try:
        yield server.url
    finally:
        server.shutdown()
        thread.join(timeout=10)
        server.server_close()


def read_token(root: str | Path) -> str:
    """The token a server generated for ``root`` (from ``root/.hub-token``).

    Raises:
        FileNotFoundError: no server generated one there (it was given a token, or ran with no_auth).
    """
    return (Path(root) / TOKEN_FILE).read_text().strip()


__all__ = ["HubServer", "ROUTES", "match_route", "serve_in_thread", "read_token", "REPO_TYPES"]
