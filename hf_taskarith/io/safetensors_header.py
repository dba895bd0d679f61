"""The safetensors file format without torch: dtype codes, header parsing and validation.

Everything here works on bytes and safetensors dtype codes (``"BF16"``, ``"F32"``, ...), so
it serves both the torch reader (:mod:`.safetensors_file`) and the torch-free merge path
(:mod:`hf_taskarith.merging.lite`), which must not pay for importing torch.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointNotFoundError, CorruptCheckpointError

#: bytes per element of each safetensors dtype code we read and write
ITEMSIZE: dict[str, int] = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2,
                            "I8": 1, "U8": 1, "BOOL": 1}
FLOAT_CODES = frozenset({"F64", "F32", "F16", "BF16"})
MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor lives in a safetensors file: dtype code, shape, absolute byte range."""

    name: str
    path: Path
    code: str
    shape: tuple[int, ...]
    start: int  # absolute offset in the file
    end: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def parse_header(path: str | os.PathLike) -> tuple[dict[str, StoredTensor], dict[str, str]]:
    """Parse and validate a safetensors header.

    Args:
        path: the ``.safetensors`` file.

    Returns:
        ``(tensors, metadata)``: name -> :class:`StoredTensor` in file order, and the file's
        ``__metadata__`` (empty if absent).

    Raises:
        CheckpointNotFoundError: the file does not exist.
        CorruptCheckpointError: the header is malformed or points past the end of the file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"safetensors file not found: {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CorruptCheckpointError(
                f"{path}: file is {size} bytes, too short to be safetensors (needs an 8-byte "
                "header length). The file is truncated or not a safetensors file."
            )
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or 8 + n > size:
            raise CorruptCheckpointError(
                f"{path}: header claims {n} bytes but the file has {size} bytes in all. "
                "The file is truncated or not a safetensors file; download or save it again."
            )
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptCheckpointError(f"{path}: header is not valid JSON ({e}).") from None
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"{path}: header is a {type(header).__name__}, expected an object.")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    tensors: dict[str, StoredTensor] = {}
    for name, entry in header.items():
        try:
            code, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            shape = tuple(int(s) for s in shape)
            begin, end = int(begin), int(end)
        except (KeyError, TypeError, ValueError):
            raise CorruptCheckpointError(
                f"{path}: header entry for tensor {name!r} is malformed: {entry!r}; expected "
                "{'dtype': ..., 'shape': [...], 'data_offsets': [begin, end]}."
            ) from None
        if code not in ITEMSIZE:
            raise CorruptCheckpointError(
                f"{path}: tensor {name!r} has dtype {code!r}; supported: {sorted(ITEMSIZE)}."
            )
        t = StoredTensor(name, path, code, shape, data_start + begin, data_start + end)
        expected = t.numel * ITEMSIZE[code]
        if t.nbytes != expected or begin < 0:
            raise CorruptCheckpointError(
                f"{path}: tensor {name!r} spans {t.nbytes} bytes but shape {list(shape)} "
                f"of {code} needs {expected}."
            )
        if t.end > size:
            raise CorruptCheckpointError(
                f"{path}: tensor {name!r} ends at byte {t.end} but the file has {size} bytes. "
                "The file is truncated; download or save it again."
            )
        tensors[name] = t
    ordered = dict(sorted(tensors.items(), key=lambda kv: kv[1].start))
    return ordered, dict(metadata)


def pread_into(fd: int, view: memoryview, offset: int, tensor: StoredTensor) -> None:
    """Fill ``view`` from ``fd`` at ``offset`` (bytes of ``tensor``), or raise naming the file."""
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n <= 0:
            raise CorruptCheckpointError(
                f"{tensor.path}: tensor {tensor.name!r} could not be read in full (got {got} of "
                f"{len(view)} bytes at offset {offset}); the file changed or is truncated."
            )
        got += n


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    """Write all of ``data`` to ``fd`` at ``offset`` (``os.pwrite`` may write less per call)."""
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)
