"""Tables generated into documentation pages, between a pair of marker comments.

The studies write their tables from their committed results files into the docs (between
``<!-- name:begin ... -->`` and ``<!-- name:end -->``), and the tests re-render them to catch a
stale or hand-edited table. Both sides use these two functions, so they agree on what "the
block" is. Written by hand: a regular expression and an atomic file replace, nothing a
templating library would make shorter.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = ["generated_block", "write_between_markers"]


def _pattern(markers: tuple[str, str]) -> re.Pattern[str]:
    begin, end = markers
    return re.compile(re.escape(begin) + r"\n?(.*?)\n?" + re.escape(end), re.S)


def generated_block(path: str | os.PathLike, markers: tuple[str, str]) -> str:
    """The text between ``markers`` in the file at ``path`` (without the newlines next to them).

    Raises:
        ValueError: the file has no such pair of markers.
    """
    found = _pattern(markers).search(Path(path).read_text())
    if not found:
        raise ValueError(f"{path}: no '{markers[0]}' ... '{markers[1]}' block; add the two marker lines where the "
                         "generated table belongs.")
    return found.group(1)


def write_between_markers(path: str | os.PathLike, block: str, markers: tuple[str, str]) -> None:
    """Replace what lies between ``markers`` in the file at ``path`` by ``block``; the rest of the
    file is kept as it is. The file is replaced atomically (never left half-written).

    Raises:
        ValueError: the file has no such pair of markers (nothing is written).
    """
    path = Path(path)
    text = path.read_text()
    generated_block(path, markers)  # the markers must exist
    begin, end = markers
    new = _pattern(markers).sub(lambda _: f"{begin}\n{block}\n{end}", text, count=1)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(new)
    tmp.replace(path)
