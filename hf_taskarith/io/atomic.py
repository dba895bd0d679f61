"""All-or-nothing output folders: write into a temporary folder, rename at the end."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path


@contextlib.contextmanager
def atomic_output_dir(target: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; rename it to ``target`` only on success.

    A crash, an exception, Ctrl-C or SIGTERM (``kill``, a scheduler's timeout) inside the
    block removes the temporary folder and leaves ``target`` as it was. With
    ``overwrite=True`` an existing ``target`` (a folder, or a file) is replaced only after the
    new one is complete.

    Raises:
        FileExistsError: ``target`` exists (and is not an empty folder) and ``overwrite`` is False.
    """
    target = Path(target).absolute()
    check_output_path(target, overwrite=overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        with _sigterm_raises():
            yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists() or target.is_symlink():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


class Terminated(SystemExit):
    """Raised in the main thread on SIGTERM inside :func:`atomic_output_dir` (exit status 143)."""


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Turn SIGTERM into a :class:`Terminated` exception for the duration, so cleanup runs.

    Python's default SIGTERM action kills the process without unwinding, leaving temporary
    folders behind. Signal handlers can only be set from the main thread; elsewhere this does
    nothing. Only the default action is replaced, and restored on exit: a handler the
    application installed (or ``SIG_IGN``, or one set outside Python) is kept.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous is not signal.SIG_DFL:  # None (set outside Python) could not be restored
        yield
        return

    def handler(signum, frame):
        raise Terminated(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def check_output_path(target: str | os.PathLike, *, overwrite: bool = False) -> None:
    """Refuse to write to ``target`` when :func:`atomic_output_dir` would: call it before long work.

    A missing path or an empty folder is accepted; so is anything with ``overwrite=True``.

    Raises:
        FileExistsError: ``target`` exists (and is not an empty folder) and ``overwrite`` is False.
    """
    target = Path(target).absolute()
    if target.exists() and not overwrite and not (target.is_dir() and not any(target.iterdir())):
        what = "folder" if target.is_dir() else "file"
        raise FileExistsError(
            f"output path {target} is an existing {what}{' that is not empty' if what == 'folder' else ''}; "
            "choose another path or pass overwrite=True (CLI: --overwrite) to replace it."
        )


def check_output_not_input(output: str | os.PathLike, inputs: Sequence[object]) -> None:
    """Refuse an output path that is (or contains, or lies inside) one of the input folders.

    ``--overwrite`` onto the base would otherwise replace the base with the merge, and an
    output inside an input folder would be read back as part of it.

    Raises:
        MergeConfigError: (a ``ValueError``) naming the input.
    """
    from ..errors import MergeConfigError

    out = Path(output).absolute().resolve()
    for x in inputs:
        if not isinstance(x, (str, os.PathLike)) or not Path(x).exists():
            continue  # Hub ids, modules, task vectors in memory
        src = Path(x).absolute().resolve()
        if out == src or src in out.parents or out in src.parents:
            raise MergeConfigError(f"the output path {output} is {'the same as' if out == src else 'nested with'} the "
                             f"input {x}; write the merge to another folder.")
