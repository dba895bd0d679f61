"""The one error type of the embedded Hub: an HTTP status with a message the client shows.

``huggingface_hub`` builds its exceptions from the status code, the ``X-Error-Code`` header
(``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound`` select ``RepositoryNotFoundError``,
``RevisionNotFoundError`` and ``RemoteEntryNotFoundError``) and the ``X-Error-Message`` header
or the ``{"error": ...}`` body, which it appends to its own message. Every refusal of this
server is a :class:`HubHTTPError`, so each one reaches the user with its reason and its fix.
"""

from __future__ import annotations

from typing import Literal

ErrorCode = Literal["RepoNotFound", "RevisionNotFound", "EntryNotFound"]


class HubHTTPError(Exception):
    """A request the server refuses.

    Args:
        status: HTTP status code (4xx for the caller's mistakes; 5xx only for server faults,
            since the client retries those).
        message: what was received, what was expected, how to fix it.
        code: optional ``X-Error-Code`` (see the module docstring).
        headers: extra response headers (e.g. ``X-Repo-Commit`` on a missing file).
        body: extra fields of the JSON body (``create_repo(exist_ok=True)`` reads ``url`` from a 409).
    """

    def __init__(self, status: int, message: str, *, code: ErrorCode | None = None,
                 headers: dict[str, str] | None = None, body: dict | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = dict(headers or {})
        self.body = dict(body or {})


def repo_not_found(repo: str) -> HubHTTPError:
    return HubHTTPError(404, f"Repository {repo!r} not found (or private and the token is missing).",
                        code="RepoNotFound")


def revision_not_found(repo: str, revision: str) -> HubHTTPError:
    return HubHTTPError(404, f"Revision {revision!r} not found in {repo!r}: it is not a branch, a tag or a "
                             "commit sha of this repo (list them with HfApi.list_repo_refs).",
                        code="RevisionNotFound")


def entry_not_found(repo: str, revision: str, path: str, commit: str) -> HubHTTPError:
    return HubHTTPError(404, f"File {path!r} not found in {repo!r} at revision {revision!r} (commit {commit}).",
                        code="EntryNotFound", headers={"X-Repo-Commit": commit})
