"""The URL routes of the embedded Hub: which endpoint answers which method and path.

Routes match the *raw* (still percent-encoded) path, one URL segment per group, and each group
is decoded once afterwards; the decoded names are then validated (:mod:`.names`), so
``%2F`` in a revision (``refs%2Fpr%2F1``) or a tree path works while ``%2e%2e`` is refused
like ``..``. (A regex table rather than Starlette's router: Starlette decodes the path before
matching, which would lose that distinction.)
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import unquote

from . import api, files, git_http, lfs, listing, web
from .errors import HubHTTPError
from .messages import Request, Response
from .names import repo_type_from_plural, validate_repo_id

_T = r"(?P<type>models|datasets|spaces)"
_R = r"(?P<ns>[^/]+)/(?P<name>[^/]+)"
_REV = r"(?P<revision>[^/]+)"
_PREFIX = r"(?:(?P<prefix>datasets|spaces)/)?"
_LFS = rf"/{_PREFIX}(?P<ns>[^/]+)/(?P<name>[^/]+?)\.git/info/lfs/objects"


@dataclass(frozen=True)
class Route:
    """One endpoint: the methods it answers, its path pattern and who may call it."""

    methods: tuple[str, ...]
    pattern: re.Pattern
    endpoint: Callable[[Request], Response]
    read_only: bool = False  # allowed to anonymous readers when public_read is on
    no_auth: bool = False  # carries its own credential (signed URL) or touches no data
    page: bool = False  # a web page: the token may come as ?token= (then a cookie, see .web)


def _route(methods: str, pattern: str, endpoint, **kw) -> Route:
    return Route(tuple(methods.split("|")), re.compile(pattern), endpoint, **kw)


ROUTES = [
    _route("GET", r"/api/whoami-v2", api.whoami),
    _route("POST", r"/api/repos/create", api.create_repo),
    _route("DELETE", r"/api/repos/delete", api.delete_repo),
    _route("POST", r"/api/validate-yaml", api.validate_yaml, no_auth=True),
    _route("GET", rf"/api/{_T}", listing.list_repos, read_only=True),
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
    _route("GET", rf"/{_PREFIX}(?P<ns>[^/]+)/(?P<name>[^/]+?)(?:\.git)?/info/refs", git_http.info_refs, read_only=True),
    _route("POST", rf"/{_PREFIX}(?P<ns>[^/]+)/(?P<name>[^/]+?)(?:\.git)?/git-upload-pack", git_http.upload_pack,
           read_only=True),
    _route("POST", rf"{_LFS}/batch", lfs.batch, read_only=True),  # downloads need read access only
    _route("GET", rf"{_LFS}/(?P<oid>[0-9a-f]{{64}})", lfs.download, read_only=True),
    _route("POST", rf"{_LFS}/verify", lfs.verify),
    _route("PUT", rf"{_LFS}/(?P<oid>[^/]+)", lfs.upload, no_auth=True),
    _route("GET", r"/", web.index, read_only=True, page=True),
    _route("GET", rf"/{_PREFIX}{_R}/?", web.repo_page, read_only=True, page=True),
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
        elif "type" in params:  # listings: /api/models
            params["repo_type"] = repo_type_from_plural(params.pop("type"))
        return route, params
    if allowed:
        raise HubHTTPError(405, f"{method} is not allowed on {raw_path}; use {' or '.join(sorted(allowed))}.",
                           headers={"Allow": ", ".join(sorted(allowed))})
    raise HubHTTPError(404, f"No such endpoint: {method} {raw_path[:200]} (this embedded Hub implements the "
                            "repo, commit, LFS, tag, branch, refs, tree and download endpoints of huggingface_hub).")
