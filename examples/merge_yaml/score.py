"""Score checkpoints on the two tasks of ``prepare_models.py`` through their frozen heads
(accuracy through ``evaluate``, from the metric module shipped with hf_taskarith).

    python examples/merge_yaml/score.py models/base models/ft_a models/ft_b merged/*

(Not named ``evaluate.py``: run from this folder, such a script would shadow the ``evaluate`` package.)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from hf_taskarith.evaluation.task_accuracy import evaluate_tasks
from hf_taskarith.training.encoders import load_encoder, load_tokenizer
from hf_taskarith.training.heads import load_heads
from hf_taskarith.training.tasks import Split, TaskData

HERE = Path(__file__).resolve().parent


def main(folders: list[str]) -> None:
    models = HERE / "models"
    heads = load_heads(models / "heads")
    data = json.loads((models / "tasks.json").read_text())
    empty = Split((), ())
    tasks = [TaskData(name, ("neg", "pos"), empty, empty, Split(tuple(d["texts"]), tuple(d["labels"])))
             for name, d in data.items()]
    tok = load_tokenizer(models / "base")
    print(f"{'checkpoint':32s} " + " ".join(f"{t.name:>16s}" for t in tasks))
    for folder in folders:
        acc = evaluate_tasks(load_encoder(folder), heads, tok, tasks)
        print(f"{folder:32s} " + " ".join(f"{100 * acc[t.name]:15.1f}%" for t in tasks))


if __name__ == "__main__":
    main(sys.argv[1:] or ["models/base", "models/ft_a", "models/ft_b"])
