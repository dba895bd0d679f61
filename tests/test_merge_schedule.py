"""Per-tensor parameter values (hf_taskarith.merging.schedule): gradients, filters, their checks,
and their path through merge(), YAML configs, the torch-free path and the merge report."""

from __future__ import annotations

import json
import random

import pytest
import torch
import yaml
from safetensors.torch import load_file

from hf_taskarith import merge, merge_from_config
from hf_taskarith.errors import MergeConfigError
from hf_taskarith.merging import Case, Conditional, Gradient
from hf_taskarith.merging.config import MergeConfig
from hf_taskarith.merging.registry import ParamSpec, get_merge_method
from hf_taskarith.merging.schedule import evaluate, layer_positions, parse_setting, to_plain, with_fallback


def _sd(folder) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


# -- the values ---------------------------------------------------------------------------
@pytest.mark.parametrize("values, t, expected", [
    ([0.0, 1.0], 0.25, 0.25), ([0.0, 0.5, 1.0], 0.75, 0.75), ([1.0, 0.0, 1.0], 0.5, 0.0),
    ([0.2, 0.8], 0.0, 0.2), ([0.2, 0.8], 1.0, 0.8), ([0.7], 0.6, 0.7), ([2, 4], 0.5, 3.0),
    ([True, False], 0.4, True), ([True, False], 1.0, False), (["tensor", "global", "tensor"], 0.5, "global"),
    (["a", "b", "c"], 0.49, "a"),
])
def test_gradient_interpolates_numbers_and_picks_other_values(values, t, expected):
    value = Gradient(values).value_at(t)
    assert value == (pytest.approx(expected) if isinstance(expected, float) else expected)
    assert type(value) is type(expected)


def test_settings_evaluate_exactly_like_mergekit():
    """Random gradients, filters and filters holding gradients, against mergekit's ``evaluate_setting``."""
    mk_config = pytest.importorskip("mergekit.config")
    rng = random.Random(0)
    names = ["model.layers.3.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight", "lm_head.weight"]
    for _ in range(300):
        grad = [rng.uniform(-1, 2) for _ in range(rng.randint(1, 6))]
        raw = rng.choice([
            grad,
            [{"filter": "self_attn", "value": grad}, {"filter": "mlp", "value": rng.random()}],
            [{"filter": "mlp", "value": rng.random()}, {"value": grad}],
            {"filter": "*", "value": grad},
            [rng.choice([True, False]) for _ in range(3)],
        ])
        ours = parse_setting(raw, where="x")
        theirs = mk_config.MergeConfiguration.model_validate(
            {"merge_method": "linear", "models": [{"model": "m"}], "parameters": {"p": raw}}).parameters["p"]
        for name in names:
            t = rng.choice([0, 1, rng.random(), 1 / 3, 2 / 3])
            assert evaluate(ours, tensor_name=name, position=t) == mk_config.evaluate_setting(
                name, theirs, t, validate=lambda v: v), (raw, name, t)


def test_conditional_first_matching_case_wins():
    c = Conditional(Case("self_attn", 0.1), Case("layers.0.", 0.2), Case("*", Gradient([0.0, 1.0])))
    assert c.value_for("model.layers.0.self_attn.q_proj.weight", 0.0) == 0.1
    assert c.value_for("model.layers.0.mlp.up_proj.weight", 0.0) == 0.2
    assert c.value_for("model.layers.3.mlp.up_proj.weight", 1.0) == 1.0
    assert Conditional(Case("mlp", 0.5)).value_for("lm_head.weight", 0.0) is None


def test_yaml_forms_parse_to_schedules():
    assert parse_setting(0.5, where="w") == 0.5
    assert parse_setting([0, 1], where="w") == Gradient([0, 1])
    assert parse_setting({"filter": "mlp", "value": [0, 1]}, where="w") == Conditional(Case("mlp", Gradient([0, 1])))
    assert parse_setting([{"filter": "mlp", "value": 1}, {"value": 2}], where="w") == Conditional(
        Case("mlp", 1), default=2)
    assert to_plain(parse_setting([{"filter": "mlp", "value": [0, 1]}, {"value": 2}], where="w")) == [
        {"filter": "mlp", "value": [0, 1]}, {"value": 2}]


@pytest.mark.parametrize("raw, message", [
    ([], r"w: an empty list is neither a value nor a gradient"),
    ([0.5, {"filter": "mlp", "value": 1}], r"w: a list mixes filter mappings and plain values"),
    ({"filter": 3, "value": 0.5}, r"w: a filter must be a string .* got 3 \(int\)"),
    ({"filter": "mlp"}, r"w: a filter mapping has no 'value'"),
    ({"filter": "mlp", "value": 1, "where": 2}, r"unknown key\(s\) \['where'\]"),
    ({"filter": "mlp", "value": {"filter": "self_attn", "value": 1}}, r"filters cannot be nested"),
    ([{"filter": "mlp", "value": []}], r"a gradient needs at least one value, got an empty list"),
    ([[0, 1], [1, 0]], r"gradient values must be numbers, booleans or strings, got \[0, 1\]"),
    ({1, 2}, r"w: expected a number, boolean, string, a list \(gradient\)"),
])
def test_malformed_yaml_settings_are_explained(raw, message):
    with pytest.raises(MergeConfigError, match=message):
        parse_setting(raw, where="w")


def test_every_value_of_a_schedule_is_checked_against_the_range():
    density = get_merge_method("ties").param_index["density"]
    assert density.check_setting(Gradient([0.2, 1]), "ties") == Gradient([0.2, 1.0])
    with pytest.raises(MergeConfigError, match=r"density=1.5 is outside \(0.0, 1.0\]"):
        density.check_setting(Gradient([0.5, 1.5]), "ties")
    with pytest.raises(MergeConfigError, match=r"density=0.0 is outside \(0.0, 1.0\]"):
        density.check_setting(Conditional(Case("mlp", 0.5), default=Gradient([0.0, 1.0])), "ties")
    with pytest.raises(MergeConfigError, match=r"trim_scope must be one of \['tensor', 'global'\], got 'layer'"):
        get_merge_method("ties").param_index["trim_scope"].check_setting(Gradient(["tensor", "layer"]), "ties")
    with pytest.raises(MergeConfigError, match=r"must be a whole number, got 2.5"):
        ParamSpec("k", 1, kind=int).check(2.5, "m")


def test_a_models_filter_falls_back_to_the_shared_value():
    assert with_fallback(Conditional(Case("mlp", 0.5)), Gradient([0, 1])) == Conditional(
        Case("mlp", 0.5), default=Gradient([0, 1]))
    assert with_fallback(Gradient([0, 1]), 0.3) == Gradient([0, 1])
    assert with_fallback(None, 0.3) == 0.3
    cfg = MergeConfig.from_dict({
        "merge_method": "ties", "base_model": "b", "parameters": {"density": [0.2, 0.4], "lambda": [1, 0.5]},
        "models": [{"model": "x", "parameters": {"density": {"filter": "mlp", "value": 0.9}}},
                   {"model": "y", "parameters": {"weight": [0.1, 0.2]}}]})
    kw = cfg.merge_kwargs()
    assert kw["density"] == [Conditional(Case("mlp", 0.9), default=Gradient([0.2, 0.4])), Gradient([0.2, 0.4])]
    assert kw["weight"] == [1.0, Gradient([0.1, 0.2])] and kw["lambda"] == Gradient([1, 0.5])


def test_layer_positions():
    names = ["model.embed_tokens.weight", "model.layers.0.mlp.w", "model.layers.1.mlp.w", "model.layers.2.mlp.w",
             "model.norm.weight", "lm_head.weight", "encoder.block.0.f", "encoder.block.1.f",
             "decoder.block.0.f", "transformer.h.10.attn.c_attn.weight", "transformer.h.0.ln_1.weight",
             "model.layers.1.block_sparse_moe.experts.7.w1.weight"]
    pos = layer_positions(names)
    assert [pos[n] for n in names[:6]] == [0.0, 0.0, 0.5, 1.0, 0.0, 0.0]
    assert (pos["encoder.block.1.f"], pos["decoder.block.0.f"]) == (1.0, 1.0)  # a stack of one layer: t = 1
    assert (pos["transformer.h.10.attn.c_attn.weight"], pos["transformer.h.0.ln_1.weight"]) == (1.0, 0.0)
    assert pos["model.layers.1.block_sparse_moe.experts.7.w1.weight"] == 0.5


# -- through the engine ---------------------------------------------------------------------
def test_api_schedules_equal_the_yaml_ones(llama_checkpoints, tmp_path):
    ckpt = llama_checkpoints
    via_api = merge(ckpt / "base", [ckpt / "ft1", ckpt / "ft2"], method="ties", output_dir=tmp_path / "api",
                    weights=[Gradient([0.3, 1.0]), Conditional(Case("self_attn", 0.2), default=0.6)],
                    density=Conditional(Case("mlp", Gradient([0.3, 0.9])), default=0.5), progress=False)
    text = yaml.safe_dump({"merge_method": "ties", "base_model": str(ckpt / "base"), "models": [
        {"model": str(ckpt / "ft1"), "parameters": {"weight": [0.3, 1.0]}},
        {"model": str(ckpt / "ft2"),
         "parameters": {"weight": [{"filter": "self_attn", "value": 0.2}, {"value": 0.6}]}}],
        "parameters": {"density": [{"filter": "mlp", "value": [0.3, 0.9]}, {"value": 0.5}]}})
    via_yaml = merge_from_config(text, tmp_path / "yaml", progress=False)
    a, b = _sd(via_api), _sd(via_yaml)
    assert all(torch.equal(a[k], b[k]) for k in a)
    flat = _sd(merge(ckpt / "base", [ckpt / "ft1", ckpt / "ft2"], method="ties", output_dir=tmp_path / "flat",
                     weights=[0.3, 0.6], density=0.5, progress=False))
    assert any(not torch.equal(a[k], flat[k]) for k in a)
    report = json.loads((via_api / "merge_report.json").read_text())
    assert report["params"]["weight"] == [[0.3, 1.0], [{"filter": "self_attn", "value": 0.2}, {"value": 0.6}]]
    assert report["params"]["density"] == [[{"filter": "mlp", "value": [0.3, 0.9]}, {"value": 0.5}]] * 2
    assert "self_attn" in (via_api / "README.md").read_text()


def test_plain_lists_are_per_model_values_in_python(llama_checkpoints, tmp_path):
    ckpt = llama_checkpoints
    with pytest.raises(MergeConfigError, match=r"lambda takes one value here, got \[0.5, 1.0\]"):
        merge(ckpt / "base", [ckpt / "ft1"], output_dir=tmp_path / "o", progress=False, **{"lambda": [0.5, 1.0]})
    with pytest.raises(MergeConfigError, match=r"got 2 values for 'weight' but 1 models"):
        merge(ckpt / "base", [ckpt / "ft1"], output_dir=tmp_path / "o", weights=[0.5, 1.0], progress=False)
    with pytest.raises(MergeConfigError, match=r"model 1: weight takes one value here, got \[0.5, 1.0\]"):
        merge(ckpt / "base", [ckpt / "ft1", ckpt / "ft2"], output_dir=tmp_path / "o", weights=[0.5, [0.5, 1.0]],
              progress=False)
    assert not (tmp_path / "o").exists()


def test_a_required_parameter_left_unset_by_a_filter_is_refused_before_writing(llama_checkpoints, tmp_path):
    ckpt = llama_checkpoints
    with pytest.raises(MergeConfigError, match=r"no filter of t .* matches tensor 'lm_head.weight', and "
                                               r"'t' has no default; add a case without filter"):
        merge(ckpt / "base", [ckpt / "ft1"], method="slerp", t=Conditional(Case("self_attn", 0.3)),
              output_dir=tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


def test_an_unset_optional_parameter_takes_the_default(llama_checkpoints, tmp_path):
    ckpt = llama_checkpoints
    out = _sd(merge(ckpt / "base", [ckpt / "ft1"], weights=Conditional(Case("mlp", 0.5)), output_dir=tmp_path / "a",
                    progress=False))
    base, ft = _sd(ckpt / "base"), _sd(ckpt / "ft1")
    k = "lm_head.weight"  # no filter matches: weight's default, 1
    assert torch.equal(out[k], ft[k])
    m = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(out[m], base[m] + 0.5 * (ft[m] - base[m]))


def test_method_checks_apply_per_tensor(llama_checkpoints, tmp_path):
    ckpt = llama_checkpoints
    with pytest.raises(MergeConfigError, match=r"tensor 'model.layers.1.mlp.down_proj.weight' \(layer position 1\): "
                                               r"linear: the weights \[1.0, -1.0\] sum to 0"):
        merge(ckpt / "base", [ckpt / "ft1", ckpt / "ft2"], method="linear", output_dir=tmp_path / "o",
              weights=[1.0, Conditional(Case("layers.1.mlp", -1.0), default=0.5)], progress=False)
    assert not (tmp_path / "o").exists()


def test_global_trim_refuses_schedules(llama_checkpoints, tmp_path):
    ckpt = llama_checkpoints
    with pytest.raises(MergeConfigError, match=r"pre-pass over each whole model \(ties: global trim\).* per-layer "
                                               r"gradients and filters cannot be combined with it\. Use trim_scope: "
                                               r"tensor"):
        merge(ckpt / "base", [ckpt / "ft1", ckpt / "ft2"], method="ties", density=Gradient([0.2, 0.5]),
              trim_scope="global", output_dir=tmp_path / "o", progress=False)


def test_torch_free_path_declines_schedules(llama_checkpoints, tmp_path, monkeypatch, caplog):
    from hf_taskarith.merging import lite

    ckpt = llama_checkpoints
    text = yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": str(ckpt / "base"),
                           "models": [{"model": str(ckpt / "ft1"), "parameters": {"weight": [0.2, 0.8]}}]})
    with caplog.at_level("INFO", logger="hf_taskarith.merging.lite"):
        assert lite.merge_config_lite(MergeConfig.from_yaml(text), tmp_path / "lite") is None
    assert "varies by tensor" in caplog.text and not (tmp_path / "lite").exists()
    out = _sd(merge_from_config(text, tmp_path / "o", progress=False))  # the torch engine runs it
    base, ft = _sd(ckpt / "base"), _sd(ckpt / "ft1")
    k = "model.layers.1.mlp.up_proj.weight"  # the last of 2 layers: weight 0.8
    torch.testing.assert_close(out[k], base[k] + 0.8 * (ft[k] - base[k]))
