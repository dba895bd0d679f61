"""The ``/api/...`` endpoints: repos, revisions, trees, commits, tags and branches.

Each function takes a routed :class:`~.messages.Request` and returns a response; the request
and response shapes are those ``huggingface_hub`` (2.x) sends and parses.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import quote, urlencode

from .commits import Operation, create_commit, new_spool
from .errors import HubHTTPError
from .messages import JSONResponse, Request, field_of
from .names import (
    URL_PREFIXES,
    repo_type_from_name,
    validate_new_ref_name,
    validate_oid,
    validate_path,
    validate_ref_name,
    validate_repo_id,
    validate_size,
)
from .storage import Repo, iso
from .upload_mode import choose_upload_mode

COMMITS_PAGE = 100
MAX_PATHS_INFO = 1000
MAX_PREUPLOAD_FILES = 1000
VALIDATE_YAML_MAX_BYTES = 1024 * 1024


def _repo(req: Request, *, write: bool = False) -> Repo:
    repo = req.server.store.open_visible(req.params["repo_type"], req.params["repo_id"], req.caller)
    if write:
        req.server.auth.require_write(req.caller)
    return repo


def _branch_of(repo: Repo, revision: str) -> str:
    """The branch a write targets (``refs/heads/x`` accepted, and ``refs/pr/N``, an open pull
    request); tags and shas are refused."""
    validate_ref_name(revision)
    branch = revision[len("refs/heads/"):] if revision.startswith("refs/heads/") else revision
    if repo.branch_head(branch) is None:
        if repo.resolve(revision) is not None:
            raise HubHTTPError(400, f"Revision {revision!r} of {repo.repo_id} is not a branch: commits go to a "
                                    "branch (tags and commit shas are read-only).")
        raise HubHTTPError(404, f"Branch {revision!r} does not exist in {repo.repo_id}: create it first "
                                "(HfApi.create_branch).", code="RevisionNotFound")
    return branch


# -- account and repos ----------------------------------------------------------------------

def whoami(req: Request) -> JSONResponse:
    if not req.caller.authenticated:
        raise HubHTTPError(401, "whoami needs a token: send 'Authorization: Bearer <token>'.")
    user = req.server.config.user
    return JSONResponse(body={"type": "user", "id": user, "name": user, "fullname": user, "email": None,
                              "emailVerified": False, "isPro": False, "canPay": False, "orgs": [],
                              "auth": {"type": "access_token",
                                       "accessToken": {"displayName": "hf-taskarith hub", "role": "write"}}})


def create_repo(req: Request) -> JSONResponse:
    req.server.auth.require_write(req.caller)
    data = req.form_or_json()
    repo_type = repo_type_from_name(field_of(data, "type", str))
    namespace = field_of(data, "organization", str) or req.server.config.user
    repo_id = validate_repo_id(namespace, field_of(data, "name", str, ""))
    visibility = field_of(data, "visibility", str)
    private = visibility == "private" if visibility is not None else field_of(data, "private", bool, False)
    if visibility not in (None, "public", "private"):
        raise HubHTTPError(400, f"Unsupported visibility {visibility!r}: expected 'public' or 'private'.")
    url = f"{req.base_url()}/{URL_PREFIXES[repo_type]}{repo_id}"
    try:
        req.server.store.create(repo_type, repo_id, private=private)
    except HubHTTPError as e:
        if e.status == 409:  # the client reads "url" from this answer when exist_ok=True (the existing
            existing = req.server.store.path_for(repo_type, repo_id)  # repo's name, in its own case)
            e.body["url"] = f"{req.base_url()}/{URL_PREFIXES[repo_type]}{existing.parent.name}/{existing.name}"
        raise
    return JSONResponse(body={"url": url, "name": repo_id, "id": repo_id})


def delete_repo(req: Request) -> JSONResponse:
    req.server.auth.require_write(req.caller)
    data = req.form_or_json()
    repo_type = repo_type_from_name(field_of(data, "type", str))
    repo_id = validate_repo_id(field_of(data, "organization", str) or req.server.config.user,
                               field_of(data, "name", str, ""))
    req.server.store.delete(repo_type, repo_id)
    return JSONResponse(body={})


def update_settings(req: Request) -> JSONResponse:
    repo = _repo(req, write=True)
    data = req.form_or_json()
    unknown = sorted(set(data) - {"private", "visibility"})
    if unknown:
        raise HubHTTPError(400, f"Unsupported repo settings {unknown}: this Hub only stores visibility "
                                "('private' or 'visibility').")
    if "visibility" in data:
        if data["visibility"] not in ("public", "private"):
            raise HubHTTPError(400, f"Unsupported visibility {data['visibility']!r}: expected 'public' or 'private'.")
        repo.write_meta(private=data["visibility"] == "private")
    elif "private" in data:
        repo.write_meta(private=field_of(data, "private", bool, False))
    return JSONResponse(body={"private": repo.private})


def validate_yaml(req: Request) -> JSONResponse:
    """Checks that a README's front matter is a YAML mapping (the Hub also checks its schema).

    Note:
        Needs no token (``ModelCard.validate`` sends none) and touches no repo; its body is
        capped at 1 MiB.
    """
    data = req.form_or_json(limit=VALIDATE_YAML_MAX_BYTES)
    content = data.get("content") or ""
    if isinstance(content, list):
        content = content[0] if content else ""
    m = re.match(r"\A\s*---\s*\n(.*?)\n---\s*(\n|\Z)", str(content), flags=re.S)
    if m:
        import yaml

        try:
            meta = yaml.safe_load(m.group(1))
        except yaml.YAMLError as e:
            msg = f"Invalid YAML in the README front matter: {e}"
            return JSONResponse(400, {"X-Error-Message": msg[:300].replace("\n", " ")},
                                body={"errors": [{"message": msg}], "warnings": [], "error": msg})
        if meta is not None and not isinstance(meta, dict):
            msg = "README front matter must be a YAML mapping (key: value)."
            return JSONResponse(400, body={"errors": [{"message": msg}], "warnings": [], "error": msg})
    return JSONResponse(body={"errors": [], "warnings": []})


def xet_not_supported(req: Request) -> JSONResponse:
    raise HubHTTPError(400, "This embedded Hub does not speak the Xet protocol: set HF_HUB_DISABLE_XET=1 on the "
                            "client (hf_xet is installed there) so large files go through plain git-LFS uploads.")


# -- reading --------------------------------------------------------------------------------

def _card_data(repo: Repo, sha: str) -> dict | None:
    readme = repo.read_small_file(sha, "README.md")
    if not readme:
        return None
    m = re.match(r"\A\s*---\s*\n(.*?)\n---\s*(\n|\Z)", readme.decode(errors="replace"), flags=re.S)
    if not m:
        return None
    import yaml

    try:
        data = yaml.safe_load(m.group(1))
    except yaml.YAMLError:
        return None
    return data if isinstance(data, dict) else None


def repo_info(req: Request) -> JSONResponse:
    """``GET /api/<type>s/<id>[/revision/<rev>]``."""
    repo = _repo(req)
    revision = req.params.get("revision") or "main"
    sha = repo.resolve_or_404(revision)
    files = repo.files(sha)
    blobs = req.flag("blobs")
    siblings = []
    for e in files:
        item: dict = {"rfilename": e.path}
        if blobs:
            item.update(size=e.size, blobId=e.oid)
            if e.lfs_oid:
                item["lfs"] = {"size": e.size, "sha256": e.lfs_oid, "pointerSize": e.pointer_size}
        siblings.append(item)
    meta = repo.meta
    body = {"_id": repo.key, "id": repo.repo_id, "author": repo.repo_id.split("/")[0], "sha": sha,
            "lastModified": iso(repo.commit_time(sha)), "createdAt": meta.get("createdAt"),
            "private": repo.private, "gated": False, "disabled": False, "downloads": 0, "likes": 0,
            "tags": [], "siblings": siblings, "usedStorage": sum(e.size for e in files)}
    card = _card_data(repo, sha)
    if card is not None:
        body["cardData"] = card
        if repo.repo_type == "model" and isinstance(card.get("library_name"), str):
            body["library_name"] = card["library_name"]
    return JSONResponse(body=body)


def list_refs(req: Request) -> JSONResponse:
    return JSONResponse(body=_repo(req).refs(include_prs=req.flag("include_prs")))


def list_commits(req: Request) -> JSONResponse:
    """``GET .../commits/<rev>?p=<page>``, newest first, 100 per page with a ``Link: rel="next"``."""
    repo = _repo(req)
    sha = repo.resolve_or_404(req.params["revision"])
    try:
        page = int((req.query.get("p") or ["0"])[-1])
    except ValueError:
        raise HubHTTPError(400, "Query parameter p must be a page number (0, 1, ...).") from None
    if page < 0:
        raise HubHTTPError(400, "Query parameter p must be >= 0.")
    commits = repo.commits(sha, skip=page * COMMITS_PAGE, limit=COMMITS_PAGE + 1)
    headers = {}
    if len(commits) > COMMITS_PAGE:
        commits = commits[:COMMITS_PAGE]
        prefix = {"model": "models", "dataset": "datasets", "space": "spaces"}[repo.repo_type]
        nxt = (f"{req.base_url()}/api/{prefix}/{repo.repo_id}/commits/{quote(req.params['revision'], safe='')}"
               f"?{urlencode({'p': page + 1})}")
        headers["Link"] = f'<{nxt}>; rel="next"'
    return JSONResponse(headers=headers, body=[c.to_json() for c in commits])


def _with_last_commits(repo: Repo, sha: str, entries: list) -> list[dict]:
    out = []
    for e in entries:
        item = e.to_json()
        last = repo.commits_touching(sha, e.path)
        if last is not None:
            item["lastCommit"] = {"id": last.sha, "title": last.title, "date": iso(last.timestamp)}
        out.append(item)
    return out


def list_tree(req: Request) -> JSONResponse:
    """``GET .../tree/<rev>[/<path>]?recursive=&expand=``.

    Note:
        ``expand=true`` runs one ``git log`` per entry (like the Hub, which caps such pages at 50).
    """
    repo = _repo(req)
    revision = req.params["revision"]
    sha = repo.resolve_or_404(revision)
    path = req.params.get("path") or ""
    if path:
        path = validate_path(path, allow_trailing_slash=True)
    entries = repo.list_tree(sha, path, recursive=req.flag("recursive"))
    if entries is None:
        raise HubHTTPError(404, f"Folder {path!r} not found in {repo.repo_id} at {revision!r} (commit {sha}).",
                           code="EntryNotFound", headers={"X-Repo-Commit": sha})
    body = _with_last_commits(repo, sha, entries) if req.flag("expand") else [e.to_json() for e in entries]
    return JSONResponse(body=body)


def paths_info(req: Request) -> JSONResponse:
    """``POST .../paths-info/<rev>`` with ``paths`` (form or JSON); missing paths are left out."""
    repo = _repo(req)
    sha = repo.resolve_or_404(req.params["revision"])
    data = req.form_or_json()
    paths = data.get("paths") or []
    if isinstance(paths, str):
        paths = [paths]
    if not isinstance(paths, list) or len(paths) > MAX_PATHS_INFO:
        raise HubHTTPError(400, f"'paths' must be a list of at most {MAX_PATHS_INFO} paths.")
    expand = str((data.get("expand") or ["false"])[-1] if isinstance(data.get("expand"), list)
                 else data.get("expand")).lower() in ("1", "true")
    entries = [e for p in paths if (e := repo.entry(sha, validate_path(str(p), allow_trailing_slash=True)))]
    body = _with_last_commits(repo, sha, entries) if expand else [e.to_json() for e in entries]
    return JSONResponse(body=body)


# -- writing --------------------------------------------------------------------------------

def preupload(req: Request) -> JSONResponse:
    """``POST .../preupload/<rev>``: ``lfs`` or ``regular`` per file, and the current oid if any."""
    repo = _repo(req, write=True)
    branch = _branch_of(repo, req.params["revision"])
    data = req.form_or_json()
    files = data.get("files")
    if not isinstance(files, list) or len(files) > MAX_PREUPLOAD_FILES:
        raise HubHTTPError(400, f"'files' must be a list of at most {MAX_PREUPLOAD_FILES} {{path, size, sample}}.")
    head = repo.branch_head(branch)
    patterns = repo.lfs_patterns(head)
    cfg = req.server.config
    answers = []
    for f in files:
        if not isinstance(f, dict):
            raise HubHTTPError(400, "Each preupload file must be {path, size, sample}.")
        path = validate_path(f.get("path"))
        size = validate_size(f.get("size"))
        try:
            sample = base64.b64decode(f.get("sample") or "", validate=True)
        except (binascii.Error, ValueError):
            raise HubHTTPError(400, f"Invalid base64 sample for {path!r}.") from None
        existing = repo.entry(head, path) if head else None
        oid = None
        if existing is not None and existing.kind == "file":
            oid = existing.lfs_oid or existing.oid
        answers.append({"path": path, "uploadMode": choose_upload_mode(path, size, sample, patterns,
                                                                      cfg.max_regular_file_bytes),
                        "shouldIgnore": False, "oid": oid})
    return JSONResponse(body={"files": answers, "commitOid": head})


def _parse_commit_lines(lines: Iterable[bytes], max_regular: int, spool: Path) -> tuple[dict, list[Operation]]:
    """The header and operations of an NDJSON commit, parsed line by line as the body arrives; each
    regular file's decoded content goes to a file in ``spool`` at once, so memory holds one line
    at a time, never the body or all of its files."""
    header = None
    ops: list[Operation] = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if not isinstance(value, dict):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            raise HubHTTPError(400, f"Commit payload line {n} is not a {{\"key\", \"value\"}} JSON object.") from None
        if header is None:
            if key != "header":
                raise HubHTTPError(400, "Commit payload must start with a 'header' line (summary, description).")
            header = value
            continue
        if key == "file":
            path = validate_path(value.get("path"))
            if value.get("encoding", "base64") != "base64":
                raise HubHTTPError(400, f"Unsupported encoding {value.get('encoding')!r} for {path!r}: use base64.")
            try:
                content = base64.b64decode(value.get("content") or "", validate=True)
            except (binascii.Error, ValueError):
                raise HubHTTPError(400, f"Invalid base64 content for {path!r}.") from None
            if len(content) > max_regular:
                raise HubHTTPError(400, f"{path!r} is {len(content)} bytes, over the {max_regular}-byte limit for "
                                        "regular files: upload it through LFS (preupload says 'lfs' for such files).")
            content_file = spool / str(len(ops))
            content_file.write_bytes(content)
            del content
            ops.append(Operation("file", path, content_file=content_file))
        elif key == "lfsFile":
            path = validate_path(value.get("path"))
            if value.get("algo", "sha256") != "sha256":
                raise HubHTTPError(400, f"Unsupported LFS hash {value.get('algo')!r} for {path!r}: use sha256.")
            size = value.get("size")  # absent for CommitOperationCopy: the stored object's size
            ops.append(Operation("lfs", path, oid=validate_oid(value.get("oid")),
                                 size=-1 if size is None else validate_size(size, what="LFS size")))
        elif key == "deletedFile":
            ops.append(Operation("delete", validate_path(value.get("path"))))
        elif key == "deletedFolder":
            ops.append(Operation("delete_folder", validate_path(value.get("path"), allow_trailing_slash=True)))
        else:
            raise HubHTTPError(400, f"Unsupported commit operation {key!r} on line {n} "
                                    "(expected file, lfsFile, deletedFile or deletedFolder).")
    if header is None:
        raise HubHTTPError(400, "Empty commit payload: expected a 'header' line, then operations.")
    return header, ops


def commit(req: Request) -> JSONResponse:
    """``POST .../commit/<rev>`` (NDJSON). Honours ``parentCommit``: 412 if the branch moved. With
    ``?create_pr=1`` the commit goes on top of ``<rev>`` into a new ``refs/pr/N`` (the branch does not
    move), answered with ``pullRequestUrl`` ``.../discussions/N``; later commits to ``refs/pr/N`` add
    to it. (Discussions themselves, merging and closing are not implemented.)"""
    repo = _repo(req, write=True)
    branch = _branch_of(repo, req.params["revision"])
    lines = req.body_reader(req.server.config.max_request_bytes).lines()
    spool = new_spool(repo)
    try:
        header, ops = _parse_commit_lines(lines, req.server.config.max_regular_file_bytes, spool)
        return _commit_parsed(req, repo, branch, header, ops)
    finally:
        shutil.rmtree(spool, ignore_errors=True)


def _refuse_regular_files_meant_for_lfs(req: Request, repo: Repo, branch: str, ops: list[Operation]) -> None:
    """Enforce preupload's answer: a file that must be LFS (by size, ``.gitattributes`` pattern or
    binary content) sent inline is refused, so ``task_vector.safetensors`` cannot be replaced by a
    plain blob."""
    files = [op for op in ops if op.kind == "file" and op.content_file is not None]
    if not files:
        return
    patterns = repo.lfs_patterns(repo.branch_head(branch))
    limit = req.server.config.max_regular_file_bytes
    for op in files:
        size = op.content_file.stat().st_size
        with open(op.content_file, "rb") as f:
            sample = f.read(512)
        if choose_upload_mode(op.path, size, sample, patterns, limit) == "lfs":
            raise HubHTTPError(400, f"{op.path!r} must be uploaded through LFS (it matches an LFS pattern of "
                                    ".gitattributes, is binary, or is large): preupload answers 'lfs' for it, "
                                    "and huggingface_hub's upload_file / create_commit follow that.")


def _commit_parsed(req: Request, repo: Repo, branch: str, header: dict, ops: list[Operation]) -> JSONResponse:
    _refuse_regular_files_meant_for_lfs(req, repo, branch, ops)
    summary = header.get("summary")
    if not isinstance(summary, str) or not summary.strip():
        raise HubHTTPError(400, "The commit header needs a non-empty 'summary' (the commit title).")
    description = header.get("description") or ""
    parent = header.get("parentCommit")
    if parent is not None and (not isinstance(parent, str) or not re.fullmatch(r"[0-9a-f]{7,40}", parent)):
        raise HubHTTPError(400, f"parentCommit must be a commit sha, got {parent!r}.")
    sha, pr = create_commit(repo, branch, ops, summary=summary, description=str(description),
                            parent_commit=parent, pull_request=req.flag("create_pr"))
    url = f"{req.base_url()}/{URL_PREFIXES[repo.repo_type]}{repo.repo_id}"
    return JSONResponse(body={"success": True, "commitOid": sha, "commitMessage": summary,
                              "commitUrl": f"{url}/commit/{sha}", "hookOutput": "",
                              "pullRequestUrl": f"{url}/discussions/{pr}" if pr else None})


def create_tag(req: Request) -> JSONResponse:
    """``POST .../tag/<rev>`` with ``{"tag", "message"?}``; 409 if the tag exists."""
    repo = _repo(req, write=True)
    sha = repo.resolve_or_404(req.params["revision"])
    data = req.form_or_json()
    tag = validate_new_ref_name(data.get("tag"), what="tag name")
    message = data.get("message")
    repo.create_tag(tag, sha, message if isinstance(message, str) else None)
    return JSONResponse(body={"success": True, "tag": tag, "targetCommit": sha})


def delete_tag(req: Request) -> JSONResponse:
    repo = _repo(req, write=True)
    repo.delete_tag(validate_ref_name(req.params["revision"], what="tag name"))
    return JSONResponse(body={})


def create_branch(req: Request) -> JSONResponse:
    """``POST .../branch/<name>`` with optional ``{"startingPoint": rev}`` (default: main)."""
    repo = _repo(req, write=True)
    branch = validate_new_ref_name(req.params["branch"], what="branch name")
    data = req.form_or_json()
    start = data.get("startingPoint") or "main"
    sha = repo.resolve_or_404(str(start))
    repo.create_branch(branch, sha)
    return JSONResponse(body={"success": True, "branch": branch, "targetCommit": sha})


def delete_branch(req: Request) -> JSONResponse:
    repo = _repo(req, write=True)
    repo.delete_branch(validate_ref_name(req.params["branch"], what="branch name"))
    return JSONResponse(body={})
