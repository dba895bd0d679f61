"""An embedded, Hub-compatible HTTP server backed by real git repositories.

The stock ``huggingface_hub`` client can create repos in it, commit (regular and LFS files),
tag, branch, list refs, commits and trees, and download by revision; each repo is a git
repository at ``<root>/models/<namespace>/<name>`` that ``git clone`` and read-only mirrors
(olah) can read. Run it with ``hf-taskarith hub serve --root DIR`` and point clients at it with
``HF_ENDPOINT=http://127.0.0.1:PORT`` and ``HF_HUB_DISABLE_XET=1``; see ``docs/hub_server.md``.

Nothing else in the library imports this package.
"""

from __future__ import annotations

from .app import HubServer, serve_in_thread
from .config import HubServerConfig
from .session import client_settings, embedded_hub

__all__ = ["HubServer", "HubServerConfig", "serve_in_thread", "embedded_hub", "client_settings"]
