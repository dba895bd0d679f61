"""Pointing this process's ``huggingface_hub`` client at an embedded server.

``huggingface_hub`` reads ``HF_HUB_OFFLINE`` and ``HF_HUB_DISABLE_XET`` into module
constants when it is imported, so setting the environment variables later has no effect
in-process. :func:`client_settings` sets the constants for a block and restores them;
:func:`embedded_hub` starts a server in a thread and applies those settings together.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from .app import serve_in_thread

#: constant -> value needed to talk to the embedded server (plain git-LFS, reachable on loopback)
CLIENT_CONSTANTS = {"HF_HUB_OFFLINE": False, "HF_HUB_DISABLE_XET": True}


@contextlib.contextmanager
def client_settings() -> Iterator[None]:
    """Within the block, ``huggingface_hub`` may reach the network and uploads LFS without Xet.

    The previous values (and ``HF_HUB_DISABLE_XET`` in ``os.environ``, which subprocesses
    inherit) are restored on exit, even after an error.
    """
    from huggingface_hub import constants

    saved = {k: getattr(constants, k) for k in CLIENT_CONSTANTS if hasattr(constants, k)}
    saved_env = os.environ.get("HF_HUB_DISABLE_XET")
    try:
        for k in saved:
            setattr(constants, k, CLIENT_CONSTANTS[k])
        os.environ["HF_HUB_DISABLE_XET"] = "1"
        yield
    finally:
        for k, v in saved.items():
            setattr(constants, k, v)
        if saved_env is None:
            os.environ.pop("HF_HUB_DISABLE_XET", None)
        else:
            os.environ["HF_HUB_DISABLE_XET"] = saved_env


@contextlib.contextmanager
def embedded_hub(root: str | os.PathLike, *, token: str | None = None, **options) -> Iterator[str]:
    """Run an embedded Hub on loopback for the block; yields its URL (pass it as ``endpoint=``).

    Example:
        >>> with embedded_hub("outputs/hub") as url:  # doctest: +SKIP
        ...     push_task_vector(tv, "me/sentiment", tag="v1", endpoint=url)
        ...     tv1 = pull_task_vector("me/sentiment", revision="v1", endpoint=url)
    """
    with serve_in_thread(Path(root), token=token, **options) as url, client_settings():
        yield url
