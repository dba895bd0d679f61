"""``run_demo``: run the demo's steps (:mod:`.steps`) in order and save the results.

See :mod:`hf_taskarith.demo.steps` for what each step does.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..merging.registry import get_merge_method
from ..training.tasks import TaskData
from . import steps as _steps  # noqa: F401  (registers the built-in steps)
from .config import DemoConfig
from .context import DEMO_STEPS, DemoContext, DemoStep
from .report import DemoResults

logger = logging.getLogger(__name__)

MARKER = ".hf_taskarith_demo"
MANAGED = ("checkpoints", "heads", "task_vectors", "merged", "hub", "hub_cache", "plots", "results.json", "results.md")


def run_demo(config: DemoConfig | None = None, *, tasks: Sequence[TaskData] | None = None,
             on_step: Callable[[int, int, DemoStep], None] | None = None) -> DemoResults:
    """Run every demo step and return the results (also written under ``config.output_dir``).

    Args:
        config: settings; defaults to :class:`DemoConfig` ``()`` (real MiniLM, three real tasks).
        tasks: already-split tasks to use instead of loading ``config.tasks`` (tests pass tiny ones).
        on_step: called as ``on_step(index, total, step)`` before each step (the CLI prints it).

    Returns:
        :class:`~hf_taskarith.demo.report.DemoResults`.

    Raises:
        MissingAssetError: an asset package is missing (run ``scripts/setup.sh``).
        FileExistsError: ``output_dir`` holds files not written by the demo and
            ``config.overwrite`` is False.

    Note:
        Cost: for each task, ``config.steps`` training steps, plus a forward pass over every
        val/test split for each evaluated model (pre-trained, one per task, one per
        coefficient and merge method, one per negation coefficient). With MiniLM on 2 idle
        CPU cores the default settings take 5-6 minutes (fine-tuning is over half of it) and
        :meth:`DemoConfig.quick` 1-2 minutes; a busy machine is much slower. Disk: one
        checkpoint per fine-tuned task and merge (about 90 MB each for MiniLM).

    Example:
        >>> results = run_demo(DemoConfig.quick(output_dir="outputs/demo-quick"))
        >>> print(results.to_markdown())
    """
    config = config or DemoConfig()
    validate_config(config, custom_tasks=tasks is not None)
    out = _prepare_output_dir(Path(config.output_dir).absolute(), overwrite=config.overwrite)
    ctx = DemoContext(config=config, output_dir=out, tasks=list(tasks or []))
    if tasks is not None:
        names = [t.name for t in tasks]
        if len(names) < 2 or len(set(names)) != len(names):
            raise ValueError(f"run_demo needs at least two distinct tasks, got {names}.")
        negate = config.negate if config.negate in names or config.negate == "" else None
        ctx.config = config = _with(config, tasks=tuple(names), negate=negate)
    start = time.perf_counter()
    for i, step in enumerate(DEMO_STEPS):
        if on_step is not None:
            on_step(i + 1, len(DEMO_STEPS), step)
        logger.info("demo step %d/%d: %s (%s)", i + 1, len(DEMO_STEPS), step.name, step.description)
        t0 = time.perf_counter()
        step.fn(ctx)
        if ctx.results is not None:
            ctx.results.timings[step.name] = round(time.perf_counter() - t0, 2)
    ctx.results.timings["total"] = round(time.perf_counter() - start, 2)
    ctx.results.save(out)  # again, with the final timings
    return ctx.results


def validate_config(config: DemoConfig, *, custom_tasks: bool = False) -> None:
    """Check names against the registries before any work is done.

    Raises:
        ValueError: an unknown task (``UnknownMethodError``, a ``ValueError`` too, for an
            unknown merge method); the message lists the valid names.
    """
    from ..training.tasks import list_tasks

    for name in config.merge_methods:
        get_merge_method(name)
    unknown = [] if custom_tasks else [t for t in config.tasks if t not in list_tasks()]
    if unknown:
        raise ValueError(f"unknown demo task(s) {unknown}; available: {sorted(list_tasks())}.")


def _with(config: DemoConfig, **changes: Any) -> DemoConfig:
    return dataclasses.replace(config, **changes)


def _prepare_output_dir(out: Path, *, overwrite: bool) -> Path:
    """Create ``out``; clear a previous demo's outputs; refuse a foreign non-empty folder."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output path {out} is a file; choose a folder.")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).exists() and not overwrite:
        raise FileExistsError(
            f"output folder {out} is not empty and was not written by the demo; choose another "
            "--output-dir or pass --overwrite (overwrite=True) to replace the demo's files in it."
        )
    out.mkdir(parents=True, exist_ok=True)
    for name in MANAGED:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    (out / MARKER).write_text("written by `hf-taskarith demo`; re-running the demo replaces its outputs here\n")
    return out
