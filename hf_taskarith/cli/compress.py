"""``hf-taskarith compress TASK_VECTOR OUT_DIR --method topk --density 0.05``."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from ..compression.codecs import CODECS

    topk, sign, lowrank = (CODECS[m].defaults for m in ("topk", "sign", "lowrank"))
    density = (f"{topk['density']}" if topk["density"] == sign["density"]
               else f"topk {topk['density']}, sign {sign['density']}")
    p = sub.add_parser(
        "compress", help="write a compressed copy of a saved task vector",
        description="Write a compressed copy of a saved task vector, for sharing: topk keeps the largest-magnitude "
                    "entries (bitmask + float16 values), sign keeps their signs and one scale per tensor, lowrank "
                    "keeps a truncated SVD of each matrix. TaskVector.from_pretrained and `pull` decompress "
                    "transparently. Prints the size ratio and the relative L2 error; check the edited model's "
                    "accuracy too (docs/compression.md has measured trade-offs).")
    p.add_argument("task_vector", help="saved task-vector folder")
    p.add_argument("output_dir", help="folder to write the compressed task vector to (created atomically)")
    p.add_argument("--method", choices=sorted(CODECS), default="topk", help="codec")
    p.add_argument("--density", type=float,
                   help=f"topk/sign: fraction of entries kept (default: {density})")
    p.add_argument("--rank", type=int, help="lowrank: rank per matrix (default: set by --rank-fraction)")
    p.add_argument("--rank-fraction", type=float,
                   help=f"lowrank: fraction of each matrix's rank kept (default: {lowrank['rank_fraction']})")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT_DIR if it exists")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..io.atomic import check_output_path
    from ..task_vector import TaskVector

    check_output_path(args.output_dir, overwrite=args.overwrite)  # before the work, not after it
    params = {k: v for k, v in (("density", args.density), ("rank", args.rank),
                                ("rank_fraction", args.rank_fraction)) if v is not None}
    tv = TaskVector.from_pretrained(args.task_vector).compress(args.method, progress=not args.no_progress, **params)
    tv.save_pretrained(args.output_dir, overwrite=args.overwrite)
    st = tv.metadata.extra["compression"]
    print(f"{args.method}: {st['size_ratio']:.1f}x smaller than float32, relative L2 error "
          f"{st['relative_error']:.4f}; written to {args.output_dir}")
    return 0
