"""A small web page for people: the repos, their versions (tags, branches, pull requests,
commits), each repo's files with download links, and its card rendered.

``/`` lists the repos; ``/<ns>/<name>`` (``/datasets/<ns>/<name>`` ...) shows one, at
``?rev=`` (default ``main``). Pages are rendered on the server (Jinja templates, Markdown by
markdown-it with raw HTML off); they run no script.

In a browser, a token travels as Jupyter's does: open ``/?token=<token>`` once (the URL the server
prints at start); the page sets an ``HttpOnly``, ``SameSite=Strict`` cookie and redirects to ``/``.
The cookie is accepted for reads (GET/HEAD) only, so a web page cannot use it to write
(see :mod:`.dispatch`).
"""

from __future__ import annotations

from functools import lru_cache
from urllib.parse import quote

from .listing import visible_repos
from .messages import Request, Response, TextResponse
from .names import REPO_TYPES, URL_PREFIXES
from .storage import Repo, iso

#: the cookie that carries the token for a browser
TOKEN_COOKIE = "hf_taskarith_hub_token"
HISTORY_SHOWN = 20


@lru_cache(maxsize=1)
def _templates():
    import jinja2

    return jinja2.Environment(loader=jinja2.PackageLoader("hf_taskarith.hub.server", "templates"),
                              autoescape=True, undefined=jinja2.StrictUndefined)


def _page(template: str, **context) -> TextResponse:
    html = _templates().get_template(template).render(**context)
    return TextResponse(200, {"Cache-Control": "no-store", "X-Frame-Options": "DENY",
                              "Content-Security-Policy":
                                  "default-src 'none'; style-src 'unsafe-inline'; img-src 'self'"},
                        text=html, content_type="text/html; charset=utf-8")


def repo_url(repo: Repo) -> str:
    return f"/{URL_PREFIXES[repo.repo_type]}{quote(repo.repo_id)}"


def index(req: Request) -> Response:
    """``GET /``: every repo the caller may see, by type. With ``?token=``: set the cookie, redirect."""
    if req.query.get("token") and req.caller.authenticated:
        token = req.query["token"][-1]
        return Response(303, {"Location": "/", "Cache-Control": "no-store",
                              "Set-Cookie": f"{TOKEN_COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/"})
    groups = []
    for plural, repo_type in REPO_TYPES.items():
        repos = [{"id": repo.repo_id, "url": repo_url(repo), "private": repo.private, "changed": changed or ""}
                 for repo, _, changed in visible_repos(req, repo_type)]
        groups.append((plural, repos))
    return _page("index.html", title="Repositories", groups=groups)


def _card(repo: Repo, sha: str) -> tuple[str | None, str | None]:
    """The README's YAML metadata (text) and its Markdown body as HTML."""
    raw = repo.read_small_file(sha, "README.md")
    if raw is None:
        return None, None
    text = raw.decode(errors="replace")
    meta = None
    if text.startswith("---\n"):
        end = text.find("\n---", 4)
        if end != -1:
            meta, text = text[4:end], text[end + 4:].lstrip("-\n")
    from markdown_it import MarkdownIt

    return meta, MarkdownIt("commonmark", {"html": False}).enable("table").render(text)


def repo_page(req: Request) -> Response:
    """``GET /<ns>/<name>[?rev=...]``: versions, history, files and card of one repo."""
    repo = req.server.store.open_visible(req.params["repo_type"], req.params["repo_id"], req.caller)
    revision = (req.query.get("rev") or ["main"])[-1]
    sha = repo.resolve_or_404(revision)
    refs = repo.refs(include_prs=True)
    kinds = {"tags": "tag", "branches": "branch", "pullRequests": "pull request"}
    rows = [{"kind": kind, "name": r["ref"] if group == "pullRequests" else r["name"], "target": r["targetCommit"]}
            for group, kind in kinds.items() for r in refs.get(group, [])]
    commits = [{"sha": c.sha, "title": c.title, "author": c.author, "date": iso(c.timestamp)}
               for c in repo.commits(sha, limit=HISTORY_SHOWN)]
    base = f"/{URL_PREFIXES[repo.repo_type]}{quote(repo.repo_id)}/resolve/{quote(sha)}"
    files = [{"path": e.path, "size": e.size, "lfs": bool(e.lfs_oid), "url": f"{base}/{quote(e.path)}"}
             for e in repo.files(sha)]
    card_meta, card_html = _card(repo, sha)
    return _page("repo.html", title=repo.repo_id, repo_id=repo.repo_id, kind=repo.repo_type, private=repo.private,
                 revision=revision, sha=sha, refs=rows, commits=commits, files=files, card_meta=card_meta,
                 card_html=card_html)
