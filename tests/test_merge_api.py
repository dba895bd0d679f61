"""merge(): inputs, outputs, strictness, vocab alignment, failure safety."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

import hf_taskarith.merging.engine as engine
from conftest import perturbed, tiny_llama_config
from hf_taskarith import TaskVector, merge
from hf_taskarith.errors import (
    IncompatibleBaseError,
    KeyMismatchError,
    MergeConfigError,
    NonFiniteError,
    ShapeMismatchError,
    UnknownMethodError,
)

ALL_METHODS = ["task_arithmetic", "linear", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties",
               "della", "della_linear", "magnitude_prune", "tsv", "iso_c", "iso_cts"]


def _sd(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("method", ALL_METHODS)
def test_every_method_writes_a_loadable_checkpoint(method, tmp_path, llama_checkpoints):
    params = {"density": 0.5} if method in ("ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties",
                                            "della", "della_linear", "magnitude_prune") else {}
    out = merge(llama_checkpoints / "base", [llama_checkpoints / "ft1", llama_checkpoints / "ft2"],
                method=method, weights=[0.5, 0.5], output_dir=tmp_path / "out", progress=False, **params)
    model = LlamaForCausalLM.from_pretrained(out)
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()
    base = _sd(llama_checkpoints / "base")
    merged = _sd(out)
    assert set(merged) == set(base)
    assert any(not torch.equal(merged[k], base[k]) for k in base)  # it did something
    card = (out / "README.md").read_text()
    assert method in card and "ft1" in card and "| density |" in card if "density" in params else method in card
    report = json.loads((out / "merge_report.json").read_text())
    assert report["method"] == method and report["merged_tensors"] == len(base)


def test_task_arithmetic_matches_hand_computation_mixed_inputs(tmp_path, llama_models, llama_checkpoints):
    base, fts = llama_models
    tv2 = TaskVector.from_models(base, fts[1])
    tv2.save_pretrained(tmp_path / "tv2")
    out = merge(llama_checkpoints / "base",
                [llama_checkpoints / "ft1", tmp_path / "tv2", TaskVector.from_models(base, fts[2])],
                method="task_arithmetic", weights=[0.3, -0.5, 0.2], output_dir=tmp_path / "out", progress=False)
    merged = _sd(out)
    b, f = base.state_dict(), [m.state_dict() for m in fts]
    for k in merged:
        want = b[k] + 0.3 * (f[0][k] - b[k]) - 0.5 * (f[1][k] - b[k]) + 0.2 * (f[2][k] - b[k])
        torch.testing.assert_close(merged[k], want, atol=1e-6, rtol=1e-5)


def test_in_memory_merge_returns_a_copy(llama_models):
    base, fts = llama_models
    before = {k: v.clone() for k, v in base.state_dict().items()}
    merged = merge(base, [TaskVector.from_models(base, fts[0])], weights=[1.0], progress=False)
    for k, v in base.state_dict().items():
        assert torch.equal(v, before[k])  # base untouched
    for a, b in zip(merged.state_dict().values(), fts[0].state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_linear_without_base_is_weighted_average(tmp_path, llama_models, llama_checkpoints):
    _, fts = llama_models
    out = merge(None, [llama_checkpoints / "ft1", llama_checkpoints / "ft2"], method="linear", weights=[1.0, 3.0],
                output_dir=tmp_path / "o", progress=False)
    merged = _sd(out)
    a, b = fts[0].state_dict(), fts[1].state_dict()
    for k in merged:
        torch.testing.assert_close(merged[k], (a[k] + 3 * b[k]) / 4, atol=1e-6, rtol=1e-5)


def test_output_dtype_and_sharding(tmp_path, llama_checkpoints):
    out = merge(llama_checkpoints / "base", [llama_checkpoints / "ft1"], dtype="bfloat16", max_shard_size="20KB",
                output_dir=tmp_path / "o", progress=False)
    assert (out / "model.safetensors.index.json").is_file()
    assert all(v.dtype == torch.bfloat16 for v in _sd(out).values())
    cfg = json.loads((out / "config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16"
    LlamaForCausalLM.from_pretrained(out)


def test_randomized_methods_are_reproducible(tmp_path, llama_checkpoints):
    args = (llama_checkpoints / "base", [llama_checkpoints / "ft1", llama_checkpoints / "ft2"])
    kw = dict(method="dare_ties", density=0.3, progress=False)
    a = _sd(merge(*args, output_dir=tmp_path / "a", seed=1, **kw))
    b = _sd(merge(*args, output_dir=tmp_path / "b", seed=1, **kw))
    c = _sd(merge(*args, output_dir=tmp_path / "c", seed=2, **kw))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_bad_parameters_are_explained(tmp_path, llama_checkpoints):
    args = (llama_checkpoints / "base", [llama_checkpoints / "ft1", llama_checkpoints / "ft2"])
    with pytest.raises(UnknownMethodError, match="available:.*ties"):
        merge(*args, method="frankenmerge", output_dir=tmp_path / "x")
    with pytest.raises(MergeConfigError, match=r"does not take parameter\(s\) \['densty'\].*density"):
        merge(*args, method="ties", densty=0.5, output_dir=tmp_path / "x")
    with pytest.raises(MergeConfigError, match="3 values for 'weight' but 2 models"):
        merge(*args, weights=[1, 2, 3], output_dir=tmp_path / "x")
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(MergeConfigError, match=r"density=.* is outside \(0.0, 1.0\]"):
            merge(*args, method="ties", density=bad, output_dir=tmp_path / "x")
    with pytest.raises(MergeConfigError, match="output_dir"):
        merge(*args)
    with pytest.raises(MergeConfigError, match="della needs"):
        merge(*args, method="della", density=0.1, epsilon=0.2, output_dir=tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()


def test_architecture_mismatch_is_strict_then_reported(tmp_path, llama_checkpoints):
    small = LlamaForCausalLM(tiny_llama_config(num_hidden_layers=1))
    small.save_pretrained(tmp_path / "small")
    with pytest.raises(KeyMismatchError, match="model.layers.1"):
        merge(llama_checkpoints / "base", [tmp_path / "small"], output_dir=tmp_path / "x", progress=False)
    wide = LlamaForCausalLM(tiny_llama_config(intermediate_size=48))
    wide.save_pretrained(tmp_path / "wide")
    with pytest.raises(ShapeMismatchError, match=r"mlp.*shape \[32, 48\].*has \[32, 64\]"):
        merge(llama_checkpoints / "base", [tmp_path / "wide"], output_dir=tmp_path / "x", progress=False)
    out = merge(llama_checkpoints / "base", [tmp_path / "wide", llama_checkpoints / "ft1"], allow_mismatch=True,
                output_dir=tmp_path / "ok", progress=False)
    report = json.loads((out / "merge_report.json").read_text())
    assert any("mlp.down_proj" in s for s in report["skipped"])


def test_task_vector_for_another_base_is_refused(tmp_path, llama_checkpoints):
    other = LlamaForCausalLM(tiny_llama_config())
    tv = TaskVector.from_models(other, perturbed(other, 3))
    with pytest.raises(IncompatibleBaseError, match="fingerprint"):
        merge(llama_checkpoints / "base", [tv], output_dir=tmp_path / "x", progress=False)
    out = merge(llama_checkpoints / "base", [tv], output_dir=tmp_path / "y", allow_mismatch=True, progress=False)
    assert json.loads((out / "merge_report.json").read_text())["fingerprint_mismatch"]


def test_nan_input_is_named_and_nothing_written(tmp_path, llama_checkpoints):
    sd = _sd(llama_checkpoints / "ft1")
    sd["model.layers.1.self_attn.q_proj.weight"][0, 0] = float("inf")
    (tmp_path / "bad").mkdir()
    save_file(sd, tmp_path / "bad" / "model.safetensors")
    with pytest.raises(NonFiniteError, match=r"bad.*model.layers.1.self_attn.q_proj.weight"):
        merge(llama_checkpoints / "base", [tmp_path / "bad"], output_dir=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["bad"]


def test_interrupt_midway_leaves_no_output(tmp_path, llama_checkpoints, monkeypatch):
    calls = {"n": 0}
    real = engine._finite

    def interrupt(t):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(t)

    monkeypatch.setattr(engine, "_finite", interrupt)
    with pytest.raises(KeyboardInterrupt):
        merge(llama_checkpoints / "base", [llama_checkpoints / "ft1"], output_dir=tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_vocab_rows_are_aligned_and_reported(tmp_path, llama_models, llama_checkpoints, caplog):
    base, fts = llama_models
    big = LlamaForCausalLM(tiny_llama_config(vocab_size=136))
    sd = big.state_dict()
    for k, v in fts[0].state_dict().items():
        if v.shape == sd[k].shape:
            sd[k].copy_(v)
        else:
            sd[k][:128].copy_(v)
    big.save_pretrained(tmp_path / "big")
    with caplog.at_level("WARNING", logger="hf_taskarith"):
        out = merge(llama_checkpoints / "base", [tmp_path / "big"], output_dir=tmp_path / "o", progress=False)
    assert "vocabulary sizes differ" in caplog.text  # mergekit refuses; we align, and say so
    merged = _sd(out)
    assert merged["model.embed_tokens.weight"].shape == (128, 32)
    torch.testing.assert_close(merged["lm_head.weight"], fts[0].state_dict()["lm_head.weight"], atol=1e-6, rtol=0)
    report = json.loads((out / "merge_report.json").read_text())
    assert any("model.embed_tokens.weight" in v and "136" in v for v in report["vocab"])
    # taking the tokenizer (and extra rows) from the bigger model
    out2 = merge(llama_checkpoints / "base", [tmp_path / "big"], tokenizer_source=str(tmp_path / "big"),
                 output_dir=tmp_path / "o2", progress=False)
    m2 = _sd(out2)
    assert m2["lm_head.weight"].shape == (136, 32)
    torch.testing.assert_close(m2["lm_head.weight"][128:], sd["lm_head.weight"][128:])
    assert json.loads((out2 / "config.json").read_text())["vocab_size"] == 136
    LlamaForCausalLM.from_pretrained(out2)


def test_vocab_size_mismatch_warns_naming_the_tensors_and_sizes(tmp_path, llama_models, llama_checkpoints, caplog):
    """mergekit refuses inputs whose vocabularies differ; we merge the shared rows, and every entry
    point says so at WARNING level, naming each tensor and its row counts."""
    from hf_taskarith.merging.config import merge_from_config

    base, fts = llama_models
    big = LlamaForCausalLM(tiny_llama_config(vocab_size=136))
    big.save_pretrained(tmp_path / "big")
    runs = {
        "merge": lambda: merge(llama_checkpoints / "base", [tmp_path / "big"], output_dir=tmp_path / "a",
                               progress=False),
        "yaml": lambda: merge_from_config({"merge_method": "task_arithmetic",
                                           "base_model": str(llama_checkpoints / "base"),
                                           "models": [{"model": str(tmp_path / "big")}]}, tmp_path / "b",
                                          progress=False),  # the torch-free path declines, the engine warns
        "module": lambda: merge(base, [big], progress=False),
    }
    for name, run in runs.items():
        caplog.clear()
        with caplog.at_level("WARNING", logger="hf_taskarith"):
            run()
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert len(warnings) == 1, (name, warnings)
        for tensor in ("model.embed_tokens.weight", "lm_head.weight"):
            assert f"{tensor}: base 128 rows, inputs [136], output 128" in warnings[0], (name, warnings[0])
    caplog.clear()
    with caplog.at_level("WARNING", logger="hf_taskarith"):  # equal vocabularies: no warning
        merge(llama_checkpoints / "base", [llama_checkpoints / "ft1"], output_dir=tmp_path / "c", progress=False)
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_tokenizer_and_generation_config_copied(tmp_path, llama_checkpoints):
    base_dir = tmp_path / "base"
    import shutil

    shutil.copytree(llama_checkpoints / "base", base_dir)
    (base_dir / "tokenizer_config.json").write_text("{}")
    out = merge(base_dir, [llama_checkpoints / "ft1"], output_dir=tmp_path / "o", progress=False)
    names = {p.name for p in out.iterdir()}
    assert {"tokenizer_config.json", "generation_config.json", "config.json", "README.md"} <= names


# -- methods defined on whole weights (slerp, model_stock, passthrough) ----------------------
WEIGHT_SPACE = [("slerp", 1, {"t": 0.4}), ("model_stock", 2, {}), ("model_stock", 3, {"filter_wise": True}),
                ("passthrough", 1, {"scale": 0.5})]


@pytest.mark.parametrize("method, n, params", WEIGHT_SPACE)
def test_weight_space_methods_write_a_loadable_checkpoint(method, n, params, tmp_path, llama_checkpoints):
    fts = [llama_checkpoints / f"ft{i + 1}" for i in range(n)]
    out = merge(llama_checkpoints / "base", fts, method=method, output_dir=tmp_path / "out", progress=False, **params)
    model = LlamaForCausalLM.from_pretrained(out)
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
    base, merged = _sd(llama_checkpoints / "base"), _sd(out)
    assert set(merged) == set(base) and any(not torch.equal(merged[k], base[k]) for k in base)
    report = json.loads((out / "merge_report.json").read_text())
    assert report["method"] == method and report["merged_tensors"] == len(base)
    assert method in (out / "README.md").read_text()


def test_weight_space_methods_take_task_vectors_as_base_plus_delta(tmp_path, llama_models, llama_checkpoints):
    """A task vector input stands for ``base + tau``: the same merge as from the fine-tuned folders,
    to the rounding of that sum."""
    base, fts = llama_models
    tvs = [TaskVector.from_models(base, fts[0]), TaskVector.from_models(base, fts[1])]
    for method, params, n in (("model_stock", {}, 2), ("slerp", {"t": 0.3}, 1)):
        a = _sd(merge(llama_checkpoints / "base", tvs[:n], method=method, output_dir=tmp_path / f"{method}_tv",
                      progress=False, **params))
        b = _sd(merge(llama_checkpoints / "base", [llama_checkpoints / "ft1", llama_checkpoints / "ft2"][:n],
                      method=method, output_dir=tmp_path / f"{method}_ft", progress=False, **params))
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


def test_passthrough_copies_one_model_without_a_base(tmp_path, llama_checkpoints):
    out = merge(None, [llama_checkpoints / "ft1"], method="passthrough", output_dir=tmp_path / "o", progress=False)
    ft1 = _sd(llama_checkpoints / "ft1")
    assert all(torch.equal(v, ft1[k]) for k, v in _sd(out).items())
    scaled = merge(None, [llama_checkpoints / "ft1"], method="passthrough", scale=-2.0, dtype="bfloat16",
                   output_dir=tmp_path / "s", progress=False)
    assert all(torch.equal(v, (ft1[k] * -2.0).bfloat16()) for k, v in _sd(scaled).items())


def test_model_stock_in_memory_equals_the_checkpoint_merge(tmp_path, llama_models, llama_checkpoints):
    base, fts = llama_models
    merged = merge(base, [fts[0], fts[1], fts[2]], method="model_stock", progress=False)
    on_disk = _sd(merge(llama_checkpoints / "base", [llama_checkpoints / f"ft{i}" for i in (1, 2, 3)],
                        method="model_stock", output_dir=tmp_path / "o", progress=False))
    for k, v in merged.state_dict().items():
        if k in on_disk:
            assert torch.equal(v, on_disk[k]), k


@pytest.mark.parametrize("method, n, params, message", [
    ("slerp", 2, {"t": 0.5}, r"'slerp' takes exactly 1 model besides the base model, got 2"),
    ("slerp", 1, {}, "needs parameter 't'"),
    ("slerp", 1, {"t": [0.0, 1.0]}, r"t takes one value here, got \[0.0, 1.0\]\. For values that vary over the "
                                     r"layers pass a Gradient"),
    ("model_stock", 1, {}, r"'model_stock' takes at least 2 models besides the base model, got 1"),
    ("model_stock", 2, {"weight": 0.5}, r"does not take parameter\(s\) \['weight'\]"),
    ("passthrough", 2, {}, r"'passthrough' takes exactly 1 model, got 2"),
])
def test_weight_space_methods_explain_bad_inputs(method, n, params, message, tmp_path, llama_checkpoints):
    fts = [llama_checkpoints / f"ft{i + 1}" for i in range(n)]
    with pytest.raises(MergeConfigError, match=message):
        merge(llama_checkpoints / "base", fts, method=method, output_dir=tmp_path / "x", progress=False, **params)
    assert not (tmp_path / "x").exists()
