"""The SVD helper of the subspace methods (TSV, Iso-C, Iso-CTS): float64 retry when float32 fails."""

from __future__ import annotations

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
                                                  (5, 3, 0.8, (5, 0)), (3, 2, 0.2, (1, 1))])
def test_iso_cts_rank_split_uses_every_direction(rank, n, frac, expected):
    from hf_taskarith.merging.methods.iso import cts_ranks

    common, per_task = cts_ranks(rank, n, frac)
    assert (common, per_task) == expected and common + n * per_task == rank and common >= 1


def test_iso_cts_merge_has_full_rank_and_a_flat_spectrum():
    from hf_taskarith.merging.methods.iso import iso_cts_merge

    g = torch.Generator().manual_seed(1)
    deltas = [torch.randn(12, 10, generator=g) for _ in range(3)]
    merged = iso_cts_merge([d.clone() for d in deltas], {"weight": [1.0] * 3, "lambda": 1.0, "common_fraction": 0.8},
                           None)
    s = torch.linalg.svdvals(merged)
    assert int(torch.linalg.matrix_rank(merged)) == 10  # the remainder is no longer left unused
    torch.testing.assert_close(s, torch.full_like(s, float(s.mean())), rtol=1e-4, atol=1e-5)
