"""Pulling task vectors by revision, and listing a repo's versions."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from ..errors import CorruptCheckpointError, HubError, NotATaskVectorRepoError
from ..task_vector import CONFIG_NAME, TaskVector

PATTERNS = ["task_vector*", "README.md"]


def pull_task_vector(repo_id: str, *, revision: str | None = None, token: str | None = None,
                     endpoint: str | None = None, cache_dir: str | os.PathLike | None = None) -> TaskVector:
    """Download a task vector at a tag, branch or commit sha.

    The revision is first resolved to a commit sha, and the files are fetched at that sha,
    so a tag or branch that moves during the download cannot mix versions. The sha is
    recorded in ``tv.metadata.extra["hub"]`` (``repo_id``, ``revision``, ``commit_sha``).

    Raises:
        HubError: repo or revision not found, or the Hub refused (message names repo and revision).
        NotATaskVectorRepoError: the revision holds no ``task_vector_config.json``.
        CorruptCheckpointError: a downloaded file is truncated or malformed (named).
    """
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    api = HfApi(endpoint=endpoint, token=token)
    where = f"{repo_id}@{revision or 'main'}"
    try:
        sha = api.repo_info(repo_id, revision=revision).sha
        files = api.list_repo_files(repo_id, revision=sha)
    except RepositoryNotFoundError as e:
        raise HubError(f"{repo_id}: repository not found (or private and the token is missing/wrong).") from e
    except RevisionNotFoundError as e:
        raise HubError(f"{where}: revision not found; list versions with list_task_vector_versions().") from e
    except HfHubHTTPError as e:
        raise HubError(f"{where}: {e}") from e
    if CONFIG_NAME not in files:
        raise NotATaskVectorRepoError(
            f"{where} (commit {sha}) is not a task vector: {CONFIG_NAME} is missing (files: {sorted(files)[:10]})."
        )
    try:
        folder = Path(snapshot_download(repo_id, revision=sha, allow_patterns=PATTERNS, token=token,
                                        endpoint=endpoint, cache_dir=cache_dir))
    except HfHubHTTPError as e:
        raise HubError(f"{where}: download failed: {e}") from e
    try:
        tv = TaskVector.from_pretrained(folder)
    except CorruptCheckpointError as e:
        raise CorruptCheckpointError(f"{where} (commit {sha}): {e}") from e
    tv.metadata.extra = {**tv.metadata.extra, "hub": {"repo_id": repo_id, "revision": revision, "commit_sha": sha}}
    return tv


@dataclass(frozen=True)
class Version:
    """A tag or branch of a task-vector repo."""

    kind: str  # "tag" or "branch"
    name: str
    commit_sha: str
    date: datetime | None
    title: str | None


def list_task_vector_versions(repo_id: str, *, token: str | None = None, endpoint: str | None = None) -> list[Version]:
    """Tags and branches of a repo with their commits and dates, newest first."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(endpoint=endpoint, token=token)
    try:
        refs = api.list_repo_refs(repo_id)
        out = []
        for kind, items in (("tag", refs.tags), ("branch", refs.branches)):
            for ref in items:
                commits = api.list_repo_commits(repo_id, revision=ref.target_commit)
                head = commits[0] if commits else None
                out.append(Version(kind, ref.name, ref.target_commit, head.created_at if head else None,
                                   head.title if head else None))
    except HfHubHTTPError as e:
        raise HubError(f"{repo_id}: could not list versions: {e}") from e
    return sorted(out, key=lambda v: (v.date is None, -(v.date.timestamp() if v.date else 0), v.kind, v.name))


def describe_versions(versions: list[Version]) -> str:
    return json.dumps([{"kind": v.kind, "name": v.name, "commit": v.commit_sha,
                        "date": v.date.isoformat() if v.date else None, "title": v.title} for v in versions], indent=2)
