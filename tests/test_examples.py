"""The task-vector example end to end on its tiny BERT: one process, and two CPU processes
under ``accelerate launch`` (DDP, gloo), the command its docstring gives."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "task_vectors" / "task_vectors.py"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
       "PYTHONPATH": str(ROOT)}


def _accuracies(line: str) -> dict[str, float]:
    return {k: float(v) for k, v in re.findall(r"(\w+) ([\d.]+)%", line)}


def _check_output(out: str, processes: int) -> None:
    lines = out.splitlines()
    pre = _accuracies(next(x for x in lines if x.startswith("pre-trained:")))
    tuned = [x for x in lines if x.startswith("fine-tuned on")]
    assert len(tuned) == 2, out  # printed once, by the main process
    mood = _accuracies(tuned[0].split("(|tv|")[0])
    assert mood["mood"] > pre["mood"] + 20, out  # fine-tuning through the frozen head learns the task
    assert f"{processes} process" in tuned[0], out
    assert "refused a different base: IncompatibleBaseError" in out


@pytest.mark.slow
def test_task_vectors_example_runs(tmp_path):
    proc = subprocess.run([sys.executable, str(EXAMPLE), "--workdir", str(tmp_path)], env=ENV, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    _check_output(proc.stdout, 1)
    assert (tmp_path / "edited" / "model.safetensors").is_file() or any((tmp_path / "edited").glob("*.safetensors"))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_task_vectors_example_under_accelerate_launch_two_cpu_processes(tmp_path):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), str(EXAMPLE), "--workdir", str(tmp_path)]
    proc = subprocess.run(cmd, env={**ENV, "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    _check_output(proc.stdout, 2)
