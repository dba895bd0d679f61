"""Joining the results files of one study that ran as several processes.

A study on a few CPU cores runs best as one single-threaded process per learning rate (or per
seed), side by side, each writing its own results file of *cells* (one mode, learning rate and
seed each). :func:`join_runs` reads such files back as one list of cells, refusing what would
make the joined tables wrong: files run with other settings, or a cell present twice.
:func:`write_results` writes a results file so that a crash never leaves half of one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["join_runs", "write_results"]


def join_runs(sources: Sequence[str | Path], settings: Sequence[str], *,
              defaults: Mapping[str, Any] | None = None) -> tuple[list[dict], list[dict]]:
    """``(runs, cells)``: the parsed results files and their cells, in file order.

    Args:
        sources: results files (JSON with ``"config"`` and ``"cells"``; each cell names its
            ``"mode"``, ``"lr"`` and ``"seed"``).
        settings: the config keys every file must agree on (what makes cells comparable:
            tasks, steps, split sizes, ...; not the modes, learning rates or seeds a file ran).
        defaults: the value a key takes where a file does not record it (a file written
            before the setting existed).

    Raises:
        ValueError: no sources, a file run with other settings than the first (the keys that
            differ are named), or a cell present in more than one file.
    """
    if not sources:
        raise ValueError("no results files to join: pass at least one.")
    defaults = defaults or {}
    paths = [Path(p) for p in sources]
    runs = [json.loads(p.read_text()) for p in paths]
    first = runs[0]["config"]
    for path, run in zip(paths[1:], runs[1:]):
        differ = [k for k in settings if run["config"].get(k, defaults.get(k)) != first.get(k, defaults.get(k))]
        if differ:
            raise ValueError(f"{path} was run with other settings than {paths[0]} ({', '.join(differ)}); "
                             "join only runs of one configuration.")
    cells: list[dict] = []
    seen: set[tuple] = set()
    for path, run in zip(paths, runs):
        for cell in run["cells"]:
            key = (cell["mode"], cell["lr"], cell["seed"])
            if key in seen:
                raise ValueError(f"cell {key} is in more than one file (again in {path}); keep one of them.")
            seen.add(key)
            cells.append(cell)
    return runs, cells


def write_results(path: str | Path, data: Mapping[str, Any], *, indent: int = 1) -> None:
    """Write ``data`` as JSON to ``path`` atomically (through a temporary file beside it, then a
    rename), creating the folder; a crash mid-write leaves the previous file as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=indent, default=str) + "\n")
    tmp.replace(path)
