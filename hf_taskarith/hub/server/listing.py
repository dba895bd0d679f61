"""``GET /api/models`` (and ``datasets``, ``spaces``): the repos a caller may see, as
``HfApi.list_models(author=..., search=..., limit=...)`` reads them."""

from __future__ import annotations

from .errors import HubHTTPError
from .messages import JSONResponse, Request
from .storage import iso

#: the most repos one answer lists when the client gives no ``limit``
MAX_LISTED = 10_000


def _last(req: Request, name: str) -> str | None:
    values = req.query.get(name)
    return values[-1] if values else None


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
    for repo in req.server.store.list(req.params["repo_type"]):
        namespace = repo.repo_id.split("/")[0]
        if repo.private and not req.caller.authenticated:
            continue
        if author and namespace.lower() != author.lower():
            continue
        if search and search.lower() not in repo.repo_id.lower():
            continue
        head = repo.branch_head("main")
        items.append({"_id": repo.key, "id": repo.repo_id, "author": namespace, "private": repo.private,
                      "sha": head, "lastModified": iso(repo.commit_time(head)) if head else None,
                      "createdAt": repo.meta.get("createdAt"), "downloads": 0, "likes": 0, "tags": [],
                      "gated": False, "disabled": False})
    items.sort(key=lambda item: item["lastModified"] or "", reverse=True)
    return JSONResponse(body=items[:limit])
