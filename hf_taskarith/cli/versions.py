"""``hf-taskarith versions REPO_ID``: list tags and branches with commits and dates."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "versions", help="list a task-vector repo's tags and branches",
        description="List the tags and branches of a task-vector repo on the Hub, one a line: kind, name, "
                    "commit sha, date and commit title. Any of the names or shas is a valid "
                    "`pull --revision` / `apply --from-hub --revision`.")
    p.add_argument("repo_id", help="Hub repo id, org/name")
    p.add_argument("--token", help="Hub token (default: HF_TOKEN / cached login)")
    p.add_argument("--endpoint", help="Hub URL (default: HF_ENDPOINT or huggingface.co)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..hub.pull import describe_versions, list_task_vector_versions

    versions = list_task_vector_versions(args.repo_id, token=args.token, endpoint=args.endpoint)
    if args.json:
        print(describe_versions(versions))
        return 0
    for v in versions:
        date = v.date.strftime("%Y-%m-%d %H:%M:%S") if v.date else "?"
        print(f"{v.kind:6s} {v.name:20s} {v.commit_sha[:12]}  {date}  {v.title or ''}")
    return 0
