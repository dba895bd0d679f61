"""TSV-Merge (Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model
Merging", CVPR 2025).

For every 2-D weight: keep each task's top ``rank_fraction * min(m, n)`` singular triplets
(default fraction ``1 / n_tasks``), concatenate them, decorrelate the concatenated left and
right singular vectors by orthogonal Procrustes, and rebuild ``U_perp diag(S) V_perp^T``.
Other tensors (biases, norms) take the weighted mean of the deltas. The result is scaled by
``lambda`` (the paper's alpha, 1.0 by default).

Note:
    Cost: one thin SVD per task per matrix plus two for the orthogonalization; on a CPU this
    is much slower than the elementwise methods.
"""

from __future__ import annotations

from typing import Any

import torch

from ..registry import MergeMethod, ParamSpec, lambda_param, register_merge_method, weight_param
from ..subspace import is_matrix, nearest_orthonormal, top_components


def tsv_merge(deltas: list[torch.Tensor], p: dict[str, Any], gen: torch.Generator | None) -> torch.Tensor:
    weighted = [d * w for d, w in zip(deltas, p["weight"])]
    n = len(weighted)
    if not is_matrix(weighted[0]):
        return torch.stack(weighted).sum(0) / n * p["lambda"]
    full = min(weighted[0].shape)
    frac = p["rank_fraction"] if p["rank_fraction"] is not None else 1.0 / n
    k = max(1, int(frac * full))
    us, ss, vhs = zip(*(top_components(d, k) for d in weighted))
    u = nearest_orthonormal(torch.cat(us, dim=1))
    vh = nearest_orthonormal(torch.cat(vhs, dim=0).T).T
    merged = (u * torch.cat(ss)) @ vh
    return merged * p["lambda"]


register_merge_method(MergeMethod(
    name="tsv", fn=tsv_merge,
    params=(weight_param(), lambda_param(),
            ParamSpec("rank_fraction", None, low=0.0, high=1.0, low_open=True,
                      help="fraction of each matrix's rank kept per task (default 1/n_tasks)")),
    description="Task Singular Vectors: per-task low-rank components, decorrelated across tasks.",
    reference="https://arxiv.org/abs/2412.00081",
))
