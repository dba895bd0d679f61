"""A cheap, stable fingerprint of a model's weights.

The fingerprint is a SHA-256 over the sorted names and shapes of the floating-point
tensors plus a few values sampled at fixed positions of each tensor. Values are rounded
to bfloat16 before hashing, so the same weights held in float32, float16 or bfloat16 give
the same fingerprint, while a different checkpoint (even one fine-tuning step away)
almost surely does not.

Note:
    Cost: a header read plus ``SAMPLES`` element reads per tensor for checkpoints on disk;
    no tensor is loaded in full. It identifies weights, it is not a cryptographic proof
    that every value is equal.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch

from .checkpoints import Checkpoint
from .safetensors_file import read_elements

SAMPLES = 8
FINGERPRINT_VERSION = "fp1"


def _positions(numel: int) -> list[int]:
    if numel <= SAMPLES:
        return list(range(numel))
    step = (numel - 1) / (SAMPLES - 1)
    return sorted({int(round(i * step)) for i in range(SAMPLES)})


def _digest(items: list[tuple[str, tuple[int, ...], torch.Tensor]]) -> str:
    h = hashlib.sha256(FINGERPRINT_VERSION.encode())
    for name, shape, values in sorted(items, key=lambda x: x[0]):
        h.update(name.encode())
        h.update(repr(tuple(shape)).encode())
        rounded = values.detach().to(torch.float32).to(torch.bfloat16).to(torch.float32)
        rounded = torch.where(rounded == 0, torch.zeros_like(rounded), rounded)  # -0.0 == 0.0
        h.update(rounded.numpy().tobytes())
    return f"{FINGERPRINT_VERSION}:{h.hexdigest()[:32]}"


def fingerprint_state_dict(state: Mapping[str, torch.Tensor]) -> str:
    """Fingerprint in-memory tensors (floating-point ones only)."""
    items = []
    for name, t in state.items():
        if not t.is_floating_point():
            continue
        flat = t.detach().reshape(-1)
        idx = torch.tensor(_positions(flat.numel()), dtype=torch.long, device=flat.device)
        items.append((name, tuple(t.shape), flat.index_select(0, idx).cpu()))
    return _digest(items)


def fingerprint_checkpoint(ckpt: Checkpoint) -> str:
    """Fingerprint a checkpoint on disk without loading its tensors."""
    items = []
    for name, info in ckpt.infos().items():
        if not info.is_float:
            continue
        items.append((name, info.shape, read_elements(info, _positions(info.numel))))
    return _digest(items)


def fingerprint_model(model: torch.nn.Module) -> str:
    """Fingerprint an ``nn.Module`` by its de-duplicated floating-point state dict."""
    from ..state import float_state_dict

    return fingerprint_state_dict(float_state_dict(model))
