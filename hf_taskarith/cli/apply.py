"""``hf-taskarith apply TASK_VECTOR BASE OUT_DIR``: write base + scaling * task vector."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("apply", help="apply a saved task vector to a base checkpoint")
    p.add_argument("task_vector", help="saved task-vector folder")
    p.add_argument("base", help="base checkpoint folder or Hub id")
    p.add_argument("output_dir")
    p.add_argument("--scaling", type=float, default=1.0, help="coefficient (negative to negate)")
    p.add_argument("--dtype", help="output dtype (default: the base's)")
    p.add_argument("--allow-mismatch", action="store_true",
                   help="apply even if the base fingerprint or shapes differ (skips are reported)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..task_vector import TaskVector

    tv = TaskVector.from_pretrained(args.task_vector)
    out = tv.apply_to(args.base, args.scaling, output_dir=args.output_dir, allow_mismatch=args.allow_mismatch,
                      dtype=args.dtype, overwrite=args.overwrite)
    print(f"edited checkpoint written to {out}")
    return 0
