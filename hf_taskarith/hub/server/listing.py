"""``GET /api/models`` (and ``datasets``, ``spaces``): the repos a caller may see, as
``HfApi.list_models(author=..., search=..., limit=...)`` reads them."""

from __future__ import annotations

from collections.abc import Iterator

from .errors import HubHTTPError
from .messages import JSONResponse, Request
from .names import RepoType
from .storage import Repo, iso

#: the most repos one answer lists when the client gives no ``limit``
MAX_LISTED = 10_000


def _last(req: Request, name: str) -> str | None:
    values = req.query.get(name)
    return values[-1] if values else None


def visible_repos(req: Request, repo_type: RepoType) -> Iterator[tuple[Repo, str | None, str | None]]:
    """``(repo, main's head, its commit time)`` for each repo of a type the caller may see
    (private repos only for authenticated callers); shared by the API listing and the web page."""
    for repo in req.server.store.list(repo_type):
        if repo.private and not req.caller.authenticated:
            continue
        head = repo.branch_head("main")
        yield repo, head, iso(repo.commit_time(head)) if head else None


def list_repos(req: Request) -> JSONResponse:
    """Repos of one type, filtered by ``author`` (namespace, any case) and ``search`` (substring of
    the id, any case), newest change first; private repos only for authenticated callers."""
    author, search = _last(req, "author"), _last(req, "search")
    limit_text = _last(req, "limit")
    try:
        limit = int(limit_text) if limit_text else MAX_LISTED
    except ValueError:
        raise HubHTTPError(400, f"Query parameter limit must be an integer, got {limit_text!r}.") from None
    if limit < 0:
        raise HubHTTPError(400, f"Query parameter limit must be >= 0, got {limit}.")
    items = []
    for repo, head, changed in visible_repos(req, req.params["repo_type"]):
        namespace = repo.repo_id.split("/")[0]
        if author and namespace.lower() != author.lower():
            continue
        if search and search.lower() not in repo.repo_id.lower():
            continue
        items.append({"_id": repo.key, "id": repo.repo_id, "author": namespace, "private": repo.private,
                      "sha": head, "lastModified": changed, "createdAt": repo.meta.get("createdAt"),
                      "downloads": 0, "likes": 0, "tags": [], "gated": False, "disabled": False})
    items.sort(key=lambda item: item["lastModified"] or "", reverse=True)
    return JSONResponse(body=items[:limit])
