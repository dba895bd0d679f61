"""``hf-taskarith pull REPO_ID OUT_DIR [--revision v1]``: download a task vector."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pull", help="download a task vector at a tag, branch or commit")
    p.add_argument("repo_id")
    p.add_argument("output_dir", help="where to save it (decompressed)")
    p.add_argument("--revision", help="tag, branch or commit sha (default: main)")
    p.add_argument("--token")
    p.add_argument("--endpoint")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..hub.pull import pull_task_vector

    tv = pull_task_vector(args.repo_id, revision=args.revision, token=args.token, endpoint=args.endpoint)
    tv.materialize().save_pretrained(args.output_dir, overwrite=args.overwrite)
    print(f"pulled {args.repo_id}@{args.revision or 'main'} (commit {tv.metadata.extra['hub']['commit_sha']}) "
          f"to {args.output_dir}")
    return 0
