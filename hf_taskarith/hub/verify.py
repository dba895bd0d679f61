"""Checking downloaded files against the Hub's listing: size, and LFS sha256 or git blob sha.

``huggingface_hub`` checks that a download has the announced length, but not its content: an
object corrupted on the server (same size, other bytes) or a cache file damaged later is used
as is. The Hub lists, for every file of a commit, its size and either the sha256 of its LFS
object or its git blob id; :func:`verify_file` recomputes the one that applies from the local
copy and, on a mismatch, removes that copy from the cache so the next pull downloads it again.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import CorruptCheckpointError

if TYPE_CHECKING:
    from huggingface_hub.hf_api import RepoFile

logger = logging.getLogger(__name__)

_CHUNK = 8 * 1024 * 1024


def sha256_of(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes (the oid of its git-LFS object)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def git_blob_sha1(path: str | os.PathLike) -> str:
    """Hex git blob id of a file (``git hash-object``): sha1 of ``blob <size>\\0`` + bytes."""
    digest = hashlib.sha1(f"blob {os.path.getsize(path)}\0".encode())  # noqa: S324 (git's id, not security)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def evict_cached(path: str | os.PathLike) -> list[Path]:
    """Delete a file from the Hugging Face cache: the snapshot entry and the blob it links to.

    Returns:
        The paths removed. A later ``hf_hub_download`` of that file downloads it again.
    """
    entry = Path(path)
    removed = []
    targets = [entry.resolve(), entry] if entry.is_symlink() else [entry]
    for target in targets:
        try:
            target.unlink()
            removed.append(target)
        except FileNotFoundError:
            pass
        except OSError as e:  # read-only cache: the message tells the user what to delete
            logger.warning("could not remove %s from the cache: %s", target, e)
    return removed


def verify_file(local: str | os.PathLike, remote: RepoFile, *, where: str) -> None:
    """Check a downloaded file against the Hub's listing; remove it from the cache if it differs.

    Args:
        local: the downloaded file (a path in the Hugging Face cache).
        remote: the file's entry from ``HfApi.list_repo_tree`` / ``get_paths_info`` at the same commit.
        where: ``repo@revision (commit sha)``, for the message.

    Raises:
        CorruptCheckpointError: size, LFS sha256 or git blob id differ (the message names the
            file, both values, and what was removed from the cache).

    Note:
        Reads the whole file once (sha256 for LFS files, sha1 for small git files): about 1 s
        per GB, small next to the download. Files without a listed hash are checked by size only.
    """
    local = Path(local)
    size = local.stat().st_size
    expected_size = remote.lfs.size if remote.lfs is not None else remote.size
    problem = None
    if expected_size is not None and size != expected_size:
        problem = f"the local copy has {size} bytes, the repo lists {expected_size}"
    elif remote.lfs is not None and remote.lfs.sha256:
        got = sha256_of(local)
        if got != remote.lfs.sha256:
            problem = f"its sha256 is {got}, the repo lists {remote.lfs.sha256} (same size: the bytes differ)"
    elif remote.blob_id:
        got = git_blob_sha1(local)
        if got != remote.blob_id:
            problem = f"its git blob id is {got}, the repo lists {remote.blob_id}"
    if problem is None:
        return
    removed = evict_cached(local)
    cache_note = (f"The bad copy was removed from the cache ({', '.join(str(p) for p in removed)}), so the next "
                  "pull downloads it again." if removed else
                  f"Delete {local} (and the blob it links to) from the cache before pulling again.")
    raise CorruptCheckpointError(
        f"{where}: file {remote.path!r} is corrupt: {problem}. {cache_note} If it fails again, the file is "
        "damaged on the server: push the task vector again (a new commit) or pull another revision."
    )
