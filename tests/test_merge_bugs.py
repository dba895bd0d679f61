"""Merge-engine and apply bugs found by an audit: each test failed before its fix."""

from __future__ import annotations

import copy
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from conftest import perturbed
from hf_taskarith import TaskVector, merge
from hf_taskarith.errors import IncompatibleBaseError, MergeConfigError, NonFiniteError
from hf_taskarith.merging.config import MergeConfig, merge_from_config


@pytest.fixture(scope="module")
def ckpts(llama_checkpoints):
    """Folders base, ft1, ft2 (and ft3) of the tiny Llama (conftest)."""
    return llama_checkpoints


def test_linear_with_weights_summing_to_zero_is_an_error(ckpts, tmp_path):
    for fast in (True, False):
        with pytest.raises(MergeConfigError, match=r"weights \[1.0, -1.0\] sum to 0.*normalize: false"):
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


def test_config_text_and_folders_are_not_file_errors(ckpts, tmp_path):
    long_text = (f"{{name: {'m' * 300}, merge_method: task_arithmetic, base_model: {ckpts / 'base'}, "
                 f"models: [{ckpts / 'ft1'}]}}")  # its first component is too long for a file name: no OSError
    assert MergeConfig.from_yaml(long_text).models == [str(ckpts / "ft1")]
    with pytest.raises(MergeConfigError, match="is a folder"):
        MergeConfig.from_yaml(str(tmp_path))
    (tmp_path / "one_line.yml").write_text("just text")
    with pytest.raises(MergeConfigError, match="must be a mapping"):
        MergeConfig.from_yaml(tmp_path / "one_line.yml")


@pytest.mark.parametrize("fast", [True, False])
def test_overwrite_onto_a_file_leaves_nothing_behind(ckpts, tmp_path, fast):
    target = tmp_path / "out"
    target.write_text("not a folder")
    config = {"merge_method": "task_arithmetic", "base_model": str(ckpts / "base"),
              "models": [{"model": str(ckpts / "ft1")}]}
    with pytest.raises(FileExistsError, match="is an existing file;") as e:
        merge_from_config(config, target, fast_path=fast)
    assert "folder" not in str(e.value) and "not empty" not in str(e.value)
    merge_from_config(config, target, overwrite=True, fast_path=fast)
    assert target.is_dir() and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("yaml_extra,match", [("seed: abc", "seed must be"), ("seed: 7.9", "seed must be"),
                                              ("seed: 7.0", "seed must be"), ("seed: true", "seed must be"),
                                              ("seed: -1", "seed must be"),
                                              ("tokenizer_source: 5", "tokenizer_source")])
def test_bad_values_are_one_line_errors(ckpts, yaml_extra, match):
    text = (f"merge_method: task_arithmetic\nbase_model: {ckpts / 'base'}\n"
            f"models:\n  - model: {ckpts / 'ft1'}\n{yaml_extra}\n")
    with pytest.raises(MergeConfigError, match=match):
        MergeConfig.from_yaml(text)


def test_good_seeds_are_integers():
    from hf_taskarith.merging.config import parse_seed

    assert [parse_seed(v) for v in (7, "7", " 7 ", np.int64(7))] == [7, 7, 7, 7]


def test_bad_python_arguments_are_explained(ckpts, tmp_path):
    with pytest.raises(TypeError, match="config must be") as e:
        merge_from_config(["a"], tmp_path / "x")
    assert isinstance(e.value, MergeConfigError)  # the CLI's one-line error type, and a TypeError
    with pytest.raises(TypeError, match=r"models must be a list.*for one input pass \[") as e:
        merge(ckpts / "base", str(ckpts / "ft1"), output_dir=tmp_path / "y")
    assert isinstance(e.value, MergeConfigError)
    with pytest.raises(MergeConfigError, match="not a model index"):
        merge(ckpts / "base", [ckpts / "ft1"], output_dir=tmp_path / "z", tokenizer_source=5)
    with pytest.raises(MergeConfigError, match="seed must be"):
        merge(ckpts / "base", [ckpts / "ft1"], output_dir=tmp_path / "w", seed=7.9)
    config = {"merge_method": "task_arithmetic", "base_model": str(ckpts / "base"), "models": [str(ckpts / "ft1")]}
    for fast in (True, False):  # the torch-free path only records the seed: checked all the same
        with pytest.raises(MergeConfigError, match="seed must be"):
            merge_from_config(config, tmp_path / "v", seed=7.9, fast_path=fast)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_models_may_be_a_generator(ckpts, tmp_path):
    out = merge(ckpts / "base", (m for m in [ckpts / "ft1"]), output_dir=tmp_path / "out", progress=False)
    assert (out / "model.safetensors").is_file()  # the output check did not use the generator up


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
    with pytest.raises(MergeConfigError, match="same as the input"):  # also when the models come lazily
        merge(ckpts / "base", (m for m in [base]), output_dir=base, overwrite=True)
    assert sorted((p.name, p.stat().st_size) for p in base.iterdir()) == before


def test_apply_refusal_does_not_claim_it_applied(llama_models):
    base, fts = llama_models
    tv = TaskVector.from_models(base, fts[0])
    other = perturbed(base, 9)
    with pytest.raises(IncompatibleBaseError, match="nothing was applied") as e:
        tv.apply_to(other)
    assert not re.search(r"applied \d+ tensors", str(e.value))
    n = len(tv)
    assert f"{n} of {n} tensors fit" in str(e.value)


def test_extrapolating_batchnorm_statistics_is_refused_unless_allowed(caplog):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).eval()
    ft = perturbed(base, 1)
    with torch.no_grad():
        ft[1].running_var.mul_(0.5)
    tv = TaskVector.from_models(base, ft)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(NonFiniteError, match=r"variances negative in '1.running_var.*nothing was applied.*"
                                             r"allow_negative_variance=True"):
        tv.apply_to(base, scaling=6.0)
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    assert not caplog.text
    assert bool((tv.apply_to(copy.deepcopy(base), scaling=1.0)[1].running_var > 0).all())  # interpolating is fine
    with caplog.at_level(logging.WARNING):
        tv.apply_to(base, scaling=6.0, allow_negative_variance=True, inplace=True)
    assert "variances are negative" in caplog.text and "1.running_var" in caplog.text
    assert bool((base[1].running_var < 0).any())


SCRIPT = textwrap.dedent("""
    import sys, time
    from hf_taskarith.io.atomic import atomic_output_dir
    with atomic_output_dir(sys.argv[1]) as tmp:
        (tmp / "shard.safetensors").write_bytes(b"x" * 1000)
        print("ready", flush=True)
        time.sleep(60)
""")


MERGE_SCRIPT = textwrap.dedent("""
    import sys, time
    import hf_taskarith.io.writer as torch_writer
    import hf_taskarith.merging.lite.engine as lite_engine
    from hf_taskarith.cli.main import main

    def slow(module, label):  # hold on when the second shard starts: the first is written
        real, calls = module.create_shard, []

        def create_shard(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                print("ready", label, flush=True)
                time.sleep(60)
            return real(*args, **kwargs)

        module.create_shard = create_shard

    slow(torch_writer, "torch")
    slow(lite_engine, "lite")
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.parametrize("engine", ["lite", "torch"])
def test_sigterm_mid_merge_leaves_no_temporary_folder(ckpts, tmp_path, engine):
    cfg = tmp_path / "m.yml"
    cfg.write_text(f"merge_method: task_arithmetic\nbase_model: {ckpts / 'base'}\nmodels:\n"
                   f"  - model: {ckpts / 'ft1'}\n  - model: {ckpts / 'ft2'}\n")
    argv = ["merge", str(cfg), str(tmp_path / "out"), "--max-shard-size", "30KB", "--no-progress"]
    argv += ["--no-fast-path"] if engine == "torch" else []
    proc = subprocess.Popen([sys.executable, "-c", MERGE_SCRIPT, *argv], stdout=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(__file__))
    try:
        assert proc.stdout.readline().split() == ["ready", engine]
        (tmp,) = [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
        assert any(p.suffix == ".safetensors" for p in tmp.iterdir())  # a partial output exists
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.yml"]


def test_sigterm_handler_is_only_installed_while_writing_and_an_own_one_is_kept(tmp_path):
    from hf_taskarith.io.atomic import atomic_output_dir

    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    with atomic_output_dir(tmp_path / "a"):
        assert callable(signal.getsignal(signal.SIGTERM))
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    own = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with atomic_output_dir(tmp_path / "b"):
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, own)


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
