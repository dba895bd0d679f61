"""Pure linear-algebra helpers for the subspace merge methods (TSV, Iso-C, Iso-CTS)."""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


def is_matrix(t: torch.Tensor) -> bool:
    """TSV acts on 2-D weights with both sides > 1 and averages the rest (Iso-C / Iso-CTS, as their
    official code, decompose every 2-D tensor: :func:`hf_taskarith.merging.methods.iso._is_matrix`)."""
    return t.dim() == 2 and min(t.shape) > 1


def svd(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD in float32: ``m = U diag(S) Vh``.

    Note:
        LAPACK's divide-and-conquer SVD (``gesdd``, what ``torch.linalg.svd`` runs on CPU)
        occasionally fails to converge in float32 on matrices with clustered singular values,
        e.g. the stacked singular vectors Iso-CTS orthogonalizes on a real 135M-parameter LLM
        (``model.layers.0.self_attn.o_proj.weight`` of SmolLM2). Such a matrix is decomposed
        again in float64 (about 3x slower, for that tensor only) and the factors returned in
        float32; a failure in float64 as well is raised.
    """
    m = m.to(torch.float32)
    try:
        return torch.linalg.svd(m, full_matrices=False)
    except torch.linalg.LinAlgError:
        logger.debug("float32 SVD of a %s matrix did not converge; retrying in float64", tuple(m.shape))
        u, s, vh = torch.linalg.svd(m.to(torch.float64), full_matrices=False)
        return u.to(torch.float32), s.to(torch.float32), vh.to(torch.float32)


def nearest_orthonormal(m: torch.Tensor) -> torch.Tensor:
    """The matrix with orthonormal columns closest to ``m`` in Frobenius norm
    (orthogonal Procrustes: ``P Q^T`` from ``m = P S Q^T``), via :func:`svd`."""
    p, _, qh = svd(m)
    return p @ qh


def top_components(m: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``k`` leading singular triplets of ``m``: ``U[:, :k], S[:k], Vh[:k]``."""
    u, s, vh = svd(m)
    return u[:, :k], s[:k], vh[:k]
