"""The streaming merge loop: one output tensor at a time.

For each tensor of the base: read the base tensor and the matching tensor of every input,
form float32 deltas, call the merge method, add the result to the base, check it is finite,
convert to the output dtype, and hand it to a sink (a streaming safetensors writer, or a
dict for in-memory merges). Peak memory is about one tensor per input plus the method's
working set; whole models are never loaded.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from ..errors import IncompatibleBaseError, KeyMismatchError, NonFiniteError, ShapeMismatchError, format_names
from ..io.buffers import Workspace
from ..io.writer import TensorSpec
from .registry import MergeMethod
from .sources import DeltaSource, ModelDelta, TensorSource
from .vocab import VocabAlignment, is_vocab_tensor, rows_differ_only

logger = logging.getLogger(__name__)


@dataclass
class MergeReport:
    """What a merge did; rendered into the model card and logged."""

    merged: int = 0
    copied_non_float: list[str] = field(default_factory=list)
    vocab: list[VocabAlignment] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)           # "input: tensor (reason)"
    zero_for_missing: list[str] = field(default_factory=list)  # task vectors that do not cover a tensor
    fingerprint_mismatch: list[str] = field(default_factory=list)

    def describe(self) -> str:
        parts = [f"merged {self.merged} tensors"]
        if self.copied_non_float:
            parts.append(f"copied {len(self.copied_non_float)} non-float tensors from the base")
        parts += [v.describe() for v in self.vocab]
        if self.fingerprint_mismatch:
            parts.append("base fingerprint mismatch (allowed): " + "; ".join(self.fingerprint_mismatch))
        if self.skipped:
            parts.append(f"skipped (allowed): {'; '.join(self.skipped[:20])}"
                         + (f" ... ({len(self.skipped) - 20} more)" if len(self.skipped) > 20 else ""))
        if self.zero_for_missing:
            parts.append(f"{len(self.zero_for_missing)} tensors absent from a task vector were left unchanged by it")
        return "; ".join(parts)


@dataclass
class _TensorJob:
    name: str
    out_shape: tuple[int, ...]
    out_dtype: torch.dtype
    is_float: bool
    inputs: list[int]          # indices of inputs that contribute
    common_rows: int | None    # vocab alignment: merge only these rows


@dataclass
class MergePlan:
    """A checked, ready-to-run merge; build with :func:`plan_merge`."""

    base: TensorSource
    inputs: list[DeltaSource]
    method: MergeMethod
    params: dict[str, Any]
    jobs: list[_TensorJob]
    report: MergeReport
    seed: int
    vocab_source: TensorSource

    def specs(self) -> list[TensorSpec]:
        return [TensorSpec(j.name, j.out_shape, j.out_dtype) for j in self.jobs]


def plan_merge(base: TensorSource, inputs: list[DeltaSource], method: MergeMethod, params: dict[str, Any], *,
               out_dtype: torch.dtype | None = None, vocab_source: TensorSource | None = None,
               seed: int = 0, allow_mismatch: bool = False) -> MergePlan:
    """Check names, shapes and fingerprints of every input against the base, and plan each tensor.

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
                msg = (f"{src.label} was made from base {src.base_model!r} (fingerprint {src.expected_fingerprint}), but the base here ({base.label}) has "
                       f"fingerprint {fp}")
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
                msg = f"tensor {name!r}: {src.label} has shape {list(shape)}, base ({base.label}) has {list(meta.shape)}"
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
    return MergePlan(base, inputs, method, params, jobs, report, seed, vocab_source)


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def _finite(t: torch.Tensor) -> bool:
    # a sum is one fast pass; NaN/inf propagate into it (an overflow is re-checked exactly)
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def run_merge(plan: MergePlan, sink: Callable[[str, torch.Tensor], None], *, progress: bool = True) -> MergeReport:
    """Execute a plan, sending each finished output tensor to ``sink(name, tensor)``.

    The tensor given to ``sink`` may be a view of a reused buffer: consume it (write it,
    or copy it) before returning.
    """
    disable = not progress or os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") in ("1", "true", "TRUE")
    method, report = plan.method, plan.report
    ws = Workspace()
    for job in tqdm(plan.jobs, desc=f"merging ({method.name})", unit="tensor", disable=disable):
        if not job.is_float:
            sink(job.name, plan.base.get(job.name))
            continue
        if method.coefficients is not None and job.common_rows is None:
            out = _merge_fused(plan, job, ws)
        else:
            out = _merge_general(plan, job)
        sink(job.name, out)
        report.merged += 1
    return report


def _bad_input(plan: MergePlan, job: _TensorJob) -> NonFiniteError | None:
    """Name the input (or base) holding NaN/inf in ``job``'s tensor, if any."""
    candidates = [(plan.base.label, plan.base.get(job.name))]
    candidates += [(plan.inputs[i].label, plan.inputs[i].raw(job.name)) for i in job.inputs]
    for label, t in candidates:
        if not bool(torch.isfinite(t).all()):
            return NonFiniteError(f"input {label}: tensor {job.name!r} contains NaN or inf. Fix or re-export that "
                                  "checkpoint; merging it would spread the bad values.")
    return None


def _merge_fused(plan: MergePlan, job: _TensorJob, ws: Workspace) -> torch.Tensor:
    """Fixed linear combinations (task arithmetic, linear) in reused float32 buffers.

    ``out = (1 + extra) * base + sum_i c_i * delta_i``, with each model input's delta formed in
    a reused scratch buffer (``x_i - base``, the same rounding as the general path) and added
    in place. Each input is read once into a reused byte buffer; no memory is allocated after
    the first (largest) tensor.
    """
    params = {k: ([v[i] for i in job.inputs] if plan.method.param_index[k].per_model else v)
              for k, v in plan.params.items()}
    coefs, extra = plan.method.coefficients(params)
    base = ws.take("base", job.out_shape, torch.float32)
    base.copy_(plan.base.read(job.name, ws))
    acc = ws.take("acc", job.out_shape, torch.float32)
    torch.mul(base, 1.0 + extra, out=acc)
    scratch = ws.take("scratch", job.out_shape, torch.float32)
    for c, i in zip(coefs, job.inputs):
        src = plan.inputs[i]
        raw = src.read(job.name, ws)
        if src.is_model:
            acc.add_(scratch.copy_(raw).sub_(base), alpha=c)
        else:
            acc.add_(raw if raw.dtype == torch.float32 else scratch.copy_(raw), alpha=c)
    if not _finite(acc):
        raise _bad_input(plan, job) or NonFiniteError(
            f"merged tensor {job.name!r} is not finite (method {plan.method.name!r}, params {plan.params}). "
            "Check the weights for extreme values.")
    if job.out_dtype == torch.float32:
        return acc
    return ws.take("out", job.out_shape, job.out_dtype).copy_(acc)


def _merge_general(plan: MergePlan, job: _TensorJob) -> torch.Tensor:
    """Any method: materialize each input's float32 delta, call the method, add to the base."""
    method = plan.method
    base_raw = plan.base.get(job.name)
    base = base_raw.to(torch.float32, copy=not plan.base.fresh)
    del base_raw
    rows = job.common_rows
    base_c = base[:rows] if rows is not None else base
    deltas = []
    for i in job.inputs:
        src = plan.inputs[i]
        d = src.delta(job.name, base_c) if rows is None else _rows_delta(src, job.name, base_c, rows)
        if not _finite(d):
            raise NonFiniteError(
                f"input {src.label}: tensor {job.name!r} contains NaN or inf. Fix or re-export that "
                "checkpoint; merging it would spread the bad values."
            )
        deltas.append(d)
    if deltas:
        params = {k: ([v[i] for i in job.inputs] if method.param_index[k].per_model else v)
                  for k, v in plan.params.items()}
        gen = _generator(plan.seed, job.name) if method.randomized else None
        merged = (method.fn(deltas, params, gen, base=base_c) if method.takes_base
                  else method.fn(deltas, params, gen))
        del deltas
        if merged.shape != base_c.shape:
            raise ShapeMismatchError(
                f"merge method {method.name!r} returned shape {list(merged.shape)} for {job.name!r}, "
                f"expected {list(base_c.shape)}."
            )
        base_c.add_(merged)
        del merged
    if not _finite(base_c):
        raise NonFiniteError(
            f"merged tensor {job.name!r} is not finite (method {method.name!r}, params {plan.params}). "
            "Check the weights and inputs for extreme values."
        )
    if rows is not None:
        extra = plan.vocab_source.get(job.name)[rows:job.out_shape[0]].to(torch.float32)
        base = torch.cat([base_c, extra], dim=0)
    return base.to(job.out_dtype)


def _rows_delta(src: DeltaSource, name: str, base_rows: torch.Tensor, rows: int) -> torch.Tensor:
    """Delta restricted to the first ``rows`` rows (vocabulary alignment)."""
    raw = src.raw(name)[:rows]
    return torch.sub(raw, base_rows) if isinstance(src, ModelDelta) else raw.to(torch.float32, copy=True)
