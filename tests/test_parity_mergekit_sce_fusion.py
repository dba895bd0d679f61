"""Parity with mergekit 0.1.5 for ``sce`` and ``arcee_fusion``.

The same YAML file is merged by mergekit's Python API (``MergeConfiguration`` + ``run_merge``)
and by ``merge_from_config`` on float32 tiny Llamas, and every tensor compared with
``torch.equal``: both methods repeat mergekit's float32 operations on the same layouts
(stacked task vectors, row softmaxes, reductions over the same axes), so the results are
bit-identical, not merely close. The engine's block path is bit-identical too for arcee_fusion;
for SCE it sums the weights' means in another order, so it is held to a few float32 ulps, and the
whole-tensor path (forced) to bit equality. Two documented differences are asserted too: SCE keeps tied
variances at its selection cut-off lowest index first (mergekit: whatever ``torch.topk``
returns), and arcee_fusion takes exact quartiles on tensors above 10^6 entries (mergekit: from
a random sample of 10^6).
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from hf_taskarith.errors import MergeConfigError
from hf_taskarith.merging.methods.arcee_fusion import (
    arcee_fusion,
    fusion_importance,
    fusion_threshold,
)
from hf_taskarith.merging.methods.sce import sce, sce_select_mask, sce_weights
from hf_taskarith.merging.registry import REQUIRED, get_merge_method
from tests.mergekit_runs import assert_close_to, run_ours_whole_tensors
from tests.mergekit_runs import run_both as _both
from tests.mergekit_runs import run_mergekit as _run_mergekit
from tests.mergekit_runs import run_ours as _run_ours
from tests.mergekit_runs import state_dict as _sd

with warnings.catch_warnings():  # mergekit's lazy unpickler touches the deprecated numpy.core
    warnings.simplefilter("ignore", DeprecationWarning)
    pytest.importorskip("mergekit")
    from mergekit.merge_methods import registry as mk_registry
    from mergekit.merge_methods.base import MISSING, TensorGroup
    from mergekit.options import MergeOptions

pytestmark = pytest.mark.mergekit
MK_OPTIONS = MergeOptions(copy_tokenizer=False, lazy_unpickle=True, quiet=True, write_model_card=False)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, llama_models) -> Path:
    """``<root>/{float32,bfloat16}/{base,ft1,ft2,ft3}``: the session's tiny Llamas."""
    root = tmp_path_factory.mktemp("sce_fusion_parity")
    base, fts = llama_models
    for dtype in ("float32", "bfloat16"):
        for name, model in [("base", base)] + [(f"ft{i + 1}", m) for i, m in enumerate(fts)]:
            copy.deepcopy(model).to(getattr(torch, dtype)).save_pretrained(root / dtype / name)
    return root


def _yaml(root: Path, method: str, n_models: int, *, shared: dict | None = None, model_params: dict | None = None,
          folder: str = "float32", dtype: str = "float32", with_base: bool = True, base_listed: bool = False) -> str:
    cfg: dict = {"merge_method": method}
    if with_base:
        cfg["base_model"] = str(root / folder / "base")
    cfg["models"] = [{"model": str(root / folder / f"ft{i + 1}"),
                      **({"parameters": dict(model_params)} if model_params else {})} for i in range(n_models)]
    if base_listed:
        cfg["models"].insert(0, {"model": str(root / folder / "base")})
    if shared is not None:
        cfg["parameters"] = shared
    cfg["dtype"] = dtype
    return yaml.safe_dump(cfg, sort_keys=False)


def _mk_group(method: str, base: torch.Tensor, models: list[torch.Tensor], **params) -> torch.Tensor:
    group = TensorGroup.from_tensors([base] + models, base_index=0)
    return mk_registry.get(method).merge_group(group, **params)


def _ours_sce(base: torch.Tensor, models: list[torch.Tensor], select_topk: float) -> torch.Tensor:
    method = get_merge_method("sce")
    params = method.resolve_params(len(models), {"select_topk": select_topk})
    return base + method.fn([m - base for m in models], params, None)


# -- end to end: the same YAML through both libraries ------------------------------------
# method, models besides the base, shared parameters, whether the result is the base
E2E_CASES = [
    pytest.param("sce", 3, None, False, id="sce-3_models-defaults"),
    pytest.param("sce", 3, {"select_topk": 0.5}, False, id="sce-3_models-select_0.5"),
    pytest.param("sce", 2, {"select_topk": 0.1, "int8_mask": True}, False, id="sce-2_models-select_0.1-int8_mask"),
    pytest.param("sce", 3, {"select_topk": 0.9}, False, id="sce-3_models-select_0.9"),
    pytest.param("sce", 1, None, False, id="sce-1_model"),
    # one model: zero variance everywhere, nothing selected
    pytest.param("sce", 1, {"select_topk": 0.5}, True, id="sce-1_model-select_0.5-gives_base"),
    pytest.param("sce", 2, {"select_topk": 0.0}, True, id="sce-select_0-gives_base"),
    pytest.param("arcee_fusion", 1, None, False, id="arcee_fusion"),
]


@pytest.mark.parametrize("method, n_models, shared, gives_base", E2E_CASES)
def test_float32_checkpoints_equal_mergekit_bit_for_bit(method, n_models, shared, gives_base, ckpts, tmp_path):
    text = _yaml(ckpts, method, n_models, shared=shared)
    ours, theirs = _both(text, tmp_path)
    exact = run_ours_whole_tensors(text, tmp_path, tmp_path / "whole")
    for k in ours:
        assert torch.equal(exact[k], theirs[k]), (k, float((exact[k] - theirs[k]).abs().max()))
        if method == "arcee_fusion":
            assert torch.equal(ours[k], theirs[k]), k
    assert_close_to(ours, theirs)
    base = _sd(ckpts / "float32" / "base")
    changed = sum(int((ours[k] != base[k]).sum()) for k in ours)
    assert (changed == 0) == gives_base, changed


@pytest.mark.parametrize("method, n_models", [("sce", 2), ("arcee_fusion", 1)])
def test_base_listed_among_the_models(method, n_models, ckpts, tmp_path):
    """mergekit's usual form lists base_model under models too; it is the base, not an input."""
    text = _yaml(ckpts, method, n_models, shared={"select_topk": 0.4} if method == "sce" else None,
                 base_listed=True)
    ours, theirs = _both(text, tmp_path)
    assert_close_to(ours, theirs)
    plain = _run_ours(_yaml(ckpts, method, n_models, shared={"select_topk": 0.4} if method == "sce" else None),
                      tmp_path, tmp_path / "plain")
    assert all(torch.equal(ours[k], plain[k]) for k in ours)


def test_arcee_fusion_keeps_the_base_or_the_model_at_every_entry(ckpts, tmp_path):
    """Each entry is the base's, or ``base + (model - base)``; outliers only: a minority of entries."""
    ours = _run_ours(_yaml(ckpts, "arcee_fusion", 1), tmp_path, tmp_path / "o")
    base, ft1 = _sd(ckpts / "float32" / "base"), _sd(ckpts / "float32" / "ft1")
    taken = total = 0
    for k in ours:
        fused = base[k] + (ft1[k] - base[k])
        from_model = (ours[k] == fused) & (ours[k] != base[k])
        assert torch.equal(torch.where(from_model, fused, base[k]), ours[k]), k
        taken, total = taken + int(from_model.sum()), total + ours[k].numel()
    assert 0 < taken < 0.5 * total


@pytest.mark.parametrize("method, n_models, shared", [("sce", 3, {"select_topk": 0.5}), ("arcee_fusion", 1, None)])
def test_bfloat16_checkpoints_with_float32_maths(method, n_models, shared, ckpts, tmp_path):
    """``dtype: float32`` on bfloat16 checkpoints: mergekit computes in float32 too. arcee_fusion
    is still bit-identical. SCE selects different entries only where variances tie at the cut-off
    (bfloat16 deltas take few distinct values), and only among the tied ones: there the entry is
    the model's on one side, the base's on the other. Such a tensor also gets slightly different
    model weights, so its other entries move a little. Every other tensor is bit-identical."""
    from mergekit.merge_methods.sce import sce_mask as mk_sce_mask

    text = _yaml(ckpts, method, n_models, shared=shared, folder="bfloat16", dtype="float32")
    blocks, theirs = _both(text, tmp_path)
    ours = run_ours_whole_tensors(text, tmp_path, tmp_path / "whole")  # the selection is the point here
    assert_close_to(blocks, ours)
    if method == "arcee_fusion":
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)
        return
    sds = [_sd(ckpts / "bfloat16" / n) for n in ("base", "ft1", "ft2", "ft3")]
    split_ties = 0
    for k in ours:
        stacked = torch.stack([sd[k].float() - sds[0][k].float() for sd in sds[1:]])
        mine, mk = sce_select_mask(stacked, 0.5), mk_sce_mask(stacked, 0.5) != 0
        var = torch.var(stacked, dim=0, unbiased=False)
        kept = int(torch.count_nonzero(var) * 0.5)
        cut = var.reshape(-1).kthvalue(var.numel() - kept + 1).values  # the k-th largest variance
        assert int(mine.sum()) == int(mk.sum()) == kept, k
        assert bool((var[mine != mk] == cut).all()), k  # selections differ only among tied variances
        if torch.equal(mine, mk):
            assert torch.equal(ours[k], theirs[k]), k
        else:
            split_ties += 1
            same = mine == mk  # the tied entries one side kept and the other did not differ by a whole delta
            torch.testing.assert_close(ours[k][same], theirs[k][same], atol=1e-3, rtol=0)
    differ = sum(int((ours[k] != theirs[k]).sum()) for k in ours)
    total = sum(t.numel() for t in ours.values())
    assert split_ties > 0 and differ < 0.002 * total, (split_ties, differ, total)  # measured 20 of 26784


# -- the pure functions against mergekit's merge_group --------------------------------------
@pytest.mark.parametrize("shape", [(48, 40), (37,), (6, 5, 3, 3), (300, 200)])
@pytest.mark.parametrize("n_models", [1, 2, 3])
@pytest.mark.parametrize("select_topk", [1.0, 0.7, 0.3, 0.05, 0.0])
def test_sce_equals_mergekit_merge_group(shape, n_models, select_topk):
    g = torch.Generator().manual_seed(sum(shape) + n_models)
    base = torch.randn(shape, generator=g)
    models = [base + 0.05 * torch.randn(shape, generator=g) for _ in range(n_models)]
    ours = _ours_sce(base, models, select_topk)
    theirs = _mk_group("sce", base, models, select_topk=select_topk, int8_mask=False)
    assert torch.equal(ours, theirs)


def test_sce_gives_equal_weights_when_task_vectors_are_small():
    """mergekit's guard: a total mean square below 1e-6 gives every model 1 / N. Task vectors of
    root mean square 1e-4 and 5e-4 (mean squares 1e-8 and 2.5e-7) fall under it although they
    differ 5-fold."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(64, 32, generator=g)
    deltas = [1e-4 * torch.randn(64, 32, generator=g), 5e-4 * torch.randn(64, 32, generator=g)]
    assert torch.equal(sce_weights(torch.stack(deltas)), torch.tensor([0.5, 0.5]))
    models = [base + d for d in deltas]
    assert torch.equal(_ours_sce(base, models, 1.0), _mk_group("sce", base, models, select_topk=1.0))
    big = torch.stack([d * 100 for d in deltas])  # now above the guard: weights by mean square
    w = sce_weights(big)
    assert w[1] > 10 * w[0]
    torch.testing.assert_close(w.sum(), torch.tensor(1.0))


def test_sce_divisor_is_clamped_at_1e6_like_mergekit():
    """Where only a model of tiny weight agrees, mergekit divides by ``max(w, 1e-6)``, not by ``w``:
    the entry is scaled by ``w / 1e-6`` instead of kept whole. We do the same (our TIES divisor
    would give the entry whole)."""
    base = torch.zeros(4)
    big = torch.tensor([1.0, 1.0, -1.0, 1.0])
    small = torch.tensor([1e-4, 1e-4, 1e-4, -1e-4])  # weight ~1e-8 / (1 + 1e-8)
    ours = _ours_sce(base, [big, small], 1.0)
    assert torch.equal(ours, _mk_group("sce", base, [big, small], select_topk=1.0))
    w_small = float(sce_weights(torch.stack([big, small]))[1])
    assert w_small < 1e-6
    # entry 2: votes sum to -1 + 1e-4 < 0, only `big` agrees -> -1; entry 3: votes sum > 0, only
    # `big` agrees -> 1; entries 0, 1: both agree
    torch.testing.assert_close(ours, torch.tensor([1.0, 1.0, -1.0, 1.0]), atol=1e-6, rtol=0)
    pair = [torch.tensor([0.0, -1.0]), torch.tensor([1e-4, 1e-4])]
    lone = sce([d.clone() for d in pair], select_topk=1.0)
    assert torch.equal(lone, _mk_group("sce", torch.zeros(2), pair, select_topk=1.0))
    # entry 0: only the small model moved; it agrees alone: w_small * 1e-4 / 1e-6, not 1e-4
    w = float(sce_weights(torch.stack([torch.tensor([0.0, -1.0]), torch.tensor([1e-4, 1e-4])]))[1])
    assert w < 1e-6
    torch.testing.assert_close(lone[0], torch.tensor(w * 1e-4 / 1e-6))
    assert float(lone[0]) < 0.1 * 1e-4


def test_sce_hand_computed():
    """Two task vectors; weights 2.5 / 9 and 6.5 / 9 (mean squares); entry 1's votes sum to 0,
    which elects +, so the -2 is erased and the 2 kept whole."""
    out = sce([torch.tensor([1.0, -2.0]), torch.tensor([3.0, 2.0])], select_topk=1.0)
    w1, w2 = 2.5 / 9, 6.5 / 9
    torch.testing.assert_close(out, torch.tensor([(w1 * 1 + w2 * 3) / (w1 + w2), 2.0]))


def test_sce_selection_counts_only_varying_entries():
    """k = int(nnz(var) * select_topk): entries where all models agree exactly (zero variance)
    are not counted, and the k kept are those of largest variance."""
    stacked = torch.tensor([[0.0, 1.0, 5.0, 2.0, 0.5, 7.0], [0.0, -1.0, 5.0, -2.0, -0.5, 7.0]])
    # variances [0, 1, 0, 4, 0.25, 0]: 3 nonzero
    assert sce_select_mask(stacked, 0.7).tolist() == [False, True, False, True, False, False]  # k = 2
    assert not sce_select_mask(stacked, 0.3).any()  # k = int(0.9) = 0
    assert sce_select_mask(stacked, 1.0) is None
    for st in (0.7, 0.3):
        base = torch.zeros(6)
        ours = _ours_sce(base, list(stacked), st)
        assert torch.equal(ours, _mk_group("sce", base, list(stacked), select_topk=st))


def test_sce_ties_at_the_selection_cut_off_are_kept_lowest_index_first():
    """Documented difference: equal variances at the cut-off. We keep exactly k entries, the tied
    ones lowest index first; mergekit keeps k too, whichever ``torch.topk`` returns. Entries
    away from the tie agree."""
    d1 = torch.tensor([3.0, 1.0, 1.0, 1.0, 1.0, 0.1, 2.0, 1.0])
    stacked = torch.stack([d1, -d1])  # variances d1^2: five tied at 1.0
    mask = sce_select_mask(stacked, 0.5)  # 8 nonzero: k = 4 -> 9.0, 4.0 and the first two of the five 1.0s
    assert mask.tolist() == [True, True, True, False, False, False, True, False]
    base = torch.zeros(8)
    theirs = _mk_group("sce", base, list(stacked), select_topk=0.5)
    ours = _ours_sce(base, list(stacked), 0.5)
    assert int((theirs != 0).sum()) <= 4 and int((ours != 0).sum()) <= 4
    untied = d1 != 1.0
    assert torch.equal(ours[untied], theirs[untied])


def test_sce_consumes_a_list_without_holding_two_copies():
    """The list's entries become rows of one stacked tensor (the originals can be freed)."""
    deltas = [torch.randn(5, 4), torch.randn(5, 4)]
    originals = [d.clone() for d in deltas]
    expected = sce(torch.stack(originals), select_topk=1.0)
    out = sce(deltas, select_topk=1.0)
    assert torch.equal(out, expected)
    assert deltas[0].untyped_storage().data_ptr() == deltas[1].untyped_storage().data_ptr()


@pytest.mark.parametrize("shape", [(48, 40), (37,), (6, 5, 3, 3), (300, 200), (1000, 1000)])
def test_arcee_fusion_equals_mergekit_merge_group(shape):
    """Up to 10^6 entries (the largest case has exactly 10^6) mergekit sorts all importances: equal."""
    g = torch.Generator().manual_seed(sum(shape))
    base = torch.randn(shape, generator=g)
    model = base + 0.05 * torch.randn(shape, generator=g)
    ours = get_merge_method("arcee_fusion").fn([model.clone()], {}, None, base=base)
    assert torch.equal(ours, _mk_group("arcee_fusion", base, [model]))
    assert torch.equal(arcee_fusion(model, base), ours)


def test_arcee_fusion_quartiles_are_order_statistics():
    """q is the floor(q (n - 1))-th smallest (0-based), no interpolation; fence median + 1.5 IQR."""
    x = torch.tensor([5.0, 1.0, 9.0, 3.0, 7.0, 2.0, 8.0])  # sorted: 1 2 3 5 7 8 9; ranks 1, 3, 4
    assert float(fusion_threshold(x)) == 5.0 + 1.5 * (7.0 - 2.0)
    assert float(fusion_threshold(torch.tensor([4.0]))) == 4.0


def test_arcee_fusion_importance_is_change_times_row_kl():
    """An independent float64 reference of the importance: |change| times the row's KL divergence."""
    g = torch.Generator().manual_seed(3)
    base, model = torch.randn(6, 10, generator=g), torch.randn(6, 10, generator=g)
    p = torch.softmax(model.double(), -1) + 1e-8
    q = torch.softmax(base.double(), -1) + 1e-8
    want = (model.double() - base.double()).abs() * (p * (p / q).log()).sum(-1, keepdim=True)
    torch.testing.assert_close(fusion_importance(model, base).double(), want, rtol=1e-5, atol=1e-7)


def test_arcee_fusion_of_the_base_with_itself_is_the_base():
    base = torch.randn(8, 8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(arcee_fusion(base.clone(), base), base)


def test_arcee_fusion_takes_exact_quartiles_above_a_million_entries():
    """Documented difference: above 10^6 entries mergekit estimates the quartiles from 10^6 random
    draws (torch's global RNG: its result changes with the seed); ours are the exact order
    statistics, so ours equals a full-sort reference, and mergekit's differs from it at a few
    entries whose importance lies between the exact and the estimated fence."""
    shape = (1100, 1000)
    g = torch.Generator().manual_seed(5)
    base = torch.randn(shape, generator=g)
    model = base + 0.05 * torch.randn(shape, generator=g)
    ours = arcee_fusion(model, base)
    importance = fusion_importance(model, base)
    ordered = importance.reshape(-1).sort().values
    n = ordered.numel()
    q1, med, q3 = (ordered[int(q * (n - 1))] for q in (0.25, 0.5, 0.75))
    keep = importance >= med + 1.5 * (q3 - q1)
    assert torch.equal(ours, base + (model - base) * keep)
    runs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        runs.append(_mk_group("arcee_fusion", base, [model]))
    assert not torch.equal(runs[0], runs[1])  # mergekit's result depends on its RNG
    for theirs in runs:
        assert 0 < int((theirs != ours).sum()) < 0.001 * n  # measured 147 to 411 of 1.1e6 (seeds 0-2)


# -- parameters, input contract, bad input ---------------------------------------------------
@pytest.mark.parametrize("name", ["sce", "arcee_fusion"])
def test_parameters_and_defaults_match_mergekit(name):
    mk = {p.name: p.default for p in mk_registry.get(name).spec.parameters}
    ours = {k: spec.default for k, spec in get_merge_method(name).param_index.items()}
    assert set(mk) == set(ours)
    for key, default in mk.items():
        assert (ours[key] is REQUIRED) == (default is MISSING)
        assert ours[key] == default or ours[key] is REQUIRED, (name, key)


def test_method_flags():
    sce_m, fusion = get_merge_method("sce"), get_merge_method("arcee_fusion")
    assert not sce_m.elementwise and sce_m.block_kernel is not None and not sce_m.on_weights and sce_m.needs_base
    assert not sce_m.randomized and sce_m.min_models == 1 and sce_m.max_models is None
    assert fusion.on_weights and not fusion.elementwise and fusion.needs_base and not fusion.randomized
    assert fusion.block_kernel is not None
    assert (fusion.min_models, fusion.max_models) == (1, 1)


@pytest.mark.parametrize("value", [1.5, -0.1])
def test_sce_select_topk_outside_zero_one_is_refused(value, ckpts, tmp_path):
    """mergekit accepts any number (above 1 keeps all, below 0 none); we ask for [0, 1]."""
    text = _yaml(ckpts, "sce", 2, shared={"select_topk": value})
    _run_mergekit(text, tmp_path / "mk")
    with pytest.raises(MergeConfigError, match=r"select_topk=.* is outside \[0.0, 1.0\]"):
        _run_ours(text, tmp_path, tmp_path / "ours")
    assert not (tmp_path / "ours").exists()


@pytest.mark.parametrize("method, model_params, shared, match", [
    ("sce", {"weight": 0.5}, None, "does not take per-model parameter 'weight'"),
    ("sce", None, {"density": 0.5}, r"does not take parameter\(s\) \['density'\]"),
    ("arcee_fusion", {"weight": 0.5}, None, "does not take per-model parameter 'weight'"),
])
def test_parameters_mergekit_ignores_are_refused(method, model_params, shared, match, ckpts, tmp_path):
    """SCE computes its own weights and arcee_fusion takes no parameters: mergekit silently ignores
    ``weight`` / ``density`` there, we name them."""
    text = _yaml(ckpts, method, 1, shared=shared, model_params=model_params)
    _run_mergekit(text, tmp_path / "mk")
    with pytest.raises(MergeConfigError, match=match):
        _run_ours(text, tmp_path, tmp_path / "ours")


@pytest.mark.parametrize("method, n_models, with_base, match, mk_match", [
    ("arcee_fusion", 2, True, "takes exactly 1 model besides the base model, got 2", "requires exactly 2 inputs"),
    ("arcee_fusion", 1, False, "needs a base model|base", "requires a base input"),
    ("sce", 2, False, "needs a base model|base", "requires a base input"),
])
def test_wrong_inputs_are_refused_by_both(method, n_models, with_base, match, mk_match, ckpts, tmp_path):
    text = _yaml(ckpts, method, n_models, with_base=with_base)
    with pytest.raises((ValueError, RuntimeError), match=mk_match):
        _run_mergekit(text, tmp_path / "mk")
    with pytest.raises(MergeConfigError, match=match):
        _run_ours(text, tmp_path, tmp_path / "ours")
    assert not (tmp_path / "ours").exists()


def test_arcee_fusion_function_refuses_two_models():
    with pytest.raises(MergeConfigError, match="exactly one model"):
        get_merge_method("arcee_fusion").fn([torch.zeros(3), torch.zeros(3)], {}, None, base=torch.zeros(3))
