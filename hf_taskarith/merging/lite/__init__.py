"""The torch-free merge path: weighted-sum merges of local safetensors checkpoints with numpy.

:func:`merge_config_lite` runs a YAML merge this way when it can (see :mod:`.engine` for
when), producing exactly the files the torch engine would, and returns ``None`` when it
cannot, so the caller falls back to :func:`hf_taskarith.merge`.
:func:`hf_taskarith.merge_from_config` and ``hf-taskarith merge`` try it first
(``fast_path=False`` / ``--no-fast-path`` turn it off).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from ...io.atomic import atomic_output_dir, check_output_not_input
from ..output import write_side_files
from .engine import Declined, LitePlan, plan_lite, run_lite

logger = logging.getLogger(__name__)

__all__ = ["merge_config_lite", "plan_lite", "run_lite", "LitePlan", "Declined"]


def merge_config_lite(config: Any, output_dir: str | os.PathLike, *, dtype: str | None = None,
                      seed: int | None = None, max_shard_size: int | str | None = None,
                      overwrite: bool | None = None, progress: bool = True, **ignored: Any) -> Path | None:
    """Run a :class:`~hf_taskarith.merging.config.MergeConfig` without torch, if it qualifies.

    Returns:
        The output folder, or ``None`` when the merge needs the torch engine (nothing was
        written then).

    Raises:
        MergeConfigError: bad parameters (as :func:`hf_taskarith.merge` would raise them).
        CheckpointNotFoundError, CorruptCheckpointError: unreadable inputs.
        FileExistsError: ``output_dir`` exists and ``overwrite`` is not set.
    """
    from ..methods import BUILTIN
    from ..registry import get_merge_method, load_builtin_methods

    if config.merge_method not in BUILTIN:
        return None
    load_builtin_methods(config.merge_method)  # only this method's declaration: no torch
    method = get_merge_method(config.merge_method)
    params = method.resolve_params(len(config.models), config.merge_kwargs())
    base = config.base_model
    if base is None and not method.needs_base:  # as merge(): the first model is the reference
        base = config.models[0]
    plan = plan_lite(method, params, base, config.models,
                     dtype=dtype if dtype is not None else config.dtype,
                     tokenizer_source=config.tokenizer_source,
                     seed=seed if seed is not None else config.seed)
    if plan is None:
        return None
    check_output_not_input(output_dir, [base, *config.models])
    try:
        with atomic_output_dir(output_dir, overwrite=bool(overwrite)) as tmp:
            run_lite(plan, tmp, max_shard_size=max_shard_size or config.max_shard_size, progress=progress)
            write_side_files(tmp, plan.summary, plan.report, config_yaml=config.source_text)
    except Declined as e:
        logger.info("torch-free merge path stopped (%s); running the torch engine", e)
        return None
    logger.info("merge (torch-free path): %s", plan.report.describe())
    return Path(output_dir)
