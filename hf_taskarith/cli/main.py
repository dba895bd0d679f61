"""``hf-taskarith`` entry point: each sub-command is a module exposing ``register(subparsers)``.

A command module adds its parser (with a ``help`` line and a ``description``, and ``help`` on
every argument) and sets ``func`` (args -> exit code). To add a command, write a module and list
it in :data:`COMMANDS`. Every command also gets ``--no-progress`` and ``-q/--quiet`` and a help
formatter that shows defaults (:mod:`.common`); ``tests/test_cli_help.py`` checks all of this.
A command that hands the options it does not know to another parser (``finetune``, to
``HfArgumentParser(TrainingArguments)``) sets ``accepts_training_args=True`` and reads them from
``args.training_args``; every other command refuses them, as ``parse_args`` would.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from ..errors import TaskArithError
from . import common

COMMANDS = ["merge", "methods", "extract", "apply", "compress", "push", "pull", "versions", "hub", "finetune", "demo"]


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argument parser, with every sub-command, or only ``command`` when it names one.

    Building only the command being run keeps start-up to what that command imports (the
    torch-free ``merge`` path imports no torch); ``--help`` and unknown commands get all.
    """
    from ..version import __version__

    parser = argparse.ArgumentParser(
        prog="hf-taskarith", description="Task arithmetic for Hugging Face models: extract, merge, apply, compress "
                                         "and share task vectors (fine-tuned minus pre-trained weights).")
    parser.add_argument("--version", action="version", version=f"hf_taskarith {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details (INFO level)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND",
                                help="the command to run (hf-taskarith COMMAND --help for its options)")
    for name in [command] if command in COMMANDS else COMMANDS:
        importlib.import_module(f"{__package__}.{name.replace('-', '_')}").register(sub)
    return common.finish_parser(parser)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command)
    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(args, "accepts_training_args", False):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")  # what parse_args says
    args.training_args = unknown
    args = common.resolve_common_options(args)
    common.configure_logging(args)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        with common.common_settings(args):
            code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe surfaces here, not at interpreter exit
        return code
    except BrokenPipeError:
        return _stdout_closed()
    except (TaskArithError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; no output was written.", file=sys.stderr)
        return 130


def _stdout_closed() -> int:
    """The reader of stdout went away (``hf-taskarith versions | head -1``): stop quietly.

    Python ignores SIGPIPE, so the write raises ``BrokenPipeError``; stdout is pointed at
    ``/dev/null`` so the final flush at exit does not raise again. Exit status 141 (128 +
    SIGPIPE), as a command killed by the signal would have.
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout has no file descriptor (embedded use)
        pass
    return 141


if __name__ == "__main__":
    sys.exit(main())
