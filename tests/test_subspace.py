"""The SVD helper of the subspace methods (TSV, Iso-C, Iso-CTS): float64 retry when float32 fails."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hf_taskarith.merging import subspace
from hf_taskarith.merging.methods.iso import iso_cts_merge
from hf_taskarith.merging.methods.tsv import tsv_merge

REAL_SVD = torch.linalg.svd


def _float32_does_not_converge(monkeypatch) -> list[torch.dtype]:
    """Make ``torch.linalg.svd`` fail on float32 input, as LAPACK's gesdd sometimes does on CPU
    (seen on a real SmolLM2-135M Iso-CTS merge); float64 input still works. Returns the dtypes seen."""
    seen: list[torch.dtype] = []

    def flaky_svd(m, *args, **kwargs):
        seen.append(m.dtype)
        if m.dtype == torch.float32:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge (error code: 1).")
        return REAL_SVD(m, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", flaky_svd)
    return seen


def _deltas(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(24, 16, generator=g) for _ in range(3)]


def test_svd_retries_in_float64(monkeypatch):
    m = _deltas()[0]
    seen = _float32_does_not_converge(monkeypatch)
    u, s, vh = subspace.svd(m)
    assert seen == [torch.float32, torch.float64]
    assert u.dtype == s.dtype == vh.dtype == torch.float32
    torch.testing.assert_close(u @ torch.diag(s) @ vh, m, atol=1e-5, rtol=1e-5)
    q = subspace.nearest_orthonormal(m)
    torch.testing.assert_close(q.T @ q, torch.eye(16), atol=1e-5, rtol=0)


@pytest.mark.parametrize("fn, params", [
    (iso_cts_merge, {"weight": [1.0, 1.0, 1.0], "lambda": 1.0, "common_fraction": 0.8}),
    (tsv_merge, {"weight": [1.0, 1.0, 1.0], "lambda": 1.0, "rank_fraction": None}),
])
def test_subspace_methods_survive_a_float32_svd_failure(monkeypatch, fn, params):
    deltas = _deltas(1)
    expected = fn(deltas, params, None)  # the real float32 path
    _float32_does_not_converge(monkeypatch)
    got = fn(deltas, params, None)
    assert got.dtype == torch.float32 and bool(torch.isfinite(got).all())
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_svd_failure_in_float64_too_is_raised(monkeypatch):
    def broken_svd(m, *args, **kwargs):
        raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge (error code: 1).")

    monkeypatch.setattr(torch.linalg, "svd", broken_svd)
    with pytest.raises(torch.linalg.LinAlgError):
        subspace.svd(torch.eye(3))


def test_iso_non_matrix_tensors_are_averaged_as_the_reference():
    from hf_taskarith.merging.methods.iso import iso_c_merge, iso_cts_merge

    g = torch.Generator().manual_seed(0)
    biases = [torch.randn(7, generator=g) for _ in range(3)]
    p = {"weight": [1.0, 1.0, 1.0], "lambda": 1.0, "common_fraction": 0.8}
    for fn in (iso_c_merge, iso_cts_merge):
        torch.testing.assert_close(fn([b.clone() for b in biases], p, None), sum(biases) / 3)


@pytest.mark.parametrize("rank,n,frac,expected", [(10, 3, 0.8, (7, 1)), (64, 8, 0.8, (48, 2)), (12, 2, 0.5, (6, 3)),
                                                  (5, 3, 0.8, (5, 0)), (3, 2, 0.2, (1, 1)), (16, 3, 0.8, (13, 1)),
                                                  (3, 3, 0.2, (0, 1))])
def test_iso_cts_rank_split_uses_every_direction(rank, n, frac, expected):
    from hf_taskarith.merging.methods.iso import cts_ranks

    common, per_task = cts_ranks(rank, n, frac)
    assert (common, per_task) == expected and common + n * per_task == rank and common >= 0
    if (rank, n, frac) != (3, 2, 0.2):  # the official split, where it is defined
        assert (common, per_task) == _official_split(rank, n, frac)


def test_iso_cts_merge_has_full_rank_and_a_flat_spectrum():
    from hf_taskarith.merging.methods.iso import iso_cts_merge

    g = torch.Generator().manual_seed(1)
    deltas = [torch.randn(12, 10, generator=g) for _ in range(3)]
    merged = iso_cts_merge([d.clone() for d in deltas], {"weight": [1.0] * 3, "lambda": 1.0, "common_fraction": 0.8},
                           None)
    s = torch.linalg.svdvals(merged)
    assert int(torch.linalg.matrix_rank(merged)) == 10  # the remainder is no longer left unused
    torch.testing.assert_close(s, torch.full_like(s, float(s.mean())), rtol=1e-4, atol=1e-5)


# -- against the official code's formulas ------------------------------------------------
# An independent float64 (numpy) implementation of Iso-C and Iso-CTS as the official code
# (iso-merging, src/utils/iso.py) computes them, written from its formulas: the common
# subspace from the SVD of the summed task matrices, its size int(fraction * r) adjusted so
# the task-specific total is a multiple of the number of tasks (round), each task's leading
# directions of its part outside the common subspace, the concatenation [task 1, ..., task T,
# common] orthogonalized (U V^T of its SVD) on both sides, the spectrum replaced by its mean.
# Tensors that are not 2-D are averaged.
def _official_split(r: int, n_tasks: int, fraction: float) -> tuple[int, int]:
    common = int(r * fraction)
    task_total = round((r - common) / n_tasks) * n_tasks
    return r - task_total, task_total // n_tasks


def _polar(m: np.ndarray) -> np.ndarray:
    u, _, vt = np.linalg.svd(m, full_matrices=False)
    return u @ vt


def _iso_c_reference(tvs: list[np.ndarray]) -> np.ndarray:
    total = sum(tvs)
    if total.ndim != 2:
        return total / len(tvs)
    u, s, vt = np.linalg.svd(total, full_matrices=False)
    return u @ np.diag(np.full_like(s, s.mean())) @ vt


def _iso_cts_reference(tvs: list[np.ndarray], fraction: float) -> np.ndarray:
    if tvs[0].ndim != 2:
        return sum(tvs) / len(tvs)
    r = min(tvs[0].shape)
    common, per_task = _official_split(r, len(tvs), fraction)
    u, s, vt = np.linalg.svd(sum(tvs), full_matrices=False)
    u_c, s_c, vt_c = u[:, :common], s[:common], vt[:common]
    parts_u, parts_s, parts_vt = [], [], []
    for w in tvs:
        u_t, s_t, vt_t = np.linalg.svd(w - u_c @ u_c.T @ w, full_matrices=False)
        parts_u.append(u_t[:, :per_task]), parts_s.append(s_t[:per_task]), parts_vt.append(vt_t[:per_task])
    big_u = _polar(np.concatenate(parts_u + [u_c], axis=1))
    big_vt = _polar(np.concatenate(parts_vt + [vt_c], axis=0))
    s_all = np.concatenate(parts_s + [s_c])
    return big_u @ np.diag(np.full_like(s_all, s_all.mean())) @ big_vt


@pytest.mark.parametrize("shape", [(20, 16), (10, 14), (12, 18), (1, 8), (16,), (4, 3, 3)])
@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0), (0.5, 1.0, -2.0)])
def test_iso_methods_match_an_independent_implementation_of_the_official_code(shape, weights):
    """3 tasks on random matrices: (20, 16) has rank 16, split 13 common + 3 x 1 (int(0.8 * 16) = 12
    leaves a remainder that goes to the common part); (10, 14) 7 + 3 x 1; (12, 18) with fraction 0.5,
    6 + 3 x 2; a 1 x n matrix; a bias and a 3-D kernel, averaged. Max deviation <= 1e-5 of the largest entry."""
    from hf_taskarith.merging.methods.iso import iso_c_merge, iso_cts_merge

    g = torch.Generator().manual_seed(sum(shape))
    deltas = [torch.randn(shape, generator=g) for _ in range(3)]
    weighted = [d.double().numpy() * w for d, w in zip(deltas, weights)]  # the official code has no weights
    fraction = 0.5 if shape == (12, 18) else 0.8
    p = {"weight": list(weights), "lambda": 1.0, "common_fraction": fraction}
    for ours_fn, ref in ((iso_c_merge, _iso_c_reference(weighted)),
                         (iso_cts_merge, _iso_cts_reference(weighted, fraction))):
        ours = ours_fn([d.clone() for d in deltas], p, None).double().numpy()
        assert ours.shape == ref.shape
        deviation = np.abs(ours - ref).max() / np.abs(ref).max()  # float32 maths against float64
        assert deviation <= 1e-5, (ours_fn.__name__, deviation)
    if len(shape) != 2:  # averaged, not summed
        np.testing.assert_allclose(ours, sum(weighted) / 3, atol=1e-6)
