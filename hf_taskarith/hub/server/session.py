"""Pointing this process's ``huggingface_hub`` client at an embedded server.

``huggingface_hub`` reads ``HF_HUB_OFFLINE`` and ``HF_HUB_DISABLE_XET`` into module
constants when it is imported, so setting the environment variables later has no effect
in-process. :func:`client_settings` sets the constants for a block and restores them;
:func:`embedded_hub` starts a server in a thread and applies those settings together.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

from .app import serve_in_thread

#: constant -> value needed to talk to the embedded server (plain git-LFS, reachable on loopback)
CLIENT_CONSTANTS = {"HF_HUB_OFFLINE": False, "HF_HUB_DISABLE_XET": True}


@contextlib.contextmanager
def client_settings(token: str | None = None) -> Iterator[None]:
    """Within the block, ``huggingface_hub`` may reach the network and uploads LFS without Xet
    (and, with ``token``, sends it: ``HF_TOKEN`` is set for the block).

    The previous values (and the variables in ``os.environ``, which subprocesses inherit) are
    restored on exit, even after an error.
    """
    from huggingface_hub import constants

    saved = {k: getattr(constants, k) for k in CLIENT_CONSTANTS if hasattr(constants, k)}
    env = {"HF_HUB_DISABLE_XET": "1", **({"HF_TOKEN": token} if token else {})}
    saved_env = {k: os.environ.get(k) for k in env}
    try:
        for k in saved:
            setattr(constants, k, CLIENT_CONSTANTS[k])
        os.environ.update(env)
        yield
    finally:
        for k, v in saved.items():
            setattr(constants, k, v)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def embedded_hub(root: str | os.PathLike, *, token: str | None = None, no_auth: bool = False,
                 **options) -> Iterator[str]:
    """Run an embedded Hub on loopback for the block; yields its URL (pass it as ``endpoint=``).

    The server requires a token (``token``, or a random one drawn here), and this process's
    ``huggingface_hub`` client sends it within the block (``HF_TOKEN``); ``no_auth=True`` runs it
    open instead (any local caller, including web pages, may write).

    Example:
        >>> with embedded_hub("outputs/hub") as url:  # doctest: +SKIP
        ...     push_task_vector(tv, "me/sentiment", tag="v1", endpoint=url)
        ...     tv1 = pull_task_vector("me/sentiment", revision="v1", endpoint=url)
    """
    if token is None and not no_auth:
        token = secrets.token_urlsafe(32)
    with serve_in_thread(Path(root), token=token, no_auth=no_auth, **options) as url, client_settings(token):
        yield url
