"""``hf-taskarith merge CONFIG.yml OUT_DIR``: run a (mergekit-compatible) merge config.

``hf-taskarith merge --print-schema`` prints the JSON schema of the config file (for editors).
"""

from __future__ import annotations

import argparse
import json

from .common import DTYPE_CHOICES


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="merge models / task vectors described by a YAML config",
                       description="Run a merge described by a mergekit-compatible YAML file.")
    p.add_argument("--print-schema", action=_PrintSchema,
                   help="print the JSON schema of merge config files (for editors: see docs/merging.md) and exit")
    p.add_argument("config", help="YAML file (merge_method, base_model, models, parameters, dtype, ...)")
    p.add_argument("output_dir", help="folder to write the merged checkpoint to (created atomically)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, help="override the output dtype (default: the config's dtype)")
    p.add_argument("--seed", type=int, help="override the seed of randomized methods (default: the config's seed, "
                                            "or 0)")
    p.add_argument("--max-shard-size", help="output shard size, e.g. 5GB, 500MB (default: the config's, or 5GB)")
    p.add_argument("--allow-mismatch", action="store_true",
                   help="merge despite base fingerprint / name / shape mismatches (skipped ones are reported)")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT_DIR if it exists")
    p.add_argument("--no-fast-path", action="store_true",
                   help="always use the torch engine (by default, task_arithmetic and linear merges of local "
                        "safetensors checkpoints run torch-free with numpy, with identical output)")
    p.set_defaults(func=run)


class _PrintSchema(argparse.Action):
    """Like ``--version``: print the schema and exit, before the positionals are required."""

    def __init__(self, option_strings, dest, **kwargs):
        kwargs.update(nargs=0, default=argparse.SUPPRESS)
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        from ..merging.schema import json_schema

        print(json.dumps(json_schema(), indent=2))
        parser.exit()


def run(args: argparse.Namespace) -> int:
    from ..merging.config import merge_from_config

    out = merge_from_config(args.config, args.output_dir, dtype=args.dtype, seed=args.seed,
                            max_shard_size=args.max_shard_size, allow_mismatch=args.allow_mismatch or None,
                            overwrite=args.overwrite or None, progress=not args.no_progress,
                            fast_path=not args.no_fast_path)
    print(f"merged checkpoint written to {out}")
    return 0
