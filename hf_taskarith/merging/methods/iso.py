"""Isotropic merging (Marczak et al., "No Task Left Behind: Isotropic Model Merging with
Common and Task-Specific Subspaces", ICML 2025).

``iso_c``: take the task-arithmetic sum of each 2-D weight, ``U S V^T = SVD(sum)``, and
replace the spectrum by its mean: ``mean(S) * U V^T`` (every direction equally strong).
``iso_cts``: keep the top ``common_fraction`` of the sum's singular vectors as a common
subspace, fill the rest of the rank with each task's leading directions orthogonal to it,
orthogonalize the concatenation, and flatten the spectrum the same way.
As in the official code (``iso-merging``, ``src/utils/iso.py``):

- every 2-D tensor is treated as a matrix, a ``1 x n`` one included (its spectrum has one
  value, so it comes out as the task-arithmetic sum); other tensors (biases, norms, 3-D and
  4-D kernels) take the *average* of the weighted task vectors;
- in ``iso_cts`` the task-specific part of the rank is rounded to a multiple of the number of
  tasks and the remainder goes to the common subspace (:func:`cts_ranks`), so the merged
  matrix has full rank.

The result is scaled by ``lambda`` (the paper's alpha, tuned on validation data; 1.0 by
default). The official code also skips CLIP's ``text_projection`` by name; methods here see
tensors, not names, so it is a matrix like any other. ``tests/test_subspace.py`` checks both
methods against an independent float64 implementation of the official formulas.
"""

from __future__ import annotations

from typing import Any

import torch

from ..registry import MergeMethod, ParamSpec, lambda_param, register_merge_method, weight_param
from ..subspace import nearest_orthonormal, svd, top_components


def _is_matrix(t: torch.Tensor) -> bool:
    """What the official code decomposes: every non-empty 2-D tensor (``1 x n`` included)."""
    return t.dim() == 2 and t.numel() > 0


def iso_c_merge(deltas: list[torch.Tensor], p: dict[str, Any], gen: torch.Generator | None) -> torch.Tensor:
    total = sum(d * w for d, w in zip(deltas, p["weight"]))
    if not _is_matrix(total):
        return total * (p["lambda"] / len(deltas))  # the average, as the reference
    u, s, vh = svd(total)
    return (s.mean() * (u @ vh)) * p["lambda"]


def iso_cts_merge(deltas: list[torch.Tensor], p: dict[str, Any], gen: torch.Generator | None) -> torch.Tensor:
    weighted = [d * w for d, w in zip(deltas, p["weight"])]
    total = sum(weighted)
    if not _is_matrix(total):
        return total * (p["lambda"] / len(weighted))  # the average, as the reference
    n = len(weighted)
    k_common, k_task = cts_ranks(min(total.shape), n, p["common_fraction"])
    u_c, s_c, vh_c = top_components(total, k_common)
    us, ss, vhs = [u_c], [s_c], [vh_c]
    for d in weighted if k_task > 0 else []:
        d = d.to(torch.float32)
        residual = d - u_c @ (u_c.T @ d)  # the part of the task outside the common subspace
        u_t, s_t, vh_t = top_components(residual, k_task)
        us.append(u_t), ss.append(s_t), vhs.append(vh_t)
    u = nearest_orthonormal(torch.cat(us, dim=1))
    vh = nearest_orthonormal(torch.cat(vhs, dim=0).T).T
    return (torch.cat(ss).mean() * (u @ vh)) * p["lambda"]


def cts_ranks(rank: int, n_tasks: int, common_fraction: float) -> tuple[int, int]:
    """``(common, per_task)`` ranks of Iso-CTS, as the reference splits them.

    ``common = int(fraction * rank)``; the task-specific total is rounded (Python's ``round``)
    to a multiple of ``n_tasks``: ``per_task = round((rank - common) / n_tasks)``; the remainder
    ``rank - n_tasks * per_task`` is common, so no direction is left unused. Where the rounding
    overshoots the rank (tiny matrices, e.g. rank 3 with 2 tasks and fraction 0.2: the official
    code would ask for -1 common directions), ``per_task = rank // n_tasks``.

    Example:
        >>> cts_ranks(16, 3, 0.8)  # int(12.8) = 12, round(4 / 3) = 1 per task, 16 - 3 = 13 common
        (13, 1)
    """
    common = int(rank * common_fraction)
    per_task = round((rank - common) / n_tasks)
    if per_task * n_tasks > rank:
        per_task = rank // n_tasks
    return rank - per_task * n_tasks, per_task


register_merge_method(MergeMethod(
    name="iso_c", fn=iso_c_merge, params=(weight_param(), lambda_param()),
    description="Isotropic merging in the common subspace: flattens the spectrum of the summed task matrix.",
    reference="https://arxiv.org/abs/2502.04959",
))
register_merge_method(MergeMethod(
    name="iso_cts", fn=iso_cts_merge,
    params=(weight_param(), lambda_param(),
            ParamSpec("common_fraction", 0.8, low=0.0, high=1.0, low_open=True,
                      help="fraction of the rank given to the common subspace")),
    description="Isotropic merging with common and task-specific subspaces.",
    reference="https://arxiv.org/abs/2502.04959",
))
