"""bfloat16 merges against a float64 reference: ours is correctly rounded, mergekit's is not always.

``benchmarks/bf16_parity.py`` merges the same bfloat16 checkpoints with mergekit (which computes
in bfloat16) and with us (float32, one rounding), and computes each method in float64 from the
bfloat16 inputs, with each tool's own kept set (which of several *equal* magnitudes at a
density cut-off to keep is not defined by the method). These tests run it on the session's tiny
Llamas (deltas of std 0.01 against weights of std 0.02) and assert what it measured, with a
margin: where the two tools differ by more than one bfloat16 ulp, the cause is tie-breaking at
the cut-off, a flipped sign vote, or mergekit's intermediate rounding, and ours is at least as
close to float64 as mergekit's on >= 99% of entries. The one place ours is not correctly
rounded is pinned by ``test_exactly_zero_vote_follows_float32_weights_not_the_written_ones``.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    pytest.importorskip("mergekit")

pytestmark = pytest.mark.mergekit


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("bf16_parity")


@pytest.fixture(scope="module")
def folders(tmp_path_factory, llama_models) -> list[Path]:
    root = tmp_path_factory.mktemp("bf16_parity")
    base, fts = llama_models
    out = []
    for name, model in [("base", base)] + [(f"ft{i + 1}", m) for i, m in enumerate(fts)]:
        copy.deepcopy(model).to(torch.bfloat16).save_pretrained(root / name)
        out.append(root / name)
    return out


def _measure(bench, folders, tmp_path, case_name: str) -> dict:
    case = bench.CASES[case_name]
    ours, mk, _ = bench.run_both(case, folders, tmp_path / case_name)
    return bench.analyse(case, folders, ours, mk, check_group=True)


@pytest.mark.parametrize("case_name", ["ties", "ties_density_0.2", "breadcrumbs"])
def test_ours_is_at_least_as_close_to_float64_as_mergekit(bench, folders, tmp_path, case_name):
    r = _measure(bench, folders, tmp_path, case_name)
    n = r["entries"]
    # the mergekit intermediates the analysis uses are those run_merge used
    assert r["mergekit_group_mismatch"] == 0
    # not vacuous: the tools do differ by more than an ulp (measured 5.0% to 8.4% of entries)
    assert r["differ_gt1"] > 0.005 * n
    # every such entry has one of the three causes
    causes = r["a_tied"] + r["a_other"] + r["b_mergekit_vote_wrong"] + r["b_ours_vote_wrong"] + r["b_both"]
    assert causes + r["c_rounding"] == r["differ_gt1"]
    # measured: ours 100% of entries correctly rounded, mergekit 75% to 85%
    assert r["frac_ours_at_least_as_close"] >= 0.99
    assert r["frac_ours_correctly_rounded"] >= 0.999
    assert r["frac_mergekit_correctly_rounded"] < min(0.95, r["frac_ours_correctly_rounded"])
    # where ours is not correctly rounded: an exactly-zero vote, or an output that cancels
    assert r["ours_err_gt_half"] == r.get("ours_err_gt_half_zero_vote", 0) + r["ours_err_gt_half_cancellation"]
    # pure rounding differences: ours is the correctly rounded one on nearly all
    assert r["c_exact_ours_only"] >= 0.95 * r["c_rounding"]
    assert r["c_exact_mergekit_only"] <= 0.01 * r["c_rounding"] + 1


def test_task_arithmetic_differs_only_by_mergekit_rounding(bench, folders, tmp_path):
    """The control: no selection, no vote; every > 1 ulp difference is rounding, and ours is the
    correctly rounded result there."""
    r = _measure(bench, folders, tmp_path, "task_arithmetic")
    assert r["mergekit_group_mismatch"] == 0
    assert r["differ_gt1"] > 0
    assert r["c_rounding"] == r["differ_gt1"]
    assert r["c_exact_ours_only"] == r["differ_gt1"]
    assert r["ours_err_gt_half"] == r["ours_err_gt_half_cancellation"]


def test_exactly_zero_vote_follows_float32_weights_not_the_written_ones(bench):
    """bfloat16 deltas take few values, so a weighted vote can be exactly 0 for the weights as
    written: 0.5 a - 0.3 a - 0.2 a. The rule (ours and mergekit's) elects + at a zero vote, so the
    exact result is 0.5 a / 0.5 = a; in float32 0.3 + 0.2 > 0.5 (mergekit's bfloat16 weights too),
    the vote is negative and both give -a. Pinned here; docs/mergekit_compatibility.md says so."""
    from hf_taskarith.merging.registry import get_merge_method

    case = bench.Case("ties", (0.5, 0.3, 0.2), density=(1.0, 1.0, 1.0))
    a = 2.0 ** -11
    deltas = [torch.tensor([a]), torch.tensor([-a]), torch.tensor([-a])]
    method = get_merge_method("ties")
    params = method.resolve_params(3, {"weight": list(case.weight), "density": list(case.density)})
    ours = method.fn([d.clone() for d in deltas], params, None)
    exact, _ = bench.reference64(case, torch.zeros(1, dtype=torch.float64), [d.double() for d in deltas],
                                 [torch.ones(1, dtype=torch.bool)] * 3)
    assert float(exact) == a
    assert float(ours) == -a
