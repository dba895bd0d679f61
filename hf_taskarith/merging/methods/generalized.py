"""The tensor work of the generalized pipeline (declared in :mod:`.pipeline`).

deltas -> sparsify (per model) -> weight -> sign consensus (optional) -> normalize -> scale,
on whole tensors (:func:`run`) or block by block (:func:`block_kernel`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ...errors import MergeConfigError
from ..blockwise import BlockKernel, BlockRunner, DeltaBlocks, ElementwiseKernel
from ..consensus import ConsensusMethod, agreement, disjoint_sum
from ..sparsify import SPARSIFIERS, MagnitudeCut, TopKRule, kept_count, top_k_rules
from .pipeline import Pipeline


def run(pipeline: Pipeline, deltas: list[torch.Tensor], p: dict[str, Any], gen: torch.Generator | None) -> torch.Tensor:
    """:meth:`Pipeline.__call__`: sparsify each delta, then :func:`combine`."""
    if pipeline.sparsify is not None:  # replace list entries so each input delta is freed as it is trimmed
        fn = SPARSIFIERS[pipeline.sparsify]
        extra = [k for k in ("gamma", "epsilon") if k in p]
        shared = {"rescale_mode": p["rescale_mode"]} if "rescale_mode" in p else {}
        cuts = global_cuts(p)
        for i in range(len(deltas)):
            if cuts is not None:
                shared["cut"] = cuts[i]
            deltas[i] = fn(deltas[i], p["density"][i], rescale=p.get("rescale", pipeline.default_rescale),
                           generator=gen, inplace=True, **{k: p[k][i] for k in extra}, **shared)
    return combine(pipeline, deltas, p)


def combine(pipeline: Pipeline, deltas: list[torch.Tensor] | torch.Tensor, p: dict[str, Any]) -> torch.Tensor:
    """:meth:`Pipeline.combine`: weight -> consensus -> normalize -> scale; consumes the deltas."""
    weights = p["weight"]
    if pipeline.consensus is not None:
        if isinstance(deltas, torch.Tensor):
            merged = _consensus(deltas, weights, pipeline.consensus, normalize=p["normalize"])
        else:
            merged = _consensus_merge(deltas, weights, pipeline.consensus, normalize=p["normalize"])
    else:  # accumulate in place: no stacked copy of all deltas
        merged = deltas[0].mul_(weights[0])
        for d, wt in zip(deltas[1:], weights[1:]):
            # round(w * d), then add, with no fused multiply-add: the torch-free path
            # (merging.lite) does the same IEEE operations and gets the same bits
            merged.add_(d.mul_(wt))
        if p["normalize"]:
            total = float(sum(weights))
            merged.div_(total if abs(total) >= 1e-8 else 1.0)
    if p["lambda"] != 1:
        merged = merged * p["lambda"]
    return merged


def global_cuts(p: dict[str, Any]) -> list[MagnitudeCut | None] | None:
    """Per input, its share of a whole-task-vector trim (``trim_scope: global``), or ``None``
    when trimming per tensor.

    Raises:
        MergeConfigError: ``trim_scope: global`` without the cuts, which only the merge engine's
            pre-pass over every tensor can compute (:mod:`..global_trim`).
    """
    if p.get("trim_scope", "tensor") != "global":
        return None
    if "magnitude_cut" not in p:
        raise MergeConfigError(
            "trim_scope: global trims each task vector as a whole, so one tensor's deltas are not enough: "
            "run it through hf_taskarith.merge() or merge_from_config() (their pre-pass finds the cut), or "
            "use trim_scope: tensor.")
    return p["magnitude_cut"]


def block_kernel(pipeline: Pipeline, p: dict[str, Any]) -> BlockKernel | None:
    """:meth:`Pipeline.block_kernel`."""
    if pipeline.is_weighted_sum:
        return ElementwiseKernel(pipeline, p, takes_base=False, linear=True)
    if pipeline.sparsify == "magnitude" and not p.get("rescale", pipeline.default_rescale):
        return _TrimmedKernel(pipeline, p)
    return None


class _TrimmedKernel(BlockKernel):
    """Magnitude trimming (exact top-k per input, found in :meth:`prepare`), then :meth:`Pipeline.combine`."""

    def __init__(self, pipeline: Pipeline, p: dict[str, Any]):
        self.pipeline, self.p = pipeline, p
        self.rules: list[TopKRule | None] = []

    def prepare(self, deltas: DeltaBlocks, runner: BlockRunner) -> None:
        """Each input's top-k rule on |delta|; also checks every delta is finite. With
        ``trim_scope: global``, each input's rule is its share of the whole-vector cut."""
        cuts = global_cuts(self.p)
        if cuts is not None:
            self.rules = [None if c is None else _cut_rule(c, i, deltas, runner) for i, c in enumerate(cuts)]
            return  # the pre-pass saw every delta, but a block check costs little: keep it
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


def _cut_rule(cut: MagnitudeCut, i: int, deltas: DeltaBlocks, runner: BlockRunner) -> TopKRule:
    """:class:`MagnitudeCut` of input ``i`` as a :class:`TopKRule`: the ties it keeps are the
    first ``cut.ties`` entries with ``|delta| == threshold``, so the rule's tie end is found by
    counting them block by block (only for the one tensor per input where the cut splits ties)."""
    if cut.ties is None:
        return TopKRule(cut.threshold, deltas.n)  # every tie kept
    if cut.ties == 0:
        return TopKRule(cut.threshold, 0)

    def equal(block: tuple[int, int]) -> torch.Tensor:
        start, stop = block
        return deltas.deltas(start, stop, deltas.base(start, stop))[i].abs() == cut.threshold

    ranges = list(deltas.ranges())
    seen = 0
    for (start, stop), count in zip(ranges, runner.map(lambda r: int(equal(r).sum()), ranges)):
        if seen + count >= cut.ties:  # the last kept tie is in this block
            at = int(equal((start, stop)).nonzero().reshape(-1)[cut.ties - seen - 1])
            return TopKRule(cut.threshold, start + at + 1)
        seen += count
    raise RuntimeError(f"tensor {deltas.name!r} changed between the global-trim pre-pass and the merge: "
                       f"{seen} magnitudes equal the cut, {cut.ties} expected.")


_CHUNK = 1 << 22  # entries per consensus chunk: bounds the stacked working set to n_models x 16 MB


def _consensus(stacked: torch.Tensor, weights: list[float], method: ConsensusMethod, *,
               normalize: bool) -> torch.Tensor:
    """Sign election + disjoint sum of stacked deltas ``(n_inputs, ...)``, weighted in place."""
    w = torch.tensor(list(weights), dtype=stacked.dtype).reshape((-1,) + (1,) * (stacked.dim() - 1))
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
