"""The generalized task-arithmetic pipeline shared by a family of methods.

deltas -> sparsify (per model) -> weight -> sign consensus (optional) -> normalize -> scale.

task_arithmetic, ties, dare_*, breadcrumbs*, della* and magnitude_prune are this pipeline
configured differently (see the sibling modules). Parameter names and defaults follow
mergekit's, so its YAML files mean the same thing here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..blockwise import BlockKernel, BlockRunner, DeltaBlocks, ElementwiseKernel
from ..consensus import ConsensusMethod, agreement, disjoint_sum
from ..registry import MergeMethod, ParamSpec, density_param, lambda_param, stack_weights, weight_param
from ..sparsify import SPARSIFIERS, TopKRule, kept_count, top_k_rules


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
        return self.combine(deltas, p)

    def combine(self, deltas: list[torch.Tensor] | torch.Tensor, p: dict[str, Any]) -> torch.Tensor:
        """weight -> consensus -> normalize -> scale, on already sparsified deltas (a list, or
        a stacked ``(n_inputs, ...)`` tensor); consumes them."""
        weights = p["weight"]
        if self.consensus is not None:
            if isinstance(deltas, torch.Tensor):
                merged = _consensus(deltas, weights, self.consensus, normalize=p["normalize"])
            else:
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

    def block_kernel(self, p: dict[str, Any]) -> BlockKernel | None:
        """Blockwise evaluation (see :mod:`..blockwise`): the weighted sum (task_arithmetic),
        or magnitude trimming without rescale (ties, magnitude_prune) after a prepare pass;
        ``None`` for the randomized and outlier-dropping configurations."""
        if self.sparsify is None and self.consensus is None:
            return ElementwiseKernel(self, p, takes_base=False, linear=True)
        if self.sparsify == "magnitude" and not p.get("rescale", self.default_rescale):
            return _TrimmedKernel(self, p)
        return None


class _TrimmedKernel(BlockKernel):
    """Magnitude trimming (exact top-k per input, found in :meth:`prepare`), then :meth:`Pipeline.combine`."""

    def __init__(self, pipeline: Pipeline, p: dict[str, Any]):
        self.pipeline, self.p = pipeline, p
        self.rules: list[TopKRule | None] = []

    def prepare(self, deltas: DeltaBlocks, runner: BlockRunner) -> None:
        """Each input's top-k rule on |delta|; also checks every delta is finite."""
        n = deltas.n
        ks = [kept_count(n, d) if d < 1 else n for d in self.p["density"]]
        trimmed = [i for i, k in enumerate(ks) if k < n]  # density >= 1 (or k >= n) keeps all
        self.rules = [None] * len(ks)
        if not trimmed:
            return

        def scan(fn: Callable[[int, torch.Tensor, torch.Tensor], Any]) -> list[Any]:
            def one(block: tuple[int, int]) -> Any:
                start, stop = block
                stack = deltas.deltas(start, stop, deltas.base(start, stop))
                scores = (stack if len(trimmed) == len(ks) else stack[trimmed]).abs_()
                return fn(start, scores, runner.scratch("scan", (2,) + tuple(scores.shape), torch.float32))
            return runner.map(one, deltas.ranges())

        sample = deltas.sample()
        if sample is not None:
            sample = sample[trimmed].abs_()
        for i, rule in zip(trimmed, top_k_rules(n, [ks[i] for i in trimmed], sample=sample, scan=scan)):
            self.rules[i] = rule
        self.catches_nonfinite_inputs = True

    def merge(self, deltas: torch.Tensor, base: torch.Tensor, start: int) -> torch.Tensor:
        scores, keep = deltas.abs(), torch.empty_like(deltas)
        for d, s, k, rule in zip(deltas, scores, keep, self.rules):
            if rule is not None:  # as sparsify.magnitude: delta * mask
                d.mul_(rule.keep(s, start, k))
        return self.pipeline.combine(deltas, self.p)


_CHUNK = 1 << 22  # entries per consensus chunk: bounds the stacked working set to n_models x 16 MB


def _consensus(stacked: torch.Tensor, weights: list[float], method: ConsensusMethod, *,
               normalize: bool) -> torch.Tensor:
    """Sign election + disjoint sum of stacked deltas ``(n_inputs, ...)``, weighted in place."""
    w = stack_weights(weights, stacked)
    weighted = stacked.mul_(w)
    return disjoint_sum(weighted, w, agreement(weighted, method), normalize=normalize)


def _consensus_merge(deltas: list[torch.Tensor], weights: list[float], method: ConsensusMethod, *,
                     normalize: bool) -> torch.Tensor:
    """:func:`_consensus` chunk by chunk (it is elementwise across models), writing into the
    first delta's storage; peak extra memory is one stacked chunk, not a stacked copy."""
    shape = deltas[0].shape
    flats = [d.reshape(-1) for d in deltas]
    out = flats[0]
    for start in range(0, out.numel(), _CHUNK):
        stop = min(start + _CHUNK, out.numel())
        out[start:stop] = _consensus(torch.stack([f[start:stop] for f in flats]), weights, method,
                                     normalize=normalize)
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
        block_kernel=pipeline.block_kernel,
    )
