"""Merge-engine and apply bugs found by an audit: each test failed before its fix."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from torch import nn

from conftest import perturbed
from hf_taskarith import TaskVector, merge
from hf_taskarith.errors import IncompatibleBaseError, MergeConfigError
from hf_taskarith.merging.config import MergeConfig, merge_from_config


@pytest.fixture(scope="module")
def ckpts(llama_checkpoints):
    """Folders base, ft1, ft2 (and ft3) of the tiny Llama (conftest)."""
    return llama_checkpoints


def test_linear_with_weights_summing_to_zero_is_an_error(ckpts, tmp_path):
    for fast in (True, False):
        with pytest.raises(MergeConfigError, match="sum to 0"):
            merge_from_config({"merge_method": "linear", "models": [
                {"model": str(ckpts / "ft1"), "parameters": {"weight": 1.0}},
                {"model": str(ckpts / "ft2"), "parameters": {"weight": -1.0}}]}, tmp_path / f"out{fast}",
                fast_path=fast)
        assert not (tmp_path / f"out{fast}").exists()
    out = merge_from_config({"merge_method": "linear", "parameters": {"normalize": False}, "models": [
        {"model": str(ckpts / "ft1"), "parameters": {"weight": 1.0}},
        {"model": str(ckpts / "ft2"), "parameters": {"weight": -1.0}}]}, tmp_path / "plain")
    assert out.is_dir()  # the plain weighted sum is well defined


@pytest.mark.parametrize("name", ["merge_method_ties.yml", "{odd}.yml", "#1.yml"])
def test_an_existing_path_is_always_a_file(ckpts, tmp_path, name, monkeypatch):
    monkeypatch.chdir(tmp_path)  # as `hf-taskarith merge merge_method_ties.yml out` is typed
    (tmp_path / name).write_text(
        f"merge_method: task_arithmetic\nbase_model: {ckpts / 'base'}\nmodels:\n  - model: {ckpts / 'ft1'}\n")
    cfg = MergeConfig.from_yaml(name)
    assert cfg.merge_method == "task_arithmetic" and cfg.models == [str(ckpts / "ft1")]
    with pytest.raises(MergeConfigError, match="not found"):
        MergeConfig.from_yaml("merge_method_missing.yml")


def test_overwrite_onto_a_file_leaves_nothing_behind(ckpts, tmp_path):
    target = tmp_path / "out"
    target.write_text("not a folder")
    with pytest.raises(FileExistsError, match="existing file"):
        merge(ckpts / "base", [ckpts / "ft1"], output_dir=target)
    merge(ckpts / "base", [ckpts / "ft1"], output_dir=target, overwrite=True)
    assert target.is_dir() and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("yaml_extra,match", [("seed: abc", "seed must be"), ("seed: 7.9", "seed must be"),
                                              ("seed: -1", "seed must be"), ("tokenizer_source: 5", "tokenizer_source")])
def test_bad_values_are_one_line_errors(ckpts, yaml_extra, match):
    text = f"merge_method: task_arithmetic\nbase_model: {ckpts / 'base'}\nmodels:\n  - model: {ckpts / 'ft1'}\n{yaml_extra}\n"
    with pytest.raises(MergeConfigError, match=match):
        MergeConfig.from_yaml(text)


def test_bad_python_arguments_are_explained(ckpts, tmp_path):
    with pytest.raises(TypeError, match="config must be"):
        merge_from_config(["a"], tmp_path / "x")
    with pytest.raises(TypeError, match="models must be a list"):
        merge(ckpts / "base", str(ckpts / "ft1"), output_dir=tmp_path / "y")
    with pytest.raises(MergeConfigError, match="not a model index"):
        merge(ckpts / "base", [ckpts / "ft1"], output_dir=tmp_path / "z", tokenizer_source=5)
    with pytest.raises(MergeConfigError, match="seed must be"):
        merge(ckpts / "base", [ckpts / "ft1"], output_dir=tmp_path / "w", seed=7.9)


@pytest.mark.parametrize("fast", [True, False])
def test_the_output_cannot_be_an_input(ckpts, tmp_path, fast):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(ckpts / "base", base)
    before = sorted((p.name, p.stat().st_size) for p in base.iterdir())
    with pytest.raises(ValueError, match="same as the input"):
        merge_from_config({"merge_method": "task_arithmetic", "base_model": str(base),
                           "models": [{"model": str(ckpts / "ft1")}]}, base, overwrite=True, fast_path=fast)
    with pytest.raises(ValueError, match="nested"):
        merge(base, [ckpts / "ft1"], output_dir=base / "merged")
    assert sorted((p.name, p.stat().st_size) for p in base.iterdir()) == before


def test_apply_refusal_does_not_claim_it_applied(llama_models):
    base, fts = llama_models
    tv = TaskVector.from_models(base, fts[0])
    other = perturbed(base, 9)
    with pytest.raises(IncompatibleBaseError) as e:
        tv.apply_to(other)
    assert "applied" not in str(e.value).split("nothing applied")[0].replace("nothing applied", "")
    assert "nothing applied" in str(e.value)


def test_extrapolating_batchnorm_statistics_warns(caplog):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).eval()
    ft = perturbed(base, 1)
    with torch.no_grad():
        ft[1].running_var.mul_(0.5)
    tv = TaskVector.from_models(base, ft)
    with caplog.at_level(logging.WARNING):
        tv.apply_to(base, scaling=6.0)
    assert "variances negative" in caplog.text and "1.running_var" in caplog.text


SCRIPT = textwrap.dedent("""
    import sys, time
    from hf_taskarith.io.atomic import atomic_output_dir
    with atomic_output_dir(sys.argv[1]) as tmp:
        (tmp / "shard.safetensors").write_bytes(b"x" * 1000)
        print("ready", flush=True)
        time.sleep(60)
""")


def test_sigterm_mid_write_leaves_no_temporary_folder(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(tmp_path / "out")], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    assert any(p.name.startswith(".out.tmp-") for p in tmp_path.iterdir())
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == []


def test_della_inverse_probability_rescale_is_unbiased_per_entry():
    """The paper's rescale (each kept entry / its keep-probability) is unbiased entry by entry;
    mergekit's L1 rescale (the default) matches the L1 norm instead."""
    from hf_taskarith.merging.sparsify import della_magprune

    delta = torch.linspace(0.1, 1.0, 50).reshape(5, 10)
    g = torch.Generator().manual_seed(0)
    mean = sum(della_magprune(delta.clone(), 0.5, epsilon=0.2, generator=g, rescale_mode="inverse_probability")
               for _ in range(4000)) / 4000
    torch.testing.assert_close(mean, delta, rtol=0.08, atol=0.0)
    l1 = della_magprune(delta.clone(), 0.5, epsilon=0.2, generator=g)
    torch.testing.assert_close(l1.abs().sum(), delta.abs().sum())


def test_della_rescale_mode_through_merge(ckpts, tmp_path):
    outs = {}
    for mode in ("l1", "inverse_probability"):
        outs[mode] = merge(ckpts / "base", [ckpts / "ft1", ckpts / "ft2"], method="della", density=0.5,
                           rescale_mode=mode, output_dir=tmp_path / mode, seed=0, progress=False)
    from safetensors.torch import load_file

    a, b = (load_file(next(outs[m].glob("*.safetensors"))) for m in ("l1", "inverse_probability"))
    assert any(not torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(MergeConfigError, match="rescale_mode must be one of"):
        merge(ckpts / "base", [ckpts / "ft1"], method="della", rescale_mode="l2", output_dir=tmp_path / "bad")
