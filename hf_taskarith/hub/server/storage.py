"""The repo store: each repo is a real git repository at ``root/<type>s/<namespace>/<name>``.

The repository is an ordinary (non-bare) git repository whose working tree is never checked
out: everything lives in its ``.git`` folder (objects, refs, reflogs, and ``lfs/objects``), so
``git clone root/models/org/name`` works, and git-lfs and olah find the LFS objects where they
look for them. Server-side metadata (visibility, creation date) is ``.git/hf-hub.json``.

Commits are built in :mod:`.commits`; tags and branches move with ``update-ref`` and the
expected old value (compare-and-swap), under a per-repo lock.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from .auth import Caller
from .commits import identity_env, write_blobs, write_tree
from .errors import HubHTTPError, entry_not_found, repo_not_found, revision_not_found
from .git import Git, GitError, init_repository
from .lfs import MAX_POINTER_BYTES, LfsStore, parse_pointer
from .names import RepoType, is_full_sha, is_short_sha, validate_ref_name
from .upload_mode import DEFAULT_GITATTRIBUTES, lfs_patterns

logger = logging.getLogger(__name__)

META_FILE = "hf-hub.json"


def iso(ts: float) -> str:
    """Unix time -> the Hub's date format (``2024-01-02T03:04:05.000Z``)."""
    return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


@dataclass(frozen=True)
class Entry:
    """A file or folder of a commit's tree, as the tree / paths-info endpoints describe it."""

    path: str
    kind: Literal["file", "directory"]
    oid: str  # git object id (blob or tree)
    size: int  # file size (the LFS object's size for LFS files); 0 for folders
    lfs_oid: str | None = None
    pointer_size: int | None = None

    def to_json(self) -> dict:
        out: dict = {"type": self.kind, "oid": self.oid, "size": self.size, "path": self.path}
        if self.lfs_oid is not None:
            out["lfs"] = {"oid": self.lfs_oid, "size": self.size, "pointerSize": self.pointer_size}
        return out


@dataclass(frozen=True)
class CommitInfo:
    """One commit, as ``list_repo_commits`` describes it."""

    sha: str
    author: str
    timestamp: int
    title: str
    message: str

    def to_json(self) -> dict:
        return {"id": self.sha, "title": self.title, "message": self.message,
                "authors": [{"user": self.author, "avatar": None}], "date": iso(self.timestamp)}


class Repo:
    """One repository (open it through :class:`RepoStore`)."""

    def __init__(self, store: RepoStore, repo_type: RepoType, repo_id: str, path: Path) -> None:
        self.store = store
        self.repo_type = repo_type
        self.repo_id = repo_id
        self.key = f"{repo_type}/{repo_id}"
        self.path = path
        self.git_dir = path / ".git"
        self.git = Git(self.git_dir)
        self.lfs = LfsStore(self.git_dir)

    # -- metadata -----------------------------------------------------------------------------

    @property
    def meta(self) -> dict:
        try:
            return json.loads((self.git_dir / META_FILE).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def write_meta(self, **updates) -> None:
        meta = {**self.meta, **updates}
        tmp = self.git_dir / f"{META_FILE}.{uuid.uuid4().hex}.tmp"
        tmp.write_text(json.dumps(meta, indent=2))
        os.replace(tmp, self.git_dir / META_FILE)

    @property
    def private(self) -> bool:
        return bool(self.meta.get("private", False))

    # -- revisions ----------------------------------------------------------------------------

    def _peel(self, ref: str) -> str | None:
        out = self.git.try_run("rev-parse", "--verify", "-q", f"{ref}^{{commit}}")
        return out.decode().strip() if out else None

    def branch_head(self, branch: str) -> str | None:
        """Head of a branch; ``branch`` may also be a pull request's ref, ``refs/pr/N``."""
        return self._peel(branch if branch.startswith("refs/pr/") else f"refs/heads/{branch}")

    def next_pull_request(self) -> int:
        """The number the next pull request gets (1 + the highest ``refs/pr/N``); call under the repo lock."""
        out = self.git.run("for-each-ref", "--format=%(refname)", "refs/pr/").decode().split()
        numbers = [int(ref.rsplit("/", 1)[1]) for ref in out if ref.rsplit("/", 1)[1].isdigit()]
        return max(numbers, default=0) + 1

    def tag_target(self, tag: str) -> str | None:
        return self._peel(f"refs/tags/{tag}")

    def resolve(self, revision: str) -> str | None:
        """Commit sha of a branch, tag, full ref (``refs/pr/1``) or full/short sha; ``None`` if unknown."""
        validate_ref_name(revision)
        if is_full_sha(revision):
            kind = self.git.try_run("cat-file", "-t", revision)
            return revision if kind and kind.strip() == b"commit" else None
        if revision.startswith(("refs/heads/", "refs/tags/", "refs/pr/", "refs/convert/")):
            return self._peel(revision)
        sha = self.branch_head(revision) or self.tag_target(revision)
        if sha is None and is_short_sha(revision):
            sha = self._peel(revision)
        return sha

    def resolve_or_404(self, revision: str) -> str:
        sha = self.resolve(revision)
        if sha is None:
            raise revision_not_found(self.repo_id, revision)
        return sha

    def refs(self, *, include_prs: bool = False) -> dict[str, list[dict]]:
        groups = {"refs/heads/": "branches", "refs/tags/": "tags", "refs/convert/": "converts"}
        if include_prs:
            groups["refs/pr/"] = "pullRequests"
        out: dict[str, list[dict]] = {g: [] for g in groups.values()}
        lines = self.git.run("for-each-ref", "--format=%(refname)%00%(objectname)%00%(*objectname)%00%(*objecttype)"
                             "%00%(objecttype)", *groups).decode().splitlines()
        for line in lines:
            ref, obj, peeled, peeled_type, obj_type = line.split("\0")
            target, kind = (peeled, peeled_type) if peeled else (obj, obj_type)
            if kind != "commit":
                continue
            for prefix, group in groups.items():
                if ref.startswith(prefix):
                    out[group].append({"name": ref[len(prefix):], "ref": ref, "targetCommit": target})
        return out

    # -- history ------------------------------------------------------------------------------

    def commits(self, sha: str, *, skip: int = 0, limit: int = 100) -> list[CommitInfo]:
        out = self.git.run("log", "-z", "--format=%H%x1f%an%x1f%ct%x1f%B", f"--skip={skip}",
                           f"--max-count={limit}", sha, "--").decode(errors="replace")
        result = []
        for record in filter(None, out.split("\0")):
            h, author, ts, body = record.lstrip("\n").split("\x1f", 3)
            title, _, rest = body.strip("\n").partition("\n")
            result.append(CommitInfo(h, author, int(ts), title, rest.strip("\n")))
        return result

    def commit_time(self, sha: str) -> int:
        return int(self.git.run("log", "-1", "--format=%ct", sha, "--").strip() or 0)

    def commits_touching(self, sha: str, path: str) -> CommitInfo | None:
        """The last commit (from ``sha`` back) that changed ``path``."""
        out = self.git.run("log", "-1", "-z", "--format=%H%x1f%an%x1f%ct%x1f%B", sha, "--", f":(literal){path}")
        records = [r for r in out.decode(errors="replace").split("\0") if r]
        if not records:
            return None
        h, author, ts, body = records[0].lstrip("\n").split("\x1f", 3)
        title, _, rest = body.strip("\n").partition("\n")
        return CommitInfo(h, author, int(ts), title, rest.strip("\n"))

    # -- trees --------------------------------------------------------------------------------

    def _ls_tree(self, treeish: str, prefix: str, *, recursive: bool) -> list[tuple[str, str, str, str, str]]:
        args = ["ls-tree", "-z", "-l"] + (["-r", "-t"] if recursive else []) + [treeish]
        out = self.git.run(*args)
        rows = []
        for record in filter(None, out.split(b"\0")):
            meta, name = record.split(b"\t", 1)
            mode, kind, oid, size = meta.decode().split()
            rows.append((mode, kind, oid, size, prefix + name.decode(errors="surrogateescape")))
        return rows

    def _entries(self, rows: list[tuple[str, str, str, str, str]]) -> list[Entry]:
        candidates = [oid for mode, kind, oid, size, _ in rows
                      if kind == "blob" and size != "-" and int(size) <= MAX_POINTER_BYTES]
        pointers = {}
        for oid, data in self.git.cat_file_batch(sorted(set(candidates))).items():
            parsed = parse_pointer(data)
            if parsed:  # an LFS file even when its object is missing: downloads then fail loudly, never
                pointers[oid] = (parsed, len(data))  # serving the pointer text as the file's content
        entries = []
        for _mode, kind, oid, size, path in rows:
            if kind == "tree":
                entries.append(Entry(path, "directory", oid, 0))
            elif kind == "blob":
                if oid in pointers:
                    (lfs_oid, lfs_size), psize = pointers[oid]
                    entries.append(Entry(path, "file", oid, lfs_size, lfs_oid, psize))
                else:
                    entries.append(Entry(path, "file", oid, int(size)))
            # submodules (commit entries) are not files: skipped
        return entries

    def list_tree(self, sha: str, path: str = "", *, recursive: bool = False) -> list[Entry] | None:
        """Entries under ``path`` (``""``: root) at commit ``sha``; ``None`` if ``path`` is not a folder."""
        if path:
            found = self.lookup(sha, path)
            if found is None or found[1] != "tree":
                return None
            return self._entries(self._ls_tree(found[0], path + "/", recursive=recursive))
        return self._entries(self._ls_tree(f"{sha}^{{tree}}", "", recursive=recursive))

    def files(self, sha: str) -> list[Entry]:
        return [e for e in self.list_tree(sha, recursive=True) or [] if e.kind == "file"]

    def lookup(self, sha: str, path: str) -> tuple[str, str, int] | None:
        """``(object id, type, size)`` of ``path`` at commit ``sha``, or ``None``."""
        out = self.git.run("cat-file", "--batch-check=%(objectname) %(objecttype) %(objectsize)",
                           input=f"{sha}:{path}\n".encode()).decode().split()
        if len(out) != 3 or out[1] not in ("blob", "tree"):
            return None
        return out[0], out[1], int(out[2])

    def entry(self, sha: str, path: str) -> Entry | None:
        found = self.lookup(sha, path)
        if found is None:
            return None
        oid, kind, size = found
        return self._entries([("100644" if kind == "blob" else "040000", kind, oid,
                               str(size) if kind == "blob" else "-", path)])[0]

    def file_entry_or_404(self, sha: str, path: str, revision: str) -> Entry:
        entry = self.entry(sha, path)
        if entry is None or entry.kind != "file":
            raise entry_not_found(self.repo_id, revision, path, sha)
        return entry

    def read_small_file(self, sha: str, path: str, limit: int = 1024 * 1024) -> bytes | None:
        found = self.lookup(sha, path)
        if found is None or found[1] != "blob" or found[2] > limit:
            return None
        return self.git.run("cat-file", "blob", found[0])

    def lfs_patterns(self, sha: str | None) -> list[str]:
        text = self.read_small_file(sha, ".gitattributes") if sha else None
        return lfs_patterns(text.decode(errors="replace")) if text else []

    # -- tags and branches ------------------------------------------------------------------

    def _update_ref(self, ref: str, new: str, old: str, what: str) -> None:
        try:
            self.git.run("update-ref", "-m", what, ref, new, old)
        except GitError as e:
            raise HubHTTPError(409, f"{what} failed (a concurrent change, or a ref that clashes with an existing "
                                    f"one such as 'a' vs 'a/b'): {e}") from None

    def create_tag(self, tag: str, sha: str, message: str | None) -> None:
        if self.tag_target(tag) is not None or self.git.try_run("rev-parse", "-q", "--verify", f"refs/tags/{tag}"):
            raise HubHTTPError(409, f"Tag {tag!r} already exists in {self.repo_id}; tags are immutable "
                                    "(delete it first, or choose a new tag).")
        if self.branch_head(tag) is not None:
            raise HubHTTPError(409, f"{tag!r} is already a branch of {self.repo_id}; a tag of the same name would "
                                    "make the revision ambiguous.")
        target = sha
        if message:
            env = identity_env(self.store.user)
            tagger = f"{env['GIT_COMMITTER_NAME']} <{env['GIT_COMMITTER_EMAIL']}> {env['GIT_COMMITTER_DATE']}"
            body = f"object {sha}\ntype commit\ntag {tag}\ntagger {tagger}\n\n{message.strip()}\n"
            target = self.git.run("mktag", input=body.encode()).decode().strip()
        with self.store.lock_for(self.key):
            self._update_ref(f"refs/tags/{tag}", target, "", f"create tag {tag}")

    def delete_tag(self, tag: str) -> None:
        old = self.git.try_run("rev-parse", "-q", "--verify", f"refs/tags/{tag}")
        if not old:
            raise revision_not_found(self.repo_id, tag)
        with self.store.lock_for(self.key):
            self.git.run("update-ref", "-d", f"refs/tags/{tag}", old.decode().strip())

    def create_branch(self, branch: str, sha: str) -> None:
        if self.branch_head(branch) is not None:
            raise HubHTTPError(409, f"Branch {branch!r} already exists in {self.repo_id}.")
        if self.tag_target(branch) is not None:
            raise HubHTTPError(409, f"{branch!r} is already a tag of {self.repo_id}; a branch of the same name "
                                    "would make the revision ambiguous.")
        with self.store.lock_for(self.key):
            self._update_ref(f"refs/heads/{branch}", sha, "", f"create branch {branch}")

    def delete_branch(self, branch: str) -> None:
        if branch == "main":
            raise HubHTTPError(403, "The default branch 'main' cannot be deleted.")
        head = self.branch_head(branch)
        if head is None:
            raise revision_not_found(self.repo_id, branch)
        with self.store.lock_for(self.key):
            self.git.run("update-ref", "-d", f"refs/heads/{branch}", head)


class RepoStore:
    """All repos under ``root``; opens, creates and deletes them."""

    def __init__(self, root: Path, *, user: str) -> None:
        self.root = Path(root).absolute()  # git runs with cwd set to repo folders: relative paths would break
        self.user = user
        self.root.mkdir(parents=True, exist_ok=True)
        self._tmp = self.root / ".tmp"
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def clean_leftovers(self) -> list[Path]:
        """Remove what a crashed or killed server left behind; call before serving.

        Commit spools (``.git/hub-spool-*``), partial LFS uploads (``.git/lfs/tmp/*.part``),
        half-written settings (``.git/hf-hub.json.*.tmp``) and the store's ``.tmp`` folder are
        never part of a repo's state (every write is renamed into place when complete), so
        deleting them loses nothing acknowledged.

        Returns:
            The paths removed.
        """
        removed: list[Path] = []
        patterns = ("hub-spool-*", "lfs/tmp/*.part", f"{META_FILE}.*.tmp")
        for git_dir in self.root.glob("*s/*/*/.git"):
            for pattern in patterns:
                for leftover in git_dir.glob(pattern):
                    if leftover.is_dir():
                        shutil.rmtree(leftover, ignore_errors=True)
                    else:
                        leftover.unlink(missing_ok=True)
                    removed.append(leftover)
        if self._tmp.is_dir():
            for leftover in self._tmp.iterdir():
                shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)
                removed.append(leftover)
        return removed

    def lock_for(self, key: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(key, threading.Lock())

    def find(self, repo_type: RepoType, repo_id: str) -> Path | None:
        """The folder of the repo named ``repo_id`` in any letter case (as on the Hub, ``Team/TV``
        and ``team/tv`` are one repo), or ``None``."""
        exact = self.root / f"{repo_type}s" / repo_id
        if (exact / ".git" / "HEAD").is_file():
            return exact
        namespace, name = repo_id.split("/")
        for ns_dir in _case_insensitive(self.root / f"{repo_type}s", namespace):
            for repo_dir in _case_insensitive(ns_dir, name):
                if (repo_dir / ".git" / "HEAD").is_file():
                    return repo_dir
        return None

    def path_for(self, repo_type: RepoType, repo_id: str) -> Path:
        """Where the repo is (whatever the case of ``repo_id``), or would be created."""
        return self.find(repo_type, repo_id) or self.root / f"{repo_type}s" / repo_id

    def open(self, repo_type: RepoType, repo_id: str) -> Repo:
        """The repo, named as it was created (its canonical case), or a 404 ``RepoNotFound`` error."""
        path = self.find(repo_type, repo_id)
        if path is None:
            raise repo_not_found(repo_id)
        return Repo(self, repo_type, f"{path.parent.name}/{path.name}", path)

    def open_visible(self, repo_type: RepoType, repo_id: str, caller: Caller) -> Repo:
        """Like :meth:`open`, but private repos are invisible (404) to unauthenticated callers."""
        repo = self.open(repo_type, repo_id)
        if repo.private and not caller.authenticated:
            raise repo_not_found(repo_id)
        return repo

    def create(self, repo_type: RepoType, repo_id: str, *, private: bool) -> Repo:
        """Create a repo with an initial commit holding the default ``.gitattributes`` on ``main``.

        Raises:
            HubHTTPError: 409 if it exists.
        """
        final = self.root / f"{repo_type}s" / repo_id
        if self.find(repo_type, repo_id) is not None or final.exists():
            raise HubHTTPError(
                409, f"You already created this {repo_type} repo: {self._existing_id(repo_type, repo_id)}")
        self._tmp.mkdir(parents=True, exist_ok=True)
        staging = self._tmp / f"create-{uuid.uuid4().hex}"
        try:
            init_repository(staging)
            repo = Repo(self, repo_type, repo_id, staging)
            repo.git.run("config", "core.logAllRefUpdates", "true")
            repo.write_meta(private=bool(private), createdAt=iso(time.time()), repoType=repo_type)
            (blob,) = write_blobs(repo, [DEFAULT_GITATTRIBUTES.encode()])
            tree = write_tree(repo, {".gitattributes": ("100644", blob)})
            first = repo.git.run("commit-tree", tree, input=b"initial commit\n", env=identity_env(self.user))
            repo.git.run("update-ref", "refs/heads/main", first.decode().strip(), "")
            final.parent.mkdir(parents=True, exist_ok=True)
            with self._locks_guard:
                if self.find(repo_type, repo_id) is not None or final.exists():
                    raise HubHTTPError(409, f"You already created this {repo_type} repo: "
                                            f"{self._existing_id(repo_type, repo_id)}")
                os.rename(staging, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        logger.info("created %s repo %s (private=%s)", repo_type, repo_id, private)
        return self.open(repo_type, repo_id)

    def list(self, repo_type: RepoType) -> list[Repo]:
        """Every repo of one type (those deleted meanwhile are skipped)."""
        repos = []
        for head in sorted((self.root / f"{repo_type}s").glob("*/*/.git/HEAD")):
            path = head.parent.parent
            try:
                repos.append(self.open(repo_type, f"{path.parent.name}/{path.name}"))
            except HubHTTPError:
                continue
        return repos

    def _existing_id(self, repo_type: RepoType, repo_id: str) -> str:
        path = self.find(repo_type, repo_id)
        return f"{path.parent.name}/{path.name}" if path is not None else repo_id

    def delete(self, repo_type: RepoType, repo_id: str) -> None:
        repo = self.open(repo_type, repo_id)
        self._tmp.mkdir(parents=True, exist_ok=True)
        trash = self._tmp / f"deleted-{uuid.uuid4().hex}"
        with self.lock_for(repo.key):  # not in the middle of a commit's ref update
            os.rename(repo.path, trash)  # atomic: the repo disappears at once
        shutil.rmtree(trash, ignore_errors=True)
        logger.info("deleted %s repo %s", repo_type, repo_id)


def _case_insensitive(folder: Path, name: str) -> list[Path]:
    """The entries of ``folder`` whose name equals ``name`` ignoring case (ASCII names only)."""
    exact = folder / name
    found = [exact] if exact.is_dir() else []
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return found
    lowered = name.lower()
    return found + [Path(e.path) for e in entries if e.name != name and e.name.lower() == lowered and e.is_dir()]
