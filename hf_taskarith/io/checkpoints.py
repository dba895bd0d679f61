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

from ..errors import CheckpointNotFoundError, CorruptCheckpointError
from .safetensors_file import TensorInfo, read_header, read_tensor

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
        self.metadata: dict[str, str] = {}
        self._infos: dict[str, TensorInfo] = {}
        for file in self._weight_files(weights_prefix):
            infos, meta = read_header(file)
            self.metadata.update(meta)
            for name, info in infos.items():
                if name in self._infos:
                    raise CorruptCheckpointError(
                        f"tensor {name!r} is stored twice: in {self._infos[name].path.name} and "
                        f"{file.name}. Remove the stale shard."
                    )
                self._infos[name] = info

    def _weight_files(self, prefix: str | None) -> list[Path]:
        if self.path.is_file():
            return [self.path]
        indexes = sorted(self.path.glob("*.safetensors.index.json"))
        if prefix:
            indexes = [p for p in indexes if p.name.startswith(prefix)]
        if indexes:
            index_path = indexes[0]
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CorruptCheckpointError(f"{index_path}: not a valid safetensors index ({e!r}).") from None
            files = []
            for shard in dict.fromkeys(weight_map.values()):
                shard_path = self.path / shard
                if not shard_path.is_file():
                    raise CheckpointNotFoundError(
                        f"{index_path} lists shard {shard!r}, which is missing from {self.path}. "
                        "The download is incomplete; fetch the missing file."
                    )
                files.append(shard_path)
            return files
        files = sorted(self.path.glob("*.safetensors"))
        if prefix:
            files = [p for p in files if p.name.startswith(prefix)]
        if not files:
            found = sorted(p.name for p in self.path.iterdir())[:20]
            hint = ""
            if any(n.endswith(".bin") or n.endswith(".pt") for n in found):
                hint = (" Only safetensors are read (pickle files can run code); convert with "
                        "`model.save_pretrained(dir, safe_serialization=True)`.")
            raise CheckpointNotFoundError(
                f"no safetensors weights in {self.path} (found: {found}).{hint}"
            )
        return files

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
