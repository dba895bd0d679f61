"""``hf-taskarith compress TASK_VECTOR OUT_DIR --method topk --density 0.05``."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compress", help="write a compressed copy of a saved task vector")
    p.add_argument("task_vector")
    p.add_argument("output_dir")
    p.add_argument("--method", choices=["topk", "sign", "lowrank"], default="topk")
    p.add_argument("--density", type=float, help="topk/sign: fraction of entries kept")
    p.add_argument("--rank", type=int, help="lowrank: rank per matrix")
    p.add_argument("--rank-fraction", type=float, help="lowrank: fraction of each matrix's rank")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..task_vector import TaskVector

    params = {k: v for k, v in (("density", args.density), ("rank", args.rank),
                                ("rank_fraction", args.rank_fraction)) if v is not None}
    tv = TaskVector.from_pretrained(args.task_vector).compress(args.method, progress=True, **params)
    tv.save_pretrained(args.output_dir, overwrite=args.overwrite)
    st = tv.metadata.extra["compression"]
    print(f"{args.method}: {st['size_ratio']:.1f}x smaller than float32, relative L2 error "
          f"{st['relative_error']:.4f}; written to {args.output_dir}")
    return 0
