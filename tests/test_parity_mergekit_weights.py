"""Parity with mergekit for the weight-space methods nuslerp, multislerp, karcher and nearswap.

Each YAML case is merged by mergekit through its Python API (``MergeConfiguration`` +
``run_merge``) and by us through ``merge_from_config``, on float32 tiny Llamas; the pure
functions are compared with mergekit's ``merge_tensors`` on hand-made edge cases. Our
functions repeat mergekit's float32 operations in the same order, so on the engine's
whole-tensor path (forced here) and for the functions every assertion is **bit equality**
(``torch.equal``). The engine's default path for nuslerp, multislerp and karcher works block
by block from each tensor's Gram matrix (:mod:`hf_taskarith.merging.span`), summing in another
order: it is held to ``tests.mergekit_runs.ULPS`` float32 ulps of each tensor's largest entry. nearswap's
blocks are elementwise, so bit-equal on both paths.

How the base model is read (mergekit 0.1.5's input contracts), covered here:

- nuslerp: optional; without it the two models' weights are interpolated, with it their task
  vectors (``base + slerp(v_0, v_1)``).
- multislerp: optional, likewise; a ``base_model`` also listed under ``models`` is the base.
- karcher: no reference point; a separate ``base_model`` is one more model averaged, a listed
  one counts once.
- nearswap: required, with exactly one other model.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
import yaml

import hf_taskarith.merging.engine as engine
from hf_taskarith import merge
from hf_taskarith.errors import MergeConfigError
from hf_taskarith.merging.registry import REQUIRED, get_merge_method
from tests.mergekit_runs import assert_close_to, run_ours_whole_tensors
from tests.mergekit_runs import run_mergekit as _run_mergekit
from tests.mergekit_runs import run_ours as _run_ours
from tests.mergekit_runs import state_dict as _sd

with warnings.catch_warnings():  # mergekit's lazy unpickler touches the deprecated numpy.core
    warnings.simplefilter("ignore", DeprecationWarning)
    pytest.importorskip("mergekit")
    from mergekit.merge_methods import registry as mk_registry
    from mergekit.merge_methods.api import merge_tensors
    from mergekit.merge_methods.base import MISSING
    from mergekit.options import MergeOptions

pytestmark = pytest.mark.mergekit
MK_OPTIONS = MergeOptions(copy_tokenizer=False, lazy_unpickle=True, quiet=True, write_model_card=False)
METHODS = ["nuslerp", "multislerp", "karcher", "nearswap"]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, llama_models) -> Path:
    """``<root>/{base,ft1,ft2,ft3}``: the session's tiny Llamas, float32."""
    root = tmp_path_factory.mktemp("mergekit_weights")
    base, fts = llama_models
    for name, model in [("base", base)] + [(f"ft{i + 1}", m) for i, m in enumerate(fts)]:
        copy.deepcopy(model).save_pretrained(root / name)
    return root


def _yaml(root: Path, method: str, model_params: list[dict], *, shared: dict | None = None,
          base: str | None = "base", listed_base: bool = False) -> str:
    """A float32 config over ft1..ftN (``model_params`` one dict each); ``listed_base`` also puts
    the base first under ``models`` (mergekit's usual slerp-style form)."""
    cfg: dict = {"merge_method": method}
    if base:
        cfg["base_model"] = str(root / base)
    models = [{"model": str(root / f"ft{i + 1}"), **({"parameters": p} if p else {})}
              for i, p in enumerate(model_params)]
    if listed_base:
        models.insert(0, {"model": str(root / base)})
    cfg["models"] = models
    if shared:
        cfg["parameters"] = shared
    cfg["dtype"] = "float32"
    return yaml.safe_dump(cfg, sort_keys=False)


def _assert_equal_to_mergekit(text: str, tmp_path: Path) -> dict[str, torch.Tensor]:
    """mergekit's result equals ours on the whole-tensor path bit for bit, and ours on the
    default (block) path to ``ULPS``; returns the default path's result."""
    theirs = _run_mergekit(text, tmp_path / "mergekit")
    exact = run_ours_whole_tensors(text, tmp_path, tmp_path / "whole")
    assert set(exact) == set(theirs)
    for k in exact:
        assert exact[k].dtype == theirs[k].dtype == torch.float32, k
        assert torch.equal(exact[k], theirs[k]), (k, float((exact[k] - theirs[k]).abs().max()))
    ours = _run_ours(text, tmp_path, tmp_path / "ours")
    assert_close_to(ours, theirs)
    return ours


def _changed(merged: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> bool:
    return any(not torch.equal(merged[k], ref[k]) for k in merged)


# method, per-model parameters (one dict per fine-tune), shared parameters, base: "base", None or "listed"
YAML_CASES = [
    # nuslerp: t = w_1 / (w_0 + w_1); weights need not sum to 1
    pytest.param("nuslerp", [{"weight": 0.3}, {"weight": 0.7}], None, None, id="nuslerp-no_base"),
    pytest.param("nuslerp", [{"weight": 2.0}, {"weight": 5.0}], None, None, id="nuslerp-no_base-weights_2_5"),
    pytest.param("nuslerp", [{"weight": 1.0}, {"weight": -1.0}], None, None, id="nuslerp-weights_cancel-t_0.5"),
    pytest.param("nuslerp", [{"weight": 0.4}, {"weight": 0.6}], None, "base", id="nuslerp-task_vectors"),
    pytest.param("nuslerp", [{"weight": 0.4}, {"weight": 1.6}], {"nuslerp_flatten": False}, "base",
                 id="nuslerp-task_vectors-rows"),
    pytest.param("nuslerp", [{"weight": 0.4}, {"weight": 0.6}], {"nuslerp_flatten": False, "nuslerp_row_wise": True},
                 None, id="nuslerp-no_base-columns"),
    pytest.param("nuslerp", [{"weight": 3.0}, {"weight": -1.0}], None, "base", id="nuslerp-extrapolates-t_-0.5"),
    # multislerp
    pytest.param("multislerp", [{"weight": 0.2}, {"weight": 0.3}, {"weight": 0.5}], None, None,
                 id="multislerp-no_base-3_models"),
    pytest.param("multislerp", [{"weight": 1.0}, {"weight": 2.0}, {"weight": 3.0}], None, "base",
                 id="multislerp-task_vectors-weights_1_2_3"),
    pytest.param("multislerp", [{"weight": 0.5}, {"weight": 0.7}], {"normalize_weights": False}, "base",
                 id="multislerp-task_vectors-not_normalized"),
    pytest.param("multislerp", [{"weight": 0.6}, {"weight": 0.4}], {"eps": 1e-4}, None, id="multislerp-eps"),
    pytest.param("multislerp", [{"weight": 0.5}, {"weight": 0.5}], None, "listed", id="multislerp-listed_base"),
    # karcher: equal shares; a separate base is one more point
    pytest.param("karcher", [{}, {}], None, None, id="karcher-2_models"),
    pytest.param("karcher", [{}, {}, {}], {"max_iter": 3, "tol": 1e-3}, None, id="karcher-3_models-max_iter_3"),
    pytest.param("karcher", [{}, {}, {}], {"max_iter": 0}, None, id="karcher-max_iter_0"),
    pytest.param("karcher", [{}, {}], None, "base", id="karcher-separate_base_is_a_point"),
    pytest.param("karcher", [{}, {}], None, "listed", id="karcher-listed_base_counts_once"),
    # nearswap: base + exactly one model
    pytest.param("nearswap", [{}], {"t": 0.001}, "base", id="nearswap-t_0.001"),
    pytest.param("nearswap", [{}], {"t": 0.01}, "base", id="nearswap-t_0.01"),
    pytest.param("nearswap", [{}], {"t": 0.02}, "listed", id="nearswap-listed_base"),
]


@pytest.mark.parametrize("method, params, shared, base", YAML_CASES)
def test_float32_checkpoints_equal_mergekit(method, params, shared, base, ckpts, tmp_path):
    text = _yaml(ckpts, method, params, shared=shared, base=base and "base", listed_base=base == "listed")
    ours = _assert_equal_to_mergekit(text, tmp_path)
    for ref in ["base", "ft1", "ft2"]:  # not a copy of an input
        assert _changed(ours, _sd(ckpts / ref)), ref


@pytest.mark.parametrize("method, shared, endpoint", [
    ("nuslerp", None, "ft1"),                 # weights [1, 0]: t = 0
    ("nuslerp", None, "ft2"),                 # weights [0, 1]: t = 1
    ("multislerp", None, "ft1"),              # one model: that model, whatever the base
    ("karcher", None, "ft1"),                 # one model: that model
    ("nearswap", {"t": 0.0}, "base"),         # t = 0: the base
    ("nearswap", {"t": 100.0}, "ft1"),        # t beyond every distance: the model
])
def test_endpoints_are_the_inputs_as_in_mergekit(method, shared, endpoint, ckpts, tmp_path):
    """Both libraries give an input back (to float32 rounding for nuslerp: ``sin(theta) /
    sin(theta)`` need not be exactly 1)."""
    if method == "nuslerp":
        params = [{"weight": 1.0}, {"weight": 0.0}] if endpoint == "ft1" else [{"weight": 0.0}, {"weight": 1.0}]
    else:  # multislerp's weight is required in mergekit, and unused with one model
        params = [{"weight": 0.7}] if method == "multislerp" else [{}]
    base = "base" if method in ("nearswap", "multislerp") else None
    ours = _assert_equal_to_mergekit(_yaml(ckpts, method, params, shared=shared, base=base), tmp_path)
    want = _sd(ckpts / endpoint)
    for k in ours:
        if method == "nuslerp":
            torch.testing.assert_close(ours[k], want[k], atol=1e-6, rtol=1e-6)
        else:
            assert torch.equal(ours[k], want[k]), k


def test_nuslerp_without_base_differs_from_nuslerp_of_task_vectors(ckpts, tmp_path):
    """Without a base model the first model is only the engine's reference: the method gets no
    base (``base=None``) and interpolates the weights, not offsets from the first model."""
    params = [{"weight": 0.3}, {"weight": 0.7}]
    no_base = _run_ours(_yaml(ckpts, "nuslerp", params, base=None), tmp_path, tmp_path / "a")
    with_base = _run_ours(_yaml(ckpts, "nuslerp", params), tmp_path, tmp_path / "b")
    assert _changed(no_base, with_base)


def test_python_api_without_base_equals_mergekit(llama_models):
    """``merge(None, [m1, m2], method=...)`` on modules: the weights themselves are merged."""
    _, fts = llama_models
    cases = [("nuslerp", {"weight": [0.25, 0.75]}), ("multislerp", {"weight": [0.5, 0.2, 0.3]}), ("karcher", {})]
    for method, params in cases:
        models = fts[:2] if method == "nuslerp" else fts
        merged = merge(None, models, method=method, progress=False, **params).state_dict()
        with pytest.MonkeyPatch.context() as m:
            m.setattr(engine, "kernel_for", lambda method, params, context: None)
            exact = merge(None, models, method=method, progress=False, **params).state_dict()
        states = [m.state_dict() for m in models]
        for k, ours in merged.items():
            if not ours.is_floating_point():
                continue
            theirs = merge_tensors([s[k] for s in states], method, parameters=params)
            assert torch.equal(exact[k], theirs), (method, k)
            assert_close_to({k: ours}, {k: theirs})


# -- the pure functions on edge cases, against mergekit's merge_tensors --------------------------
def _ours(method: str, weights: list[torch.Tensor], params: dict, base: torch.Tensor | None) -> torch.Tensor:
    m = get_merge_method(method)
    return m.fn([w.clone() for w in weights], m.resolve_params(len(weights), params), None, base=base)


def _theirs(method: str, weights: list[torch.Tensor], params: dict, base: torch.Tensor | None) -> torch.Tensor:
    if base is None:
        return merge_tensors(weights, method, parameters=params)
    if method == "karcher":  # mergekit's order: the models, then the base
        return merge_tensors(weights + [base], method, parameters=params, base_index=len(weights))
    return merge_tensors([base] + weights, method, parameters=params, base_index=0)


G = torch.Generator().manual_seed(0)
V = torch.randn(24, 16, generator=G)
W = torch.randn(24, 16, generator=G)
Z = torch.zeros(24, 16)
EDGE_CASES = [
    pytest.param("nuslerp", [V, 2 * V], {"weight": [0.3, 0.7]}, None, id="nuslerp-colinear"),
    pytest.param("nuslerp", [V, -3 * V], {"weight": [0.3, 0.7]}, None, id="nuslerp-opposite"),
    pytest.param("nuslerp", [V, Z], {"weight": [0.5, 0.5]}, None, id="nuslerp-zero_tensor"),
    pytest.param("nuslerp", [V, V], {"weight": [0.4, 0.6]}, Z + V, id="nuslerp-zero_task_vectors"),
    pytest.param("nuslerp", [V, W], {"weight": [0.4, 0.6], "nuslerp_flatten": False}, None, id="nuslerp-rows"),
    pytest.param("nuslerp", [V[0], W[0]], {"weight": [0.4, 0.6], "nuslerp_flatten": False, "nuslerp_row_wise": True},
                 None, id="nuslerp-1d-row_wise"),
    pytest.param("multislerp", [V, -V], {"weight": [0.5, 0.5]}, None, id="multislerp-antipodal_2-linear"),
    pytest.param("multislerp", [V, 2 * V, W], {"weight": [0.2, 0.3, 0.5]}, None, id="multislerp-colinear_pair"),
    pytest.param("multislerp", [V, Z, W], {"weight": [1.0, 1.0, 2.0]}, None, id="multislerp-zero_tensor"),
    pytest.param("multislerp", [V, W], {"weight": [0.5, 0.5]}, W, id="multislerp-one_zero_task_vector"),
    pytest.param("multislerp", [V, W], {"weight": [0.3, 0.2], "normalize_weights": False}, Z,
                 id="multislerp-unnormalized"),
    pytest.param("karcher", [V, 2 * V], {}, None, id="karcher-colinear"),
    pytest.param("karcher", [V, Z, W], {}, None, id="karcher-one_zero_tensor"),
    pytest.param("karcher", [Z, Z], {}, None, id="karcher-all_zero"),
    pytest.param("karcher", [V, -V, W], {"max_iter": 25}, None, id="karcher-opposite"),
    pytest.param("karcher", [V, W], {"tol": 0.0}, Z + 1, id="karcher-tol_0-with_base"),
    pytest.param("nearswap", [V], {"t": 0.5}, W, id="nearswap"),
    pytest.param("nearswap", [V], {"t": 0.5}, V, id="nearswap-equal_tensors"),
]


@pytest.mark.parametrize("method, weights, params, base", EDGE_CASES)
def test_edge_cases_equal_mergekit_bit_for_bit(method, weights, params, base):
    ours = _ours(method, weights, params, base)
    theirs = _theirs(method, weights, params, base)
    assert torch.isfinite(ours).all()
    assert torch.equal(ours, theirs), float((ours - theirs).abs().max())


def test_edge_case_values_are_the_expected_ones():
    """Hand-checked values, so the edge cases above cannot pass by both sides being wrong alike."""
    torch.testing.assert_close(_ours("nuslerp", [V, 2 * V], {"weight": [0.3, 0.7]}, None), 1.7 * V)  # linear branch
    assert torch.equal(_ours("multislerp", [V, -V], {"weight": [0.5, 0.5]}, None), Z)  # 0.5 V - 0.5 V
    assert torch.equal(_ours("karcher", [Z, Z], {}, None), Z)
    torch.testing.assert_close(_ours("karcher", [V, 3 * V], {}, None), 2 * V)  # same direction, mean norm
    near = _ours("nearswap", [torch.tensor([0.1, 1.0, 3.0])], {"t": 0.5}, torch.zeros(3))
    torch.testing.assert_close(near, torch.tensor([0.1, 0.5, 0.5]))


def test_three_cancelling_directions_are_refused_like_mergekit():
    a = torch.tensor([1.0, 0.0])
    pts = [a, -a, torch.tensor([0.0, 0.0])]
    with pytest.raises(ValueError, match="weighted sum of the input tensors is zero"):
        merge_tensors(pts, "multislerp", parameters={"weight": [0.5, 0.5, 1.0]})
    with pytest.raises(MergeConfigError, match="cancel out"):
        _ours("multislerp", pts, {"weight": [0.5, 0.5, 1.0]}, None)


def test_multislerp_weights_summing_to_zero_are_refused_where_mergekit_divides_by_zero():
    theirs = merge_tensors([V, W], "multislerp", parameters={"weight": [1.0, -1.0]})
    assert not torch.isfinite(theirs).all()
    with pytest.raises(MergeConfigError, match="sum to 0"):
        _ours("multislerp", [V, W], {"weight": [1.0, -1.0]}, None)
    ours = _ours("multislerp", [V, W], {"weight": [1.0, -1.0], "normalize_weights": False}, None)
    assert torch.equal(ours, merge_tensors([V, W], "multislerp",
                                           parameters={"weight": [1.0, -1.0], "normalize_weights": False}))


# -- parameters and input contracts ------------------------------------------------------------
@pytest.mark.parametrize("name", METHODS)
def test_parameters_and_defaults_match_mergekit(name):
    """Same names and defaults; ``weight`` is required in mergekit and 1.0 here (as for every method)."""
    mk = {p.name: p.default for p in mk_registry.get(name).spec.parameters}
    ours = {k: spec.default for k, spec in get_merge_method(name).param_index.items()}
    assert set(mk) == set(ours)
    for key in set(mk) - {"weight"}:
        assert (ours[key] is REQUIRED) == (mk[key] is MISSING), key
        if ours[key] is not REQUIRED:
            assert ours[key] == mk[key], key
    if "weight" in ours:
        assert ours["weight"] == 1.0 and mk["weight"] is MISSING


@pytest.mark.parametrize("method, n_models, shared, base, message, mk_message", [
    ("nuslerp", 3, None, None, "takes exactly 2 models, got 3", "exactly 2 non-base"),
    ("nuslerp", 1, None, "base", "takes exactly 2 models, got 1", "at least 2 non-base"),
    ("nuslerp", 1, None, "listed", "two models; got 1 besides the base", "at least 2 non-base"),
    ("nearswap", 2, {"t": 0.1}, "base", "takes exactly 1 model besides the base model, got 2",
     "exactly 2 inputs"),
    ("nearswap", 1, {"t": 0.1}, None, "needs a base model", "requires a base input"),
    ("nearswap", 1, None, "base", "needs parameter 't'", "Missing required parameter t"),
])
def test_wrong_inputs_are_refused_by_both(method, n_models, shared, base, message, mk_message, ckpts, tmp_path):
    params = [{"weight": 0.5}] * n_models if method == "nuslerp" else [{}] * n_models
    text = _yaml(ckpts, method, params, shared=shared, base=base and "base", listed_base=base == "listed")
    with pytest.raises((ValueError, RuntimeError), match=mk_message):
        _run_mergekit(text, tmp_path / "mk")
    with pytest.raises(MergeConfigError, match=message):
        _run_ours(text, tmp_path, tmp_path / "ours")
    assert not (tmp_path / "ours").exists()


def test_nuslerp_with_the_base_also_listed_is_refused_where_mergekit_drops_it(ckpts, tmp_path):
    """Documented difference: ``base_model`` + ``models: [base, ft1, ft2]`` is three models under
    ``models`` for our count (nuslerp takes exactly 2); mergekit reads it as base + two models.
    The same merge without listing the base is equal to mergekit's."""
    params = [{"weight": 0.4}, {"weight": 0.6}]
    listed = _yaml(ckpts, "nuslerp", params, listed_base=True)
    with pytest.raises(MergeConfigError, match="takes exactly 2 models, got 3"):
        _run_ours(listed, tmp_path, tmp_path / "ours")
    theirs = _run_mergekit(listed, tmp_path / "mk")
    ours = _run_ours(_yaml(ckpts, "nuslerp", params), tmp_path, tmp_path / "ours2")
    assert_close_to(ours, theirs)


@pytest.mark.parametrize("method, given, message", [
    ("nearswap", {"t": -0.1}, r"t=-0.1 is outside \[0.0"),
    ("karcher", {"max_iter": -1}, r"max_iter=-1 is outside \[0"),
    ("karcher", {"max_iter": 2.5}, "max_iter must be a whole number"),
    ("karcher", {"tol": "small"}, "tol must be a number"),
    ("multislerp", {"eps": -1.0}, r"eps=-1.0 is outside \[0.0"),
    ("multislerp", {"normalize_weights": "yes"}, "normalize_weights must be true or false"),
    ("nuslerp", {"nuslerp_flaten": False}, "does not take parameter"),
])
def test_bad_parameters_are_refused_before_reading_weights(method, given, message):
    m = get_merge_method(method)
    with pytest.raises(MergeConfigError, match=message):
        m.resolve_params(1 if method != "nuslerp" else 2, given)


def test_nearswap_negative_t_is_refused_where_mergekit_returns_the_base(ckpts, tmp_path):
    """Documented difference: ``t < 0`` clamps every fraction to 0 in mergekit (the base, silently)."""
    text = _yaml(ckpts, "nearswap", [{}], shared={"t": -0.5})
    theirs = _run_mergekit(text, tmp_path / "mk")
    base = _sd(ckpts / "base")
    assert all(torch.equal(theirs[k], base[k]) for k in theirs)
    with pytest.raises(MergeConfigError, match="outside"):
        _run_ours(text, tmp_path, tmp_path / "ours")
