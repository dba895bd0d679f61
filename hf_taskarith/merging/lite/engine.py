"""Weighted-sum merges of safetensors checkpoints with numpy: no torch import.

For the common case (a ``task_arithmetic`` or ``linear`` YAML over a base and fine-tuned
checkpoint folders that share every tensor name, shape and a float16 / bfloat16 / float32
dtype), importing torch costs more than the merge itself (1-1.5 s against about 1 s of
arithmetic and I/O for a 320M-parameter model). :func:`plan_lite` checks the inputs from
their headers alone and :func:`run_lite` merges block by block on worker threads: ``pread``
the inputs, widen to float32, form ``sum_i round(w_i * (theta_i - theta_0))`` and the
method's scaling with the same IEEE operations in the same order as the torch engine, add
the base, check finiteness, narrow, ``pwrite`` into shards laid out by
:mod:`hf_taskarith.io.layout`. The output is byte-for-byte what the torch engine writes
(tests compare every file).

Anything else (other methods, among them the weight-space ``slerp``, ``model_stock`` and
``passthrough``; task-vector inputs, Hub ids, mismatched names or shapes,
vocabulary alignment, float64, NaN/inf) makes :func:`plan_lite` return ``None`` or
:func:`run_lite` raise :class:`Declined`; the caller then runs the torch engine, which
reports errors in full. Errors that both paths would raise the same way (unreadable
files, bad parameters) are raised directly.
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...io.checkpoint_files import read_checkpoint_headers
from ...io.layout import Entry, ShardLayout, create_shard, encode_header
from ...io.safetensors_header import FLOAT_CODES, ITEMSIZE, StoredTensor, pread_into, pwrite_all
from ...metadata import CONFIG_NAME
from ..report import MergeReport, MergeSummary
from ..schedule import has_schedule
from .codecs import CODES, STORED, decode, encode

logger = logging.getLogger(__name__)

#: entries per block (as in the torch engine's :mod:`..blockwise`)
BLOCK = 1 << 18
#: output dtype names -> codes (the torch engine's names, without ``torch.``)
DTYPE_NAMES = {"float32": "F32", "fp32": "F32", "float16": "F16", "fp16": "F16", "bfloat16": "BF16", "bf16": "BF16"}
CANONICAL = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


@dataclass(frozen=True)
class WeightedSum:
    """How a method's merged delta follows from ``acc = sum_i round(w_i d_i)``, in the torch
    engine's order: ``acc / sum_i w_i`` when ``normalize``; otherwise, if ``rebase``,
    ``acc + round((sum_i w_i - 1) * base)`` (a weighted sum of whole models, ``linear``);
    then ``* lambda`` when the method has one and it is not 1."""

    rebase: bool


#: the methods this path runs, by registry name
FORMS: dict[str, WeightedSum] = {"task_arithmetic": WeightedSum(rebase=False), "linear": WeightedSum(rebase=True)}


class Declined(Exception):
    """The inputs turned out not to suit this path (e.g. NaN found mid-merge); use the torch engine."""


@dataclass
class _Job:
    name: str
    out: Entry
    base: StoredTensor
    inputs: list[StoredTensor]  # empty for non-float tensors (copied)


@dataclass
class LitePlan:
    """A checked weighted-sum merge; see :func:`plan_lite`."""

    jobs: list[_Job]
    form: WeightedSum
    weights: list[float]
    normalize: bool
    lam: float
    summary: MergeSummary
    report: MergeReport


def plan_lite(method: Any, params: dict[str, Any], base: str | None, models: list[str], *, dtype: str | None,
              tokenizer_source: Any, seed: int) -> LitePlan | None:
    """A plan if this path can run the merge exactly as the torch engine would, else ``None``.

    Args:
        method: the registry entry (:class:`~hf_taskarith.merging.registry.MergeMethod`).
        params: its resolved parameters (:meth:`MergeMethod.resolve_params`).
        base, models: local checkpoint folders (as given).
        dtype: output dtype name or ``None`` (the base's, per tensor).
        tokenizer_source: ``"base"``, ``None`` or one of ``models``.
        seed: recorded in the report only (the method is deterministic).

    Raises:
        CheckpointNotFoundError, CorruptCheckpointError: as the torch engine would, for the
            same files.
    """
    def no(why: str) -> None:
        logger.info("torch-free merge path not used: %s", why)

    form = FORMS.get(method.name)
    if form is None:
        return no(f"method {method.name!r} runs on the torch engine only (this path runs the weighted sums "
                  f"{sorted(FORMS)}; methods that need per-tensor norms, angles or selections, such as slerp and "
                  "model_stock, do not stream block by block with the same bits)")
    if has_schedule(params):
        return no("a parameter varies by tensor (a gradient or filter); the torch engine evaluates those")
    if base is None or not all(isinstance(x, str) for x in [base, *models]):
        return no("base and models must be given as paths")
    folders = [Path(x) for x in [base, *models]]
    if not all(f.is_dir() for f in folders):
        return no("base and models must be local folders")
    if any((f / CONFIG_NAME).is_file() for f in folders[1:]):
        return no("an input is a saved task vector")
    out_code = None
    if dtype is not None:
        out_code = DTYPE_NAMES.get(str(dtype).replace("torch.", ""))
        if out_code is None:
            return no(f"output dtype {dtype!r}")
    if tokenizer_source in (None, "base"):
        tok_folder = folders[0]
    elif tokenizer_source in models:
        tok_folder = folders[1 + models.index(tokenizer_source)]
    else:
        return no(f"tokenizer_source {tokenizer_source!r}")

    base_tensors, _ = read_checkpoint_headers(folders[0])
    input_tensors = [read_checkpoint_headers(f)[0] for f in folders[1:]]
    report = MergeReport()
    jobs: list[_Job] = []
    for name, b in base_tensors.items():
        if any(name not in t for t in input_tensors):
            return no(f"tensor {name!r} is missing from an input")
        ins = [t[name] for t in input_tensors]
        if b.code not in FLOAT_CODES:
            jobs.append(_Job(name, Entry(name, b.shape, b.code), b, []))
            report.copied_non_float.append(name)
            continue
        if b.code not in CODES or any(x.code not in CODES for x in ins):
            return no(f"tensor {name!r} has a dtype other than {CODES}")
        if any(x.shape != b.shape for x in ins):
            return no(f"tensor {name!r} differs in shape between inputs")
        jobs.append(_Job(name, Entry(name, b.shape, out_code or b.code), b, ins))
        report.merged += 1
    if any(len(t) != len(base_tensors) for t in input_tensors):
        return no("an input has tensors the base lacks")

    summary = MergeSummary(
        method=method.name, description=method.description, reference=method.reference, params=params,
        seed=seed, dtype=CANONICAL[out_code] if out_code else None, base_label=base, input_labels=list(models),
        base_folder=folders[0], tokenizer_folder=tok_folder,
    )
    return LitePlan(jobs, form, list(params["weight"]), bool(params["normalize"]), float(params.get("lambda", 1.0)),
                    summary, report)


class _Scratch(threading.local):
    """Per-thread block buffers, allocated once."""

    def get(self, role: str, n: int, dtype: np.dtype) -> np.ndarray:
        buffers = self.__dict__.setdefault("buffers", {})
        key = (role, np.dtype(dtype))
        buf = buffers.get(key)
        if buf is None or buf.size < n:
            buf = buffers[key] = np.empty(max(n, BLOCK), dtype)
        return buf[:n]


def run_lite(plan: LitePlan, folder: Path, *, max_shard_size: int | str, progress: bool = True,
             workers: int | None = None) -> None:
    """Write the merged tensors of ``plan`` as sharded safetensors into ``folder``.

    Raises:
        Declined: a merged block is not finite (the torch engine then names the input).
    """
    from tqdm.auto import tqdm

    layout = ShardLayout([j.out for j in plan.jobs], prefix="model", max_shard_size=max_shard_size)
    metadata = {"format": "pt"}
    scratch = _Scratch()
    weights = [np.float32(w) for w in plan.weights]
    total = float(sum(plan.weights))
    divisor = np.float32(total if abs(total) >= 1e-8 else 1.0) if plan.normalize else None
    rebase = np.float32(total - 1.0) if plan.form.rebase and not plan.normalize else None
    lam = np.float32(plan.lam) if plan.lam != 1 else None
    fds: dict[Path, int] = {}  # every input file, opened once up front (workers only read the dict)

    def read(t: StoredTensor, start: int, n: int, role: str) -> np.ndarray:
        raw = scratch.get(role, n, STORED[t.code])
        pread_into(fds[t.path], memoryview(raw).cast("B"), t.start + start * raw.itemsize, t)
        return raw

    def merge_block(job: _Job, out_fd: int, out_at: int, start: int, n: int) -> None:
        base = decode(job.base.code, read(job.base, start, n, "raw"), scratch.get("base", n, np.float32))
        acc = scratch.get("acc", n, np.float32)
        x = scratch.get("x", n, np.float32)
        for i, t in enumerate(job.inputs):  # acc = round(w0 d0), then acc += round(wi di), as the torch engine
            d = decode(t.code, read(t, start, n, "raw"), x)
            np.subtract(d, base, out=d)
            np.multiply(d, weights[i], out=acc if i == 0 else d)
            if i:
                np.add(acc, d, out=acc)
        if divisor is not None:
            np.divide(acc, divisor, out=acc)
        elif rebase is not None:
            np.add(acc, np.multiply(base, rebase, out=x), out=acc)
        if lam is not None:
            np.multiply(acc, lam, out=acc)
        np.add(base, acc, out=base)
        if not (np.isfinite(base.sum()) or np.isfinite(base).all()):
            raise Declined(f"tensor {job.name!r} has NaN or inf")
        code = job.out.code
        data = base if code == "F32" else encode(code, base, scratch.get("out", n, STORED[code]),
                                                   scratch.get("bits", n, np.uint32))
        pwrite_all(out_fd, memoryview(data).cast("B"), out_at + start * ITEMSIZE[code])

    def copy_tensor(job: _Job, out_fd: int, out_at: int) -> None:
        raw = np.empty(job.base.nbytes, np.uint8)
        pread_into(fds[job.base.path], memoryview(raw), job.base.start, job.base)
        pwrite_all(out_fd, memoryview(raw), out_at)

    workers = workers or max(1, min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                    else (os.cpu_count() or 1), 8))
    disable = not progress or os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") in ("1", "true", "TRUE")
    jobs = {j.name: j for j in plan.jobs}
    try:
        for t in (t for j in plan.jobs for t in (j.base, *j.inputs)):
            if t.path not in fds:
                fds[t.path] = os.open(t.path, os.O_RDONLY)
        with ThreadPoolExecutor(workers, thread_name_prefix="hf_taskarith-lite") as pool, \
                tqdm(total=len(plan.jobs), desc=f"merging ({plan.summary.method}, torch-free)", unit="tensor",
                     disable=disable) as bar:
            for fname, group in layout.groups.items():
                header = encode_header(group, metadata)
                out_fd = create_shard(folder / fname, header)
                try:  # a shard's blocks all in flight at once: no stall at tensor boundaries
                    pending = []
                    for entry in group:
                        job = jobs[entry.name]
                        at = header.data_start + header.offsets[entry.name]
                        if not job.inputs:
                            pending.append([pool.submit(copy_tensor, job, out_fd, at)])
                        else:
                            numel = job.base.numel
                            pending.append([pool.submit(merge_block, job, out_fd, at, s, min(BLOCK, numel - s))
                                            for s in range(0, numel, BLOCK)])
                    try:
                        for futures in pending:
                            for f in futures:
                                f.result()
                            bar.update(1)
                    except BaseException:
                        for f in (f for futures in pending for f in futures):
                            f.cancel()
                        wait([f for futures in pending for f in futures])
                        raise
                finally:
                    os.close(out_fd)
    finally:
        for fd in fds.values():
            os.close(fd)
    layout.write_index(folder, metadata)
