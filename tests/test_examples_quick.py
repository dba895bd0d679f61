"""Every example under ``examples/`` runs end to end in CI, in a quick mode (few training steps).

Each runs as its README says, as a subprocess, offline, writing into a temporary folder; the
assertions check that each step the example announces happened (not its accuracies, which
need the full step counts). The task-vector example has its own tests (``test_examples.py``,
one process and two under ``accelerate launch``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "2",
       "PYTHONPATH": str(ROOT), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}

pytestmark = pytest.mark.slow


def _run(args: list[str], cwd: Path | None = None, timeout: int = 600) -> str:
    proc = subprocess.run(args, env=ENV, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    return proc.stdout


def test_linearized_finetuning_example(tmp_path):
    out = _run([sys.executable, str(EXAMPLES / "linearized_finetuning" / "linearized_finetuning.py"),
                "--steps", "8", "--output-dir", str(tmp_path)])
    for mode in ("linear", "nonlinear"):
        assert f"{mode:9s} " in out, out
    assert "accuracy on held-out data" in out and "and reloaded:" in out, out


def test_llora_adapter_example(tmp_path):
    out = _run([sys.executable, str(EXAMPLES / "adapters" / "llora_example.py"), "--steps", "8",
                "--out", str(tmp_path / "adapters")])
    assert "reloaded task_5 adapter: accuracy" in out, out
    assert out.count("merged, ") == 2 and "tangent space" in out, out
    assert any((tmp_path / "adapters").rglob("adapter_config.json"))


def test_evaluation_example(tmp_path):
    out = _run([sys.executable, str(EXAMPLES / "evaluation" / "evaluation.py"), "--steps", "8",
                "--output-dir", str(tmp_path), "--xi-alphas", "0", "1"])
    assert "negation of mood" in out and "disentanglement error xi" in out, out
    results = json.loads((tmp_path / "results.json").read_text())
    assert results
    assert len(list(tmp_path.glob("*.png"))) == 2


def test_hub_sharing_example(tmp_path):
    out = _run([sys.executable, str(EXAMPLES / "hub_sharing" / "hub_sharing.py"), "--workdir", str(tmp_path)])
    assert "identical to what was pushed: True" in out, out
    assert "refused, tag exists" in out and "refused, stale parent" in out, out
    assert (tmp_path / "tv_v1").is_dir() and (tmp_path / "tv_v2").is_dir()


def test_merge_yaml_example(tmp_path):
    """``run.sh`` as its README gives it, on a copy of the folder (it writes models/ and merged/)."""
    work = tmp_path / "merge_yaml"
    shutil.copytree(EXAMPLES / "merge_yaml", work, ignore=shutil.ignore_patterns("models", "merged", "__pycache__"))
    out = _run(["bash", str(work / "run.sh")], cwd=work)
    for cfg in ("task_arithmetic", "ties", "dare_ties", "negate"):
        assert (work / "merged" / cfg / "config.json").is_file(), cfg
        assert f"merged/{cfg}" in out, out
