"""TaskVector: construction, mapping behaviour, algebra, persistence, application."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

from conftest import perturbed, tiny_llama_config
from hf_taskarith import TaskVector
from hf_taskarith.errors import IncompatibleBaseError, KeyMismatchError, ShapeMismatchError


def test_from_models_is_finetuned_minus_base(llama_models):
    base, fts = llama_models
    tv = TaskVector.from_models(base, fts[0])
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.allclose(tv[name], fts[0].state_dict()[name] - base.state_dict()[name])
    assert set(tv.keys()) == {k for k, v in base.state_dict().items() if v.is_floating_point()}
    assert tv.metadata.base_fingerprint and tv.metadata.created_with == "from_models"
    with pytest.raises(TypeError):
        tv["x"] = torch.zeros(1)  # read-only mapping


def test_skips_non_float_and_counts_tied_weights_once():
    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32, tie_word_embeddings=True)
    base = GPT2LMHeadModel(cfg)
    ft = perturbed(base, 1)
    ft.tie_weights()
    tv = TaskVector.from_models(base, ft)
    assert "lm_head.weight" not in tv and "transformer.wte.weight" in tv
    assert all(v.is_floating_point() for v in tv.values())


def test_from_checkpoints_matches_from_models(llama_models, llama_checkpoints):
    base, fts = llama_models
    a = TaskVector.from_models(base, fts[2])
    b = TaskVector.from_checkpoints(llama_checkpoints / "base", llama_checkpoints / "ft3")  # sharded
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k])
    assert a.metadata.base_fingerprint == b.metadata.base_fingerprint


def test_algebra(llama_models):
    base, fts = llama_models
    t1, t2, t3 = (TaskVector.from_models(base, f) for f in fts)
    k = "model.norm.weight"
    assert torch.allclose((t1 + t2)[k], t1[k] + t2[k])
    assert torch.allclose((t1 - t2)[k], t1[k] - t2[k])
    assert torch.allclose((-t1)[k], -t1[k])
    assert torch.allclose((0.5 * t1)[k], 0.5 * t1[k]) and torch.allclose((t1 * 2)[k], 2 * t1[k])
    assert torch.allclose((t1 / 4)[k], t1[k] / 4)
    assert torch.allclose(sum([t1, t2, t3])[k], t1[k] + t2[k] + t3[k])
    flat = torch.cat([v.reshape(-1) for v in t1.values()]).double()
    assert t1.norm() == pytest.approx(float(flat.norm()))
    assert t1.norm(1) == pytest.approx(float(flat.abs().sum()))
    assert t1.cosine_similarity(t1) == pytest.approx(1.0)
    assert t1.cosine_similarity(-t1) == pytest.approx(-1.0)
    assert abs(t1.cosine_similarity(t2)) < 0.1  # independent noise
    with pytest.raises(TypeError):
        t1 * t2


def test_mismatched_keys_and_shapes_list_the_names(llama_models):
    base, fts = llama_models
    t1 = TaskVector.from_models(base, fts[0])
    fewer = TaskVector({k: v for k, v in t1.items() if k != "model.norm.weight"}, t1.metadata)
    with pytest.raises(KeyMismatchError, match="model.norm.weight"):
        t1 + fewer
    reshaped = TaskVector({**dict(t1.items()), "model.norm.weight": torch.zeros(3)}, t1.metadata)
    with pytest.raises(ShapeMismatchError, match=r"model.norm.weight: \[32\] vs \[3\]"):
        t1 - reshaped
    other_base = LlamaForCausalLM(tiny_llama_config())
    t_other = TaskVector.from_models(other_base, perturbed(other_base, 5))
    with pytest.raises(IncompatibleBaseError, match="different bases"):
        t1 + t_other


def test_save_load_roundtrip_is_lazy_and_exact(tmp_path, llama_models):
    base, fts = llama_models
    tv = TaskVector.from_models(base, fts[0], base_model="org/base", base_revision="abc123")
    tv.save_pretrained(tmp_path / "tv", max_shard_size="40KB")
    files = sorted(p.name for p in (tmp_path / "tv").iterdir())
    assert "task_vector_config.json" in files and "task_vector.safetensors.index.json" in files
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    loaded = TaskVector.from_pretrained(tmp_path / "tv")
    assert loaded.lazy and loaded.metadata.base_model == "org/base" and loaded.metadata.base_revision == "abc123"
    assert loaded.metadata.base_fingerprint == tv.metadata.base_fingerprint
    for k in tv:
        assert torch.equal(loaded[k], tv[k])
    cfg = json.loads((tmp_path / "tv" / "task_vector_config.json").read_text())
    assert cfg["library_version"] and cfg["format"] == "hf_taskarith.task_vector"


def test_newer_config_keys_warn_not_crash(tmp_path, llama_models, caplog):
    base, fts = llama_models
    TaskVector.from_models(base, fts[0]).save_pretrained(tmp_path / "tv")
    cfg_path = tmp_path / "tv" / "task_vector_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(library_version="99.0.0", shiny_new_field={"x": 1})
    cfg_path.write_text(json.dumps(cfg))
    with caplog.at_level(logging.WARNING):
        tv = TaskVector.from_pretrained(tmp_path / "tv")
    assert "99.0.0" in caplog.text and "shiny_new_field" in caplog.text
    assert tv.metadata.extra["unknown"] == {"shiny_new_field": {"x": 1}}


def test_save_refuses_nonfinite_and_leaves_nothing(tmp_path, llama_models):
    base, fts = llama_models
    tv = TaskVector.from_models(base, fts[0])
    bad = TaskVector({**dict(tv.items()), "model.norm.weight": torch.full((32,), float("nan"))}, tv.metadata)
    with pytest.raises(FloatingPointError, match="model.norm.weight"):
        bad.save_pretrained(tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_not_a_task_vector_folder(tmp_path, llama_checkpoints):
    with pytest.raises(FileNotFoundError, match="task_vector_config.json"):
        TaskVector.from_pretrained(llama_checkpoints / "base")


def test_apply_to_reproduces_finetuned_and_scaling_zero_is_identity(llama_models):
    base, fts = llama_models
    tv = TaskVector.from_models(base, fts[0])
    import copy

    edited = tv.apply_to(copy.deepcopy(base))
    for a, b in zip(edited.state_dict().values(), fts[0].state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    same = tv.apply_to(copy.deepcopy(base), scaling=0.0)
    for a, b in zip(same.state_dict().values(), base.state_dict().values()):
        assert torch.equal(a, b)
    x = torch.tensor([[1, 2, 3]])
    neg = tv.apply_to(copy.deepcopy(base), scaling=-1.0)
    assert not torch.allclose(neg(x).logits, base(x).logits)


def test_apply_to_wrong_base_refuses_then_reports_when_allowed(llama_models):
    base, fts = llama_models
    tv = TaskVector.from_models(base, fts[0])
    other = LlamaForCausalLM(tiny_llama_config(num_hidden_layers=1))
    with pytest.raises(IncompatibleBaseError, match="allow_mismatch"):
        tv.apply_to(other)
    edited = tv.apply_to(other, allow_mismatch=True)
    report = edited.hf_taskarith_apply_report
    assert "model.layers.1.mlp.up_proj.weight" in report.missing_in_base
    assert "model.layers.0.mlp.up_proj.weight" in report.applied
    assert not report.fingerprint_ok


def test_apply_to_checkpoint_writes_edited_folder(tmp_path, llama_models, llama_checkpoints):
    base, fts = llama_models
    tv = TaskVector.from_models(base, fts[0])
    out = tv.apply_to(llama_checkpoints / "base", 1.0, output_dir=tmp_path / "edited")
    model = LlamaForCausalLM.from_pretrained(out)
    for a, b in zip(model.state_dict().values(), fts[0].state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_compatibility_uses_fingerprint_then_id_and_revision(llama_models):
    import copy

    from hf_taskarith import check_compatibility

    base, fts = llama_models
    tv = TaskVector.from_models(base, fts[0], base_model="org/base", base_revision="r1")
    model = copy.deepcopy(base)
    model.config._name_or_path = "somewhere/else"
    report = check_compatibility(tv, model)
    assert report.compatible and report.identity_notes  # same weights under another name: fine
    no_fp = TaskVector(dict(tv.items()), tv.metadata.derived("arithmetic"))
    no_fp.metadata.base_fingerprint = None
    report = check_compatibility(no_fp, model)
    assert not report.compatible and "somewhere/else" in report.describe()
    with pytest.raises(IncompatibleBaseError, match="somewhere/else"):
        no_fp.apply_to(model)


def test_apply_to_returns_a_new_model_unless_inplace(llama_models):
    base, fts = llama_models
    tv = TaskVector.from_models(base, fts[0])
    before = {k: v.clone() for k, v in base.state_dict().items()}
    edited = tv.apply_to(base)
    assert edited is not base
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())  # base untouched
    for a, b in zip(edited.state_dict().values(), fts[0].state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    import copy

    target = copy.deepcopy(base)
    same = tv.apply_to(target, inplace=True)
    assert same is target and same.hf_taskarith_apply_report.performed
    for a, b in zip(target.state_dict().values(), fts[0].state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    with pytest.raises(TypeError, match="in-memory models only"):
        tv.apply_to("some/folder", output_dir="out", inplace=True)
