"""Building a commit: blobs, a tree, a commit object, and a compare-and-swap of the branch.

Plumbing only: blobs with ``hash-object -w`` (one process for all files), the tree in a
temporary index (``GIT_INDEX_FILE``) with ``update-index --index-info`` and ``write-tree``,
``commit-tree``, then ``update-ref refs/heads/<branch> <new> <old>``. The last step is a
compare-and-swap: the commit lands whole or not at all, and a commit based on a stale parent
is refused (412) instead of overwriting what landed first. Commits to one repo are serialized by
an in-process lock; the compare-and-swap still protects against other processes.

Note:
    Objects written for a refused commit stay in the object store, unreferenced, until
    ``git gc`` prunes them; refs never point at them.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from .errors import HubHTTPError, entry_not_found, repo_not_found
from .git import EMPTY_TREE, GitError
from .lfs import format_pointer
from .names import is_short_sha

if TYPE_CHECKING:
    from .storage import Repo

logger = logging.getLogger(__name__)

FILE_MODES = ("100644", "100755")


@dataclass(frozen=True)
class Operation:
    """One line of a commit: ``kind`` is ``file`` (``content``, or the file ``content_file`` holding
    it), ``lfs`` (oid, size), ``delete``, ``delete_folder``."""

    kind: Literal["file", "lfs", "delete", "delete_folder"]
    path: str
    content: bytes = b""
    content_file: Path | None = None
    oid: str = ""
    size: int = 0


def identity_env(user: str) -> dict[str, str]:
    """Author and committer of the server's commits and tags (the configured user, now, UTC)."""
    now = f"{int(time.time())} +0000"
    return {"GIT_AUTHOR_NAME": user, "GIT_AUTHOR_EMAIL": f"{user}@localhost", "GIT_AUTHOR_DATE": now,
            "GIT_COMMITTER_NAME": user, "GIT_COMMITTER_EMAIL": f"{user}@localhost", "GIT_COMMITTER_DATE": now}


def new_spool(repo: Repo) -> Path:
    """A fresh scratch folder in the repo's git dir (removed by the caller; a crash leaves it to
    :meth:`~.storage.RepoStore.clean_leftovers` at the next start)."""
    spool = Path(repo.git_dir) / f"hub-spool-{uuid.uuid4().hex}"
    spool.mkdir()
    return spool


def write_blobs(repo: Repo, contents: list[bytes | Path]) -> list[str]:
    """Write blobs (bytes, or files already on disk) into the object store (one ``hash-object``)."""
    if not contents:
        return []
    spool = new_spool(repo)
    try:
        names = []
        for i, data in enumerate(contents):
            if isinstance(data, Path):
                names.append(str(data))
                continue
            (spool / str(i)).write_bytes(data)
            names.append(str(spool / str(i)))
        out = repo.git.run("hash-object", "-w", "--no-filters", "--stdin-paths", input="\n".join(names).encode())
        return out.decode().split()
    finally:
        shutil.rmtree(spool, ignore_errors=True)


def tree_files(repo: Repo, sha: str | None) -> dict[str, tuple[str, str]]:
    """``path -> (mode, blob id)`` of every file of commit ``sha``."""
    if sha is None:
        return {}
    out = repo.git.run("ls-tree", "-r", "-z", sha)
    files = {}
    for record in filter(None, out.split(b"\0")):
        meta, name = record.split(b"\t", 1)
        mode, _kind, oid = meta.decode().split()
        files[name.decode(errors="surrogateescape")] = (mode, oid)
    return files


def write_tree(repo: Repo, files: dict[str, tuple[str, str]]) -> str:
    """A tree object holding ``files``, built in a temporary index file."""
    index = repo.git_dir / f"hub-index-{uuid.uuid4().hex}"
    try:
        env = {"GIT_INDEX_FILE": str(index)}
        records = b"".join(f"{mode} {oid}\t".encode() + path.encode(errors="surrogateescape") + b"\0"
                           for path, (mode, oid) in sorted(files.items()))
        if records:
            repo.git.run("update-index", "-z", "--index-info", input=records, env=env)
            return repo.git.run("write-tree", env=env).decode().strip()
        return EMPTY_TREE
    finally:
        index.unlink(missing_ok=True)
        index.with_name(index.name + ".lock").unlink(missing_ok=True)


def apply_operations(repo: Repo, files: dict[str, tuple[str, str]], ops: list[Operation],
                     blob_ids: dict[int, str], revision: str, head: str) -> None:
    """Apply ``ops`` to ``files`` in place; refuses deleting what is missing and file/folder clashes."""
    for i, op in enumerate(ops):
        if op.kind in ("file", "lfs"):
            old_mode = files.get(op.path, ("100644", ""))[0]
            files[op.path] = (old_mode if old_mode in FILE_MODES else "100644", blob_ids[i])
        elif op.kind == "delete":
            if op.path not in files:
                raise entry_not_found(repo.repo_id, revision, op.path, head)
            del files[op.path]
        else:  # delete_folder
            doomed = [p for p in files if p.startswith(op.path + "/")]
            if not doomed:
                raise entry_not_found(repo.repo_id, revision, op.path + "/", head)
            for p in doomed:
                del files[p]
    folders = {p.rsplit("/", 1)[0] for p in files if "/" in p}
    folders |= {f.rsplit("/", i)[0] for f in list(folders) for i in range(1, f.count("/") + 1)}
    clash = sorted(folders & files.keys())
    if clash:
        raise HubHTTPError(409, f"Cannot commit: {clash[0]!r} would be both a file and a folder; "
                                f"delete one of them in the same commit.")


def _with_stored_size(repo: Repo, op: Operation) -> Operation:
    """An LFS line without a size (``CommitOperationCopy`` sends only the oid) takes the size of the
    object already stored; an unknown object is refused."""
    size = repo.lfs.size(op.oid)
    if size is None:
        raise HubHTTPError(400, f"LFS object {op.oid} for {op.path!r} is not stored in {repo.repo_id}: a copy can "
                                "only name an object of this repo (upload it through the LFS batch API first).")
    return dataclasses.replace(op, size=size)


def create_commit(repo: Repo, branch: str, ops: list[Operation], *, summary: str, description: str = "",
                  parent_commit: str | None = None, pull_request: bool = False) -> tuple[str, int | None]:
    """Apply ``ops`` on top of ``branch`` as one commit; returns its sha and, with ``pull_request``,
    the number of the new ``refs/pr/N`` that holds it (see :func:`_create_commit`).

    A repo deleted while the commit runs answers 404 ``RepoNotFound`` (git commands then fail
    on a vanished folder), never 500.
    """
    try:
        return _create_commit(repo, branch, ops, summary=summary, description=description,
                              parent_commit=parent_commit, pull_request=pull_request)
    except (FileNotFoundError, NotADirectoryError, GitError):
        if not (repo.path / ".git" / "HEAD").is_file():
            raise repo_not_found(repo.repo_id) from None
        raise


def _create_commit(repo: Repo, branch: str, ops: list[Operation], *, summary: str, description: str = "",
                   parent_commit: str | None = None, pull_request: bool = False) -> tuple[str, int | None]:
    """Apply ``ops`` on top of ``branch`` as one commit; returns its sha (and the pull request's number).

    Raises:
        HubHTTPError: 404 unknown branch / deleted file missing; 412 when ``parent_commit`` is
            given and the branch is no longer there (nothing is changed); 400 for an LFS
            file whose object was not uploaded; 409 for a file/folder clash.
    """
    ops = [_with_stored_size(repo, op) if op.kind == "lfs" and op.size < 0 else op for op in ops]
    for op in ops:
        if op.kind == "lfs" and not repo.lfs.has(op.oid, op.size):
            raise HubHTTPError(400, f"LFS object {op.oid} ({op.size} bytes) for {op.path!r} was not uploaded "
                                    f"to {repo.repo_id}: upload it through the LFS batch API first.")
    contents = {i: ((op.content_file or op.content) if op.kind == "file" else format_pointer(op.oid, op.size))
                for i, op in enumerate(ops) if op.kind in ("file", "lfs")}
    blob_ids = dict(zip(contents, write_blobs(repo, list(contents.values()))))
    message = summary.strip() + (f"\n\n{description.strip()}" if description.strip() else "") + "\n"
    with repo.store.lock_for(repo.key):
        if not (repo.path / ".git" / "HEAD").is_file():  # deleted while the blobs were written
            raise repo_not_found(repo.repo_id)
        head = repo.branch_head(branch)
        if head is None:
            raise HubHTTPError(404, f"Branch {branch!r} does not exist in {repo.repo_id}: create it first "
                                    "(HfApi.create_branch) or commit to an existing branch.",
                               code="RevisionNotFound")
        if parent_commit is not None:
            parent_sha = repo.resolve(parent_commit) if is_short_sha(parent_commit) else None
            if parent_sha != head:
                raise HubHTTPError(412, f"Branch {branch!r} of {repo.repo_id} has moved: it is at commit {head}, "
                                        f"not at the parent commit {parent_commit} this commit was based on "
                                        "(another push landed first). Nothing was changed; pull the latest "
                                        "version, re-apply your change and push again.")
        files = tree_files(repo, head)
        apply_operations(repo, files, ops, blob_ids, branch, head)
        tree = write_tree(repo, files)
        new = repo.git.run("commit-tree", tree, "-p", head, input=message.encode(),
                           env=identity_env(repo.store.user)).decode().strip()
        pr = repo.next_pull_request() if pull_request else None
        ref, old = (f"refs/pr/{pr}", "") if pr else (branch if branch.startswith("refs/pr/") else
                                                       f"refs/heads/{branch}", head)
        try:  # old "" : the ref must not exist yet
            repo.git.run("update-ref", "-m", f"commit: {summary.strip()[:200]}", ref, new, old)
        except GitError as e:
            raise HubHTTPError(412, f"Branch {branch!r} of {repo.repo_id} moved while committing (another "
                                    f"process pushed); nothing was changed, push again. ({e})") from None
    logger.info("%s@%s: commit %s (%d operations)", repo.repo_id, ref, new, len(ops))
    return new, pr
