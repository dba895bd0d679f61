"""The on-disk layout of a sharded safetensors output, decided before any byte is written.

Given every output tensor's name, shape and dtype code in order, :class:`ShardLayout` groups
them into shards of at most ``max_shard_size`` bytes, names the files
(``model.safetensors`` or ``model-0000i-of-0000n.safetensors``), encodes each shard's
header with every tensor's byte offsets, and writes the ``*.safetensors.index.json``. It
needs no torch: the streaming writer (:mod:`.writer`) and the torch-free merge path
(:mod:`hf_taskarith.merging.lite`) share it, so both produce byte-identical files.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import MergeConfigError
from .safetensors_header import ITEMSIZE, pwrite_all

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Parse ``"500MB"``, ``"2GiB"`` or an int number of bytes."""
    if isinstance(size, int):
        value = size
    else:
        m = _SIZE.match(str(size))
        if not m:
            raise MergeConfigError(f"cannot parse size {size!r}; expected e.g. 500MB, 5GB, 2GiB or bytes.")
        value = int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])
    if value <= 0:
        raise MergeConfigError(f"shard size must be positive, got {size!r}.")
    return value


@dataclass(frozen=True)
class Entry:
    """One tensor to be written: name, shape and safetensors dtype code."""

    name: str
    shape: tuple[int, ...]
    code: str

    @property
    def nbytes(self) -> int:
        n = ITEMSIZE[self.code]
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class ShardHeader:
    """One shard's encoded header: ``raw`` (length prefix included) and where data starts."""

    raw: bytes
    offsets: dict[str, int]  # tensor name -> byte offset from data_start
    data_start: int
    data_size: int


def encode_header(entries: Sequence[Entry], metadata: Mapping[str, str]) -> ShardHeader:
    """The header of a shard holding ``entries`` back to back, in order."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offsets: dict[str, int] = {}
    offset = 0
    for e in entries:
        if e.code not in ITEMSIZE:
            raise MergeConfigError(f"cannot write tensor {e.name!r} of dtype {e.code}.")
        header[e.name] = {"dtype": e.code, "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offsets[e.name] = offset
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return ShardHeader(struct.pack("<Q", len(raw)) + raw, offsets, 8 + len(raw), offset)


def create_shard(path: str | Path, header: ShardHeader) -> int:
    """Create a shard file at full size with its header written; returns its open fd
    (write-only). Tensor bytes then go to ``header.data_start + offset`` in any order."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        pwrite_all(fd, header.raw, 0)
        os.ftruncate(fd, header.data_start + header.data_size)
    except BaseException:
        os.close(fd)
        raise
    return fd


class ShardLayout:
    """Which tensors go in which file.

    Args:
        entries: every tensor, in writing order.
        prefix: file stem (``model`` gives ``model.safetensors`` or ``model-00001-of-00003.safetensors``).
        max_shard_size: bytes per shard (``"5GB"``, ``"500MB"`` or an int); a tensor larger
            than this gets a shard of its own.
    """

    def __init__(self, entries: Sequence[Entry], *, prefix: str = "model", max_shard_size: int | str = "5GB"):
        limit = parse_size(max_shard_size)
        groups: list[list[Entry]] = [[]]
        size = 0
        for e in entries:
            if groups[-1] and size + e.nbytes > limit:
                groups.append([])
                size = 0
            groups[-1].append(e)
            size += e.nbytes
        groups = [g for g in groups if g] or [[]]
        n = len(groups)
        self.prefix = prefix
        self.files: list[str] = ([f"{prefix}.safetensors"] if n == 1 else
                                 [f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
        self.groups: dict[str, list[Entry]] = dict(zip(self.files, groups))
        self.weight_map: dict[str, str] = {e.name: f for f, g in self.groups.items() for e in g}
        self.total_size = sum(e.nbytes for e in entries)

    def write_index(self, folder: str | Path, metadata: Mapping[str, str]) -> None:
        """Write ``{prefix}.safetensors.index.json`` (only for more than one shard)."""
        if len(self.files) > 1:
            index = {"metadata": {"total_size": self.total_size, **metadata}, "weight_map": self.weight_map}
            (Path(folder) / f"{self.prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2))
