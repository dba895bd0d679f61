"""All-or-nothing output folders: write into a temporary folder, rename at the end."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_output_dir(target: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; rename it to ``target`` only on success.

    A crash, an exception or Ctrl-C inside the block removes the temporary folder and
    leaves ``target`` as it was. With ``overwrite=True`` an existing ``target`` is replaced
    only after the new one is complete.

    Raises:
        FileExistsError: ``target`` exists (and is not an empty folder) and ``overwrite`` is False.
    """
    target = Path(target).absolute()
    if target.exists() and not overwrite and not (target.is_dir() and not any(target.iterdir())):
        raise FileExistsError(
            f"output folder {target} already exists and is not empty; choose another path or "
            "pass overwrite=True (CLI: --overwrite)."
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
