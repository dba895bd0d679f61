"""``hf-taskarith apply TASK_VECTOR BASE OUT_DIR``: write base + scaling * task vector."""

from __future__ import annotations

import argparse

from .common import DTYPE_CHOICES


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "apply", help="apply a saved task vector to a base checkpoint",
        description="Write BASE + SCALING * TASK_VECTOR as a new checkpoint (a complete folder that "
                    "AutoModel.from_pretrained loads), streamed tensor by tensor. A negative --scaling negates "
                    "the task. The base must match the task vector's recorded fingerprint, names and shapes "
                    "unless --allow-mismatch is given.")
    p.add_argument("task_vector", help="saved task-vector folder, or a Hub repo id with --from-hub")
    p.add_argument("base", help="base checkpoint folder or Hub id")
    p.add_argument("output_dir", help="folder to write the edited checkpoint to (created atomically)")
    p.add_argument("--scaling", type=float, default=1.0, help="coefficient (negative to negate)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, help="output dtype (default: the base's)")
    p.add_argument("--allow-mismatch", action="store_true",
                   help="apply even if the base fingerprint or shapes differ (skips are reported)")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT_DIR if it exists")
    p.add_argument("--from-hub", action="store_true", help="TASK_VECTOR is a Hub repo id")
    p.add_argument("--revision", help="with --from-hub: tag, branch or commit sha (default: main)")
    p.add_argument("--token", help="with --from-hub: Hub token (default: HF_TOKEN / cached login)")
    p.add_argument("--endpoint", help="with --from-hub: Hub URL (default: HF_ENDPOINT or huggingface.co)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..io.atomic import check_output_path
    from ..task_vector import TaskVector

    check_output_path(args.output_dir, overwrite=args.overwrite)  # before downloading or merging
    if args.from_hub:
        from ..hub.pull import pull_task_vector

        tv = pull_task_vector(args.task_vector, revision=args.revision, token=args.token, endpoint=args.endpoint)
        print(f"pulled {args.task_vector} at commit {tv.metadata.extra['hub']['commit_sha']}")
    else:
        tv = TaskVector.from_pretrained(args.task_vector)
    out = tv.apply_to(args.base, args.scaling, output_dir=args.output_dir, allow_mismatch=args.allow_mismatch,
                      dtype=args.dtype, overwrite=args.overwrite)
    print(f"edited checkpoint written to {out}")
    return 0
