"""Property tests (hypothesis) for the algebraic laws task vectors and merges must obey."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_taskarith import TaskVector, merge
from hf_taskarith.merging.registry import get_merge_method
from hf_taskarith.merging.sparsify import magnitude, top_k_mask

SETTINGS = settings(max_examples=25, deadline=None)
seeds = st.integers(min_value=0, max_value=2**31 - 1)


def _model(seed: int, hidden: int = 6) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, hidden), torch.nn.LayerNorm(hidden),
                               torch.nn.Linear(hidden, 3)).eval()


def _finetuned(model: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return out


def _assert_same_params(a: torch.nn.Module, b: torch.nn.Module, **tol) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], msg=lambda m, k=k: f"{k}: {m}", **(tol or dict(atol=1e-6, rtol=1e-6)))


# -- TaskVector algebra -----------------------------------------------------------------
@SETTINGS
@given(seed=seeds, s1=seeds, s2=seeds, scale=st.floats(1e-3, 10.0))
def test_adding_then_subtracting_a_task_vector_is_the_identity(seed, s1, s2, scale):
    base = _model(seed)
    a = TaskVector.from_models(base, _finetuned(base, s1))
    b = scale * TaskVector.from_models(base, _finetuned(base, s2))
    back = (a + b) - b
    assert back.keys() == a.keys()
    for k in a:  # float32: (a + b) - b is a up to one rounding of |a + b|
        torch.testing.assert_close(back[k], a[k], atol=4 * torch.finfo(torch.float32).eps * (1 + scale), rtol=0)
    applied = b.apply_to(copy.deepcopy(base))
    undone = (-b).apply_to(applied, allow_mismatch=True)  # applied is no longer b's base
    _assert_same_params(undone, base, atol=1e-5 * (1 + scale), rtol=0)


@SETTINGS
@given(seed=seeds, s1=seeds)
def test_scaling_by_zero_then_applying_returns_the_base(seed, s1):
    base = _model(seed)
    tv = TaskVector.from_models(base, _finetuned(base, s1))
    zero = 0 * tv
    assert all(torch.count_nonzero(zero[k]) == 0 for k in zero)
    edited = zero.apply_to(copy.deepcopy(base))
    for k, v in base.state_dict().items():
        assert torch.equal(edited.state_dict()[k], v), k
    edited = tv.apply_to(copy.deepcopy(base), scaling=0.0)
    for k, v in base.state_dict().items():
        assert torch.equal(edited.state_dict()[k], v), k


@SETTINGS
@given(seed=seeds, s1=seeds, scaling=st.floats(-2.0, 2.0))
def test_task_arithmetic_of_one_vector_equals_apply_to(seed, s1, scaling):
    base = _model(seed)
    tv = TaskVector.from_models(base, _finetuned(base, s1))
    merged = merge(base, [tv], method="task_arithmetic", weights=[1.0], progress=False)
    _assert_same_params(merged, tv.apply_to(copy.deepcopy(base)))
    scaled = merge(base, [tv], method="task_arithmetic", weights=[scaling], progress=False)
    _assert_same_params(scaled, tv.apply_to(copy.deepcopy(base), scaling=scaling))


# -- merge methods --------------------------------------------------------------------------
@SETTINGS
@given(seed=seeds, n=st.integers(1, 5), density=st.floats(0.01, 1.0),
       weights=st.lists(st.floats(0.05, 5.0), min_size=5, max_size=5),
       shape=st.sampled_from([(7,), (12, 5), (3, 4, 6)]))
def test_ties_of_identical_vectors_is_the_trimmed_vector(seed, n, density, weights, shape):
    """With normalize=True and positive weights every kept entry agrees with itself, and the
    disjoint mean of n copies is the copy: TIES(n x tau) == trim(tau)."""
    tau = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    method = get_merge_method("ties")
    params = method.resolve_params(n, {"density": density, "weight": weights[:n], "normalize": True})
    got = method.fn([tau.clone() for _ in range(n)], params, None)
    torch.testing.assert_close(got, magnitude(tau, density), atol=1e-6, rtol=1e-6)


@SETTINGS
@given(seed=seeds, s1=seeds, weights=st.lists(st.floats(0.05, 5.0), min_size=1, max_size=4))
def test_linear_of_identical_models_is_the_model(seed, s1, weights):
    base = _model(seed)
    ft = _finetuned(base, s1)
    copies = [copy.deepcopy(ft) for _ in weights]
    merged = merge(base, copies, method="linear", weights=weights, progress=False)
    _assert_same_params(merged, ft)
    without_base = merge(None, copies, method="linear", weights=weights, progress=False)
    _assert_same_params(without_base, ft, atol=0, rtol=0)  # every delta is exactly 0


@SETTINGS
@given(values=st.lists(st.integers(-4, 4), min_size=1, max_size=40), k=st.integers(-2, 45))
def test_top_k_mask_keeps_exactly_k_largest_lowest_index_first(values, k):
    scores = torch.tensor(values, dtype=torch.float32)  # small integers: many ties
    mask = top_k_mask(scores, k)
    n = len(values)
    assert mask.dtype == torch.bool and mask.shape == scores.shape
    assert int(mask.sum()) == min(max(k, 0), n)
    if 0 < k < n:
        kept, dropped = scores[mask], scores[~mask]
        assert kept.min() >= dropped.max()  # the kept entries are the largest
        cut = float(kept.min())
        tied = (scores == cut).nonzero().reshape(-1)
        expected = tied[: int((kept == cut).sum())]
        assert torch.equal(mask[tied].nonzero().reshape(-1), torch.arange(len(expected)))  # lowest index first
        assert mask[expected].all()


@SETTINGS
@given(values=st.lists(st.floats(-1e3, 1e3, allow_nan=False, width=32), min_size=1, max_size=60),
       frac=st.floats(0.0, 1.0))
def test_top_k_mask_on_real_values_matches_a_stable_sort(values, frac):
    scores = torch.tensor(values, dtype=torch.float32).reshape(-1)
    k = int(frac * scores.numel())
    want = torch.zeros_like(scores, dtype=torch.bool)
    want[torch.sort(scores, descending=True, stable=True).indices[:k]] = True
    assert torch.equal(top_k_mask(scores, k), want)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties", "della", "della_linear"])
@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 10**6), data_seed=seeds)
def test_randomized_methods_are_reproducible_per_seed(method, seed, data_seed):
    base = _model(data_seed, hidden=32)
    tvs = [TaskVector.from_models(base, _finetuned(base, data_seed + i + 1)) for i in range(2)]
    kw = dict(method=method, weights=[0.6, 0.4], density=0.5, progress=False)
    a = merge(base, tvs, seed=seed, **kw).state_dict()
    b = merge(base, tvs, seed=seed, **kw).state_dict()
    c = merge(base, tvs, seed=seed + 1, **kw).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
