"""Parity with mergekit: the same YAML file merged by mergekit and by us gives the same model.

Each case writes one mergekit YAML config over tiny Llama checkpoints (float32 and bfloat16),
runs mergekit through its Python API (``MergeConfiguration`` + ``run_merge``) and us through
``merge_from_config`` on the same file, and compares every tensor.

- float32: equal to float32 rounding, every method.
- bfloat16 (``dtype: bfloat16``): mergekit does its maths in bfloat16 (weights, deltas, sums,
  lambda rounded at every step), we do ours in float32 and round once, so results agree within
  3 bfloat16 ulps of the largest input or output magnitude at each entry. Methods that select
  entries by magnitude or elect signs (ties, breadcrumbs*, dare_ties, della) are discontinuous:
  bfloat16 deltas have many *equal* magnitudes, which mergekit orders by argsort and we by
  lowest index, and votes whose sum is near 0 can flip with rounding; so a small fraction of
  entries (measured 0.05% to 0.5%, asserted < 1%) differ by a whole delta.
  ``test_magnitude_selection_differs_only_among_tied_magnitudes`` proves tie-breaking is the
  only cause of selection differences in float32 maths.
- Randomized methods (DARE, DELLA) are compared end to end at density 1 (deterministic) and
  at lower densities on the pure functions, where mergekit's global RNG and our generator,
  seeded alike, draw identical masks.

Differences on purpose are asserted too; docs/mergekit_compatibility.md names each test.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from hf_taskarith.errors import MergeConfigError, UnknownMethodError
from hf_taskarith.merging.registry import get_merge_method, list_merge_methods
from hf_taskarith.merging.sparsify import magnitude, magnitude_outliers
from tests.mergekit_runs import assert_close_to, run_ours_whole_tensors
from tests.mergekit_runs import run_both as _both
from tests.mergekit_runs import run_mergekit as _run_mergekit
from tests.mergekit_runs import run_ours as _run_ours
from tests.mergekit_runs import state_dict as _sd

with warnings.catch_warnings():  # mergekit's lazy unpickler touches the deprecated numpy.core
    warnings.simplefilter("ignore", DeprecationWarning)
    pytest.importorskip("mergekit")
    from mergekit import sparsify as mk_sparsify
    from mergekit.merge_methods import registry as mk_registry
    from mergekit.merge_methods.base import TensorGroup
    from mergekit.options import MergeOptions

pytestmark = pytest.mark.mergekit
MK_OPTIONS = MergeOptions(copy_tokenizer=False, lazy_unpickle=True, quiet=True, write_model_card=False)
BF16_EPS = 2.0 ** -7  # bfloat16 has 8 significant bits: one ulp of x is 2^(floor(log2|x|) - 7)
GTA_METHODS = ["task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties",
               "della", "della_linear"]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, llama_models) -> Path:
    """``<root>/{float32,bfloat16}/{base,ft1,ft2,ft3}``: the session's tiny Llamas in both dtypes."""
    root = tmp_path_factory.mktemp("mergekit_parity")
    base, fts = llama_models
    for dtype in ("float32", "bfloat16"):
        for name, model in [("base", base)] + [(f"ft{i + 1}", m) for i, m in enumerate(fts)]:
            copy.deepcopy(model).to(getattr(torch, dtype)).save_pretrained(root / dtype / name)
    return root


def _yaml(root: Path, method: str, model_params: list[dict], *, shared: dict | None = None, dtype: str | None = None,
          with_base: bool = True, folder: str = "float32", extra: dict | None = None) -> str:
    cfg: dict = {"merge_method": method}
    if with_base:
        cfg["base_model"] = str(root / folder / "base")
    cfg["models"] = [{"model": str(root / folder / f"ft{i + 1}"), **({"parameters": p} if p else {})}
                     for i, p in enumerate(model_params)]
    if shared:
        cfg["parameters"] = shared
    if dtype:
        cfg["dtype"] = dtype
    cfg.update(extra or {})
    return yaml.safe_dump(cfg, sort_keys=False)


def _bf16_ulps(x: torch.Tensor, y: torch.Tensor, *refs: torch.Tensor) -> torch.Tensor:
    """|x - y| per entry, in bfloat16 ulps of the largest magnitude among x, y and ``refs``."""
    scale = torch.stack([t.abs().float() for t in (x, y, *refs)]).amax(0).clamp_min(2.0 ** -100)
    ulp = torch.exp2(torch.floor(torch.log2(scale)) - 7)
    return (x.float() - y.float()).abs() / ulp


# method, per-model parameters (ft1, ft2, ft3), shared parameters
CASES = [
    pytest.param("task_arithmetic", [{"weight": 0.3}, {"weight": -0.3}, {"weight": 0.3}], None,
                 id="task_arithmetic-negative_weight"),
    pytest.param("task_arithmetic", [{"weight": 0.3}, {"weight": 0.5}, {"weight": -0.2}],
                 {"lambda": 0.5, "normalize": True}, id="task_arithmetic-lambda-normalize"),
    pytest.param("linear", [{"weight": 0.3}, {"weight": 0.5}, {"weight": 0.2}], None, id="linear"),
    pytest.param("ties", [{"weight": 0.3, "density": 0.2}, {"weight": -0.3, "density": 0.5},
                          {"weight": 0.5, "density": 0.5}], None, id="ties-density_0.2_0.5"),
    pytest.param("ties", [{"weight": 1.0, "density": 0.2}] * 3, {"int8_mask": True, "lambda": 0.8},
                 id="ties-int8_mask-lambda"),
    pytest.param("ties", [{"weight": 0.4, "density": 0.5}] * 3, {"normalize": False}, id="ties-no_normalize"),
    pytest.param("breadcrumbs", [{"weight": 0.3, "density": 0.5, "gamma": 0.01}] * 3, None, id="breadcrumbs"),
    pytest.param("breadcrumbs_ties", [{"weight": 0.3, "density": 0.5, "gamma": 0.01}, {"weight": -0.3, "density": 0.5},
                                      {"weight": 0.5, "density": 0.5, "gamma": 0.01}], None, id="breadcrumbs_ties"),
    pytest.param("dare_linear", [{"weight": 0.3, "density": 1.0}, {"weight": -0.3, "density": 1.0},
                                 {"weight": 0.5, "density": 1.0}], None, id="dare_linear-density_1"),
    pytest.param("dare_ties", [{"weight": 0.3, "density": 1.0}, {"weight": 0.7, "density": 1.0},
                               {"weight": 0.5, "density": 1.0}], {"normalize": True}, id="dare_ties-density_1"),
    pytest.param("della", [{"weight": 0.3, "density": 1.0, "epsilon": 0.1}] * 3, None, id="della-density_1"),
    pytest.param("della_linear", [{"weight": 0.3, "density": 1.0}, {"weight": -0.3, "density": 1.0},
                                  {"weight": 0.5, "density": 1.0}], {"lambda": 1.5}, id="della_linear-density_1"),
]
# select entries by magnitude or elect signs: discontinuous in the inputs (see the module docstring)
SELECTS_OR_ELECTS = {"ties", "breadcrumbs", "breadcrumbs_ties", "dare_ties", "della"}


@pytest.mark.parametrize("method, params, shared", CASES)
def test_float32_checkpoints_equal_mergekit(method, params, shared, ckpts, tmp_path):
    text = _yaml(ckpts, method, params, shared=shared, dtype="float32", with_base=method != "linear")
    ours, theirs = _both(text, tmp_path)
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], atol=1e-6, rtol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("method, params, shared", CASES)
def test_bfloat16_checkpoints_equal_mergekit_to_bf16_rounding(method, params, shared, ckpts, tmp_path):
    text = _yaml(ckpts, method, params, shared=shared, dtype="bfloat16", with_base=method != "linear",
                 folder="bfloat16")
    ours, theirs = _both(text, tmp_path)
    inputs = [_sd(ckpts / "bfloat16" / n) for n in ("base", "ft1", "ft2", "ft3")]
    base = inputs[0]
    # mergekit rounds every intermediate (deltas, weighted deltas, sums) to bfloat16, so the
    # error scale is an ulp of the largest input or output magnitude at that entry
    ulps = {k: _bf16_ulps(ours[k], theirs[k], *(sd[k] for sd in inputs)) for k in ours}
    if method not in SELECTS_OR_ELECTS:
        worst = {k: float(u.max()) for k, u in ulps.items()}
        assert max(worst.values()) <= 3.0, worst
        return
    far = sum(int((u > 3.0).sum()) for u in ulps.values())
    total = sum(u.numel() for u in ulps.values())
    assert far / total < 0.01, f"{far} of {total} entries differ by more than 3 bf16 ulps"
    changed = sum(int((ours[k] != base[k]).sum()) for k in ours)
    changed_mk = sum(int((theirs[k] != base[k]).sum()) for k in ours)
    assert abs(changed - changed_mk) <= 0.002 * total  # same number of entries touched


@pytest.mark.parametrize("method, params", [
    ("ties", [{"weight": 0.3, "density": 0.2}, {"weight": -0.3, "density": 0.5}, {"weight": 0.5, "density": 0.5}]),
    ("breadcrumbs_ties", [{"weight": 0.5, "density": 0.5, "gamma": 0.05}] * 3),
])
def test_bfloat16_inputs_with_float32_maths_differ_only_by_tie_breaking(method, params, ckpts, tmp_path):
    """``dtype: float32`` on bfloat16 checkpoints makes mergekit compute in float32 like us: then
    only the order among equal magnitudes differs, which touches well under 1% of entries."""
    ours, theirs = _both(_yaml(ckpts, method, params, dtype="float32", folder="bfloat16"), tmp_path)
    total = sum(t.numel() for t in ours.values())
    differ = sum(int((~torch.isclose(ours[k], theirs[k], atol=1e-6, rtol=1e-5)).sum()) for k in ours)
    assert differ / total < 0.005


@pytest.mark.parametrize("name", ["model.layers.0.mlp.up_proj.weight", "model.layers.1.self_attn.q_proj.weight",
                                  "lm_head.weight", "model.norm.weight"])
@pytest.mark.parametrize("density", [0.2, 0.5])
def test_magnitude_selection_differs_only_among_tied_magnitudes(name, density, ckpts):
    """On bfloat16 checkpoints (deltas with many equal magnitudes) ours and mergekit keep the same
    number of entries, the same entries above the cut-off magnitude and none below it: they
    differ only in which of the entries *at* the cut-off they keep."""
    base = load_file(ckpts / "bfloat16" / "base" / "model.safetensors")[name].float()
    ft = load_file(ckpts / "bfloat16" / "ft1" / "model.safetensors")[name].float()
    d = ft - base
    n = d.numel()
    # TIES trimming
    ours, theirs = magnitude(d, density) != 0, mk_sparsify.magnitude(d, density) != 0
    k = max(1, int(density * n))
    assert int(ours.sum()) == int(theirs.sum()) == k
    cut = d.abs().reshape(-1).kthvalue(n - k + 1).values
    assert int((d.abs() == cut).sum()) > 1  # bf16 data: the cut-off magnitude is tied (not vacuous)
    assert torch.equal(ours & (d.abs() != cut), theirs & (d.abs() != cut))
    # breadcrumbs: two cut-offs (outliers above, small entries below)
    gamma = 0.05
    ours = magnitude_outliers(d, density, gamma=gamma) != 0
    theirs = mk_sparsify.magnitude_outliers(d, density, gamma=gamma) != 0
    assert int(ours.sum()) == int(theirs.sum()) == int(density * n)
    n_top = min(int(gamma * n), n - int(density * n))
    order = d.abs().reshape(-1).sort().values
    low, high = order[n - n_top - int(density * n)], order[n - n_top - 1]
    boundary = (d.abs() == low) | (d.abs() == high)
    assert torch.equal(ours & ~boundary, theirs & ~boundary)


def _mk_group_merge(method: str, base: torch.Tensor, deltas: list[torch.Tensor], per_model: dict, shared: dict):
    mk = mk_registry.get(method)
    spec_names = {p.name for p in mk.spec.parameters}
    group = TensorGroup.from_tensors([base] + [base + d for d in deltas], base_index=0)
    params = {k: dict(enumerate(v, start=1)) for k, v in per_model.items() if k in spec_names}
    defaults = {p.name: p.default for p in mk.spec.parameters if p.name not in params}
    return mk.merge_group(group, **{**defaults, **shared, **params})


@pytest.mark.parametrize("method", GTA_METHODS)
@pytest.mark.parametrize("shape", [(48, 40), (37,), (6, 5, 3, 3)])  # 4-D: DELLA ranks along dim 1, as mergekit
def test_pipeline_equals_mergekit_for_the_same_seed(method, shape):
    """The pure functions against mergekit's ``merge_group``: equal for every method, including
    DARE/DELLA below density 1 when mergekit's global RNG and our generator share a seed."""
    g = torch.Generator().manual_seed(sum(shape))
    base = torch.randn(shape, generator=g)
    deltas = [0.1 * torch.randn(shape, generator=g) for _ in range(3)]
    per_model = {"weight": [0.3, -0.5, 0.8], "density": [0.3, 0.6, 0.45], "gamma": [0.01, 0.05, 0.02],
                 "epsilon": [0.1, 0.15, 0.2]}
    ours_m = get_merge_method(method)
    given = {k: v for k, v in per_model.items() if k in ours_m.param_index}
    params = ours_m.resolve_params(3, given)
    ours = base + ours_m.fn([d.clone() for d in deltas], params, torch.Generator().manual_seed(99))
    torch.manual_seed(99)
    theirs = _mk_group_merge(method, base, deltas, per_model, {})
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)


# -- breadcrumbs on small tensors --------------------------------------------------------
def test_breadcrumbs_keeps_density_of_small_norm_tensors(ckpts, tmp_path):
    """Layer norms have 32 entries, so gamma * n = 0.32 outliers: we (and mergekit 0.1.5) keep
    int(0.5 * 32) = 16 entries; mergekit before 0.1.5 sliced ``[n_bot:-0]`` and kept none."""
    text = _yaml(ckpts, "breadcrumbs", [{"weight": 1.0, "density": 0.5, "gamma": 0.01}], dtype="float32")
    ours, theirs = _both(text, tmp_path)
    base = _sd(ckpts / "float32" / "base")
    norms = [k for k in base if k.endswith("norm.weight")]
    assert norms and all(base[k].numel() == 32 for k in norms)
    for k in base:
        n = base[k].numel()
        assert int((ours[k] != base[k]).sum()) == int(0.5 * n), k
        assert torch.equal(ours[k] != base[k], theirs[k] != base[k]), k


@pytest.mark.parametrize("n", [10, 32, 99])
@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_breadcrumbs_small_tensor_counts_match_mergekit(n, density):
    d = torch.randn(n, generator=torch.Generator().manual_seed(n))
    ours, theirs = magnitude_outliers(d, density, gamma=0.01), mk_sparsify.magnitude_outliers(d, density, gamma=0.01)
    assert int((ours != 0).sum()) == max(1, int(density * n))
    assert torch.equal(ours, theirs)


def test_breadcrumbs_keeps_one_entry_where_mergekit_keeps_none():
    """Documented difference: density * n < 1 (here 0.02 * 32): mergekit keeps int(0.64) = 0
    entries, we keep 1 (the largest non-outlier), as our TIES trimming and mergekit's do."""
    d = torch.randn(32, generator=torch.Generator().manual_seed(0))
    assert int((mk_sparsify.magnitude_outliers(d, 0.02, gamma=0.01) != 0).sum()) == 0
    ours = magnitude_outliers(d, 0.02, gamma=0.01)
    assert int((ours != 0).sum()) == 1 and float(ours.abs().max()) == float(d.abs().max())


# -- YAML semantics that differ on purpose -------------------------------------------------
def test_weight_defaults_to_one_where_mergekit_requires_it(ckpts, tmp_path):
    text = _yaml(ckpts, "task_arithmetic", [{}, {}], dtype="float32")
    with pytest.raises(RuntimeError, match="Missing required parameter weight"):
        _run_mergekit(text, tmp_path / "mk")
    explicit = _yaml(ckpts, "task_arithmetic", [{"weight": 1.0}, {"weight": 1.0}], dtype="float32")
    ours, theirs = _run_ours(text, tmp_path, tmp_path / "ours"), _run_mergekit(explicit, tmp_path / "mk2")
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], atol=1e-6, rtol=1e-5)


def test_unknown_parameters_fail_here_where_mergekit_ignores_them(ckpts, tmp_path):
    text = _yaml(ckpts, "ties", [{"weight": 0.5, "density": 0.5, "desnity": 0.2}], dtype="float32")
    _run_mergekit(text, tmp_path / "mk")  # the typo is silently ignored
    with pytest.raises(MergeConfigError, match="desnity"):
        _run_ours(text, tmp_path, tmp_path / "ours")


def test_our_extension_keys_are_ignored_by_mergekit(ckpts, tmp_path):
    """``seed`` and ``max_shard_size`` are ours; mergekit accepts (ignores) them, so configs stay portable."""
    text = _yaml(ckpts, "task_arithmetic", [{"weight": 0.5}], dtype="float32",
                 extra={"seed": 7, "max_shard_size": "1GB"})
    ours, theirs = _both(text, tmp_path)
    assert all(torch.allclose(ours[k], theirs[k], atol=1e-6) for k in ours)


def test_output_dtype_defaults_to_the_base_dtype_not_the_promoted_one(ckpts, tmp_path):
    """No ``dtype:`` with a bfloat16 base and float32 models: mergekit writes the promoted dtype
    (float32), we write the base's (bfloat16); the values agree to bfloat16 rounding."""
    cfg = {"merge_method": "task_arithmetic", "base_model": str(ckpts / "bfloat16" / "base"),
           "models": [{"model": str(ckpts / "float32" / "ft1"), "parameters": {"weight": 0.5}}]}
    text = yaml.safe_dump(cfg)
    ours, theirs = _run_ours(text, tmp_path, tmp_path / "ours"), _run_mergekit(text, tmp_path / "mk")
    assert {t.dtype for t in ours.values()} == {torch.bfloat16}
    assert {t.dtype for t in theirs.values()} == {torch.float32}
    for k in ours:
        assert float(_bf16_ulps(ours[k], theirs[k].bfloat16()).max()) <= 1.0, k


def test_dtype_sets_the_output_only_maths_is_always_float32(ckpts, tmp_path):
    """mergekit's ``dtype:`` is the compute dtype (``out_dtype:`` the output one); ours is only the
    output dtype: with ``dtype: bfloat16, out_dtype: float32`` we give the float32 result, while
    mergekit's carries bfloat16 rounding. We round once: within half a bf16 ulp of exact."""
    params = [{"weight": 0.3}, {"weight": -0.3}, {"weight": 0.3}]
    text = _yaml(ckpts, "task_arithmetic", params, extra={"dtype": "bfloat16", "out_dtype": "float32"})
    ours, theirs = _both(text, tmp_path)
    reference = _run_ours(_yaml(ckpts, "task_arithmetic", params, dtype="float32"), tmp_path, tmp_path / "f32")
    assert all(torch.equal(ours[k], reference[k]) for k in ours)
    assert any(not torch.allclose(theirs[k], reference[k], atol=1e-6, rtol=1e-5) for k in ours)
    for k in ours:  # ... but only by bfloat16 rounding
        torch.testing.assert_close(theirs[k], reference[k], atol=2e-3, rtol=1.6e-2)
    # bfloat16 output: one rounding of exact maths, mergekit rounds at every step
    bf = _run_ours(_yaml(ckpts, "task_arithmetic", params, dtype="bfloat16", folder="bfloat16"), tmp_path,
                   tmp_path / "bf")
    mk = _run_mergekit(_yaml(ckpts, "task_arithmetic", params, dtype="bfloat16", folder="bfloat16"),
                       tmp_path / "mk_bf")
    sd = {n: _sd(ckpts / "bfloat16" / n) for n in ("base", "ft1", "ft2", "ft3")}
    worst_ours = worst_mk = 0.0
    for k in bf:
        b = sd["base"][k].double()
        exact = b + sum(w["weight"] * (sd[f"ft{i + 1}"][k].double() - b) for i, w in enumerate(params))
        worst_ours = max(worst_ours, float(_bf16_ulps(bf[k].double(), exact).max()))
        worst_mk = max(worst_mk, float(_bf16_ulps(mk[k].double(), exact).max()))
    assert worst_ours <= 0.5 + 1e-3
    assert worst_mk > 0.5


def test_base_listed_among_the_models_is_the_base_for_task_vector_methods(ckpts, tmp_path):
    """mergekit lets ``base_model`` appear under ``models`` (without parameters); so do we."""
    cfg = yaml.safe_load(_yaml(ckpts, "ties", [{"weight": 0.7, "density": 0.5}, {"weight": 0.3, "density": 0.4}],
                               dtype="float32"))
    cfg["models"].insert(0, {"model": cfg["base_model"]})
    ours, theirs = _both(yaml.safe_dump(cfg), tmp_path)
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], atol=1e-6, rtol=1e-5)


def test_linear_with_a_base_that_is_not_a_model(ckpts, tmp_path):
    """mergekit's linear needs a weight for ``base_model`` (it is an input); ours treats it as the
    reference point only: the result is the weighted average of the listed models."""
    params = [{"weight": 0.3}, {"weight": 0.5}]
    text = _yaml(ckpts, "linear", params, dtype="float32")
    with pytest.raises(RuntimeError, match="Missing required parameter weight"):
        _run_mergekit(text, tmp_path / "mk")
    ours = _run_ours(text, tmp_path, tmp_path / "ours")
    theirs = _run_mergekit(_yaml(ckpts, "linear", params, dtype="float32", with_base=False), tmp_path / "mk2")
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], atol=1e-6, rtol=1e-5)


def test_linear_includes_the_base_when_it_is_listed_among_the_models(ckpts, tmp_path):
    cfg = {"merge_method": "linear", "base_model": str(ckpts / "float32" / "base"),
           "models": [{"model": str(ckpts / "float32" / "base"), "parameters": {"weight": 0.5}},
                      {"model": str(ckpts / "float32" / "ft1"), "parameters": {"weight": 0.5}}],
           "dtype": "float32"}
    ours, theirs = _both(yaml.safe_dump(cfg), tmp_path)
    base, ft1 = _sd(ckpts / "float32" / "base"), _sd(ckpts / "float32" / "ft1")
    for k in ours:
        want = 0.5 * base[k] + 0.5 * ft1[k]
        torch.testing.assert_close(theirs[k], want, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(ours[k], want, atol=1e-6, rtol=1e-5)


def test_linear_without_normalize_is_the_plain_weighted_sum(ckpts, tmp_path):
    text = _yaml(ckpts, "linear", [{"weight": 0.5}, {"weight": 0.7}], shared={"normalize": False},
                 dtype="float32", with_base=False)
    ours, theirs = _both(text, tmp_path)
    ft1, ft2 = _sd(ckpts / "float32" / "ft1"), _sd(ckpts / "float32" / "ft2")
    for k in ours:
        want = 0.5 * ft1[k] + 0.7 * ft2[k]
        torch.testing.assert_close(theirs[k], want, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(ours[k], want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("extra, model_params, message", [
    # slices (layer ranges, frankenmerges) are supported: tests/test_slices.py
    ({"modules": {}}, {"weight": 0.5}, "per-module configs are not supported"),
    ({"tokenizer": {"source": "base"}}, {"weight": 0.5}, "tokenizer blocks are not supported"),
    # tokenizer_source: union is supported: tests/test_tokenizer_union.py
    # gradients and filters are supported: tests/test_parity_mergekit_gradients.py
])
def test_unsupported_mergekit_features_are_refused(extra, model_params, message, ckpts, tmp_path):
    text = _yaml(ckpts, "task_arithmetic", [model_params], dtype="float32", extra=extra)
    with pytest.raises(MergeConfigError, match=message):
        _run_ours(text, tmp_path, tmp_path / "ours")
    assert not (tmp_path / "ours").exists()


# documented in docs/mergekit_compatibility.md, "Methods"
MERGEKIT_ONLY = {"ram", "ramplus_tl"}
OURS_ONLY = {"magnitude_prune", "tsv", "iso_c", "iso_cts", "hierarchical"}


def test_method_sets_differ_exactly_as_documented():
    theirs = {m.spec.name for m in mk_registry.registered_methods()}
    ours = {m.name for m in list_merge_methods()}
    assert theirs - ours == MERGEKIT_ONLY
    assert ours - theirs == OURS_ONLY
    for name in sorted(MERGEKIT_ONLY)[:3]:
        with pytest.raises(UnknownMethodError, match="available"):
            get_merge_method(name)


# parameters one side accepts and the other does not (docs/mergekit_compatibility.md, "Parameters")
MERGEKIT_ONLY_PARAMS = {"task_arithmetic": {"density", "rescale"}}  # accepted but without effect there
# della: rescale_mode (default "l1" = mergekit's rescale; "inverse_probability" = the DELLA paper's)
OURS_ONLY_PARAMS: dict[str, set[str]] = {"della": {"rescale_mode"}, "della_linear": {"rescale_mode"},
                                        "ties": {"trim_scope"}}


@pytest.mark.parametrize("name", GTA_METHODS + ["linear", "slerp", "model_stock", "passthrough"])
def test_parameters_and_defaults_match_mergekit(name):
    """Same parameter names and defaults as mergekit, except the documented ones and ``weight``
    (required in mergekit, 1.0 here: test_weight_defaults_to_one_where_mergekit_requires_it).
    Required parameters (slerp's ``t``) are required on both sides."""
    from mergekit.merge_methods.base import MISSING

    from hf_taskarith.merging.registry import REQUIRED

    mk = {p.name: p.default for p in mk_registry.get(name).spec.parameters}
    ours = {k: spec.default for k, spec in get_merge_method(name).param_index.items()}
    assert set(mk) - set(ours) == MERGEKIT_ONLY_PARAMS.get(name, set())
    assert set(ours) - set(mk) == OURS_ONLY_PARAMS.get(name, set())
    for key in set(mk) & set(ours) - {"weight"}:
        assert (ours[key] is REQUIRED) == (mk[key] is MISSING), (name, key)
        if ours[key] is not REQUIRED:
            assert ours[key] == mk[key], (name, key)
    if "weight" in ours:
        assert ours["weight"] == 1.0


def test_task_arithmetic_rejects_density_that_mergekit_ignores(ckpts, tmp_path):
    text = _yaml(ckpts, "task_arithmetic", [{"weight": 0.5, "density": 0.2}], shared={"rescale": True},
                 dtype="float32")
    full = _run_mergekit(_yaml(ckpts, "task_arithmetic", [{"weight": 0.5}], dtype="float32"), tmp_path / "mk0")
    ignored = _run_mergekit(text, tmp_path / "mk")
    assert all(torch.equal(full[k], ignored[k]) for k in full)  # density had no effect in mergekit
    with pytest.raises(MergeConfigError, match="does not take"):
        _run_ours(text, tmp_path, tmp_path / "ours")


# -- methods defined on whole weights: slerp, model_stock, passthrough ----------------------
# These take the models' weights, not task vectors (MergeMethod.on_weights), and repeat
# mergekit's float32 arithmetic step by step: outputs are equal bit for bit. The engine runs
# model_stock block by block from Gram matrices by default (hf_taskarith.merging.span): that
# path is held to a few float32 ulps, the whole-tensor path to bit equality.
WEIGHT_SPACE_CASES = [
    pytest.param("slerp", 1, {"t": 0.3}, id="slerp-t_0.3"),
    pytest.param("slerp", 1, {"t": 0.0}, id="slerp-t_0"),
    pytest.param("slerp", 1, {"t": 1.0}, id="slerp-t_1"),
    pytest.param("slerp", 1, {"t": 1.4}, id="slerp-t_1.4-extrapolates"),
    pytest.param("model_stock", 2, None, id="model_stock-2_models"),
    pytest.param("model_stock", 3, None, id="model_stock-3_models"),
    pytest.param("model_stock", 3, {"filter_wise": True}, id="model_stock-3_models-filter_wise"),
    pytest.param("model_stock", 2, {"filter_wise": True}, id="model_stock-2_models-filter_wise"),
]


@pytest.mark.parametrize("method, n_models, shared", WEIGHT_SPACE_CASES)
def test_weight_space_methods_equal_mergekit_exactly(method, n_models, shared, ckpts, tmp_path):
    text = _yaml(ckpts, method, [{}] * n_models, shared=shared, dtype="float32")
    ours, theirs = _both(text, tmp_path)
    exact = run_ours_whole_tensors(text, tmp_path, tmp_path / "whole")
    base = _sd(ckpts / "float32" / "base")
    for k in ours:
        assert torch.equal(exact[k], theirs[k]), (k, float((exact[k] - theirs[k]).abs().max()))
    assert_close_to(ours, theirs)
    if shared != {"t": 0.0}:
        assert any(not torch.equal(ours[k], base[k]) for k in ours)  # it did something


@pytest.mark.parametrize("t, endpoint", [(0.0, "base"), (1.0, "ft1")])
def test_slerp_endpoints_are_the_base_and_the_model(t, endpoint, ckpts, tmp_path):
    """The base is the first endpoint (``t = 0``), as in mergekit; the endpoints are reached to
    float32 rounding (``sin(theta) / sin(theta)`` need not be exactly 1)."""
    ours = _run_ours(_yaml(ckpts, "slerp", [{}], shared={"t": t}, dtype="float32"), tmp_path, tmp_path / "o")
    want = _sd(ckpts / "float32" / endpoint)
    for k in ours:
        torch.testing.assert_close(ours[k], want[k], atol=1e-6, rtol=1e-6)


def test_slerp_with_the_base_listed_among_the_models(ckpts, tmp_path):
    """mergekit's usual slerp YAML lists both models, one of them as base_model."""
    cfg = yaml.safe_load(_yaml(ckpts, "slerp", [{}], shared={"t": 0.6}, dtype="float32"))
    cfg["models"].insert(0, {"model": cfg["base_model"]})
    ours, theirs = _both(yaml.safe_dump(cfg), tmp_path)
    assert_close_to(ours, theirs)


def test_slerp_interpolates_linearly_between_colinear_tensors(tmp_path):
    """|cos theta| > 0.9995 (here: the model is 2x the base, or -3x) takes the linear branch, as
    mergekit; a zero tensor (norm below 1e-8, counted as 1) gives a finite result, also as mergekit."""
    from mergekit.merge_methods.slerp import slerp as mk_slerp

    from hf_taskarith.merging.methods.slerp import slerp

    v0 = torch.randn(64, 48, generator=torch.Generator().manual_seed(0))
    for v1 in (2 * v0, -3 * v0, torch.zeros_like(v0)):
        ours = slerp(0.3, v0, v1)
        assert torch.equal(ours, mk_slerp(torch.tensor(0.3), v0, v1))
        if v1.any():
            torch.testing.assert_close(ours, 0.7 * v0 + 0.3 * v1)
        assert torch.isfinite(ours).all()


@pytest.mark.parametrize("shared, scale, with_base", [
    (None, None, False),      # a plain copy
    (None, 0.5, False),       # scaled
    ({"scale": -1.5}, None, True),  # shared value; base_model equal to the model
])
def test_passthrough_equals_mergekit_exactly(shared, scale, with_base, ckpts, tmp_path):
    cfg = yaml.safe_load(_yaml(ckpts, "passthrough", [{"scale": scale} if scale is not None else {}], shared=shared,
                               dtype="float32", with_base=False))
    if with_base:
        cfg["base_model"] = cfg["models"][0]["model"]
    ours, theirs = _both(yaml.safe_dump(cfg), tmp_path)
    ft1 = _sd(ckpts / "float32" / "ft1")
    factor = scale if scale is not None else (shared or {}).get("scale", 1.0)
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k
        assert torch.equal(ours[k], ft1[k] * factor), k


def test_passthrough_with_another_base_model_uses_it_only_as_the_reference(ckpts, tmp_path):
    """mergekit counts a separate ``base_model`` as a second input and refuses; ours copies the
    model and uses the base only for names, shapes, the default dtype and the tokenizer."""
    text = _yaml(ckpts, "passthrough", [{"scale": 0.5}], dtype="float32")
    with pytest.raises(ValueError, match="requires exactly 1 inputs"):
        _run_mergekit(text, tmp_path / "mk")
    ours = _run_ours(text, tmp_path, tmp_path / "ours")
    ft1 = _sd(ckpts / "float32" / "ft1")
    assert all(torch.equal(ours[k], ft1[k] * 0.5) for k in ours)


@pytest.mark.parametrize("method, n_models, shared, message, mk_message", [
    ("slerp", 2, {"t": 0.5}, "takes exactly 1 model besides the base model, got 2", "requires exactly 2 inputs"),
    ("model_stock", 1, None, "takes at least 2 models besides the base model, got 1", "requires at least 3 inputs"),
    ("passthrough", 2, None, "takes exactly 1 model, got 2", "requires exactly 1 inputs"),
    ("slerp", 1, None, "needs parameter 't'", "Missing required parameter t"),
])
def test_weight_space_methods_refuse_the_wrong_number_of_models(method, n_models, shared, message, mk_message, ckpts,
                                                                tmp_path):
    """mergekit refuses these too (its input contracts count the base: slerp 2 inputs, model_stock
    at least 3, passthrough 1)."""
    text = _yaml(ckpts, method, [{}] * n_models, shared=shared, dtype="float32", with_base=method != "passthrough")
    with pytest.raises((ValueError, RuntimeError), match=mk_message):
        _run_mergekit(text, tmp_path / "mk")
    with pytest.raises(MergeConfigError, match=message):
        _run_ours(text, tmp_path, tmp_path / "ours")
    assert not (tmp_path / "ours").exists()


# a gradient of t (t: [0, 0.5, 1]) and filters: tests/test_parity_mergekit_gradients.py


@pytest.mark.parametrize("method, n_models, shared", [
    ("slerp", 1, {"t": 0.3}),
    ("model_stock", 3, None),
    ("passthrough", 1, {"scale": 0.7}),
])
def test_weight_space_methods_on_bfloat16_checkpoints(method, n_models, shared, ckpts, tmp_path):
    """``dtype: bfloat16``: mergekit's slerp computes in float32 and rounds once, like us (equal);
    its passthrough rounds ``w * scale`` once from float32, like us (equal); its model_stock runs in
    bfloat16 (every step rounded), ours in float32: within 3 bfloat16 ulps."""
    text = _yaml(ckpts, method, [{}] * n_models, shared=shared, dtype="bfloat16", folder="bfloat16",
                 with_base=method != "passthrough")
    ours, theirs = _both(text, tmp_path)
    if method != "model_stock":
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)
        return
    inputs = [_sd(ckpts / "bfloat16" / n) for n in ("base", "ft1", "ft2", "ft3")]
    worst = max(float(_bf16_ulps(ours[k], theirs[k], *(sd[k] for sd in inputs)).max()) for k in ours)
    assert worst <= 3.0
