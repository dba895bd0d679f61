"""Pulling task vectors by revision, and listing a repo's versions."""

from __future__ import annotations

import fnmatch
import json
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import CheckpointNotFoundError, HubError, NotATaskVectorRepoError, TaskArithError
from ..task_vector import CONFIG_NAME, WEIGHTS_PREFIX, TaskVector
from .network import network_error_cause, network_errors
from .verify import verify_file

if TYPE_CHECKING:
    import torch

PATTERNS = ["task_vector*", "README.md"]


def _wanted(path: str) -> bool:
    """Files of a task vector (top level only), as :data:`PATTERNS` select them."""
    return "/" not in path and any(fnmatch.fnmatchcase(path, p) for p in PATTERNS)


def pull_task_vector(repo_id: str, *, revision: str | None = None, token: str | None = None,
                     endpoint: str | None = None, cache_dir: str | os.PathLike | None = None,
                     dtype: torch.dtype | None = None) -> TaskVector:
    """Download a task vector at a tag, branch or commit sha, and check what was downloaded.

    The revision is first resolved to a commit sha, and the files are fetched at that sha,
    so a tag or branch that moves during the download cannot mix versions. The sha is
    recorded in ``tv.metadata.extra["hub"]`` (``repo_id``, ``revision``, ``commit_sha``).
    ``dtype`` converts tensors on access, as for :meth:`TaskVector.from_pretrained`.
    Each downloaded file is checked against the repo's listing (size, and the sha256 of LFS
    files or the git blob id of small files) before it is opened.

    Raises:
        HubError: repo or revision not found, the Hub refused or failed, or the endpoint cannot
            be reached (offline mode, no server); messages name repo, revision, file and endpoint.
        NotATaskVectorRepoError: the revision holds no ``task_vector_config.json``.
        CheckpointNotFoundError: the config is there but weights (or a shard) are missing.
        CorruptCheckpointError: a downloaded file differs from the listing (it is removed from
            the cache), or is truncated or malformed.
        TaskArithError: the config is not valid task-vector metadata.
        Every message starts with ``repo_id@revision (commit <sha>)`` and names the file.

    Note:
        Hashing reads every file once more (about 1 s per GB); it also runs when the files
        come from the cache, so a cache damaged since the download is caught too.

    Example:
        >>> tv = pull_task_vector("team/tv-sentiment", revision="v1")  # doctest: +SKIP
        >>> tv.metadata.extra["hub"]["commit_sha"]  # doctest: +SKIP
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError
    from huggingface_hub.hf_api import RepoFile

    api = HfApi(endpoint=endpoint, token=token)
    where = f"{repo_id}@{revision or 'main'}"
    with network_errors(where, endpoint):
        try:
            sha = api.repo_info(repo_id, revision=revision).sha
            if sha is None:
                raise HubError(f"{where}: the Hub returned no commit sha for this revision, so the files cannot be "
                               "pinned to one commit; check the endpoint (it must be a Hub-compatible server).")
            listing = {f.path: f for f in api.list_repo_tree(repo_id, revision=sha, recursive=True)
                       if isinstance(f, RepoFile)}
        except RepositoryNotFoundError as e:
            raise HubError(f"{repo_id}: repository not found (or private and the token is missing/wrong).") from e
        except RevisionNotFoundError as e:
            raise HubError(f"{where}: revision not found; list versions with list_task_vector_versions().") from e
        except HfHubHTTPError as e:
            raise HubError(f"{where}: {e}") from e
    at = f"{where} (commit {sha})"
    if CONFIG_NAME not in listing:
        raise NotATaskVectorRepoError(
            f"{at} is not a task vector: {CONFIG_NAME} is missing (files: {sorted(listing)[:10]})."
        )
    names = sorted(p for p in listing if _wanted(p))
    if not any(n.startswith(WEIGHTS_PREFIX) and n.endswith(".safetensors") for n in names):
        raise CheckpointNotFoundError(
            f"{at}: file {WEIGHTS_PREFIX}.safetensors is missing: the revision has {CONFIG_NAME} but no "
            f"{WEIGHTS_PREFIX}*.safetensors weights (files: {sorted(listing)[:10]}). The push that made it was "
            "incomplete; push the task vector again, or pull another revision."
        )
    folder = Path()  # names holds at least the weights file (checked above): the loop sets it
    for name in names:
        local = _download(repo_id, name, sha=sha, at=at, token=token, endpoint=endpoint, cache_dir=cache_dir)
        verify_file(local, listing[name], where=at)
        folder = Path(local).parent
    try:
        tv = TaskVector.from_folder(folder, dtype=dtype, config_label=f"{at}, file {CONFIG_NAME!r}")
    except TaskArithError as e:
        message = str(e)
        if not message.startswith(at):
            named = next((n for n in sorted(names, key=len, reverse=True) if n in message), None)
            message = f"{at}" + (f", file {named!r}" if named else "") + f": {message}"
        raise _same_type(e, message) from e
    tv.metadata.extra = {**tv.metadata.extra, "hub": {"repo_id": repo_id, "revision": revision, "commit_sha": sha}}
    return tv


def _download(repo_id: str, name: str, *, sha: str, at: str, token: str | None, endpoint: str | None,
              cache_dir: str | os.PathLike | None) -> str:
    """``hf_hub_download`` of one file at a commit, with errors that name repo, revision and file."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError

    what = f"{at}, file {name!r}"
    with network_errors(what, endpoint):
        try:
            return hf_hub_download(repo_id, name, revision=sha, token=token, endpoint=endpoint,
                                   cache_dir=None if cache_dir is None else os.fspath(cache_dir))
        except HfHubHTTPError as e:
            if isinstance(e, EntryNotFoundError):
                raise CheckpointNotFoundError(f"{what} is listed but the Hub answers 'not found': {e}") from e
            raise _http_failure(what, e) from e
        except EntryNotFoundError as e:  # LocalEntryNotFoundError: the metadata request failed, cause chained
            if network_error_cause(e) is not None:
                raise
            cause = e.__cause__
            if isinstance(cause, HfHubHTTPError):
                raise _http_failure(what, cause) from e
            raise HubError(f"{what}: download failed: {e}") from e


def _http_failure(what: str, error) -> HubError:
    status = getattr(getattr(error, "response", None), "status_code", None)
    server = getattr(error, "server_message", None) or str(error)
    return HubError(f"{what}: download failed (HTTP {status}): {server}")


def _same_type(error: TaskArithError, message: str) -> TaskArithError:
    """``error``'s class with a new message (every class of hf_taskarith.errors takes one)."""
    try:
        return type(error)(message)
    except TypeError:
        return TaskArithError(message)


@dataclass(frozen=True)
class Version:
    """A tag or branch of a task-vector repo."""

    kind: str  # "tag" or "branch"
    name: str
    commit_sha: str
    date: datetime | None
    title: str | None


def list_task_vector_versions(repo_id: str, *, token: str | None = None, endpoint: str | None = None) -> list[Version]:
    """Tags and branches of a repo with their commits and dates, newest first.

    Commit dates have one-second resolution; where they tie, a commit that descends from another
    (a later push on the same history) comes first, so ``v1``, ``v2``, ``v10`` pushed within one
    second list as ``v10, v2, v1``. Unrelated commits with the same date are ordered branches
    first, then by name.

    Raises:
        HubError: the repo is missing, the Hub refused, or the endpoint cannot be reached.

    Note:
        One ``list_repo_commits`` request per branch (the full history, paged by 100), plus one per
        tag that is not on any branch.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    api = HfApi(endpoint=endpoint, token=token)
    history: dict[str, tuple[datetime | None, str | None, int]] = {}  # sha -> (date, title, ancestors)

    def learn(sha: str) -> None:
        if sha in history:
            return
        commits = api.list_repo_commits(repo_id, revision=sha)  # newest first, back to the root
        for i, c in enumerate(commits):
            if c.commit_id in history:
                break  # the rest is known from another ref
            history[c.commit_id] = (c.created_at, c.title, len(commits) - 1 - i)
        history.setdefault(sha, (None, None, -1))

    with network_errors(f"{repo_id}: listing versions", endpoint):
        try:
            refs = api.list_repo_refs(repo_id)
            pairs = [("branch", r) for r in refs.branches] + [("tag", r) for r in refs.tags]
            for _, ref in pairs:  # branches first: their histories usually cover the tags
                learn(ref.target_commit)
        except RepositoryNotFoundError as e:
            raise HubError(f"{repo_id}: repository not found (or private and the token is missing/wrong).") from e
        except HfHubHTTPError as e:
            raise HubError(f"{repo_id}: could not list versions: {e}") from e
    out = []
    for kind, ref in pairs:
        date, title, _ = history[ref.target_commit]
        out.append(Version(kind, ref.name, ref.target_commit, date, title))

    def key(v: Version):
        depth = history[v.commit_sha][2]
        return (v.date is None, -(v.date.timestamp() if v.date else 0), -depth, v.kind, v.name)

    return sorted(out, key=key)


def describe_versions(versions: list[Version]) -> str:
    return json.dumps([{"kind": v.kind, "name": v.name, "commit": v.commit_sha,
                        "date": v.date.isoformat() if v.date else None, "title": v.title} for v in versions], indent=2)
