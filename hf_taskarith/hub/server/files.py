"""``HEAD/GET /<repo>/resolve/<rev>/<path>``: file downloads, with the Hub's metadata headers.

``huggingface_hub`` reads ``X-Repo-Commit`` (the resolved commit), ``ETag`` (cache key: the
git blob sha for regular files, the sha256 for LFS files), ``X-Linked-Etag`` / ``X-Linked-Size``
(LFS files) and ``Content-Length``; it resumes interrupted downloads with ``Range: bytes=N-``.
No ``X-Xet-Hash`` is ever sent, so clients with ``hf_xet`` still download over plain HTTP.
"""

from __future__ import annotations

import logging
import re

from .errors import HubHTTPError
from .messages import FileResponse, Request, Response, StreamResponse
from .names import validate_path

logger = logging.getLogger(__name__)

_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``(start, end_exclusive)`` of a single ``bytes=`` range, or ``None`` to send everything.

    Raises:
        HubHTTPError: 416 for a range outside the file.
    """
    if not header:
        return None
    m = _RANGE.fullmatch(header.strip())
    if not m or (not m.group(1) and not m.group(2)):
        return None  # multiple ranges or other units: ignored, the whole file is sent (allowed by RFC 9110)
    if not m.group(1):  # suffix range: the last N bytes
        n = int(m.group(2))
        if n == 0:
            raise HubHTTPError(416, f"Unsatisfiable range {header!r} for a {size}-byte file.",
                               headers={"Content-Range": f"bytes */{size}"})
        return max(size - n, 0), size
    start = int(m.group(1))
    end = min(int(m.group(2)) + 1, size) if m.group(2) else size
    if start >= size or end <= start:
        if start == size == 0:
            return None
        raise HubHTTPError(416, f"Unsatisfiable range {header!r} for a {size}-byte file.",
                           headers={"Content-Range": f"bytes */{size}"})
    return start, end


def resolve(req: Request) -> Response:
    server = req.server
    repo = server.store.open_visible(req.params["repo_type"], req.params["repo_id"], req.caller)
    revision = req.params["revision"]
    path = validate_path(req.params["path"])
    sha = repo.resolve_or_404(revision)
    entry = repo.file_entry_or_404(sha, path, revision)
    headers = {"X-Repo-Commit": sha, "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream",
               "Cache-Control": "no-cache" if sha != revision else "public, max-age=31536000, immutable"}
    if entry.lfs_oid:
        headers.update({"ETag": f'"{entry.lfs_oid}"', "X-Linked-Etag": f'"{entry.lfs_oid}"',
                        "X-Linked-Size": str(entry.size)})
    else:
        headers["ETag"] = f'"{entry.oid}"'
    if entry.lfs_oid and req.method == "GET":
        # Checked on GET only: huggingface_hub retries a 5xx answer to its HEAD for ~25 s, but fails a
        # 5xx GET at once, with this message. Sending a damaged object would hang (truncated: the
        # client waits for bytes never sent) or deliver wrong bytes.
        problem = repo.lfs.damage(entry.lfs_oid, entry.size)
        if problem:
            logger.error("%s@%s: refusing to serve %s: %s", repo.repo_id, sha, path, problem)
            raise HubHTTPError(500, f"File {path!r} of {repo.repo_id} at revision {revision!r} (commit {sha}) is "
                                    f"damaged on this server: {problem}. Push the file again (a new commit), "
                                    "or restore the object from a backup.", headers={"X-Repo-Commit": sha})
    span = parse_range(req.headers.get("Range"), entry.size) if req.method == "GET" else None
    status, (start, end) = (206, span) if span else (200, (0, entry.size))
    if span:
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{entry.size}"
    if entry.lfs_oid:
        return FileResponse(status, headers, file=repo.lfs.path(entry.lfs_oid), offset=start, length=end - start)
    chunks = repo.git.stream_blob(entry.oid, start=start, length=end - start) if req.method == "GET" else ()
    return StreamResponse(status, headers, length=end - start, chunks=chunks)
