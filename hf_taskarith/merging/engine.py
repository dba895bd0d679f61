"""The streaming merge loop: one output tensor at a time.

For each tensor of the base: read the base tensor and the matching tensor of every input,
form float32 deltas, call the merge method, add the result to the base, check it is finite,
convert to the output dtype, and hand it to a sink (a streaming safetensors writer, or a
dict for in-memory merges). Whole models are never loaded.

Two paths, same results bit for bit:

- block by block (:mod:`.blockwise`), for methods that are elementwise or become so after
  a whole-tensor prepare pass (task_arithmetic, linear, ties, magnitude_prune): inputs are
  read by range, float32 exists only in cache-sized blocks on a few worker threads, and each
  output block is written to its place in the output file. Peak memory is a few blocks per
  thread, whatever the tensor size.
- whole tensors, for the rest (randomized, outlier-dropping and SVD-based methods) and for
  vocabulary-aligned rows: one float32 delta per input plus the method's working set.
  Methods defined on whole weights (``MergeMethod.on_weights``: slerp, model_stock,
  passthrough) get each input's float32 weights instead of its delta (a task vector is added
  to the base first) and return the merged weights, which are written as they are.

A method that needs figures of each whole input first (TIES with ``trim_scope: global``)
declares a pre-pass (:mod:`.prepass`): every tensor's deltas are streamed through it, block by
block, before the first tensor is merged.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..errors import (
    IncompatibleBaseError,
    KeyMismatchError,
    MergeConfigError,
    NonFiniteError,
    ShapeMismatchError,
    format_names,
)
from ..io.writer import TensorSpec
from .blockwise import (
    BlockKernel,
    BlockRunner,
    DeltaBlocks,
    KernelContext,
    RangeSink,
    finite,
    kernel_for,
    merge_blocks,
)
from .prepass import ModelPrepass
from .registry import MergeMethod
from .report import MergeReport, MergeSummary
from .schedule import has_schedule, layer_positions, to_plain
from .sources import DeltaSource, ModelDelta, TensorSource
from .vocab import VocabAlignment, is_vocab_tensor, rows_differ_only

logger = logging.getLogger(__name__)


@dataclass
class _TensorJob:
    name: str
    out_shape: tuple[int, ...]
    out_dtype: torch.dtype
    is_float: bool
    inputs: list[int]          # indices of inputs that contribute
    common_rows: int | None    # vocab alignment: merge only these rows
    params: dict[str, Any] | None = None  # this tensor's values of parameters that vary by tensor


@dataclass
class MergePlan:
    """A checked, ready-to-run merge; build with :func:`plan_merge`.

    ``prepass`` is the method's finished whole-model pre-pass (:mod:`.prepass`), set by
    :func:`run_merge` on its copy of the plan; its per-tensor parameters join each tensor's.

    ``base_given`` is False when the caller gave no base model and the first model stands in as
    the reference (methods with ``needs_base=False``); methods defined on weights then get
    ``base=None``. ``base_inputs`` are the inputs that are the base checkpoint itself (a base
    model also listed among the models): a method defined on weights that needs no base
    receives, for them, the very tensor it gets as ``base=`` (``weights[i] is base``), so it
    can tell the base apart as mergekit does (nuslerp, multislerp: not a model to merge;
    karcher: one of the points, counted once).
    """

    base: TensorSource
    inputs: list[DeltaSource]
    method: MergeMethod
    params: dict[str, Any]
    jobs: list[_TensorJob]
    report: MergeReport
    seed: int
    vocab_source: TensorSource
    prepass: ModelPrepass | None = None
    base_given: bool = True
    base_inputs: tuple[int, ...] = ()

    def specs(self) -> list[TensorSpec]:
        return [TensorSpec(j.name, j.out_shape, j.out_dtype) for j in self.jobs]

    def summary(self, dtype: torch.dtype | None) -> MergeSummary:
        """What is recorded next to the output (``dtype``: the requested output dtype)."""
        return MergeSummary(
            method=self.method.name, description=self.method.description, reference=self.method.reference,
            params={k: to_plain(v) for k, v in self.params.items()}, seed=self.seed,
            dtype=str(dtype).replace("torch.", "") if dtype else None,
            base_label=self.base.label, input_labels=[s.label for s in self.inputs],
            base_folder=self.base.folder, tokenizer_folder=self.vocab_source.folder or self.base.folder,
        )


def plan_merge(base: TensorSource, inputs: list[DeltaSource], method: MergeMethod, params: dict[str, Any], *,
               out_dtype: torch.dtype | None = None, vocab_source: TensorSource | None = None,
               seed: int = 0, allow_mismatch: bool = False, base_given: bool = True) -> MergePlan:
    """Check names, shapes and fingerprints of every input against the base, and plan each tensor.

    ``base_given=False``: ``base`` is the first model standing in as the reference, not a base
    model the caller chose (see :class:`MergePlan`).

    Raises:
        KeyMismatchError / ShapeMismatchError / IncompatibleBaseError: with the offending
            input, tensor names and shapes, unless ``allow_mismatch`` (then they are skipped
            and listed in the report).
    """
    report = MergeReport()
    vocab_source = vocab_source or base
    base_names = base.names()
    base_set = set(base_names)

    fp = None
    for src in inputs:
        if src.expected_fingerprint:
            fp = fp or base.fingerprint()
            if src.expected_fingerprint != fp:
                msg = (f"{src.label} was made from base {src.base_model!r} (fingerprint {src.expected_fingerprint}), "
                       f"but the base here ({base.label}) has fingerprint {fp}")
                if not allow_mismatch:
                    raise IncompatibleBaseError(msg + ". Use the matching base, or pass allow_mismatch=True "
                                                "(CLI: --allow-mismatch) to merge anyway.")
                report.fingerprint_mismatch.append(msg)

    names_by_input = [set(s.names()) for s in inputs]
    for src, names in zip(inputs, names_by_input):
        extra = sorted(names - base_set)
        if extra:
            msg = f"{src.label} has tensors the base ({base.label}) lacks: [{format_names(extra)}]"
            if not allow_mismatch:
                raise KeyMismatchError(msg + ". Inputs must share the base's architecture "
                                       "(or pass allow_mismatch=True to ignore them).")
            report.skipped += [f"{src.label}: {n} (not in base)" for n in extra]

    jobs: list[_TensorJob] = []
    for name in base_names:
        meta = base.meta(name)
        if not meta.dtype.is_floating_point:
            jobs.append(_TensorJob(name, meta.shape, meta.dtype, False, [], None))
            report.copied_non_float.append(name)
            continue
        contributing: list[int] = []
        shapes: list[tuple[int, ...]] = []
        for i, (src, names) in enumerate(zip(inputs, names_by_input)):
            if name not in names:
                if isinstance(src, ModelDelta):
                    msg = f"{src.label} lacks tensor {name!r} that the base ({base.label}) has"
                    if not allow_mismatch:
                        raise KeyMismatchError(msg + ". Inputs must share the base's architecture.")
                    report.skipped.append(f"{src.label}: {name} (missing)")
                else:
                    report.zero_for_missing.append(f"{src.label}: {name}")
                continue
            shape = src.meta(name).shape
            if shape != meta.shape and not (is_vocab_tensor(name) and rows_differ_only(shape, meta.shape)):
                msg = (f"tensor {name!r}: {src.label} has shape {list(shape)}, "
                       f"base ({base.label}) has {list(meta.shape)}")
                if not allow_mismatch:
                    raise ShapeMismatchError(msg + ". Inputs must share the base's architecture.")
                report.skipped.append(msg)
                continue
            contributing.append(i)
            shapes.append(shape)
        out_shape, common = meta.shape, None
        if is_vocab_tensor(name):
            if vocab_source is not base and name in vocab_source.names():
                out_shape = vocab_source.meta(name).shape
            rows = [s[0] for s in shapes] + [meta.shape[0], out_shape[0]]
            if len(set(rows)) > 1:
                common = min(rows)
                report.vocab.append(VocabAlignment(name, meta.shape[0], [s[0] for s in shapes], out_shape[0],
                                                   common, vocab_source.label))
        jobs.append(_TensorJob(name, out_shape, out_dtype or meta.dtype, True, contributing, common))
    if has_schedule(params):
        _evaluate_schedules(method, params, jobs, base_names)
    return MergePlan(base, inputs, method, params, jobs, report, seed, vocab_source, base_given=base_given,
                     base_inputs=_base_inputs(base, inputs) if base_given and not method.needs_base else ())


def _base_inputs(base: TensorSource, inputs: list[DeltaSource]) -> tuple[int, ...]:
    """The inputs that are the base checkpoint itself (same folder on disk)."""
    if base.folder is None:
        return ()
    folder = Path(base.folder).resolve()
    return tuple(i for i, src in enumerate(inputs) if isinstance(src, ModelDelta) and src.source.folder is not None
                 and Path(src.source.folder).resolve() == folder)


def _evaluate_schedules(method: MergeMethod, params: dict[str, Any], jobs: list[_TensorJob],
                        base_names: list[str]) -> None:
    """Give each float job its own values of the parameters that vary by tensor (gradients over
    the layers, filters on names; :mod:`.schedule`), checked before anything is merged.

    Raises:
        MergeConfigError: a value a tensor cannot take (see :meth:`MergeMethod.tensor_params`),
            or a schedule with a method that needs a whole-model pre-pass.
    """
    positions = layer_positions(base_names)
    for job in jobs:
        if not job.is_float:
            continue
        job.params = method.tensor_params(params, tensor_name=job.name, position=positions[job.name])
        if method.prepass is not None and method.prepass(job.params) is not None:
            fix = ("Use trim_scope: tensor, or one value per model." if method.name == "ties"
                   else "Give each parameter one value (per model where it is per model).")
            raise MergeConfigError(
                f"merge method {method.name!r}: with these parameters it runs a pre-pass over each whole model "
                f"({method.name}: {_prepass_what(method, job.params)}), which takes one value per model for every "
                f"tensor; per-layer gradients and filters cannot be combined with it. {fix}")


def _prepass_what(method: MergeMethod, params: dict[str, Any]) -> str:
    """What a method's pre-pass does, for messages."""
    prepass = method.prepass(params) if method.prepass is not None else None
    return getattr(prepass, "description", None) or "whole-model figures"


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


#: the finiteness check applied to every merged tensor (and block)
_finite = finite


def run_merge(plan: MergePlan, sink: Callable[[str, torch.Tensor], None], *, progress: bool = True,
              open_output: Callable[[str], RangeSink] | None = None, workers: int | None = None) -> MergeReport:
    """Execute a plan, sending each finished output tensor to ``sink(name, tensor)``.

    Args:
        plan: from :func:`plan_merge`.
        sink: receives whole output tensors, in plan order.
        progress: show a progress bar over tensors.
        open_output: for tensors merged block by block, ``open_output(name)`` gives a
            :class:`~.blockwise.RangeSink` that receives the blocks instead of ``sink``
            (:meth:`~hf_taskarith.io.writer.ShardedWriter.open_range`): no output tensor is
            ever held whole. Default: blocks are gathered into a tensor for ``sink``.
        workers: threads for block work (default: torch's thread count, at most the CPUs and 8).
    """
    disable = not progress or os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") in ("1", "true", "TRUE")
    method, report = plan.method, plan.report
    with BlockRunner(workers) as runner:
        prepass = method.prepass(plan.params) if method.prepass is not None else None
        if prepass is not None:  # figures of each whole input, before any tensor is merged
            prepass.begin(plan.base)
            _run_prepass(plan, prepass, runner, disable=disable)
            plan = replace(plan, prepass=prepass)
        for job in tqdm(plan.jobs, desc=f"merging ({method.name})", unit="tensor", disable=disable):
            if not job.is_float:
                sink(job.name, plan.base.get(job.name))
                continue
            kernel = (kernel_for(method, _job_params(plan, job), _context(plan, job)) if job.common_rows is None
                      else None)
            if kernel is None:
                sink(job.name, _merge_general(plan, job))
            elif open_output is not None:
                out = open_output(job.name)
                _merge_blockwise(plan, job, kernel, out, runner)
                out.close()
            else:
                tensor = torch.empty(job.out_shape, dtype=job.out_dtype)
                _merge_blockwise(plan, job, kernel, _IntoTensor(tensor), runner)
                sink(job.name, tensor)
            report.merged += 1
    return report


def _context(plan: MergePlan, job: _TensorJob) -> KernelContext:
    """What a block kernel factory needs to know about one tensor (:class:`KernelContext`)."""
    return KernelContext(shape=job.out_shape, base_given=plan.base_given,
                         is_base=tuple(i in plan.base_inputs for i in job.inputs))


def _job_params(plan: MergePlan, job: _TensorJob) -> dict[str, Any]:
    """The method's parameters for one tensor: per-model ones for its contributing inputs only,
    plus the pre-pass's share for this tensor."""
    source = job.params if job.params is not None else plan.params
    params = {k: ([v[i] for i in job.inputs] if plan.method.param_index[k].per_model else v)
              for k, v in source.items()}
    if plan.prepass is not None:
        params.update(plan.prepass.tensor_params(job.name, job.inputs))
    return params


#: blocks whose pre-pass results are gathered before they are folded (bounds their memory)
_PREPASS_GROUP = 32


def _run_prepass(plan: MergePlan, prepass: ModelPrepass, runner: BlockRunner, *, disable: bool) -> None:
    """Stream every float tensor's deltas through ``prepass``, as many times as it asks.

    Deltas are formed exactly as for the merge (block by block from range reads; whole
    vocabulary-aligned rows), so the pre-pass sees the values the merge will trim; a NaN or
    inf in an input stops the merge here, before anything is written.
    """
    jobs = [job for job in plan.jobs if job.is_float and job.inputs and prepass.selects(job.name)]
    rounds = 0
    while prepass.needs_pass():
        rounds += 1
        for job in tqdm(jobs, desc=f"{prepass.description} ({plan.method.name}), pass {rounds}", unit="tensor",
                        disable=disable):
            if prepass.reads == "weights":  # whole float32 weights, as an on_weights method gets them
                prepass.collect_weights(job.name, job.inputs, *_whole_weights(plan, job))
                continue
            if job.common_rows is not None:
                prepass.collect(job.name, job.inputs, [prepass.scan(_rows_deltas(plan, job), job.inputs)])
                continue
            with _delta_blocks(plan, job, runner) as deltas:
                def scan(block: tuple[int, int], deltas: DeltaBlocks = deltas, inputs: list[int] = job.inputs) -> Any:
                    stack = deltas.deltas(block[0], block[1], deltas.base(block[0], block[1]))
                    return prepass.scan(stack, inputs)

                ranges = list(deltas.ranges())
                for at in range(0, len(ranges), _PREPASS_GROUP):
                    prepass.collect(job.name, job.inputs, runner.map(scan, ranges[at:at + _PREPASS_GROUP]))
        prepass.end_pass()


def _whole_weights(plan: MergePlan, job: _TensorJob) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One tensor's float32 base weights and each contributing input's float32 weights (over
    the common rows of a vocabulary-aligned tensor); a NaN or inf stops the merge here."""
    base = plan.base.get(job.name)[:job.common_rows].to(torch.float32)
    weights = [_checked_finite(plan, i, job.name, _input_weights(plan.inputs[i], job.name, base, job.common_rows))
               for i in job.inputs]
    return base, weights


def _checked_finite(plan: MergePlan, i: int, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` (input ``i``'s weights or delta for ``name``); a NaN or inf stops the merge here."""
    if not _finite(tensor):
        raise NonFiniteError(f"input {plan.inputs[i].label}: tensor {name!r} contains NaN or inf. Fix or "
                             "re-export that checkpoint; merging it would spread the bad values.")
    return tensor


def _rows_deltas(plan: MergePlan, job: _TensorJob) -> torch.Tensor:
    """The stacked, flattened float32 deltas ``(n_inputs, rows * ...)`` of a vocabulary-aligned tensor."""
    base = plan.base.get(job.name)[:job.common_rows].to(torch.float32)
    return torch.stack([
        _checked_finite(plan, i, job.name, _input_delta(plan.inputs[i], job.name, base, job.common_rows)).reshape(-1)
        for i in job.inputs])


def _merge_blockwise(plan: MergePlan, job: _TensorJob, kernel: BlockKernel, out: RangeSink,
                     runner: BlockRunner) -> None:
    """One tensor, block by block (see :mod:`.blockwise`): inputs are read by range as stored,
    float32 exists only block by block, the result goes to ``out`` block by block."""
    with _delta_blocks(plan, job, runner) as deltas:
        merge_blocks(deltas, kernel, out, out_dtype=job.out_dtype, runner=runner, is_finite=_finite,
                     what=f"method {plan.method.name!r}, params {plan.params}")


@contextlib.contextmanager
def _delta_blocks(plan: MergePlan, job: _TensorJob, runner: BlockRunner) -> Iterator[DeltaBlocks]:
    """One tensor's inputs opened by range (base first) as :class:`DeltaBlocks`; closed on exit."""
    srcs = [plan.inputs[i] for i in job.inputs]
    readers = [plan.base.open_range(job.name)]
    try:
        readers += [src.open_range(job.name) for src in srcs]
        yield DeltaBlocks(job.name, readers[0], readers[1:], is_model=[src.is_model for src in srcs],
                          labels=[src.label for src in srcs], runner=runner)
    finally:
        for reader in readers:
            reader.close()


class _IntoTensor:
    """A :class:`~.blockwise.RangeSink` filling a tensor in memory."""

    def __init__(self, tensor: torch.Tensor):
        self._flat = tensor.view(-1)

    def write(self, start: int, block: torch.Tensor) -> None:
        self._flat[start:start + block.numel()].copy_(block)

    def close(self) -> None:
        pass


def _merge_general(plan: MergePlan, job: _TensorJob) -> torch.Tensor:
    """Any method: materialize each input's float32 delta (or, for methods defined on
    weights, its float32 weights), call the method, add the merged delta to the base (or
    take the merged weights as they are)."""
    method = plan.method
    base_raw = plan.base.get(job.name)
    base = base_raw.to(torch.float32, copy=not plan.base.fresh)
    del base_raw
    rows = job.common_rows
    base_c = base[:rows] if rows is not None else base
    read_input = _input_weights if method.on_weights else _input_delta
    inputs = []
    for i in job.inputs:
        src = plan.inputs[i]
        if method.on_weights and i in plan.base_inputs:  # the base itself: the very tensor given as base=
            inputs.append(base_c)
            continue
        x = read_input(src, job.name, base_c, rows)
        if not _finite(x):
            raise NonFiniteError(
                f"input {src.label}: tensor {job.name!r} contains NaN or inf. Fix or re-export that "
                "checkpoint; merging it would spread the bad values."
            )
        inputs.append(x)
    if inputs:
        params = _job_params(plan, job)
        gen = _generator(plan.seed, job.name) if method.randomized else None
        if method.on_weights:  # without a base model given, none is passed (the first model is among the inputs)
            merged = method.fn(inputs, params, gen, base=base_c if plan.base_given else None)
        elif method.takes_base:
            merged = method.fn(inputs, params, gen, base=base_c)
        else:
            merged = method.fn(inputs, params, gen)
        del inputs
        if merged.shape != base_c.shape:
            raise ShapeMismatchError(
                f"merge method {method.name!r} returned shape {list(merged.shape)} for {job.name!r}, "
                f"expected {list(base_c.shape)}."
            )
        if method.on_weights:  # the merged weights themselves
            base_c = merged
        else:
            base_c.add_(merged)
        del merged
    if not _finite(base_c):
        raise NonFiniteError(
            f"merged tensor {job.name!r} is not finite (method {method.name!r}, params {plan.params}). "
            "Check the weights and inputs for extreme values."
        )
    if rows is None:
        return base_c.to(job.out_dtype)
    extra = plan.vocab_source.get(job.name)[rows:job.out_shape[0]].to(torch.float32)
    return torch.cat([base_c, extra], dim=0).to(job.out_dtype)


def _input_delta(src: DeltaSource, name: str, base: torch.Tensor, rows: int | None) -> torch.Tensor:
    """An input's float32 delta (a new tensor), over the first ``rows`` rows if given (vocabulary alignment)."""
    if rows is None:
        return src.delta(name, base)
    raw = src.raw(name)[:rows]
    return torch.sub(raw, base) if isinstance(src, ModelDelta) else raw.to(torch.float32, copy=True)


def _input_weights(src: DeltaSource, name: str, base: torch.Tensor, rows: int | None) -> torch.Tensor:
    """An input's float32 weights (a new tensor): a model's own (no delta round trip), or
    ``base + delta`` for a task vector; over the first ``rows`` rows if given."""
    if not isinstance(src, ModelDelta):
        return _input_delta(src, name, base, rows).add_(base)
    raw = src.raw(name)
    if rows is not None:
        raw = raw[:rows]
    return raw.to(torch.float32, copy=not (src.source.fresh and rows is None))
