"""Our pure merge functions against peft's (``peft.utils.merge_utils``), an independent reference.

Where the maths agree the results must be equal; where they differ on purpose (documented in
docs/mergekit_compatibility.md) the difference itself is asserted, so the doc stays true:

- TIES: peft elects the sign on the *unweighted* trimmed deltas and divides by the *count* of
  agreeing models; we (like mergekit) elect on the *weighted* deltas and divide by the *sum of
  the weights* of the agreeing models. Identical when every weight is 1.
- DARE: peft rescales kept entries by ``1 / density`` (L1 norm preserved in expectation); we
  (like mergekit) rescale so each delta's L1 norm is preserved exactly. The drop masks are the
  same draw: peft's global RNG and our ``torch.Generator`` seeded alike give identical masks.
- DARE-TIES: peft always averages the agreeing entries (count divisor); ours (like mergekit)
  sums them unless ``normalize=True``.
- magnitude pruning keeps ``int(density * n)`` entries in peft (0 for tiny tensors or
  densities); we keep ``max(1, int(density * n))``.
"""

from __future__ import annotations

import pytest
import torch

from hf_taskarith.merging.consensus import agreement_mask, disjoint_sum
from hf_taskarith.merging.registry import get_merge_method
from hf_taskarith.merging.sparsify import random as random_sparsify

merge_utils = pytest.importorskip("peft.utils.merge_utils")

# peft warns that density 1 does no pruning; test_dare_at_density_one_equals_peft asserts it once
pytestmark = pytest.mark.filterwarnings("ignore:The density .* no pruning will be performed:UserWarning")

SHAPES = [(64, 48), (257,), (8, 4, 16)]


def _deltas(n: int, shape, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


def _ours(method: str, deltas: list[torch.Tensor], generator: torch.Generator | None = None, **given):
    m = get_merge_method(method)
    params = m.resolve_params(len(deltas), given)
    return m.fn([d.clone() for d in deltas], params, generator)  # fn may consume its inputs


# -- task arithmetic and magnitude pruning: the maths agree ---------------------------
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("weights", [[1.0], [0.3, -0.3], [0.5, 1.5, -0.7]])
def test_task_arithmetic_equals_peft(shape, weights):
    deltas = _deltas(len(weights), shape, seed=len(weights))
    want = merge_utils.task_arithmetic(deltas, torch.tensor(weights))
    got = _ours("task_arithmetic", deltas, weight=weights)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("density", [0.1, 0.3, 0.7])
def test_magnitude_prune_equals_peft(shape, density):
    deltas = _deltas(3, shape, seed=11)
    weights = [0.4, -1.2, 0.9]
    want = merge_utils.magnitude_prune(deltas, torch.tensor(weights), density)
    got = _ours("magnitude_prune", deltas, weight=weights, density=density)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    kept = int(density * deltas[0].numel())
    for d in deltas:  # and both keep exactly int(density * n) entries per model
        assert int((merge_utils.prune(d, density, method="magnitude") != 0).sum()) == kept


def test_magnitude_prune_keeps_one_entry_where_peft_keeps_none():
    """Documented difference: for density * n < 1 peft's k = int(density * n) = 0 wipes the
    tensor; we keep max(1, int(density * n)) = 1 entry, the largest."""
    d = torch.tensor([0.1, -0.9, 0.3, 0.2, -0.05, 0.4, 0.0, 0.15, -0.25, 0.35])
    assert torch.count_nonzero(merge_utils.magnitude_prune([d], torch.tensor([1.0]), 0.05)) == 0
    got = _ours("magnitude_prune", [d], density=0.05)
    assert torch.equal(got, torch.where(torch.arange(10) == 1, d, torch.zeros_like(d)))


# -- TIES -------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
@pytest.mark.parametrize("n", [2, 3, 5])
def test_ties_equals_peft_with_unit_weights(shape, density, n):
    deltas = _deltas(n, shape, seed=100 + n)
    want = merge_utils.ties(deltas, torch.ones(n), density)
    got = _ours("ties", deltas, weight=1.0, density=density)  # normalize=True by default
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("c", [0.3, 2.0])
def test_ties_with_equal_weights_c_peft_is_c_times_ours(c):
    """Documented difference (divisor): peft divides the weighted sum by the number of agreeing
    models, we divide by their total weight; with every weight equal to c > 0 the elected
    signs agree and peft's result is c times ours."""
    deltas = _deltas(3, (40, 30), seed=5)
    want = merge_utils.ties(deltas, torch.full((3,), c), 0.4)
    got = _ours("ties", deltas, weight=c, density=0.4)
    torch.testing.assert_close(want, c * got, atol=1e-6, rtol=1e-5)


def test_ties_hand_computed_sign_election_difference():
    """Documented difference (election): model 1 has delta +1.0 at weight 0.5, model 2 has
    -0.6 at weight 1.0. peft votes on unweighted deltas (1.0 - 0.6 > 0 -> '+', keeps model 1:
    0.5 * 1.0 / 1 model = 0.5). We vote on weighted deltas (0.5 - 0.6 < 0 -> '-', keep model 2:
    1.0 * -0.6 / weight 1.0 = -0.6)."""
    deltas = [torch.tensor([1.0]), torch.tensor([-0.6])]
    peft_out = merge_utils.ties(deltas, torch.tensor([0.5, 1.0]), 1.0)
    ours = _ours("ties", deltas, weight=[0.5, 1.0], density=1.0)
    assert torch.allclose(peft_out, torch.tensor([0.5]))
    assert torch.allclose(ours, torch.tensor([-0.6]))


def test_ties_hand_computed_divisor_difference():
    """Both agree on '+'; peft: (1*2.0 + 3*1.0) / 2 models = 2.5, ours: 5.0 / (1 + 3) = 1.25."""
    deltas = [torch.tensor([2.0]), torch.tensor([1.0])]
    assert torch.allclose(merge_utils.ties(deltas, torch.tensor([1.0, 3.0]), 1.0), torch.tensor([2.5]))
    assert torch.allclose(_ours("ties", deltas, weight=[1.0, 3.0], density=1.0), torch.tensor([1.25]))


@pytest.mark.parametrize("ours_method, peft_method", [("sum", "total"), ("count", "frequency")])
def test_sign_election_and_disjoint_merge_equal_peft(ours_method, peft_method):
    stacked = torch.stack(_deltas(4, (30, 20), seed=9))
    stacked[:, 0, :5] = 0.0  # zeros never agree, in both
    stacked[0, 1, :] = -stacked[1, 1, :]  # ties in the vote (zero sum elects '+', in both)
    stacked[2:, 1, :] = 0.0
    mask = agreement_mask(stacked, ours_method)
    assert torch.equal(mask, merge_utils.calculate_majority_sign_mask(stacked, method=peft_method))
    ones = torch.ones(4, 1, 1)
    torch.testing.assert_close(disjoint_sum(stacked, ones, mask, normalize=True),
                               merge_utils.disjoint_merge(stacked, mask), atol=1e-6, rtol=1e-6)


# -- DARE -------------------------------------------------------------------------------
@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_dare_drops_the_same_entries_as_peft_for_the_same_seed(density):
    """peft draws from torch's global RNG, we from a torch.Generator: seeded alike, the drop
    masks are identical; without rescaling ours times 1/density is peft's pruned tensor."""
    d = torch.randn(100, 37, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(1234)
    peft_pruned = merge_utils.prune(d, density, method="random", rescale=True)
    ours = random_sparsify(d.clone(), density, rescale=False, generator=torch.Generator().manual_seed(1234))
    assert torch.equal(ours != 0, peft_pruned != 0)
    torch.testing.assert_close(ours / density, peft_pruned, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("density", [0.2, 0.6])
def test_dare_linear_without_rescale_is_peft_times_density(density):
    deltas, weights = _deltas(3, (50, 20), seed=21), [0.5, -1.0, 2.0]
    torch.manual_seed(77)
    want = merge_utils.dare_linear(deltas, torch.tensor(weights), density)
    got = _ours("dare_linear", deltas, torch.Generator().manual_seed(77), weight=weights, density=density,
                rescale=False)
    torch.testing.assert_close(got / density, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("density", [0.2, 0.6])
def test_dare_ties_with_normalize_is_peft_times_density(density):
    """With unit weights, normalize=True (count divisor) and rescale=False, the only difference
    left is peft's 1/density factor. Our default normalize=False (mergekit's) sums instead."""
    deltas = _deltas(3, (50, 20), seed=22)
    torch.manual_seed(78)
    want = merge_utils.dare_ties(deltas, torch.ones(3), density)
    got = _ours("dare_ties", deltas, torch.Generator().manual_seed(78), density=density, normalize=True,
                rescale=False)
    torch.testing.assert_close(got / density, want, atol=1e-5, rtol=1e-5)
    summed = _ours("dare_ties", deltas, torch.Generator().manual_seed(78), density=density, rescale=False)
    assert not torch.allclose(summed / density, want)  # the default differs from peft


@pytest.mark.parametrize("density", [0.1, 0.3, 0.7])
def test_dare_rescale_preserves_l1_exactly_where_peft_preserves_it_in_expectation(density):
    """Documented difference: we scale kept entries by ||d||_1 / ||kept||_1 (exact L1), peft by
    1 / density (L1 kept only on average); on a large tensor the two factors nearly agree."""
    d = torch.randn(200_000, generator=torch.Generator().manual_seed(4))
    torch.manual_seed(5)
    peft_out = merge_utils.prune(d, density, method="random", rescale=True)
    ours = random_sparsify(d.clone(), density, rescale=True, generator=torch.Generator().manual_seed(5))
    l1 = d.abs().sum()
    torch.testing.assert_close(ours.abs().sum(), l1, atol=0, rtol=1e-5)
    assert not torch.isclose(peft_out.abs().sum(), l1, atol=0, rtol=1e-5)
    torch.testing.assert_close(peft_out.abs().sum(), l1, atol=0, rtol=0.02)
    kept = ours != 0
    assert torch.equal(kept, peft_out != 0)
    factor = (ours[kept] / d[kept]).unique()
    assert torch.allclose(factor, factor[0]) and abs(float(factor[0]) * density - 1) < 0.02
    assert abs(float(kept.float().mean()) - density) < 0.01


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_at_density_one_equals_peft(method):
    deltas, weights = _deltas(3, (30, 30), seed=31), [1.0, 1.0, 1.0]
    peft_fn = getattr(merge_utils, method)
    with pytest.warns(UserWarning, match="no pruning"):
        want = peft_fn(deltas, torch.tensor(weights), 1.0)
    extra = {"normalize": True} if method == "dare_ties" else {}
    got = _ours(method, deltas, torch.Generator().manual_seed(0), weight=weights, density=1.0, **extra)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("density", [0.0, 1.5])
def test_density_outside_zero_one_is_an_error_here(density):
    """peft accepts density 0 (prunes everything) and >= 1 (warns, no pruning); we require
    0 < density <= 1 and say so."""
    from hf_taskarith.errors import MergeConfigError

    d = torch.randn(20)
    if density == 0.0:
        assert torch.count_nonzero(merge_utils.magnitude_prune([d], torch.ones(1), density)) == 0
    with pytest.raises(MergeConfigError, match=r"density=.* is outside \(0.0, 1.0\]"):
        get_merge_method("ties").resolve_params(1, {"density": density})
