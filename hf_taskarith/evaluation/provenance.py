"""Where a result came from: the code's commit and the software it ran on.

A study's results file is only evidence if it says which code and which releases produced
it (transformers, peft and torch change numerics between releases). :func:`run_record` gives
both, for the studies under ``benchmarks/`` to store beside their config.

Example:
    >>> rec = run_record(".")
    >>> sorted(rec)
    ['commit', 'environment']
    >>> "transformers" in rec["environment"]["packages"]
    True
"""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from typing import Any

#: the distributions whose versions a result records (absent ones are recorded as ``None``)
PACKAGES = ("torch", "transformers", "peft", "accelerate", "datasets", "evaluate", "huggingface_hub", "safetensors",
            "numpy", "hf_taskarith")


def git_commit(path: str | os.PathLike = ".") -> str | None:
    """The commit checked out at ``path`` (``None`` outside a git work tree or without git),
    with ``+dirty`` appended when tracked files differ from it, so an uncommitted run is not
    mistaken for the commit's."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=path).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True, cwd=path).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return f"{head}+dirty" if dirty else head


def short_commit(commit: str | None) -> str:
    """``abc1234`` for a commit recorded by :func:`git_commit` (``abc1234+dirty`` for a run from a
    work tree with uncommitted changes, ``unknown`` for none), as result tables print it."""
    if not commit:
        return "unknown"
    return commit[:7] + ("+dirty" if commit.endswith("+dirty") else "")


def commits_phrase(commits: list[str | None]) -> str:
    """``commit `abc1234` `` or, for results joined or resumed across commits,
    ``commits `abc1234`, `def5678` `` (each as :func:`short_commit` prints it)."""
    commits = list(commits) or [None]
    return ("commit " if len(commits) == 1 else "commits ") + ", ".join(f"`{short_commit(c)}`" for c in commits)


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """``name -> installed version`` (``None`` when a distribution is not installed)."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def environment() -> dict[str, Any]:
    """Python, platform, torch threads and the versions of :data:`PACKAGES`."""
    import torch

    return {"python": platform.python_version(), "platform": platform.platform(), "threads": torch.get_num_threads(),
            "cuda": torch.version.cuda if torch.cuda.is_available() else None, "packages": package_versions()}


def run_record(path: str | os.PathLike = ".") -> dict[str, Any]:
    """``{"commit": ..., "environment": ...}`` for a results file (commit of the work tree at ``path``).

    Note:
        Take it when the run *starts*: the work tree may move on while a long study runs.
    """
    return {"commit": git_commit(path), "environment": environment()}
