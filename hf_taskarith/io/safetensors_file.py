"""Reading single safetensors files tensor by tensor, without mmap.

The reader parses the header once, validates every entry against the file size, and
reads one tensor at a time with ``os.pread`` into a fresh buffer (:func:`read_tensor`), or
any flat range of one into a buffer the caller reuses (:class:`RangeReader`). Unlike ``safe_open``
(which memory-maps the file), pages read here are not kept mapped by the process, so the
resident memory of a streaming merge stays at "the tensors in flight" rather than growing
with every file touched.

Note:
    Reading from the page cache costs one memcpy per tensor. Nothing is ever unpickled.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..errors import CorruptCheckpointError
from .safetensors_header import StoredTensor, parse_header, pread_into

#: safetensors dtype codes and their torch dtypes.
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_CODES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo(StoredTensor):
    """Where one tensor lives (file, dtype code, shape, absolute byte range), with its torch dtype."""

    @classmethod
    def of(cls, t: StoredTensor) -> TensorInfo:
        return cls(t.name, t.path, t.code, t.shape, t.start, t.end)

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.code]

    @property
    def is_float(self) -> bool:
        return self.dtype.is_floating_point


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header (see :func:`.safetensors_header.parse_header`).

    Returns:
        ``(tensors, metadata)``: a dict name -> :class:`TensorInfo` in file order, and the
        file's ``__metadata__`` (empty if absent).

    Raises:
        CheckpointNotFoundError: the file does not exist.
        CorruptCheckpointError: the header is malformed or points past the end of the file.
    """
    stored, metadata = parse_header(path)
    return {name: TensorInfo.of(t) for name, t in stored.items()}, metadata


def read_tensor(info: TensorInfo) -> torch.Tensor:
    """Read one tensor's bytes from disk into a new CPU tensor (no mmap, no pickle)."""
    buf = torch.empty(info.nbytes, dtype=torch.uint8)
    if info.nbytes:
        fd = os.open(info.path, os.O_RDONLY)
        try:
            pread_into(fd, memoryview(buf.numpy()).cast("B"), info.start, info)
        finally:
            os.close(fd)
    return buf.view(info.dtype).reshape(info.shape)


class RangeReader:
    """Reads any flat range of one stored tensor's elements, with positional reads.

    Keeps the file open until :meth:`close`; :meth:`read` may be called from several
    threads at once (``os.preadv`` has no shared file position, and releases the GIL).

    Example:
        >>> with RangeReader(ckpt.info("model.embed_tokens.weight")) as r:
        ...     first_rows = r.read(0, 4096, torch.empty(8192, dtype=torch.uint8))
    """

    def __init__(self, info: TensorInfo):
        self.info = info
        self.numel = info.numel
        self.dtype = info.dtype
        self._item = torch.empty((), dtype=info.dtype).element_size()
        self._fd: int | None = os.open(info.path, os.O_RDONLY)

    def read(self, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        """Elements ``start:stop`` (flat), read into the uint8 buffer ``out`` (at least
        ``(stop - start) * itemsize`` bytes); returns a 1-D view of it in the stored dtype."""
        nbytes = (stop - start) * self._item
        buf = out[:nbytes]
        if nbytes:
            if self._fd is None:
                raise ValueError(f"RangeReader for {self.info.name!r} is closed.")
            pread_into(self._fd, memoryview(buf.numpy()).cast("B"), self.info.start + start * self._item, self.info)
        return buf.view(self.dtype)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RangeReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_elements(info: TensorInfo, flat_indices: list[int]) -> torch.Tensor:
    """Read a few elements of a tensor by flat index (used for cheap fingerprints)."""
    item = torch.empty((), dtype=info.dtype).element_size()
    out = torch.empty(len(flat_indices) * item, dtype=torch.uint8)
    view = memoryview(out.numpy()).cast("B")
    with open(info.path, "rb") as f:
        for j, idx in enumerate(flat_indices):
            f.seek(info.start + idx * item)
            data = f.read(item)
            if len(data) != item:
                raise CorruptCheckpointError(f"{info.path}: tensor {info.name!r} is truncated.")
            view[j * item : (j + 1) * item] = data
    return out.view(info.dtype)
