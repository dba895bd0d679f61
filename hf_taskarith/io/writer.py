"""Streaming, sharded safetensors writing, and all-or-nothing output folders.

Because every output tensor's name, shape and dtype is known before any is computed, the
writer lays out each shard's header up front and then writes tensor bytes straight to their
place on disk as they are produced: a whole tensor, or a tensor piece by piece from several
threads (:class:`RangeWriter`). Memory stays at one tensor (or one piece), not one shard.
Files are written in the standard safetensors layout (readable by ``safetensors.safe_open``
and transformers), with a ``*.safetensors.index.json`` when there is more than one shard.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import MergeConfigError
from .atomic import atomic_output_dir
from .layout import Entry, ShardLayout, create_shard, encode_header, parse_size
from .safetensors_file import DTYPE_CODES
from .safetensors_header import pwrite_all

__all__ = ["TensorSpec", "RangeWriter", "ShardedWriter", "save_tensors", "atomic_output_dir", "parse_size"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TensorSpec:
    """The name, shape and dtype of a tensor that will be written."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def entry(self) -> Entry:
        if self.dtype not in DTYPE_CODES:
            raise MergeConfigError(f"cannot write tensor {self.name!r} of dtype {self.dtype}.")
        return Entry(self.name, tuple(self.shape), DTYPE_CODES[self.dtype])

    @property
    def nbytes(self) -> int:
        return self.entry.nbytes


class _Shard:
    """One output file: its header written up front, tensor bytes written at their offsets."""

    def __init__(self, path: Path, specs: list[TensorSpec], metadata: Mapping[str, str]):
        self.path = path
        self.specs = {s.name: s for s in specs}
        header = encode_header([s.entry for s in specs], metadata)
        self.offsets, self.data_start = header.offsets, header.data_start
        self.order = [s.name for s in specs]
        self.next = 0
        self.fd: int | None = create_shard(path, header)  # full size now: ranges may land in any order

    def check(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> TensorSpec:
        spec = self.specs[name]
        if self.order[self.next] != name:
            raise RuntimeError(f"tensor {name!r} written out of order; expected {self.order[self.next]!r}.")
        if tuple(shape) != spec.shape or dtype != spec.dtype:
            raise RuntimeError(f"tensor {name!r}: planned {list(spec.shape)} {spec.dtype}, "
                               f"got {list(shape)} {dtype}.")
        return spec

    def write_at(self, name: str, byte_offset: int, data: torch.Tensor) -> None:
        """Write ``data``'s bytes at ``byte_offset`` within tensor ``name`` (thread-safe)."""
        if data.numel():
            flat = data.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            pwrite_all(self.fd, memoryview(flat.numpy()), self.data_start + self.offsets[name] + byte_offset)

    def done(self, name: str) -> bool:
        """Mark the next planned tensor complete; True when the shard is complete (and closed)."""
        self.next += 1
        if self.next == len(self.order):
            self.close()
            return True
        return False

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class RangeWriter:
    """Writes one planned tensor in pieces, by flat element range, in any order and from any
    thread; :meth:`close` checks every byte arrived. Get one from :meth:`ShardedWriter.open_range`."""

    def __init__(self, writer: ShardedWriter, shard: _Shard, spec: TensorSpec):
        self._writer, self._shard, self.spec = writer, shard, spec
        self._item = torch.empty((), dtype=spec.dtype).element_size()
        self._written = 0
        self._lock = threading.Lock()

    def write(self, start: int, block: torch.Tensor) -> None:
        """Write ``block`` (1-D, the planned dtype) as elements ``start:start + len(block)``."""
        if block.dtype != self.spec.dtype or start < 0 or (start + block.numel()) * self._item > self.spec.nbytes:
            raise RuntimeError(f"tensor {self.spec.name!r}: cannot write {block.numel()} {block.dtype} elements at "
                               f"{start}; planned {list(self.spec.shape)} {self.spec.dtype}.")
        self._shard.write_at(self.spec.name, start * self._item, block)
        with self._lock:
            self._written += block.numel() * self._item

    def close(self) -> None:
        """Finish the tensor (every element must have been written exactly once)."""
        if self._written != self.spec.nbytes:
            raise RuntimeError(f"tensor {self.spec.name!r}: {self._written} of {self.spec.nbytes} bytes written.")
        self._writer._tensor_done(self.spec.name)


class ShardedWriter:
    """Write tensors, in a fixed planned order, into one or more safetensors shards.

    Args:
        folder: where the files go (usually a temporary folder; see :func:`atomic_output_dir`).
        specs: every tensor to be written, in the order they will be given to :meth:`write`.
        prefix: file stem: ``model`` gives ``model.safetensors`` or
            ``model-00001-of-00003.safetensors`` + ``model.safetensors.index.json``.
        max_shard_size: bytes per shard (``"5GB"``, ``"500MB"``, or an int); a single
            tensor larger than this gets a shard of its own.
        metadata: ``__metadata__`` string pairs stored in every shard.

    Example:
        >>> specs = [TensorSpec("w", (2, 2), torch.float32), TensorSpec("b", (4,), torch.float32)]
        >>> with ShardedWriter(folder, specs) as w:
        ...     w.write("w", torch.zeros(2, 2))
        ...     out = w.open_range("b")      # or piece by piece, in any order
        ...     out.write(2, torch.ones(2)); out.write(0, torch.zeros(2)); out.close()
    """

    def __init__(self, folder: str | os.PathLike, specs: list[TensorSpec], *, prefix: str = "model",
                 max_shard_size: int | str = "5GB", metadata: Mapping[str, str] | None = None):
        self.folder = Path(folder)
        specs_by_name = {s.name: s for s in specs}
        self.layout = ShardLayout([s.entry for s in specs], prefix=prefix, max_shard_size=max_shard_size)
        self.prefix = prefix
        self.files = self.layout.files
        self.weight_map = self.layout.weight_map
        self.total_size = self.layout.total_size
        self._groups = {f: [specs_by_name[e.name] for e in g] for f, g in self.layout.groups.items()}
        self._metadata = dict(metadata or {})
        self._open: dict[str, _Shard] = {}
        self._done: set[str] = set()
        if not specs:  # an empty checkpoint is still a valid file
            _Shard(self.folder / self.files[0], [], self._metadata).close()
            self._done.add(self.files[0])

    def _shard(self, name: str) -> _Shard:
        fname = self.weight_map.get(name)
        if fname is None:
            raise RuntimeError(f"tensor {name!r} was not planned for writing.")
        shard = self._open.get(fname)
        if shard is None:
            shard = self._open[fname] = _Shard(self.folder / fname, self._groups[fname], self._metadata)
        return shard

    def _tensor_done(self, name: str) -> None:
        fname = self.weight_map[name]
        if self._open[fname].done(name):
            del self._open[fname]
            self._done.add(fname)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next planned tensor, whole."""
        shard = self._shard(name)
        shard.check(name, tuple(tensor.shape), tensor.dtype)
        shard.write_at(name, 0, tensor)
        self._tensor_done(name)

    def open_range(self, name: str) -> RangeWriter:
        """Write the next planned tensor in pieces (see :class:`RangeWriter`)."""
        shard = self._shard(name)
        return RangeWriter(self, shard, shard.check(name, shard.specs[name].shape, shard.specs[name].dtype))

    def finish(self) -> None:
        """Check every planned tensor was written, and write the index for multi-shard output."""
        missing = [f for f in self.files if f not in self._done]
        if missing:
            raise RuntimeError(f"shards not completed: {missing}")
        self.layout.write_index(self.folder, self._metadata)

    def close(self) -> None:
        for shard in self._open.values():
            shard.close()
        self._open.clear()

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()
        if exc_type is None:
            self.finish()


def save_tensors(tensors: Mapping[str, torch.Tensor], folder: str | os.PathLike, *, prefix: str = "model",
                 max_shard_size: int | str = "5GB", metadata: Mapping[str, str] | None = None) -> list[str]:
    """Save a dict of tensors as (sharded) safetensors; returns the file names written."""
    specs = [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    with ShardedWriter(folder, specs, prefix=prefix, max_shard_size=max_shard_size, metadata=metadata) as w:
        for k, v in tensors.items():
            w.write(k, v)
    return list(w.files)
