"""``hf-taskarith push TASK_VECTOR REPO_ID [--tag v1]``: publish a saved task vector."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "push", help="push a saved task vector to a Hub repo in one commit",
        description="Upload a saved task-vector folder (optionally compressed first) with a model card to a Hub "
                    "repo in one commit, optionally tagged. Concurrent pushes to the same branch fail instead of "
                    "overwriting each other.")
    p.add_argument("task_vector", help="saved task-vector folder")
    p.add_argument("repo_id", help="org/name (created if missing)")
    p.add_argument("--tag", help="tag the commit, e.g. v1")
    p.add_argument("--branch", help="push to this branch (created if missing)")
    p.add_argument("--message", help="commit message")
    p.add_argument("--private", action="store_true", help="create the repo as private")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    p.add_argument("--compress", choices=["topk", "sign", "lowrank"], help="compress before pushing")
    p.add_argument("--density", type=float, help="topk/sign: fraction of entries kept (default: 0.1)")
    p.add_argument("--rank", type=int, help="lowrank: rank per matrix (default: set by --rank-fraction)")
    p.add_argument("--rank-fraction", type=float, help="lowrank: fraction of each matrix's rank kept (default: 0.05)")
    p.add_argument("--token", help="Hub token (default: HF_TOKEN / cached login)")
    p.add_argument("--endpoint", help="Hub URL (default: HF_ENDPOINT or huggingface.co)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..task_vector import TaskVector

    tv = TaskVector.from_pretrained(args.task_vector)
    if args.compress:
        params = {k: v for k, v in (("density", args.density), ("rank", args.rank),
                                    ("rank_fraction", args.rank_fraction)) if v is not None}
        tv = tv.compress(args.compress, **params)
        st = tv.metadata.extra["compression"]
        print(f"compressed with {args.compress}: {st['size_ratio']:.1f}x smaller, "
              f"relative error {st['relative_error']:.3f}")
    res = tv.push_to_hub(args.repo_id, tag=args.tag, branch=args.branch, commit_message=args.message,
                         private=args.private, create_pr=args.create_pr, token=args.token, endpoint=args.endpoint)
    print(f"pushed {args.repo_id}@{res.branch}: commit {res.commit_sha}" + (f", tag {res.tag}" if res.tag else ""))
    return 0
