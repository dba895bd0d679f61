"""``hf-taskarith extract BASE FINETUNED OUT_DIR``: save the task vector between two checkpoints."""

from __future__ import annotations

import argparse

from .common import DTYPE_CHOICES


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "extract", help="save finetuned - base as a task vector folder",
        description="Compute the task vector FINETUNED - BASE between two checkpoints of the same architecture "
                    "(safetensors folders, sharded or not, or Hub ids), one tensor pair at a time, and save it "
                    "with metadata pinning the base (id and weight fingerprint). Load it with "
                    "TaskVector.from_pretrained(OUTPUT_DIR); use it with `merge`, `apply`, `compress` or `push`.")
    p.add_argument("base", help="pre-trained checkpoint folder or Hub id")
    p.add_argument("finetuned", help="fine-tuned checkpoint folder or Hub id (same tensor names and shapes)")
    p.add_argument("output_dir", help="folder to write the task vector to (created atomically)")
    p.add_argument("--dtype", default="float32", choices=DTYPE_CHOICES, help="dtype of the stored deltas")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB, 500MB")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT_DIR if it exists")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..io.atomic import check_output_path
    from ..merging.api import parse_dtype
    from ..task_vector import TaskVector

    check_output_path(args.output_dir, overwrite=args.overwrite)  # before reading the checkpoints
    tv = TaskVector.from_checkpoints(args.base, args.finetuned, dtype=parse_dtype(args.dtype))
    tv.save_pretrained(args.output_dir, max_shard_size=args.max_shard_size, overwrite=args.overwrite)
    print(f"task vector ({len(tv)} tensors, norm {tv.norm():.4g}) written to {args.output_dir}")
    return 0
