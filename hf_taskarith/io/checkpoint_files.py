"""Which files hold a checkpoint's weights, and their combined header (no torch needed).

A checkpoint is a folder with ``model.safetensors``, sharded ``*.safetensors`` listed by a
``*.safetensors.index.json``, or any set of ``*.safetensors`` files; or one ``.safetensors``
file. :class:`~hf_taskarith.io.checkpoints.Checkpoint` builds on this; the torch-free merge
path (:mod:`hf_taskarith.merging.lite`) uses it directly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import CheckpointNotFoundError, CorruptCheckpointError
from .safetensors_header import StoredTensor, parse_header


def weight_files(path: str | os.PathLike, *, prefix: str | None = None) -> list[Path]:
    """The safetensors files of a checkpoint, in index order (or name order without an index).

    Args:
        path: a checkpoint folder, or a single ``.safetensors`` file.
        prefix: only consider files whose name starts with this (e.g. ``"task_vector"``).

    Raises:
        CheckpointNotFoundError: no safetensors file, or the index names a missing shard.
        CorruptCheckpointError: the index is not valid JSON with a ``weight_map``.
    """
    path = Path(path)
    if path.is_file():
        return [path]
    indexes = sorted(path.glob("*.safetensors.index.json"))
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
            shard_path = path / shard
            if not shard_path.is_file():
                raise CheckpointNotFoundError(
                    f"{index_path} lists shard {shard!r}, which is missing from {path}. "
                    "The download is incomplete; fetch the missing file."
                )
            files.append(shard_path)
        return files
    files = sorted(path.glob("*.safetensors"))
    if prefix:
        files = [p for p in files if p.name.startswith(prefix)]
    if not files:
        found = sorted(p.name for p in path.iterdir())[:20]
        hint = ""
        if any(n.endswith((".bin", ".pt")) for n in found):
            hint = (" Only safetensors are read (pickle files can run code); convert with "
                    "`model.save_pretrained(dir, safe_serialization=True)`.")
        raise CheckpointNotFoundError(f"no safetensors weights in {path} (found: {found}).{hint}")
    return files


def read_checkpoint_headers(path: str | os.PathLike, *, weights_prefix: str | None = None
                            ) -> tuple[dict[str, StoredTensor], dict[str, str]]:
    """Every tensor of a checkpoint (name -> :class:`StoredTensor`), and the merged
    ``__metadata__`` of its files.

    Raises:
        CheckpointNotFoundError: the path does not exist or holds no safetensors file.
        CorruptCheckpointError: a header is malformed, or two shards hold the same tensor.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointNotFoundError(f"checkpoint not found: {path}")
    metadata: dict[str, str] = {}
    tensors: dict[str, StoredTensor] = {}
    for file in weight_files(path, prefix=weights_prefix):
        stored, meta = parse_header(file)
        metadata.update(meta)
        for name, t in stored.items():
            if name in tensors:
                raise CorruptCheckpointError(
                    f"tensor {name!r} is stored twice: in {tensors[name].path.name} and "
                    f"{file.name}. Remove the stale shard."
                )
            tensors[name] = t
    return tensors, metadata
