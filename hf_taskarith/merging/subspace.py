"""Pure linear-algebra helpers for the subspace merge methods (TSV, Iso-C, Iso-CTS)."""

from __future__ import annotations

import torch


def is_matrix(t: torch.Tensor) -> bool:
    """Subspace methods act on 2-D weights with both sides > 1; the rest are averaged or summed."""
    return t.dim() == 2 and min(t.shape) > 1


def svd(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD in float32: ``m = U diag(S) Vh``."""
    return torch.linalg.svd(m.to(torch.float32), full_matrices=False)


def nearest_orthonormal(m: torch.Tensor) -> torch.Tensor:
    """The matrix with orthonormal columns closest to ``m`` in Frobenius norm
    (orthogonal Procrustes: ``P Q^T`` from ``m = P S Q^T``)."""
    p, _, qh = torch.linalg.svd(m, full_matrices=False)
    return p @ qh


def top_components(m: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``k`` leading singular triplets of ``m``: ``U[:, :k], S[:k], Vh[:k]``."""
    u, s, vh = svd(m)
    return u[:, :k], s[:k], vh[:k]
