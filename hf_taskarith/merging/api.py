"""``merge()``: the Python entry point of the merge engine."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import MergeArgumentTypeError, MergeConfigError
from ..io.atomic import check_output_not_input
from ..io.writer import ShardedWriter, atomic_output_dir
from .config import parse_seed
from .engine import MergePlan, MergeReport, plan_merge, run_merge
from .output import write_side_files
from .registry import get_merge_method
from .sources import ModelDelta, open_delta_source, open_tensor_source

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[str(dtype).replace("torch.", "")]
    except KeyError:
        raise MergeConfigError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}.") from None


def merge(base: Any, models: Sequence[Any], *, method: str = "task_arithmetic",
          weights: Sequence[float] | float | None = None, output_dir: str | os.PathLike | None = None,
          dtype: str | torch.dtype | None = None, tokenizer_source: Any = "base", seed: int = 0,
          max_shard_size: int | str = "5GB", allow_mismatch: bool = False, overwrite: bool = False,
          inplace: bool = False, progress: bool = True, config_yaml: str | None = None,
          **params: Any) -> Path | torch.nn.Module:
    """Merge task vectors (or fine-tuned models) into a base model.

    Args:
        base: the pre-trained model: a checkpoint folder, a Hub id, or an ``nn.Module``.
            ``None`` is allowed for methods that do not need one (``linear``): the first
            model is then the reference point.
        models: the inputs: :class:`~hf_taskarith.TaskVector` objects, saved task-vector
            folders, fine-tuned checkpoint folders, Hub ids, or ``nn.Module`` s.
        method: a registered method (``hf-taskarith methods`` lists them): task_arithmetic,
            linear, ties, dare_linear, dare_ties, breadcrumbs, breadcrumbs_ties, della,
            della_linear, magnitude_prune, tsv, iso_c, iso_cts, sce, hierarchical, and the
            weight-space methods slerp (one model, ``t=``), nuslerp (two models), multislerp,
            karcher, model_stock (two or more models), nearswap and arcee_fusion (one model) and
            passthrough (one model, optional ``scale=``; no base needed).
        weights: one weight per model (or one for all). Negative weights negate tasks. Each
            may vary by tensor: a :class:`~hf_taskarith.merging.schedule.Gradient` over the
            layers or a :class:`~hf_taskarith.merging.schedule.Conditional` on tensor names
            (see ``**params``).
        output_dir: where to write the merged checkpoint (required unless ``base`` is a module).
        dtype: output dtype (default: the base's dtype per tensor). Maths runs in float32.
        tokenizer_source: ``"base"`` or one of the models: its tokenizer is copied, and its
            vocabulary size decides the rows of embedding / LM-head tensors. ``"union"``: the
            union of every model's vocabulary (mergekit's), each model's embedding / LM-head rows
            re-indexed by token before merging (:mod:`~hf_taskarith.merging.tokenizer_union`;
            checkpoint folders with tokenizers only).
        seed: seeds randomized methods (DARE, DELLA); results are reproducible per seed and
            independent of tensor order.
        max_shard_size: output shard size (``"5GB"``, ``"500MB"``, bytes).
        allow_mismatch: merge despite fingerprint, name or shape mismatches, skipping and
            reporting what does not fit. Strict by default.
        overwrite: replace an existing ``output_dir`` (only once the new one is complete).
        inplace: for module bases, edit ``base`` itself rather than a copy.
        progress: show a tqdm bar over tensors (also off with ``HF_HUB_DISABLE_PROGRESS_BARS=1``).
        **params: method parameters, e.g. ``density=0.2``, ``lambda_=0.5`` (or ``**{"lambda": 0.5}``),
            ``normalize=True``, ``gamma=0.01``, ``epsilon=0.15``, ``t=0.3`` (slerp). Per-model ones take a list.
            Any value may vary by tensor, as mergekit's gradients and filters do
            (:mod:`hf_taskarith.merging.schedule`): ``t=Gradient([0, 0.5, 1])`` interpolates over
            the layers (tensors outside the layers take the first value);
            ``density=Conditional(Case("self_attn", 0.3), default=0.6)`` picks by name (first
            matching filter wins; with no match and no ``default`` the method's default applies);
            a case's value may itself be a ``Gradient``. A plain list always means one value per
            model, never a gradient; a shared parameter refuses a list.

    Returns:
        The output folder (``Path``) for checkpoint bases, or the merged ``nn.Module``.

    Raises:
        MergeArgumentTypeError: ``models`` is not a list (e.g. one path: pass ``[path]``); a
            ``MergeConfigError`` and a ``TypeError``.
        MergeConfigError: unknown method or parameter, wrong number of weights or of models
            for the method (slerp: one besides the base; model_stock: two or more), bad density or
            seed, an output path that is (or is nested with) an input, ``linear`` weights
            summing to 0 with ``normalize`` (for some tensor, where weights vary); a gradient or
            filter value out of range (every value it can take is checked), a conditional that
            leaves a required parameter unset for some tensor.
        FileExistsError: ``output_dir`` exists (a file, or a folder that is not empty) and
            ``overwrite`` is False.
        KeyMismatchError, ShapeMismatchError, IncompatibleBaseError: inputs do not fit the base.
        NonFiniteError: NaN/inf in an input or the result (nothing is written).
        CheckpointNotFoundError, CorruptCheckpointError: unreadable inputs.

    Note:
        Checkpoints are streamed tensor by tensor: peak memory is about one tensor per input
        plus the method's working set. Output goes to a temporary folder renamed at the end,
        so an interrupted merge (an exception, Ctrl-C, or SIGTERM while merging on the main
        thread: the process then exits with status 143) leaves nothing behind.

    Example:
        >>> merge("base/", ["tv_a/", "tv_b/"], method="ties", weights=[1.0, 1.0], density=0.2,
        ...       output_dir="merged/")
        >>> from hf_taskarith.merging import Case, Conditional, Gradient
        >>> merge("base/", ["chat/"], method="slerp", output_dir="slerped/",
        ...       t=Conditional(Case("self_attn", Gradient([0, 0.5, 1])), default=0.5))
    """
    m = get_merge_method(method)
    if "lambda_" in params:
        params["lambda"] = params.pop("lambda_")
    if isinstance(models, (str, os.PathLike, torch.nn.Module, Mapping)) or not isinstance(models, Iterable):
        raise MergeArgumentTypeError(
            f"merge(base, models): models must be a list of inputs, got {type(models).__name__} "
            f"({models!r:.80}); for one input pass [{models!r:.60}].")
    seed = parse_seed(seed)
    models = list(models)  # once: a generator would be used up by the check below
    if output_dir is not None:
        check_output_not_input(output_dir, [base, *models])
    if not models:
        raise MergeConfigError("merge() needs at least one model or task vector to merge.")
    base_given = base is not None
    if base is None:
        if m.needs_base:
            raise MergeConfigError(f"merge method {method!r} needs a base model.")
        base = models[0]
    if weights is not None:
        params["weight"] = list(weights) if isinstance(weights, (list, tuple)) else weights
    resolved = m.resolve_params(len(models), params)

    base_src = open_tensor_source(base, label=_label(base, "base"))
    inputs = [open_delta_source(x, label=_label(x, f"model {i}")) for i, x in enumerate(models)]
    union = None
    if isinstance(tokenizer_source, str) and tokenizer_source == "union":  # hf_taskarith.merging.tokenizer_union
        from .tokenizer_union import union_sources

        union = union_sources(base_src, inputs, base_given=base_given)
        base_src, inputs = union.base, union.inputs
    vocab_src = base_src if union is not None else _vocab_source(tokenizer_source, base_src, inputs)
    out_dtype = parse_dtype(dtype)
    plan = plan_merge(base_src, inputs, m, resolved, out_dtype=out_dtype, vocab_source=vocab_src,
                      seed=seed, allow_mismatch=allow_mismatch, base_given=base_given)

    if isinstance(base, torch.nn.Module):
        return _merge_into_module(plan, base, inplace=inplace, progress=progress)
    if output_dir is None:
        raise MergeConfigError("merging checkpoints writes a new one: pass output_dir=.")
    with atomic_output_dir(output_dir, overwrite=overwrite) as tmp:
        with ShardedWriter(tmp, plan.specs(), prefix="model", max_shard_size=max_shard_size,
                           metadata={"format": "pt"}) as writer:
            report = run_merge(plan, writer.write, progress=progress, open_output=writer.open_range)
        summary = plan.summary(out_dtype)
        if union is not None:  # the union tokenizer, not a copy of the base's
            union.save_tokenizer(tmp)
            summary = dataclasses.replace(summary, tokenizer_folder=None)
        write_side_files(tmp, summary, report, config_yaml=config_yaml)
        if union is not None:
            union.set_vocab_size(tmp)
    _log_report(report)
    return Path(output_dir)


def _merge_into_module(plan: MergePlan, base: torch.nn.Module, *, inplace: bool, progress: bool) -> torch.nn.Module:
    import copy

    out: dict[str, torch.Tensor] = {}
    report = run_merge(plan, out.__setitem__, progress=progress)
    model = base if inplace else copy.deepcopy(base)
    state = model.state_dict()
    with torch.no_grad():
        for name, t in out.items():
            if t.shape != state[name].shape:
                raise MergeConfigError(
                    f"{name}: merged shape {list(t.shape)} differs from the model's {list(state[name].shape)}; "
                    "resize the model's embeddings first or merge to a checkpoint folder."
                )
            state[name].copy_(t)
    # torch types Module.__setattr__ for tensors and modules only; any value is accepted at runtime
    model.hf_taskarith_merge_report = report  # type: ignore[assignment]
    _log_report(report)
    return model


def _vocab_source(ref: Any, base_src, inputs):
    if ref in (None, "base"):
        return base_src
    if isinstance(ref, bool) or not isinstance(ref, (int, str, os.PathLike)):
        raise MergeConfigError(f"tokenizer_source must be 'base', a model's index or path; got {ref!r}.")
    if isinstance(ref, int):
        if not -len(inputs) <= ref < len(inputs):
            raise MergeConfigError(f"tokenizer_source={ref} is not a model index; there are {len(inputs)} models "
                                   f"(0..{len(inputs) - 1}).")
        src = inputs[ref]
    else:
        matches = [s for s in inputs if s.label == str(ref)]
        if not matches:
            raise MergeConfigError(f"tokenizer_source {ref!r} is neither 'base' nor one of the models "
                                   f"{[s.label for s in inputs]}.")
        src = matches[0]
    if not isinstance(src, ModelDelta):
        raise MergeConfigError(f"tokenizer_source {ref!r} must be a model, not a task vector.")
    return src.source


def _label(x: Any, default: str) -> str:
    if isinstance(x, (str, os.PathLike)):
        return str(x)
    return default


def _log_report(report: MergeReport) -> None:
    if report.vocab:  # mergekit refuses this; we align, but the user must know
        logger.warning("merge: vocabulary sizes differ (%s); merged over the rows all inputs share, the rest taken "
                       "from the tokenizer source. Check that the models share a tokenizer.",
                       "; ".join(v.describe() for v in report.vocab[:4]))
    if report.skipped or report.fingerprint_mismatch:
        logger.warning("merge: %s", report.describe())
    else:
        logger.info("merge: %s", report.describe())
