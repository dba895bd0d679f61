"""Reusable scratch buffers for streaming work.

Allocating a fresh 100 MB tensor for every step of a stream costs more than the arithmetic
done in it: each new block is mapped from the OS and page-faulted in. A :class:`Workspace`
keeps one growing buffer per role and hands out views of it, so a streaming loop touches
the same memory tensor after tensor. Views are only valid until the same role is asked for
again.
"""

from __future__ import annotations

import math

import torch


class Workspace:
    """Named scratch buffers, grown on demand and reused.

    Example:
        >>> ws = Workspace()
        >>> acc = ws.take("acc", (4096, 1024), torch.float32)   # a view; contents are garbage
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def raw(self, role: str, nbytes: int) -> torch.Tensor:
        """A uint8 buffer of at least ``nbytes`` (a prefix view of the role's storage)."""
        buf = self._buffers.get(role)
        if buf is None or buf.numel() < nbytes:
            self._buffers.pop(role, None)  # free the old one before growing
            buf = self._buffers[role] = torch.empty(max(nbytes, 1), dtype=torch.uint8)
        return buf[:nbytes]

    def take(self, role: str, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """An uninitialized tensor of ``shape`` and ``dtype`` backed by the role's buffer."""
        item = torch.empty((), dtype=dtype).element_size()
        n = math.prod(shape)
        return self.raw(role, n * item).view(dtype)[:n].view(shape) if n else torch.empty(shape, dtype=dtype)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() for b in self._buffers.values())
