"""Compressed task vectors: a TaskVector whose tensors are decoded on access from compact parts.

Saving a compressed vector writes the compact parts (``name::mask``, ``name::values``, ...)
and the codec description in ``task_vector_config.json``; loading it (locally or from the
Hub) decodes transparently, so every other API sees an ordinary task vector.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from .codecs import Codec, get_codec

if TYPE_CHECKING:
    from ..task_vector import TaskVector

SEP = "::"


class DecodedTensors(Mapping):
    """name -> decoded float32 tensor, computed from ``components`` on each access."""

    def __init__(self, components: Mapping[str, torch.Tensor], codec: Codec, shapes: Mapping[str, Sequence[int]]):
        self.components, self.codec = components, codec
        self._shapes = {k: tuple(v) for k, v in shapes.items()}
        self._parts: dict[str, list[str]] = {k: [] for k in self._shapes}
        for key in components:
            name, _, part = key.rpartition(SEP)
            if name not in self._parts:
                from ..errors import CorruptCheckpointError

                raise CorruptCheckpointError(f"compressed tensor part {key!r} belongs to no listed tensor.")
            self._parts[name].append(part)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._shapes)

    def __getitem__(self, name: str) -> torch.Tensor:
        parts = {p: self.components[f"{name}{SEP}{p}"] for p in self._parts[name]}
        return self.codec.decode(parts, self._shapes[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)

    def spec(self) -> dict[str, Any]:
        return {"shapes": {k: list(v) for k, v in self._shapes.items()}}


def compress(tv: TaskVector, method: str = "topk", *, progress: bool = False, **params: Any) -> TaskVector:
    """Compress a task vector for sharing.

    Args:
        tv: the task vector.
        method: ``"topk"`` (density, value_dtype), ``"sign"`` (density) or ``"lowrank"``
            (rank or rank_fraction, value_dtype).

    Returns:
        A task vector whose values are the *reconstructed* deltas; ``metadata.extra["compression"]``
        records the codec, its parameters, the relative L2 reconstruction error and the
        size ratio (float32 dense bytes / compressed bytes).

    Example:
        >>> small = compress(tv, "topk", density=0.05)
        >>> small.metadata.extra["compression"]["size_ratio"]
    """
    from ..task_vector import TaskVector

    codec = get_codec(method)
    p = codec.resolve(params)
    parts: dict[str, torch.Tensor] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    err = ref = 0.0
    dense_bytes = comp_bytes = 0
    for name, t in tqdm(tv.items(), total=len(tv), desc=f"compressing ({method})", disable=not progress):
        t32 = t.detach().to(torch.float32)
        encoded = codec.encode(t32, p)
        rec = codec.decode(encoded, tuple(t32.shape))
        err += float((rec - t32).double().pow(2).sum())
        ref += float(t32.double().pow(2).sum())
        shapes[name] = tuple(t32.shape)
        dense_bytes += t32.numel() * 4
        for part, value in encoded.items():
            parts[f"{name}{SEP}{part}"] = value.contiguous()
            comp_bytes += value.numel() * value.element_size()
    stats = {"method": method, "params": p, "relative_error": math.sqrt(err / ref) if ref > 0 else 0.0,
             "size_ratio": dense_bytes / max(comp_bytes, 1), "dense_bytes": dense_bytes, "compressed_bytes": comp_bytes}
    meta = tv.metadata.derived(tv.metadata.created_with, **tv.metadata.extra)
    meta.finetuned_model = tv.metadata.finetuned_model
    meta.extra["compression"] = stats
    return TaskVector(DecodedTensors(parts, codec, shapes), meta)


def open_compressed(components: Mapping[str, torch.Tensor], compression: dict[str, Any],
                    shapes: dict[str, list[int]]) -> DecodedTensors:
    """Wrap lazily-read compressed parts (from a saved folder) in a decoding mapping."""
    return DecodedTensors(components, get_codec(compression["method"]), shapes)
