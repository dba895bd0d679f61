"""Pushing a task vector to a Hub repo as one commit, optionally tagged or on a branch."""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ConcurrentPushError, HubError
from .network import network_errors

if TYPE_CHECKING:
    from ..task_vector import TaskVector

logger = logging.getLogger(__name__)

#: files owned by a task-vector repo; stale ones from an earlier version are deleted in the same commit
_OWNED = ("task_vector", "README.md")


@dataclass(frozen=True)
class PushResult:
    """Where a push landed."""

    repo_id: str
    commit_sha: str
    commit_url: str
    branch: str
    tag: str | None
    pr_url: str | None = None

    @property
    def revision(self) -> str:
        """The most stable name of what was pushed: the tag if any, else the commit sha."""
        return self.tag or self.commit_sha


def push_task_vector(tv: TaskVector, repo_id: str, *, tag: str | None = None, branch: str | None = None,
                     commit_message: str | None = None, private: bool = False, create_pr: bool = False,
                     token: str | None = None, endpoint: str | None = None, parent_commit: str | None = None,
                     tag_message: str | None = None, license: str = "apache-2.0",
                     max_shard_size: int | str = "5GB") -> PushResult:
    """Push a task vector (safetensors + JSON config + model card) in **one commit**.

    Args:
        tv: the task vector.
        repo_id: ``org/name``; created (as a model repo) if missing.
        tag: tag the new commit (e.g. ``"v1"``); refused up front if the tag exists.
        branch: push to this branch (created from ``main`` if missing); default ``main``.
        commit_message: default ``"Upload task vector"`` (+ tag).
        private: visibility when the repo is created.
        create_pr: open a pull request instead of committing to the branch.
        token, endpoint: passed to ``huggingface_hub.HfApi`` (``HF_ENDPOINT`` / ``HF_TOKEN`` by default).
        parent_commit: the commit you expect the branch to be at. Default: the head read just
            before pushing, so a push that lands in between makes this one fail rather than
            silently overwrite it.

    Returns:
        :class:`PushResult` with the commit sha (use it, or the tag, as ``revision=`` to pull).

    Raises:
        ConcurrentPushError: the branch moved since ``parent_commit`` (nothing was changed;
            pull, re-apply your change and push again).
        HubError: the tag already exists, or the Hub refused the request (message included).
    """
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint, token=token)
    target = branch or "main"
    with network_errors(f"{repo_id}@{target}: push", endpoint):
        return _push(api, tv, repo_id, target=target, tag=tag, branch=branch, commit_message=commit_message,
                     private=private, create_pr=create_pr, parent_commit=parent_commit, tag_message=tag_message,
                     license=license, max_shard_size=max_shard_size)


def _push(api, tv: TaskVector, repo_id: str, *, target: str, tag: str | None, branch: str | None,
          commit_message: str | None, private: bool, create_pr: bool, parent_commit: str | None,
          tag_message: str | None, license: str, max_shard_size: int | str) -> PushResult:
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete
    from huggingface_hub.errors import HfHubHTTPError, RevisionNotFoundError

    from .card import render_task_vector_card

    try:
        # a bare name ("reviews") is created under the token's namespace; go on with the full id
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        refs = api.list_repo_refs(repo_id)
        if tag and any(t.name == tag for t in refs.tags):
            raise HubError(f"{repo_id}: tag {tag!r} already exists; choose a new tag (tags are immutable versions).")
        if branch and not any(b.name == branch for b in refs.branches):
            api.create_branch(repo_id, branch=branch, exist_ok=True)
        try:
            head = api.repo_info(repo_id, revision=target).sha
        except RevisionNotFoundError:
            head = None
        parent = parent_commit or head
        existing = set(api.list_repo_files(repo_id, revision=parent)) if parent else set()
    except HfHubHTTPError as e:
        raise HubError(f"{repo_id}: could not prepare the push to {target!r}: {e}") from e

    message = commit_message or (f"Upload task vector {tag}" if tag else "Upload task vector")
    with tempfile.TemporaryDirectory(prefix="tv-push-") as tmp:
        folder = Path(tmp) / "tv"
        tv.save_pretrained(folder, max_shard_size=max_shard_size)
        (folder / "README.md").write_text(render_task_vector_card(tv, repo_id=repo_id, revision=tag, license=license))
        new_files = sorted(p.name for p in folder.iterdir())
        ops: list[CommitOperationAdd | CommitOperationDelete] = [
            CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name)) for name in new_files]
        stale = sorted(f for f in existing if f.startswith(_OWNED) and f not in new_files)
        ops += [CommitOperationDelete(path_in_repo=f) for f in stale]
        try:
            info = api.create_commit(repo_id, operations=ops, commit_message=message, revision=target,
                                     create_pr=create_pr, parent_commit=parent)
        except HfHubHTTPError as e:
            status = getattr(getattr(e, "response", None), "status_code", None)
            if status in (409, 412):
                raise ConcurrentPushError(
                    f"{repo_id}@{target}: the branch moved since commit {parent} (another push landed first). "
                    "Nothing was overwritten; pull the latest version and push again."
                ) from e
            raise HubError(f"{repo_id}@{target}: commit refused: {e}") from e
    sha = info.oid
    if tag:
        try:
            with network_errors(f"{repo_id}: pushed commit {sha} but tagging it {tag!r} failed", api.endpoint):
                api.create_tag(repo_id, tag=tag, revision=sha, tag_message=tag_message or message)
        except HfHubHTTPError as e:
            raise HubError(f"{repo_id}: pushed commit {sha} but tagging it {tag!r} failed: {e}") from e
    logger.info("pushed task vector to %s@%s (commit %s%s)", repo_id, target, sha, f", tag {tag}" if tag else "")
    return PushResult(repo_id, sha, info.commit_url, target, tag, getattr(info, "pr_url", None))
