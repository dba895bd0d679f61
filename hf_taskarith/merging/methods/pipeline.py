"""The generalized task-arithmetic pipeline, as a declaration.

deltas -> sparsify (per model) -> weight -> sign consensus (optional) -> normalize -> scale.

task_arithmetic, ties, dare_*, breadcrumbs*, della* and magnitude_prune are this pipeline
configured differently (see the sibling modules). Parameter names and defaults follow
mergekit's, so its YAML files mean the same thing here.

This module only declares a configuration and its parameters; the tensor work lives in
:mod:`.generalized`, imported on first use. So a method's registry entry (name,
parameters, description) costs no torch import: ``hf-taskarith methods`` and the torch-free
merge path (:mod:`hf_taskarith.merging.lite`) read it without loading torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from ..registry import MergeMethod, ParamSpec, density_param, lambda_param, weight_param

if TYPE_CHECKING:
    import torch

    from ..blockwise import BlockKernel
    from ..prepass import ModelPrepass


@dataclass(frozen=True)
class Pipeline:
    """One configuration of the pipeline.

    Attributes:
        sparsify: a key of :data:`hf_taskarith.merging.sparsify.SPARSIFIERS`, or ``None``.
        consensus: sign election (``"sum"`` as in TIES, ``"count"``), or ``None``.
        default_normalize, default_rescale: the defaults of the ``normalize`` / ``rescale`` parameters.
    """

    sparsify: str | None
    consensus: Literal["sum", "count"] | None
    default_normalize: bool
    default_rescale: bool

    @property
    def is_weighted_sum(self) -> bool:
        """No sparsification and no consensus: the merged delta is ``lambda * sum_i w_i d_i``
        (divided by ``sum_i w_i`` when normalized)."""
        return self.sparsify is None and self.consensus is None

    def __call__(self, deltas: list[torch.Tensor], p: dict[str, Any], gen: torch.Generator | None) -> torch.Tensor:
        """Merge one tensor's deltas. The deltas are consumed (may be modified in place)."""
        from . import generalized

        return generalized.run(self, deltas, p, gen)

    def combine(self, deltas: list[torch.Tensor] | torch.Tensor, p: dict[str, Any]) -> torch.Tensor:
        """weight -> consensus -> normalize -> scale, on already sparsified deltas (a list, or
        a stacked ``(n_inputs, ...)`` tensor); consumes them."""
        from . import generalized

        return generalized.combine(self, deltas, p)

    def block_kernel(self, p: dict[str, Any], context: Any = None) -> BlockKernel | None:
        """Blockwise evaluation (see :mod:`..blockwise`): the weighted sum (task_arithmetic),
        or magnitude trimming without rescale (ties, magnitude_prune) after a prepare pass;
        ``None`` for the randomized and outlier-dropping configurations."""
        from . import generalized

        return generalized.block_kernel(self, p)

    def prepass(self, p: dict[str, Any]) -> ModelPrepass | None:
        """``trim_scope: global`` (magnitude trimming): the pre-pass finding each task vector's
        cut over all its tensors (:mod:`..global_trim`); ``None`` when trimming per tensor."""
        if p.get("trim_scope", "tensor") != "global":
            return None
        from ..global_trim import GlobalMagnitudeCut

        return GlobalMagnitudeCut(p["density"])


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
    if pipeline.sparsify == "magnitude":
        params.append(ParamSpec("trim_scope", "tensor", kind=str, choices=("tensor", "global"),
                                help="tensor (mergekit: keep density of each tensor) or global (the TIES paper: "
                                     "of each whole task vector; reads the inputs 2-3 more times)"))
    if pipeline.sparsify == "magnitude_outliers":
        params.append(ParamSpec("gamma", 0.01, per_model=True, low=0.0, high=1.0,
                                help="fraction of largest-magnitude entries removed as outliers"))
    if pipeline.sparsify == "della_magprune":
        params.append(ParamSpec("epsilon", 0.15, per_model=True, low=0.0, high=1.0, low_open=True,
                                help="spread of keep-probabilities around density"))
        params.append(ParamSpec("rescale_mode", "l1", kind=str, choices=("l1", "inverse_probability"),
                                help="with rescale: l1 (mergekit: keep each delta's L1 norm) or inverse_probability "
                                     "(the DELLA paper: each kept entry divided by its keep-probability)"))
    return MergeMethod(
        name=name, fn=pipeline, params=tuple(params), description=description,
        reference=reference, randomized=pipeline.sparsify in ("random", "della_magprune"),
        elementwise=pipeline.sparsify is None, needs_base=needs_base,
        block_kernel=pipeline.block_kernel,
        prepass=pipeline.prepass if pipeline.sparsify == "magnitude" else None,
    )
