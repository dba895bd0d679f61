"""Task-vector codecs: turn one delta tensor into a few compact tensors and back.

- ``topk``: keep the ``density`` fraction of largest-magnitude entries; store a packed
  position bitmask (1 bit per entry) and the kept values (float16 by default).
- ``lowrank``: truncated SVD per 2-D matrix (``rank``, or ``rank_fraction`` of the full
  rank); store ``U*S`` and ``Vh``. Other tensors are stored densely.
- ``sign``: top-k positions, their signs (1 bit each) and one scale per tensor (the mean
  magnitude of the kept entries), as in ComPEFT's ternary compression.

Every codec is a pair of pure functions registered in :data:`CODECS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import MergeConfigError
from ..merging.sparsify import top_k_mask
from .bits import pack_bits, unpack_bits

VALUE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

Encoded = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Codec:
    name: str
    encode: Callable[[torch.Tensor, dict[str, Any]], Encoded]
    decode: Callable[[Encoded, tuple[int, ...]], torch.Tensor]
    defaults: dict[str, Any]
    help: str

    def resolve(self, params: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            raise MergeConfigError(f"codec {self.name!r} does not take {unknown}; valid: {sorted(self.defaults)}.")
        p = {**self.defaults, **params}
        if "density" in p and not 0 < float(p["density"]) <= 1:
            raise MergeConfigError(f"codec {self.name!r}: density must be in (0, 1], got {p['density']}.")
        if "value_dtype" in p and p["value_dtype"] not in VALUE_DTYPES:
            raise MergeConfigError(f"value_dtype must be one of {sorted(VALUE_DTYPES)}, got {p['value_dtype']!r}.")
        if p.get("rank") is not None and int(p["rank"]) < 1:
            raise MergeConfigError(f"rank must be >= 1, got {p['rank']}.")
        return p


def _topk_mask(t: torch.Tensor, density: float) -> torch.Tensor:
    return top_k_mask(t.abs().to(torch.float32), max(1, int(density * t.numel())) if t.numel() else 0)


def _topk_encode(t: torch.Tensor, p: dict[str, Any]) -> Encoded:
    mask = _topk_mask(t, float(p["density"]))
    return {"mask": pack_bits(mask), "values": t.reshape(-1)[mask.reshape(-1)].to(VALUE_DTYPES[p["value_dtype"]])}


def _topk_decode(e: Encoded, shape: tuple[int, ...]) -> torch.Tensor:
    n = int(torch.Size(shape).numel())
    out = torch.zeros(n, dtype=torch.float32)
    out[unpack_bits(e["mask"], n)] = e["values"].to(torch.float32)
    return out.reshape(shape)


def _sign_encode(t: torch.Tensor, p: dict[str, Any]) -> Encoded:
    mask = _topk_mask(t, float(p["density"]))
    kept = t.reshape(-1)[mask.reshape(-1)].to(torch.float32)
    scale = kept.abs().mean() if kept.numel() else torch.tensor(0.0)
    return {"mask": pack_bits(mask), "signs": pack_bits(kept > 0), "scale": scale.reshape(1)}


def _sign_decode(e: Encoded, shape: tuple[int, ...]) -> torch.Tensor:
    n = int(torch.Size(shape).numel())
    mask = unpack_bits(e["mask"], n)
    k = int(mask.sum())
    signs = unpack_bits(e["signs"], k).to(torch.float32) * 2 - 1
    out = torch.zeros(n, dtype=torch.float32)
    out[mask] = signs * e["scale"].to(torch.float32)
    return out.reshape(shape)


def _lowrank_encode(t: torch.Tensor, p: dict[str, Any]) -> Encoded:
    dtype = VALUE_DTYPES[p["value_dtype"]]
    if t.dim() != 2 or min(t.shape) <= 1:
        return {"dense": t.to(dtype)}
    full = min(t.shape)
    r = int(p["rank"]) if p.get("rank") is not None else max(1, int(float(p["rank_fraction"]) * full))
    r = min(r, full)
    if r * (t.shape[0] + t.shape[1]) >= t.numel():  # low rank would be bigger: store densely
        return {"dense": t.to(dtype)}
    u, s, vh = torch.linalg.svd(t.to(torch.float32), full_matrices=False)
    return {"us": (u[:, :r] * s[:r]).to(dtype), "vh": vh[:r].to(dtype)}


def _lowrank_decode(e: Encoded, shape: tuple[int, ...]) -> torch.Tensor:
    if "dense" in e:
        return e["dense"].to(torch.float32).reshape(shape)
    return (e["us"].to(torch.float32) @ e["vh"].to(torch.float32)).reshape(shape)


CODECS: dict[str, Codec] = {}


def register_codec(codec: Codec) -> Codec:
    if codec.name in CODECS:
        raise ValueError(f"codec {codec.name!r} is already registered.")
    CODECS[codec.name] = codec
    return codec


def get_codec(name: str) -> Codec:
    try:
        return CODECS[name]
    except KeyError:
        raise MergeConfigError(f"unknown compression {name!r}; available: {sorted(CODECS)}.") from None


register_codec(Codec("topk", _topk_encode, _topk_decode, {"density": 0.1, "value_dtype": "float16"},
                     "largest-magnitude entries: bitmask + values"))
register_codec(Codec("sign", _sign_encode, _sign_decode, {"density": 0.1},
                     "largest-magnitude entries: bitmask + sign bits + one scale per tensor"))
register_codec(Codec("lowrank", _lowrank_encode, _lowrank_decode,
                     {"rank": None, "rank_fraction": 0.05, "value_dtype": "float16"},
                     "truncated SVD per matrix: U*S and Vh; other tensors dense"))
