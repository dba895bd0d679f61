"""``hf-taskarith extract BASE FINETUNED OUT_DIR``: save the task vector between two checkpoints."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("extract", help="save finetuned - base as a task vector folder")
    p.add_argument("base", help="pre-trained checkpoint folder or Hub id")
    p.add_argument("finetuned", help="fine-tuned checkpoint folder or Hub id")
    p.add_argument("output_dir")
    p.add_argument("--dtype", default="float32", help="dtype of the stored deltas (default float32)")
    p.add_argument("--max-shard-size", default="5GB")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..merging.api import parse_dtype
    from ..task_vector import TaskVector

    tv = TaskVector.from_checkpoints(args.base, args.finetuned, dtype=parse_dtype(args.dtype))
    tv.save_pretrained(args.output_dir, max_shard_size=args.max_shard_size, overwrite=args.overwrite)
    print(f"task vector ({len(tv)} tensors, norm {tv.norm():.4g}) written to {args.output_dir}")
    return 0
