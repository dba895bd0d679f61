"""mergekit-style YAML configs and the hf-taskarith CLI."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from hf_taskarith import MergeConfig, merge, merge_from_config
from hf_taskarith.cli.main import main
from hf_taskarith.errors import MergeConfigError

YAML = """\
merge_method: ties
base_model: base
models:
  - model: base
  - model: ft1
    parameters: {weight: 0.7, density: 0.5}
  - model: ft2
    parameters:
      weight: 0.3
      density: 0.4
parameters:
  normalize: true
  int8_mask: true
dtype: float32
"""


def test_yaml_equals_python_call(tmp_path, llama_checkpoints):
    cfg_file = llama_checkpoints / "ties.yml"
    cfg_file.write_text(YAML)
    cfg = MergeConfig.from_yaml(cfg_file)
    # base dropped, paths resolved
    assert cfg.models == [str(llama_checkpoints / "ft1"), str(llama_checkpoints / "ft2")]
    assert cfg.merge_kwargs()["density"] == [0.5, 0.4]
    a = merge_from_config(cfg_file, tmp_path / "a", progress=False)
    b = merge(llama_checkpoints / "base", [llama_checkpoints / "ft1", llama_checkpoints / "ft2"], method="ties",
              weights=[0.7, 0.3], density=[0.5, 0.4], normalize=True, dtype="float32", output_dir=tmp_path / "b",
              progress=False)
    sa, sb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert (a / "hf_taskarith_merge.yml").read_text() == YAML


@pytest.mark.parametrize("text, message", [
    ("merge_method: ties\nmodels: []\n", "non-empty models"),
    ("base_model: x\nmodels: [{model: y}]\n", "needs merge_method"),
    ("merge_method: ties\nslices: []\nmodels: [{model: y}]\n", "both models: and slices:"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: y, params: {}}]\n", "unknown key.*params"),
    ("merge_method: ties\nbase_model: b\nmodelz: []\n", r"unknown config key\(s\) \['modelz'\]"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: y, parameters: {density: [0.5, 1.5]}}]\n",
     r"density=1.5 is outside \(0.0, 1.0\]"),  # every point of a gradient is checked
    ("merge_method: ties\nbase_model: b\nmodels: [{model: y, parameters: {lambda: 2}}]\n", "shared parameter"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: y, parameters: {gamma: 2}}]\n",
     "does not take per-model parameter 'gamma'"),
    ("merge_method: [unclosed\n", "not valid YAML"),
])
def test_bad_configs_explain_themselves(tmp_path, text, message):
    f = tmp_path / "c.yml"
    f.write_text(text)
    with pytest.raises(MergeConfigError, match=message):
        cfg = MergeConfig.from_yaml(f)
        cfg.merge_kwargs()
        merge_from_config(cfg, tmp_path / "out")


def test_cli_merge_methods_extract_apply(tmp_path, llama_checkpoints, capsys):
    cfg = tmp_path / "ta.yml"
    cfg.write_text(f"merge_method: task_arithmetic\nbase_model: {llama_checkpoints / 'base'}\nmodels:\n"
                   f"  - model: {llama_checkpoints / 'ft1'}\n    parameters: {{weight: 0.3}}\n")
    assert main(["merge", str(cfg), str(tmp_path / "merged"), "--no-progress"]) == 0
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert main(["merge", str(cfg), str(tmp_path / "merged"), "--no-progress"]) == 1  # exists
    assert "overwrite" in capsys.readouterr().err
    assert main(["methods"]) == 0
    listing = capsys.readouterr().out
    for m in ("task_arithmetic", "ties", "dare_ties", "breadcrumbs", "della", "tsv", "iso_cts", "magnitude_prune"):
        assert m in listing
    assert main(["extract", str(llama_checkpoints / "base"), str(llama_checkpoints / "ft1"), str(tmp_path / "tv")]) == 0
    assert main(["apply", str(tmp_path / "tv"), str(llama_checkpoints / "base"), str(tmp_path / "ap"),
                 "--scaling", "0.3"]) == 0
    a, b = load_file(tmp_path / "ap" / "model.safetensors"), load_file(tmp_path / "merged" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
    assert main(["merge", str(tmp_path / "missing.yml"), str(tmp_path / "z")]) == 1
    assert "not found" in capsys.readouterr().err


def test_console_script_is_installed():
    r = subprocess.run([sys.executable, "-m", "hf_taskarith.cli.main", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and "hf_taskarith" in r.stdout
