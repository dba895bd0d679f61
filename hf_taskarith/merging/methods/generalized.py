"""The generalized task-arithmetic pipeline shared by a family of methods.

deltas -> sparsify (per model) -> weight -> sign consensus (optional) -> normalize -> scale.

task_arithmetic, ties, dare_*, breadcrumbs*, della* and magnitude_prune are this pipeline
configured differently (see the sibling modules). Parameter names and defaults follow
mergekit's, so its YAML files mean the same thing here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..consensus import ConsensusMethod, agreement_mask, disjoint_sum
from ..registry import MergeMethod, ParamSpec, density_param, lambda_param, stack_weights, weight_param
from ..sparsify import SPARSIFIERS


@dataclass(frozen=True)
class Pipeline:
    """One configuration of the pipeline."""

    sparsify: str | None
    consensus: ConsensusMethod | None
    default_normalize: bool
    default_rescale: bool

    def __call__(self, deltas: list[torch.Tensor], p: dict[str, Any], gen: torch.Generator | None) -> torch.Tensor:
        """Merge one tensor's deltas. The deltas are consumed (may be modified in place)."""
        if self.sparsify is not None:  # replace list entries so each input delta is freed as it is trimmed
            fn = SPARSIFIERS[self.sparsify]
            extra = [k for k in ("gamma", "epsilon") if k in p]
            for i in range(len(deltas)):
                deltas[i] = fn(deltas[i], p["density"][i], rescale=p.get("rescale", self.default_rescale),
                               generator=gen, inplace=True, **{k: p[k][i] for k in extra})
        weights = p["weight"]
        if self.consensus is not None:
            merged = _consensus_merge(deltas, weights, self.consensus, normalize=p["normalize"])
        else:  # accumulate in place: no stacked copy of all deltas
            merged = deltas[0].mul_(weights[0])
            for d, wt in zip(deltas[1:], weights[1:]):
                merged.add_(d, alpha=wt)
            if p["normalize"]:
                total = float(sum(weights))
                merged.div_(total if abs(total) >= 1e-8 else 1.0)
        if p["lambda"] != 1:
            merged = merged * p["lambda"]
        return merged


_CHUNK = 1 << 22  # entries per consensus chunk: bounds the stacked working set to n_models x 16 MB


def _consensus_merge(deltas: list[torch.Tensor], weights: list[float], method: ConsensusMethod, *,
                     normalize: bool) -> torch.Tensor:
    """Sign election + disjoint sum, chunk by chunk (it is elementwise across models), writing
    into the first delta's storage; peak extra memory is one stacked chunk, not a stacked copy."""
    shape = deltas[0].shape
    flats = [d.reshape(-1) for d in deltas]
    out = flats[0]
    for start in range(0, out.numel(), _CHUNK):
        stop = min(start + _CHUNK, out.numel())
        stacked = torch.stack([f[start:stop] for f in flats])
        w = stack_weights(weights, stacked)
        weighted = stacked.mul_(w)
        mask = agreement_mask(weighted, method)
        out[start:stop] = disjoint_sum(weighted, w, mask, normalize=normalize)
    return out.reshape(shape)


def make_method(name: str, pipeline: Pipeline, *, description: str, reference: str,
                needs_base: bool = True) -> MergeMethod:
    params: list[ParamSpec] = [
        weight_param(),
        lambda_param(),
        ParamSpec("normalize", pipeline.default_normalize, kind=bool,
                  help="divide by the sum of weights (of agreeing models, with consensus)"),
        ParamSpec("int8_mask", False, kind=bool, help="accepted for mergekit compatibility; no effect"),
    ]
    if pipeline.sparsify is not None:
        params += [
            density_param(),
            ParamSpec("rescale", pipeline.default_rescale, kind=bool,
                      help="rescale kept entries to preserve each delta's L1 norm"),
        ]
    if pipeline.sparsify == "magnitude_outliers":
        params.append(ParamSpec("gamma", 0.01, per_model=True, low=0.0, high=1.0,
                                help="fraction of largest-magnitude entries removed as outliers"))
    if pipeline.sparsify == "della_magprune":
        params.append(ParamSpec("epsilon", 0.15, per_model=True, low=0.0, high=1.0, low_open=True,
                                help="spread of keep-probabilities around density"))
    return MergeMethod(
        name=name, fn=pipeline, params=tuple(params), description=description,
        reference=reference, randomized=pipeline.sparsify in ("random", "della_magprune"),
        elementwise=pipeline.sparsify is None, needs_base=needs_base,
        coefficients=_linear_coefficients if pipeline.sparsify is None and pipeline.consensus is None else None,
    )


def _linear_coefficients(p: dict[str, Any]) -> tuple[list[float], float]:
    """Task arithmetic as a fixed combination: ``lambda * w_i`` (divided by ``sum w`` if normalize)."""
    total = float(sum(p["weight"]))
    scale = p["lambda"] / (total if abs(total) >= 1e-8 else 1.0) if p["normalize"] else p["lambda"]
    return [w * scale for w in p["weight"]], 0.0

