"""Large files, git-lfs style: pointer files in the git tree, contents in ``.git/lfs/objects``.

Layout (what git-lfs and olah read): the object with sha256 ``oid`` lives at
``<repo>/.git/lfs/objects/<oid[0:2]>/<oid[2:4]>/<oid>`` and the tree holds the pointer::

    version https://git-lfs.github.com/spec/v1
    oid sha256:<oid>
    size <bytes>

Uploads follow the LFS batch API (basic transfer, which ``huggingface_hub`` uses without
``hf_xet``): ``POST <repo>.git/info/lfs/objects/batch`` answers a signed PUT URL per missing
object; the PUT streams into ``.git/lfs/tmp``, checks sha256 and size, and only then renames the
file into place, so a dropped connection or a wrong hash leaves no object behind. Objects are
immutable and content-addressed, so concurrent uploads of the same oid are harmless.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
import threading
from pathlib import Path
from urllib.parse import urlencode

from .errors import HubHTTPError
from .guard import check_write_body
from .limits import TruncatedBody
from .messages import FileResponse, JSONResponse, Request
from .names import URL_PREFIXES, validate_oid, validate_size

logger = logging.getLogger(__name__)

POINTER_VERSION = "https://git-lfs.github.com/spec/v1"
_POINTER = re.compile(rb"version https://git-lfs\.github\.com/spec/v1\noid sha256:([0-9a-f]{64})\nsize (\d+)\n")
#: pointers are ~130 bytes; blobs larger than this are never pointers
MAX_POINTER_BYTES = 200
LFS_CONTENT_TYPE = "application/vnd.git-lfs+json"
MAX_BATCH_OBJECTS = 1000


#: objects whose sha256 was checked, with the (size, mtime_ns, inode) they had then
_VERIFIED: dict[Path, tuple[int, int, int]] = {}
_VERIFIED_LOCK = threading.Lock()


def _relative(path: Path) -> str:
    """``.git/lfs/objects/...`` (the part of an object's path that names it inside its repo)."""
    parts = path.parts
    return "/".join(parts[parts.index(".git"):]) if ".git" in parts else str(path)


def format_pointer(oid: str, size: int) -> bytes:
    return f"version {POINTER_VERSION}\noid sha256:{oid}\nsize {size}\n".encode()


def parse_pointer(data: bytes) -> tuple[str, int] | None:
    """``(oid, size)`` if ``data`` is exactly a git-lfs pointer, else ``None``."""
    if len(data) > MAX_POINTER_BYTES:
        return None
    m = _POINTER.fullmatch(data)
    return (m.group(1).decode(), int(m.group(2))) if m else None


class LfsStore:
    """The LFS objects of one repository."""

    def __init__(self, git_dir: Path) -> None:
        self.objects = Path(git_dir) / "lfs" / "objects"
        self.tmp = Path(git_dir) / "lfs" / "tmp"

    def path(self, oid: str) -> Path:
        return self.objects / oid[0:2] / oid[2:4] / oid

    def size(self, oid: str) -> int | None:
        """Size of a stored object, or ``None`` if it is not stored."""
        try:
            return self.path(oid).stat().st_size
        except FileNotFoundError:
            return None

    def damage(self, oid: str, size: int) -> str | None:
        """What is wrong with a stored object, or ``None`` if it has ``size`` bytes and hashes to ``oid``.

        Note:
            The size is checked on every call (one ``stat``). The sha256 is computed once per
            object and file state (size, mtime): about 1 s per GB on the first download of an
            object, then free until the file changes on disk.
        """
        path = self.path(oid)
        try:
            st = path.stat()
        except FileNotFoundError:
            return f"its LFS object {oid} is missing from {_relative(path)}"
        if st.st_size != size:
            return (f"its LFS object {_relative(path)} has {st.st_size} bytes but the pointer says {size} "
                    "(truncated or overwritten on disk)")
        state = (st.st_size, st.st_mtime_ns, st.st_ino)
        with _VERIFIED_LOCK:
            if _VERIFIED.get(path) == state:
                return None
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(8 * 1024 * 1024):
                digest.update(chunk)
        if digest.hexdigest() != oid:
            return (f"its LFS object {_relative(path)} hashes to sha256 {digest.hexdigest()}, not {oid} "
                    "(its bytes were changed on disk)")
        with _VERIFIED_LOCK:
            _VERIFIED[path] = state
        return None

    def has(self, oid: str, size: int | None = None) -> bool:
        stored = self.size(oid)
        return stored is not None and (size is None or stored == size)

    def receive(self, oid: str, size: int, chunks) -> None:
        """Store an object from an iterator of byte chunks, atomically.

        Raises:
            HubHTTPError: 400 if the bytes do not hash to ``oid`` or do not add up to ``size``.
            TruncatedBody: the client disconnected; nothing was stored.
        """
        self.tmp.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f"{oid[:16]}-", suffix=".part", dir=self.tmp)
        tmp = Path(tmp_name)
        try:
            digest = hashlib.sha256()
            received = 0
            with os.fdopen(fd, "wb") as f:
                for chunk in chunks:
                    received += len(chunk)
                    if received > size:
                        raise HubHTTPError(400, f"LFS upload of {oid} sent more than the announced {size} bytes.")
                    digest.update(chunk)
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            if received != size:
                raise HubHTTPError(400, f"LFS upload of {oid}: received {received} bytes, expected {size}.")
            if digest.hexdigest() != oid:
                raise HubHTTPError(400, f"LFS upload does not match its oid: expected sha256 {oid}, "
                                        f"got {digest.hexdigest()} (file changed during the upload?).")
            final = self.path(oid)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)


# -- endpoints ------------------------------------------------------------------------------

def batch(req: Request) -> JSONResponse:
    """``POST /<repo>.git/info/lfs/objects/batch``: upload instructions per object."""
    server = req.server
    repo = server.store.open_visible(req.params["repo_type"], req.params["repo_id"], req.caller)
    data = req.json()
    operation = data.get("operation") if isinstance(data, dict) else None
    if operation == "download":
        return _download_batch(req, repo, data)
    if operation != "upload":
        raise HubHTTPError(400, f"LFS batch operation must be 'upload' or 'download', got {operation!r}.")
    server.auth.require_write(req.caller)
    check_write_body("POST", req.headers, has_body=True)
    transfers = data.get("transfers") or ["basic"]
    if "basic" not in transfers:
        raise HubHTTPError(400, f"Only the 'basic' LFS transfer is supported, the client offered {transfers}. "
                                "With hf_xet installed, set HF_HUB_DISABLE_XET=1.")
    objects = data.get("objects")
    if not isinstance(objects, list) or len(objects) > MAX_BATCH_OBJECTS:
        raise HubHTTPError(400, f"'objects' must be a list of at most {MAX_BATCH_OBJECTS} {{oid, size}} items.")
    base = req.base_url()
    prefix = URL_PREFIXES[repo.repo_type]
    limit = server.config.max_upload_bytes
    answers = []
    for obj in objects:
        if not isinstance(obj, dict):
            raise HubHTTPError(400, "Each LFS batch object must be {oid, size}.")
        oid, size = validate_oid(obj.get("oid")), validate_size(obj.get("size"), what="LFS size")
        if size > limit:
            answers.append({"oid": oid, "size": size, "error": {
                "code": 413, "message": f"{size} bytes exceeds this server's LFS limit of {limit} bytes "
                                        "(raise it with --max-upload-size)."}})
            continue
        if repo.lfs.has(oid, size):
            answers.append({"oid": oid, "size": size, "authenticated": True})  # no actions: already there
            continue
        signed = server.auth.sign_upload(repo.key, oid, size, server.config.upload_url_ttl_s)
        obj_url = f"{base}/{prefix}{repo.repo_id}.git/info/lfs/objects"
        answers.append({"oid": oid, "size": size, "authenticated": True, "actions": {
            "upload": {"href": f"{obj_url}/{oid}?{urlencode(signed)}", "expires_in": server.config.upload_url_ttl_s},
            "verify": {"href": f"{obj_url}/verify", "expires_in": server.config.upload_url_ttl_s},
        }})
    return JSONResponse(body={"transfer": "basic", "objects": answers, "hash_algo": "sha256"},
                        content_type=LFS_CONTENT_TYPE)


def _download_batch(req: Request, repo, data: dict) -> JSONResponse:
    """Download actions (what ``git lfs pull`` after a ``git clone`` asks for)."""
    objects = data.get("objects")
    if not isinstance(objects, list) or len(objects) > MAX_BATCH_OBJECTS:
        raise HubHTTPError(400, f"'objects' must be a list of at most {MAX_BATCH_OBJECTS} {{oid, size}} items.")
    href = f"{req.base_url()}/{URL_PREFIXES[repo.repo_type]}{repo.repo_id}.git/info/lfs/objects"
    auth = req.headers.get("Authorization")
    answers = []
    for obj in objects:
        if not isinstance(obj, dict):
            raise HubHTTPError(400, "Each LFS batch object must be {oid, size}.")
        oid, size = validate_oid(obj.get("oid")), validate_size(obj.get("size"), what="LFS size")
        if not repo.lfs.has(oid, size):
            answers.append({"oid": oid, "size": size, "error": {"code": 404, "message": "Object does not exist"}})
            continue
        action = {"href": f"{href}/{oid}", **({"header": {"Authorization": auth}} if auth else {})}
        answers.append({"oid": oid, "size": size, "authenticated": True, "actions": {"download": action}})
    return JSONResponse(body={"transfer": "basic", "objects": answers, "hash_algo": "sha256"},
                        content_type=LFS_CONTENT_TYPE)


def download(req: Request) -> FileResponse:
    """``GET /<repo>.git/info/lfs/objects/<oid>``: the bytes of one stored object (checked first)."""
    repo = req.server.store.open_visible(req.params["repo_type"], req.params["repo_id"], req.caller)
    oid = validate_oid(req.params["oid"])
    size = repo.lfs.size(oid)
    problem = repo.lfs.damage(oid, size) if size is not None else "it is not stored"
    if problem:
        raise HubHTTPError(404, f"LFS object {oid} of {repo.repo_id} cannot be served: {problem}.")
    return FileResponse(200, {"Content-Type": "application/octet-stream"}, file=repo.lfs.path(oid), length=size)


def upload(req: Request) -> JSONResponse:
    """``PUT /<repo>.git/info/lfs/objects/<oid>?size&expires&sig``: the bytes of one object."""
    server = req.server
    oid = validate_oid(req.params["oid"])
    try:  # the signature is the credential; a missing repo and a bad signature answer alike, so an
        # unsigned PUT cannot tell whether a private repo exists
        repo = server.store.open(req.params["repo_type"], req.params["repo_id"])
        size = server.auth.verify_upload(repo.key, oid, req.query)
    except HubHTTPError as e:
        if e.status not in (403, 404):
            raise
        logger.info("LFS upload refused: %s", e.message)  # the server log keeps the reason
        raise HubHTTPError(404, "No LFS upload at this URL: the repository does not exist, or the upload URL is "
                                "unsigned, invalid or expired. Ask the batch endpoint for a new one.") from None
    reader = req.body_reader(server.config.max_upload_bytes)
    if reader.length is not None and reader.length != size:
        raise HubHTTPError(400, f"LFS upload of {oid}: Content-Length {reader.length} differs from the "
                                f"announced size {size}.")
    try:
        repo.lfs.receive(oid, size, reader)
    except TruncatedBody as e:
        logger.warning("%s: interrupted LFS upload of %s discarded (%s)", repo.repo_id, oid, e)
        raise
    logger.info("%s: stored LFS object %s (%d bytes)", repo.repo_id, oid, size)
    return JSONResponse(body={})


def verify(req: Request) -> JSONResponse:
    """``POST /<repo>.git/info/lfs/objects/verify``: is the object stored with that size?"""
    server = req.server
    repo = server.store.open_visible(req.params["repo_type"], req.params["repo_id"], req.caller)
    server.auth.require_write(req.caller)
    data = req.json()
    if not isinstance(data, dict):
        raise HubHTTPError(400, "Expected {oid, size}.")
    oid, size = validate_oid(data.get("oid")), validate_size(data.get("size"), what="LFS size")
    if not repo.lfs.has(oid, size):
        raise HubHTTPError(404, f"LFS object {oid} ({size} bytes) was not uploaded to {repo.repo_id}.")
    return JSONResponse(body={"oid": oid, "size": size}, content_type=LFS_CONTENT_TYPE)
