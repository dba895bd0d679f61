"""Who may do what: the bearer token, and the signed URLs handed out for LFS uploads.

Rules (see :class:`~.config.HubServerConfig`):

- no token configured: every caller is trusted (loopback use);
- a token configured: a request with the right ``Authorization: Bearer <token>`` may do anything;
  a request with any other token is refused (401 ``Invalid credentials in Authorization header``,
  which ``huggingface_hub`` reports as is); a request without a token is refused too, unless
  ``public_read`` is set and it only reads a public repo;
- private repos answer 404 (not 401/403) to callers who may not see them, like the Hub, so
  their names do not leak.

LFS uploads follow the Hub's protocol: the batch endpoint (authenticated) hands out a PUT URL
that carries its own HMAC signature over (repo, oid, size, expiry) with a key drawn at start-up,
because ``huggingface_hub`` sends no ``Authorization`` header on that PUT.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

from .errors import HubHTTPError

INVALID_CREDENTIALS = "Invalid credentials in Authorization header"
#: asks git (and browsers) for Basic credentials; huggingface_hub ignores it
CHALLENGE = {"WWW-Authenticate": 'Basic realm="hf-taskarith hub", charset="UTF-8"'}


def _credential(authorization: str) -> str:
    """The token in ``Bearer <token>``, or the password in ``Basic base64(user:password)`` (git
    sends the token that way); ``""`` for anything else."""
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() == "bearer":
        return value.strip()
    if scheme.lower() == "basic":
        try:
            return base64.b64decode(value.strip(), validate=True).decode().partition(":")[2]
        except (binascii.Error, UnicodeDecodeError):
            return ""
    return ""


@dataclass(frozen=True)
class Caller:
    """The result of checking a request's credentials."""

    authenticated: bool  # may write, and may see private repos
    anonymous_reader: bool  # no token sent, but public reads are allowed


class Authenticator:
    def __init__(self, token: str | None, *, public_read: bool = False) -> None:
        self._token = token
        self._public_read = public_read
        self._key = secrets.token_bytes(32)

    @property
    def open(self) -> bool:
        """No token configured: everyone is trusted."""
        return self._token is None

    def check(self, authorization: str | None) -> Caller:
        """Check an ``Authorization`` header value.

        Raises:
            HubHTTPError: 401 for a wrong token, or a missing one when reads need a token too.
        """
        if self._token is None:
            return Caller(authenticated=True, anonymous_reader=False)
        if authorization:
            if hmac.compare_digest(_credential(authorization).encode(), self._token.encode()):
                return Caller(authenticated=True, anonymous_reader=False)
            raise HubHTTPError(401, INVALID_CREDENTIALS, headers=CHALLENGE)
        if self._public_read:
            return Caller(authenticated=False, anonymous_reader=True)
        raise HubHTTPError(401, "This Hub requires a token: send 'Authorization: Bearer <token>' "
                                "(set HF_TOKEN, or pass token= to HfApi / hf_hub_download; git: "
                                "http://user:<token>@host/...).", headers=CHALLENGE)

    @staticmethod
    def require_write(caller: Caller) -> None:
        if not caller.authenticated:
            raise HubHTTPError(401, "Writing to this Hub requires a token: send 'Authorization: Bearer <token>' "
                                    "(set HF_TOKEN, or pass token= to HfApi).")

    # -- signed LFS upload URLs -------------------------------------------------------------

    def _signature(self, repo_key: str, oid: str, size: int, expires: int) -> str:
        msg = f"{repo_key}\n{oid}\n{size}\n{expires}".encode()
        return hmac.new(self._key, msg, hashlib.sha256).hexdigest()

    def sign_upload(self, repo_key: str, oid: str, size: int, ttl_s: int) -> dict[str, str]:
        """Query parameters that authorize one PUT of ``oid`` (``size`` bytes) into ``repo_key``."""
        expires = int(time.time()) + ttl_s
        return {"size": str(size), "expires": str(expires), "sig": self._signature(repo_key, oid, size, expires)}

    def verify_upload(self, repo_key: str, oid: str, query: dict[str, list[str]]) -> int:
        """Check a signed PUT URL's query; returns the announced size.

        Raises:
            HubHTTPError: 403 when the signature is missing, wrong or expired.
        """
        try:
            size = int(query["size"][0])
            expires = int(query["expires"][0])
            sig = query["sig"][0]
        except (KeyError, IndexError, ValueError):
            raise HubHTTPError(403, "LFS upload URL is not signed: ask the batch endpoint "
                                    "(POST <repo>.git/info/lfs/objects/batch) for an upload URL.") from None
        if not hmac.compare_digest(sig, self._signature(repo_key, oid, size, expires)):
            raise HubHTTPError(403, "LFS upload URL signature is invalid (was it issued by another server run?).")
        if expires < time.time():
            raise HubHTTPError(403, "LFS upload URL has expired: request a new one from the batch endpoint.")
        return size
