"""``hf-taskarith methods``: list merge methods and their parameters."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "methods", help="list merge methods and their parameters",
        description="List every registered merge method (the YAML's merge_method), whether it is randomized "
                    "or needs a base model, and its parameters: name, per model or shared, default and meaning.")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..merging.registry import list_merge_methods

    for m in list_merge_methods():
        tags = [t for t, on in (("randomized", m.randomized), ("no base needed", not m.needs_base)) if on]
        print(f"{m.name}{' (' + ', '.join(tags) + ')' if tags else ''}: {m.description}")
        for p in m.params:
            scope = "per model" if p.per_model else "shared"
            print(f"    {p.name} [{scope}, default {p.default!r}]: {p.help}")
    return 0
