"""Lazy, streaming access to checkpoints: single or sharded safetensors folders and Hub ids.

A :class:`Checkpoint` knows every tensor's name, shape, dtype and location from the
safetensors headers alone, and reads a tensor only when asked. Nothing is loaded up front,
so opening a 100 GB checkpoint costs a few header reads.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import torch

from ..errors import CheckpointNotFoundError
from .checkpoint_files import read_checkpoint_headers
from .safetensors_file import TensorInfo, read_tensor

logger = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")
#: Files fetched when a Hub id is resolved (weights, configs, tokenizer, card).
HUB_PATTERNS = ["*.safetensors", "*.json", "*.txt", "*.model", "*.jinja", "*.md", "*.yml", "*.yaml"]


class Checkpoint:
    """A read-only view of the tensors of one checkpoint folder or file.

    Args:
        path: a folder holding ``model.safetensors``, sharded ``*.safetensors`` with a
            ``*.safetensors.index.json``, or any set of ``*.safetensors`` files; or a single
            ``.safetensors`` file.
        weights_prefix: only consider files whose name starts with this (for example
            ``"task_vector"``); default: every safetensors file in the folder.

    Raises:
        CheckpointNotFoundError: the path does not exist or holds no safetensors file.
        CorruptCheckpointError: a header is malformed, an index names a missing shard, or
            two shards hold the same tensor.

    Note:
        ``pytorch_model.bin`` checkpoints are refused: loading them unpickles arbitrary code.
        Convert them once with ``transformers`` (``save_pretrained(safe_serialization=True)``).
    """

    def __init__(self, path: str | os.PathLike, *, weights_prefix: str | None = None):
        self.path = Path(path)
        if not self.path.exists():
            raise CheckpointNotFoundError(f"checkpoint not found: {self.path}")
        stored, self.metadata = read_checkpoint_headers(self.path, weights_prefix=weights_prefix)
        self._infos: dict[str, TensorInfo] = {
            name: TensorInfo.of(t) for name, t in stored.items()}

    # -- mapping-like interface -------------------------------------------------------
    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def __iter__(self) -> Iterator[str]:
        return iter(self._infos)

    def __len__(self) -> int:
        return len(self._infos)

    def keys(self) -> list[str]:
        return list(self._infos)

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise KeyError(f"tensor {name!r} is not in checkpoint {self.path}") from None

    def infos(self) -> dict[str, TensorInfo]:
        return dict(self._infos)

    def get_tensor(self, name: str) -> torch.Tensor:
        """Read one tensor from disk (a new CPU tensor each call)."""
        return read_tensor(self.info(name))

    @property
    def folder(self) -> Path:
        return self.path if self.path.is_dir() else self.path.parent

    def config(self) -> dict | None:
        """The folder's ``config.json`` as a dict, or ``None`` if absent."""
        cfg = self.folder / "config.json"
        return json.loads(cfg.read_text()) if cfg.is_file() else None

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, tensors={len(self)})"


def resolve_checkpoint_path(ref: str | os.PathLike, *, revision: str | None = None) -> Path:
    """Turn a local path or a Hub model id into a local folder.

    Local paths win. A string that is not an existing path and looks like a Hub id
    (``org/name``) is fetched with ``huggingface_hub.snapshot_download`` (safetensors,
    JSON and tokenizer files only), honouring ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE``.

    Raises:
        CheckpointNotFoundError: not a local path, and the Hub download failed (the
            message carries the Hub's reason).
    """
    path = Path(ref)
    if path.exists():
        return path
    ref = str(ref)
    if not _HUB_ID.match(ref) or ref.startswith((".", "/")):
        raise CheckpointNotFoundError(
            f"{ref!r} is not an existing path and not a valid Hub model id (expected 'org/name')."
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(ref, revision=revision, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # the hub raises many types (offline, 404, auth); report them all
        raise CheckpointNotFoundError(
            f"{ref!r} is not a local folder, and fetching it from the Hub "
            f"(revision={revision!r}) failed: {type(e).__name__}: {e}"
        ) from e


def open_checkpoint(ref: str | os.PathLike, *, revision: str | None = None) -> Checkpoint:
    """Open a local folder/file or Hub model id as a lazy :class:`Checkpoint`."""
    return Checkpoint(resolve_checkpoint_path(ref, revision=revision))
