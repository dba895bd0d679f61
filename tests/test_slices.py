"""Layer slices (mergekit's ``slices:``): frankenmerges and layer-range merges.

The same YAML is merged by mergekit (``MergeConfiguration`` + ``run_merge``) and by
``merge_from_config`` on tiny float32 Llama checkpoints (2 layers each) and every output tensor
compared; the output must load with transformers and run; bad ranges fail before anything is
written.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from hf_taskarith import merge_from_config
from hf_taskarith.errors import KeyMismatchError, MergeConfigError
from hf_taskarith.merging.layer_stack import layer_stack
from tests.mergekit_runs import assert_close_to
from tests.mergekit_runs import state_dict as _sd

with warnings.catch_warnings():  # mergekit's lazy unpickler touches the deprecated numpy.core
    warnings.simplefilter("ignore", DeprecationWarning)
    mergekit = pytest.importorskip("mergekit")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

MK_OPTIONS = MergeOptions(copy_tokenizer=False, lazy_unpickle=True, quiet=True, write_model_card=False)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, llama_models) -> Path:
    """``<root>/{base,ft1,ft2}``: the session's tiny float32 Llamas (2 layers each)."""
    root = tmp_path_factory.mktemp("slices")
    base, fts = llama_models
    for name, model in [("base", base), ("ft1", fts[0]), ("ft2", fts[1])]:
        model.save_pretrained(root / name)
    return root


def _src(root: Path, name: str, start: int, end: int, **params) -> dict:
    out = {"model": str(root / name), "layer_range": [start, end]}
    if params:
        out["parameters"] = params
    return out


def _both(cfg: dict, tmp_path: Path) -> tuple[dict, dict]:
    text = yaml.safe_dump(cfg, sort_keys=False)
    (tmp_path / "cfg.yml").write_text(text)
    ours = _sd(merge_from_config(tmp_path / "cfg.yml", tmp_path / "ours", progress=False))
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), str(tmp_path / "mk"), options=MK_OPTIONS)
    theirs = _sd(tmp_path / "mk")
    assert set(ours) == set(theirs)
    return ours, theirs


def _max_diff(ours: dict, theirs: dict) -> float:
    return max((ours[k].float() - theirs[k].float()).abs().max().item() for k in ours)


def test_passthrough_frankenmerge_equals_mergekit_bit_for_bit(ckpts, tmp_path):
    cfg = {"merge_method": "passthrough", "dtype": "float32",
           "slices": [{"sources": [_src(ckpts, "ft1", 0, 2)]}, {"sources": [_src(ckpts, "ft2", 1, 2)]}]}
    ours, theirs = _both(cfg, tmp_path)
    assert _max_diff(ours, theirs) == 0
    ft1, ft2 = _sd(ckpts / "ft1"), _sd(ckpts / "ft2")
    # layers renumbered in order; embeddings from the first slice, final norm and LM head from the last
    assert torch.equal(ours["model.layers.1.mlp.up_proj.weight"], ft1["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(ours["model.layers.2.mlp.up_proj.weight"], ft2["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(ours["model.embed_tokens.weight"], ft1["model.embed_tokens.weight"])
    assert torch.equal(ours["model.norm.weight"], ft2["model.norm.weight"])
    assert torch.equal(ours["lm_head.weight"], ft2["lm_head.weight"])
    ours_cfg = json.loads((tmp_path / "ours" / "config.json").read_text())
    theirs_cfg = json.loads((tmp_path / "mk" / "config.json").read_text())
    assert ours_cfg["num_hidden_layers"] == theirs_cfg["num_hidden_layers"] == 3


def test_frankenmerge_loads_with_transformers_and_runs(ckpts, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = {"merge_method": "passthrough",
           "slices": [{"sources": [_src(ckpts, "ft1", 0, 2)]}, {"sources": [_src(ckpts, "ft2", 1, 2)]},
                      {"sources": [_src(ckpts, "ft1", 0, 1)]}]}
    out = merge_from_config(cfg, tmp_path / "out", progress=False)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.config.num_hidden_layers == 4 and len(model.model.layers) == 4
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9, 3]])).logits
    assert logits.shape == (1, 4, 128) and torch.isfinite(logits).all()
    report = json.loads((out / "merge_report.json").read_text())
    assert report["merged_tensors"] == len(_sd(out)) == 3 + 4 * 9
    assert "slices[2] (output layers 3..3)" in (out / "README.md").read_text()


def test_slerp_slices_with_per_slice_t_and_offset_sources_equal_mergekit(ckpts, tmp_path):
    # slice 0: base layers 0-1 with ft1 layers 0-1; slice 1: base layer 1 with ft1 layer 0 (other offsets)
    cfg = {"merge_method": "slerp", "base_model": str(ckpts / "base"), "dtype": "float32",
           "parameters": {"t": 0.3},
           "slices": [{"sources": [_src(ckpts, "base", 0, 2), _src(ckpts, "ft1", 0, 2)]},
                      {"sources": [_src(ckpts, "base", 1, 2), _src(ckpts, "ft1", 0, 1)],
                       "parameters": {"t": 0.8}}]}
    ours, theirs = _both(cfg, tmp_path)
    assert_close_to(ours, theirs)  # slerp block by block: float32 rounding (merging/span.py)
    # the slice-level t applies to slice 1 only: its layer differs from what t=0.3 would give
    assert not torch.equal(ours["model.layers.2.mlp.up_proj.weight"], ours["model.layers.1.mlp.up_proj.weight"])


def test_slerp_gradient_of_t_runs_over_each_slice_like_mergekit(ckpts, tmp_path):
    # t = i / (n - 1) inside each slice (1 for a one-layer slice), 0 outside the layers
    cfg = {"merge_method": "slerp", "base_model": str(ckpts / "base"), "dtype": "float32",
           "parameters": {"t": [0.1, 0.9]},
           "slices": [{"sources": [_src(ckpts, "base", 0, 2), _src(ckpts, "ft1", 0, 2)]},
                      {"sources": [_src(ckpts, "base", 0, 1), _src(ckpts, "ft1", 1, 2)]}]}
    ours, theirs = _both(cfg, tmp_path)
    assert_close_to(ours, theirs)


def test_task_arithmetic_slice_with_source_slice_and_global_parameters_equals_mergekit(ckpts, tmp_path):
    cfg = {"merge_method": "task_arithmetic", "base_model": str(ckpts / "base"), "dtype": "float32",
           "parameters": {"weight": 0.7, "lambda": 0.9},
           "slices": [
               {"sources": [_src(ckpts, "base", 0, 2), _src(ckpts, "ft1", 0, 2, weight=0.5),
                            _src(ckpts, "ft2", 0, 2, weight=-0.3)]},
               {"sources": [_src(ckpts, "base", 1, 2), _src(ckpts, "ft1", 0, 1),
                            _src(ckpts, "ft2", 1, 2, weight=0.2)],
                "parameters": {"weight": 0.4, "lambda": 1.5}}]}
    ours, theirs = _both(cfg, tmp_path)
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], atol=1e-6, rtol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    base = _sd(ckpts / "base")
    assert (ours["model.layers.0.mlp.up_proj.weight"] - base["model.layers.0.mlp.up_proj.weight"]).abs().max() > 1e-3


def test_one_full_slice_equals_merging_whole_models(ckpts, tmp_path):
    whole = {"merge_method": "dare_linear", "base_model": str(ckpts / "base"), "seed": 3,
             "models": [{"model": str(ckpts / "ft1"), "parameters": {"weight": 0.6, "density": 0.5}},
                        {"model": str(ckpts / "ft2"), "parameters": {"weight": 0.4, "density": 0.5}}]}
    sliced = {"merge_method": "dare_linear", "base_model": str(ckpts / "base"), "seed": 3,
              "slices": [{"sources": [_src(ckpts, "base", 0, 2), _src(ckpts, "ft1", 0, 2, weight=0.6, density=0.5),
                                      _src(ckpts, "ft2", 0, 2, weight=0.4, density=0.5)]}]}
    a = _sd(merge_from_config(whole, tmp_path / "whole", progress=False))
    b = _sd(merge_from_config(sliced, tmp_path / "sliced", progress=False))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_repeated_layers_get_fresh_random_draws(ckpts, tmp_path):
    piece = {"sources": [_src(ckpts, "base", 0, 1), _src(ckpts, "ft1", 0, 1, weight=1.0, density=0.5)]}
    cfg = {"merge_method": "dare_linear", "base_model": str(ckpts / "base"), "slices": [piece, piece]}
    out = _sd(merge_from_config(cfg, tmp_path / "out", progress=False))
    name = "model.layers.{}.mlp.up_proj.weight"
    assert not torch.equal(out[name.format(0)], out[name.format(1)])


def test_layer_types_follow_the_layers_they_came_from(tmp_path):
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64, use_sliding_window=True, sliding_window=4,
                      max_window_layers=1, layer_types=["full_attention", "sliding_attention", "full_attention"])
    torch.manual_seed(0)
    Qwen2ForCausalLM(cfg).save_pretrained(tmp_path / "qwen")
    merge = {"merge_method": "passthrough",
             "slices": [{"sources": [{"model": str(tmp_path / "qwen"), "layer_range": [1, 3]}]},
                        {"sources": [{"model": str(tmp_path / "qwen"), "layer_range": [1, 2]}]}]}
    out = merge_from_config(merge, tmp_path / "out", progress=False)
    written = json.loads((out / "config.json").read_text())
    assert written["num_hidden_layers"] == 3
    assert written["layer_types"] == ["sliding_attention", "full_attention", "sliding_attention"]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.layer_types == written["layer_types"]
    # mergekit keeps the source's list: the wrong types here, and no config at all when the count changes
    run_merge(MergeConfiguration.model_validate(merge), str(tmp_path / "mk"), options=MK_OPTIONS)
    theirs = json.loads((tmp_path / "mk" / "config.json").read_text())
    assert theirs["layer_types"] == ["full_attention", "sliding_attention", "full_attention"]
    shorter = {"merge_method": "passthrough", "slices": merge["slices"][:1]}
    with pytest.raises(Exception, match="must be equal to the number of `layer_types`"):
        run_merge(MergeConfiguration.model_validate(shorter), str(tmp_path / "mk2"), options=MK_OPTIONS)
    out = merge_from_config(shorter, tmp_path / "out2", progress=False)
    assert json.loads((out / "config.json").read_text())["layer_types"] == ["sliding_attention", "full_attention"]


# -- errors: nothing is written ----------------------------------------------------------------------------------

def _refused(cfg: dict, tmp_path: Path, error: type, *needles: str) -> None:
    with pytest.raises(error) as info:
        merge_from_config(cfg, tmp_path / "out", progress=False)
    for needle in needles:
        assert needle in str(info.value), str(info.value)
    assert not (tmp_path / "out").exists()


def test_layer_range_outside_the_model_is_refused(ckpts, tmp_path):
    cfg = {"merge_method": "passthrough", "slices": [{"sources": [_src(ckpts, "ft1", 1, 3)]}]}
    _refused(cfg, tmp_path, MergeConfigError, "slices[0].sources[0]", "[1, 3)", "has 2 layers")


@pytest.mark.parametrize("rng", [[1, 1], [2, 1], [-1, 1], [0], [0.5, 1], ["a", 1]],
                         ids=["empty", "reversed", "negative", "one_number", "fraction", "string"])
def test_empty_or_malformed_layer_ranges_are_refused(ckpts, tmp_path, rng):
    cfg = {"merge_method": "passthrough", "slices": [{"sources": [{"model": str(ckpts / "ft1"), "layer_range": rng}]}]}
    _refused(cfg, tmp_path, MergeConfigError, "layer_range")


def test_sources_of_different_lengths_are_refused(ckpts, tmp_path):
    cfg = {"merge_method": "task_arithmetic", "base_model": str(ckpts / "base"),
           "slices": [{"sources": [_src(ckpts, "base", 0, 2), _src(ckpts, "ft1", 0, 1)]}]}
    _refused(cfg, tmp_path, MergeConfigError, "slices[0]", "different numbers of layers")


def test_slice_with_a_source_count_the_method_cannot_take_is_refused(ckpts, tmp_path):
    cfg = {"merge_method": "slerp", "base_model": str(ckpts / "base"), "parameters": {"t": 0.5},
           "slices": [{"sources": [_src(ckpts, "base", 0, 2), _src(ckpts, "ft1", 0, 2), _src(ckpts, "ft2", 0, 2)]}]}
    _refused(cfg, tmp_path, MergeConfigError, "slices[0]", "slerp", "exactly 1", "got 2")
    cfg = {"merge_method": "passthrough",
           "slices": [{"sources": [_src(ckpts, "ft1", 0, 2), _src(ckpts, "ft2", 0, 2)]}]}
    _refused(cfg, tmp_path, MergeConfigError, "passthrough", "got 2")


def test_base_model_missing_from_a_slice_is_refused(ckpts, tmp_path):
    cfg = {"merge_method": "task_arithmetic", "base_model": str(ckpts / "base"),
           "slices": [{"sources": [_src(ckpts, "base", 0, 2), _src(ckpts, "ft1", 0, 2)]},
                      {"sources": [_src(ckpts, "ft2", 0, 2)]}]}
    _refused(cfg, tmp_path, MergeConfigError, "slices[1]", "needs its base model", "among the slice's sources")


def test_models_of_different_architectures_are_refused(ckpts, tmp_path):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    MistralForCausalLM(MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, vocab_size=128)).save_pretrained(tmp_path / "mistral")
    cfg = {"merge_method": "passthrough",
           "slices": [{"sources": [_src(ckpts, "ft1", 0, 2)]},
                      {"sources": [{"model": str(tmp_path / "mistral"), "layer_range": [0, 1]}]}]}
    _refused(cfg, tmp_path, MergeConfigError, "different architectures", "'llama'", "'mistral'")


def test_layers_that_do_not_match_across_sources_are_refused(ckpts, tmp_path):
    from transformers import LlamaForCausalLM

    from conftest import tiny_llama_config

    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(attention_bias=True)).save_pretrained(tmp_path / "biased")
    cfg = {"merge_method": "task_arithmetic", "base_model": str(ckpts / "base"),
           "slices": [{"sources": [_src(ckpts, "base", 0, 2), {"model": str(tmp_path / "biased"),
                                                                "layer_range": [0, 2]}]}]}
    _refused(cfg, tmp_path, KeyMismatchError, "biased")


def test_layer_stack_finds_layers_and_refuses_several_stacks():
    stack = layer_stack(["transformer.wte.weight", "transformer.h.0.attn.c_attn.weight",
                         "transformer.h.1.mlp.c_fc.weight", "transformer.ln_f.weight", "lm_head.weight"])
    assert (stack.prefix, stack.num_layers) == ("transformer.h.", 2)
    assert stack.before == ["transformer.wte.weight"] and stack.after == ["transformer.ln_f.weight", "lm_head.weight"]
    with pytest.raises(MergeConfigError, match="several layer stacks"):
        layer_stack(["model.layers.0.w", "vision_tower.encoder.layers.0.w"])
    with pytest.raises(MergeConfigError, match=r"layers \[1\] are missing"):
        layer_stack(["model.layers.0.w", "model.layers.2.w"])
    with pytest.raises(MergeConfigError, match="no numbered layers"):
        layer_stack(["embed.weight", "head.weight"])
