"""``hf-taskarith pull REPO_ID OUT_DIR [--revision v1]``: download a task vector."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pull", help="download a task vector at a tag, branch or commit",
        description="Download a task vector from a Hub repo (pushed with `push` or push_task_vector) at a tag, "
                    "branch or commit, and save it as a plain (decompressed) task-vector folder. The commit sha "
                    "is recorded in its metadata. `versions REPO_ID` lists the tags and branches.")
    p.add_argument("repo_id", help="Hub repo id, org/name")
    p.add_argument("output_dir", help="where to save it (decompressed; created atomically)")
    p.add_argument("--revision", help="tag, branch or commit sha (default: main)")
    p.add_argument("--token", help="Hub token (default: HF_TOKEN / cached login)")
    p.add_argument("--endpoint", help="Hub URL (default: HF_ENDPOINT or huggingface.co)")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT_DIR if it exists")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..hub.pull import pull_task_vector
    from ..io.atomic import check_output_path

    check_output_path(args.output_dir, overwrite=args.overwrite)  # before downloading
    tv = pull_task_vector(args.repo_id, revision=args.revision, token=args.token, endpoint=args.endpoint)
    tv.materialize().save_pretrained(args.output_dir, overwrite=args.overwrite)
    print(f"pulled {args.repo_id}@{args.revision or 'main'} (commit {tv.metadata.extra['hub']['commit_sha']}) "
          f"to {args.output_dir}")
    return 0
