"""Validation of everything a request names: repo types and ids, file paths, revisions, LFS oids.

Every name is checked *after* percent-decoding and *before* it reaches the file system or
``git``, so encoded tricks (``%2e%2e``, ``%00``, ``%2F``) are judged like their plain form.
Each check raises :class:`~.errors.HubHTTPError` (400) naming the value and the rule.
"""

from __future__ import annotations

import re
from typing import Literal

from .errors import HubHTTPError

RepoType = Literal["model", "dataset", "space"]

#: URL plural -> repo type, and the folder under the root that holds each type
REPO_TYPES: dict[str, RepoType] = {"models": "model", "datasets": "dataset", "spaces": "space"}
#: prefix of download / LFS URLs per type (models have none)
URL_PREFIXES: dict[RepoType, str] = {"model": "", "dataset": "datasets/", "space": "spaces/"}

#: ASCII only (``\w`` would admit Unicode look-alikes such as a Cyrillic "е" for "e")
_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")
#: namespaces that would make URLs ambiguous (``/datasets/x/resolve`` ...)
_RESERVED_NAMESPACES = {"api", "models", "datasets", "spaces", "resolve", "lfs"}
_OID = re.compile(r"[0-9a-f]{64}")
_FULL_SHA = re.compile(r"[0-9a-f]{40}")
_SHORT_SHA = re.compile(r"[0-9a-f]{7,40}")
_REF_FORBIDDEN = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]")
MAX_PATH_CHARS = 1000
MAX_REVISION_CHARS = 200


def _bad(what: str, value: str, rule: str) -> HubHTTPError:
    return HubHTTPError(400, f"Invalid {what} {value!r}: {rule}.")


def repo_type_from_plural(plural: str) -> RepoType:
    try:
        return REPO_TYPES[plural]
    except KeyError:
        raise _bad("repo type", plural, f"expected one of {sorted(REPO_TYPES)}") from None


def repo_type_from_name(name: str | None) -> RepoType:
    """Repo type from a ``create_repo`` payload (``None`` means model)."""
    if name is None:
        return "model"
    if name not in URL_PREFIXES:
        raise _bad("repo type", str(name), f"expected one of {sorted(URL_PREFIXES)}")
    return name  # type: ignore[return-value]


def validate_repo_id(namespace: str, name: str) -> str:
    """``namespace/name``, each part ``[A-Za-z0-9][\\w.-]{0,95}``, no ``..``, no ``.git`` suffix."""
    repo_id = f"{namespace}/{name}"
    for part in (namespace, name):
        if not isinstance(part, str) or not _SEGMENT.fullmatch(part):
            raise _bad("repo id", repo_id, "expected 'namespace/name', each part 1-96 characters from "
                                           "[A-Za-z0-9_.-] starting with a letter or digit")
        if ".." in part or part.lower().endswith(".git"):
            raise _bad("repo id", repo_id, "parts may not contain '..' nor end with '.git'")
    if namespace.lower() in _RESERVED_NAMESPACES:
        raise _bad("repo id", repo_id, f"namespace is reserved ({sorted(_RESERVED_NAMESPACES)})")
    return repo_id


def validate_path(path: str, *, what: str = "file path", allow_trailing_slash: bool = False) -> str:
    """A relative POSIX path inside a repo: no absolute path, ``.``/``..``/``.git`` segment,
    empty segment, backslash or control character. Returns it (trailing ``/`` stripped when allowed).
    """
    if not isinstance(path, str) or not path:
        raise _bad(what, str(path), "expected a non-empty relative path")
    if len(path) > MAX_PATH_CHARS:
        raise _bad(what, path[:80] + "...", f"longer than {MAX_PATH_CHARS} characters")
    if allow_trailing_slash and path.endswith("/"):
        path = path[:-1]
    if path.startswith("/"):
        raise _bad(what, path, "absolute paths are not allowed; use a path relative to the repo root")
    if any(ord(c) < 0x20 or c == "\x7f" for c in path) or "\\" in path:
        raise _bad(what, path, "control characters and backslashes are not allowed")
    for part in path.split("/"):
        if part in ("", ".", ".."):
            raise _bad(what, path, "empty, '.' and '..' segments are not allowed")
        if part.lower() == ".git":
            raise _bad(what, path, "'.git' segments are not allowed")
    return path


def validate_ref_name(name: str, *, what: str = "revision") -> str:
    """A branch or tag name following ``git check-ref-format`` (plus: no leading ``-``)."""
    if not isinstance(name, str) or not name:
        raise _bad(what, str(name), "expected a non-empty name")
    if len(name) > MAX_REVISION_CHARS:
        raise _bad(what, name[:80] + "...", f"longer than {MAX_REVISION_CHARS} characters")
    if _REF_FORBIDDEN.search(name) or ".." in name or "@{" in name or name == "@":
        raise _bad(what, name, "spaces, control characters, '..', '@{' and any of ~^:?*[\\ are not allowed")
    if name.startswith(("-", "/")) or name.endswith(("/", ".")) or "//" in name:
        raise _bad(what, name, "may not start with '-' or '/', end with '/' or '.', or contain '//'")
    for part in name.split("/"):
        if part.startswith(".") or part.endswith(".lock"):
            raise _bad(what, name, "no component may start with '.' or end with '.lock'")
    return name


def validate_new_ref_name(name: str, *, what: str) -> str:
    """A name for a new branch or tag: a valid ref name that cannot be mistaken for a sha or a full ref."""
    validate_ref_name(name, what=what)
    if _FULL_SHA.fullmatch(name):
        raise _bad(what, name, "a 40-hex name would be mistaken for a commit sha")
    if name.startswith("refs/") or name in ("HEAD",):
        raise _bad(what, name, "give the short name (e.g. 'v1'), not a full ref or HEAD")
    return name


def is_full_sha(value: str) -> bool:
    return bool(_FULL_SHA.fullmatch(value))


def is_short_sha(value: str) -> bool:
    return bool(_SHORT_SHA.fullmatch(value))


def validate_oid(oid: object) -> str:
    """An LFS object id: 64 lowercase hex characters (sha256)."""
    if not isinstance(oid, str) or not _OID.fullmatch(oid):
        raise _bad("LFS oid", str(oid)[:80], "expected 64 lowercase hex characters (sha256)")
    return oid


def validate_size(size: object, *, what: str = "size") -> int:
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise _bad(what, str(size)[:40], "expected a non-negative integer")
    return size
