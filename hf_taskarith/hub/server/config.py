"""Configuration of the embedded Hub server."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path

from .names import _SEGMENT

MiB = 1024**2
GiB = 1024**3


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) only accepts connections from this machine."""
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass
class HubServerConfig:
    """Settings of :class:`~hf_taskarith.hub.server.HubServer`.

    Args:
        root: folder holding the repos, as real git repositories at
            ``root/<models|datasets|spaces>/<namespace>/<name>``; created if missing.
        host: address to bind. Loopback by default; any other address needs ``token``.
        port: TCP port; 0 picks a free one.
        token: every request must send ``Authorization: Bearer <token>`` (except the signed LFS
            upload URLs the server hands out, and the stateless ``validate-yaml``). When unset, the
            server generates one at start (see :class:`~.app.HubServer`), unless ``no_auth``.
        no_auth: trust every caller, with no token (loopback only; for tests). Explicit, because
            any web page the user opens can reach a loopback server.
        public_read: with a token, let requests *without* any token read public repos (GET/HEAD,
            tree, refs, commits, paths-info). Private repos stay invisible (404) to them, and a
            wrong token is always refused.
        user: the account name of the token holder: ``whoami``'s answer, the namespace of
            ``create_repo("name")`` without one, and the author of commits.
        max_request_bytes: largest JSON / NDJSON request body (commits carry regular files in it).
        max_upload_bytes: largest LFS object (one PUT).
        max_regular_file_bytes: largest file stored as a plain git blob; larger files must use LFS
            (``preupload`` tells the client so).
        read_timeout_s: a request body that sends nothing for this long is refused (408).
        min_body_rate: after ``read_timeout_s``, a body arriving slower than this many bytes/s on
            average is refused (408): trickling clients cannot hold a connection.
        request_deadline_s: the longest a request body may take in all.
        header_timeout_s: a connection whose next request line and headers are not complete
            this long after it opened (or after the previous response) is closed.
        keep_alive_s: idle time after a response before a keep-alive connection is closed.
        max_workers: threads handling requests at once (git and file work); more wait.
        max_connections: connections and requests at once; beyond it new requests get 503.
        backlog: the listen queue of the socket.
        upload_url_ttl_s: validity of the signed LFS upload URLs.
        allow_hosts: ``Host`` names served besides the loopback names and the bound address
            (DNS-rebinding protection, see :mod:`~hf_taskarith.hub.server.guard`); ``"*"`` serves any.
    """

    root: Path = field(metadata={"help": "folder holding the git repositories"})
    host: str = field(default="127.0.0.1", metadata={"help": "address to bind (loopback by default)"})
    port: int = field(default=0, metadata={"help": "TCP port (0: a free one)"})
    token: str | None = field(default=None, metadata={"help": "required bearer token; None: generate one"})
    no_auth: bool = field(default=False, metadata={"help": "trust every caller, no token (loopback only)"})
    public_read: bool = field(default=False, metadata={"help": "anonymous reads of public repos when a token is set"})
    user: str = field(default="local", metadata={"help": "account name of the token holder"})
    max_request_bytes: int = field(default=64 * MiB, metadata={"help": "largest JSON/NDJSON body"})
    max_upload_bytes: int = field(default=5 * GiB, metadata={"help": "largest LFS object"})
    max_regular_file_bytes: int = field(default=10 * MiB, metadata={"help": "largest non-LFS file"})
    read_timeout_s: float = field(default=60.0, metadata={"help": "idle time of a request body before 408"})
    min_body_rate: float = field(default=1024.0, metadata={"help": "slowest average body rate accepted (B/s)"})
    request_deadline_s: float = field(default=6 * 3600.0, metadata={"help": "longest time for one request body"})
    header_timeout_s: float = field(default=30.0, metadata={"help": "time to send a request's headers"})
    keep_alive_s: float = field(default=15.0, metadata={"help": "idle keep-alive time between requests"})
    max_workers: int = field(default=16, metadata={"help": "threads handling requests at once"})
    max_connections: int = field(default=1000, metadata={"help": "connections/requests at once (503 beyond)"})
    backlog: int = field(default=2048, metadata={"help": "listen queue length"})
    upload_url_ttl_s: int = field(default=3600, metadata={"help": "lifetime of signed LFS upload URLs"})
    allow_hosts: tuple[str, ...] = field(default=(), metadata={
        "help": "extra Host names served besides loopback names and the bound address ('*': any)"})

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ValueError(f"port must be an integer in [0, 65535], got {self.port!r}")
        if self.token is not None:
            if not isinstance(self.token, str) or len(self.token) < 8 or not re.fullmatch(r"[\x21-\x7e]+", self.token):
                raise ValueError("token must be at least 8 printable ASCII characters without spaces; "
                                 "generate one with `python -c 'import secrets; print(secrets.token_urlsafe())'`")
        if self.no_auth and self.token is not None:
            raise ValueError("give either a token or no_auth=True, not both")
        if not is_loopback(self.host) and self.no_auth:
            raise ValueError(f"refusing to serve on non-loopback address {self.host!r} with no_auth: anyone who "
                             "can reach it could write. Drop no_auth (a token is generated), or bind 127.0.0.1.")
        if self.public_read and self.no_auth:
            raise ValueError("public_read only makes sense with a token (without one every caller can read and write)")
        if not _SEGMENT.fullmatch(self.user) or ".." in self.user:
            raise ValueError(f"user must be a valid namespace ([A-Za-z0-9][\\w.-]{{0,95}}), got {self.user!r}")
        for name in ("max_request_bytes", "max_upload_bytes", "max_regular_file_bytes", "upload_url_ttl_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.max_regular_file_bytes > self.max_request_bytes:
            raise ValueError(f"max_regular_file_bytes ({self.max_regular_file_bytes}) must not exceed "
                             f"max_request_bytes ({self.max_request_bytes}): regular files travel in the commit body")
        if isinstance(self.allow_hosts, str) or not all(isinstance(h, str) and h for h in self.allow_hosts):
            raise ValueError(f"allow_hosts must be a list of host names, got {self.allow_hosts!r}")
        self.allow_hosts = tuple(self.allow_hosts)
        for name in ("read_timeout_s", "min_body_rate", "request_deadline_s", "header_timeout_s", "keep_alive_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a positive number of seconds (or bytes/s), got {value!r}")
        for name in ("max_workers", "max_connections", "backlog"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
