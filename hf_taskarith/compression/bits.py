"""Packing boolean tensors into bytes (8 per byte, little-endian bit order)."""

from __future__ import annotations

import torch

_SHIFTS = torch.arange(8, dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Flatten a bool tensor and pack it into ``ceil(n / 8)`` uint8 values."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8) << _SHIFTS).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``n`` bits as a flat bool tensor."""
    bits = (packed.reshape(-1, 1) >> _SHIFTS) & 1
    return bits.reshape(-1)[:n].to(torch.bool)
