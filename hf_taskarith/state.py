"""Helpers that turn models into plain name -> tensor dicts the rest of the library uses."""

from __future__ import annotations

from collections.abc import Mapping

import torch


def dedupe_tied(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop names whose tensor shares storage with an earlier name (tied weights).

    The first name in state-dict order is kept, which matches what transformers'
    ``save_pretrained`` writes for tied embeddings (``lm_head.weight`` is dropped in favour
    of the input embedding that precedes it).
    """
    seen: set[tuple[int, int, tuple[int, ...], tuple[int, ...]]] = set()
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        local = t.to_local() if hasattr(t, "to_local") else t  # a sharded DTensor (FSDP2): its shard's storage
        key = (local.untyped_storage().data_ptr(), local.storage_offset(), tuple(t.shape), tuple(local.stride()))
        if local.numel() and key in seen:
            continue
        seen.add(key)
        out[name] = t
    return out


def float_state_dict(model_or_state: torch.nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Floating-point tensors of a model or state dict, tied weights counted once.

    Non-float tensors (position ids, integer buffers, masks) are skipped: they are not
    trained, so they carry no task information.
    """
    state = model_or_state.state_dict() if isinstance(model_or_state, torch.nn.Module) else model_or_state
    return {k: v for k, v in dedupe_tied(state).items() if v.is_floating_point()}
