"""What every ``hf-taskarith`` command shares: help formatting, ``--no-progress``, ``-q/--quiet``.

:func:`finish_parser` walks the parser tree once it is built and gives every sub-command (nested
ones included) the :class:`HelpFormatter` and the common options, so a command module only
declares its own arguments. :func:`resolve_common_options` fills in the parsed values, and
:func:`common_settings` applies them (log level, progress bars) while the command runs.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
from collections.abc import Iterator

PROGRESS_ENV = "HF_HUB_DISABLE_PROGRESS_BARS"
"""The switch huggingface_hub and this library's progress bars read; ``--no-progress`` sets it."""

DTYPE_CHOICES = ("float32", "bfloat16", "float16")
"""The ``--dtype`` values the commands accept (``hf_taskarith.merging.api.parse_dtype`` accepts them all)."""

_STATES_DEFAULT = re.compile(r"\(default\b|%\(default\)")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: X)`` to an argument's help, unless the help already states its
    default or there is nothing to show (``None``, ``False`` for flags, an empty list)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (_STATES_DEFAULT.search(text) or default is None or default is False or default == argparse.SUPPRESS
                or (isinstance(default, (list, tuple)) and not default)):
            return action.help
        return super()._get_help_string(action)


def add_common_options(parser: argparse.ArgumentParser, *, nested: bool = False) -> None:
    """Add ``--no-progress`` and ``-q/--quiet`` to ``parser``.

    Args:
        parser: a sub-command's parser.
        nested: the parser sits below another sub-command that has the options (``hub serve``
            under ``hub``): its options then default to unset, so that ``hub -q serve`` stays
            quiet (argparse copies a sub-parser's defaults over its parent's values).
    """
    default = argparse.SUPPRESS if nested else False
    group = parser.add_argument_group("output options")
    group.add_argument("--no-progress", action="store_true", default=default,
                       help=f"hide progress bars (as {PROGRESS_ENV}=1 does)")
    group.add_argument("-q", "--quiet", action="store_true", default=default,
                       help="log only warnings and errors (WARNING level, overrides -v) and hide progress bars")


def finish_parser(parser: argparse.ArgumentParser, *, _depth: int = 0) -> argparse.ArgumentParser:
    """Give ``parser`` and every sub-command below it the :class:`HelpFormatter`, and every
    sub-command the common options (:func:`add_common_options`). Returns ``parser``."""
    parser.formatter_class = HelpFormatter
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        if not action.help:
            action.help = f"one of: {', '.join(action.choices)} (each has --help)"
        seen: set[int] = set()
        for sub in action.choices.values():  # aliases map to the same parser
            if id(sub) in seen:
                continue
            seen.add(id(sub))
            add_common_options(sub, nested=_depth > 0)
            finish_parser(sub, _depth=_depth + 1)
    return parser


def resolve_common_options(args: argparse.Namespace) -> argparse.Namespace:
    """Set ``args.quiet`` and ``args.no_progress`` to booleans (``--quiet`` implies
    ``--no-progress``), also where the command did not define them. Returns ``args``."""
    args.quiet = bool(getattr(args, "quiet", False))
    args.no_progress = bool(getattr(args, "no_progress", False)) or args.quiet
    return args


def log_level(args: argparse.Namespace) -> int:
    """WARNING with ``-q`` (even with ``-v``), INFO with ``-v``, otherwise WARNING."""
    if getattr(args, "quiet", False):
        return logging.WARNING
    return logging.INFO if getattr(args, "verbose", False) else logging.WARNING


def configure_logging(args: argparse.Namespace) -> None:
    """Log to stderr at :func:`log_level`; with ``-q`` the handler itself drops records below
    WARNING, also from loggers that set their own lower level. Does nothing if logging is
    already configured (an embedding application, pytest)."""
    level = log_level(args)
    handler = logging.StreamHandler()
    if getattr(args, "quiet", False):
        handler.setLevel(logging.WARNING)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", handlers=[handler])


@contextlib.contextmanager
def common_settings(args: argparse.Namespace) -> Iterator[None]:
    """While a command runs: progress bars off with ``--no-progress`` / ``-q`` (this library's,
    through :data:`PROGRESS_ENV`, and huggingface_hub's); both are restored afterwards, so
    in-process callers (tests, notebooks) keep their settings."""
    if not getattr(args, "no_progress", False):
        yield
        return
    from huggingface_hub.utils import disable_progress_bars  # before the variable changes: it is read at import

    previous = os.environ.get(PROGRESS_ENV)
    os.environ[PROGRESS_ENV] = "1"
    try:
        with disable_progress_bars():
            yield
    finally:
        if previous is None:
            os.environ.pop(PROGRESS_ENV, None)
        else:
            os.environ[PROGRESS_ENV] = previous
