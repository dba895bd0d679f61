"""Evaluating a merge one cache-sized block at a time.

Most of a merge's arithmetic is elementwise: forming deltas, weighting them, electing signs,
adding the result to the base. Run on whole tensors, every step is a pass over RAM (one
float32 copy of a 32000 x 4096 embedding is 500 MB), so memory bandwidth, not arithmetic,
sets the speed. Run on blocks of :data:`BLOCK` entries of the flattened tensor, every
intermediate stays in the CPU cache. Each block is an independent unit of work: read the
inputs' bytes for its range (``pread``), compute in float32, write the output's bytes at
their place in the output file (``pwrite``). Blocks run on a few worker threads, so reading
and writing overlap with arithmetic, and resident memory is a few blocks per thread, not a
tensor per input.

Results are bit-identical to the whole-tensor path: the same float32 operations run on the
same entries in the same order. A method that must see a whole tensor before it can work
elementwise (TIES trims each delta to its top-k magnitudes) does so in
:meth:`BlockKernel.prepare`, a pass over the blocks that reduces each input to a threshold
and a tie cut; then it merges block by block like the others.

Note:
    Workers run torch single-threaded: on blocks, torch's own thread pool costs more in
    synchronization than it gains, and badly so when other processes compete for the CPUs
    (a block-sized add took 50x longer with 2 OpenMP threads on a busy 2-core machine).
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import torch

from ..errors import NonFiniteError

#: entries per block: an (n_inputs, BLOCK) float32 stack plus block-sized temporaries stay
#: within a core's share of the L2/L3 caches for a handful of inputs, while each torch call
#: does enough work to hide its dispatch cost (256K was fastest on a 2-core EPYC).
BLOCK = 1 << 18
#: the sample of a tensor's deltas read by :meth:`DeltaBlocks.sample`: RUNS contiguous runs
#: of RUN entries, one per equal stratum of the tensor.
RUNS, RUN = 128, 128

T = TypeVar("T")


class RangeSource(Protocol):
    """Any flat range of one stored tensor (:class:`~hf_taskarith.io.safetensors_file.RangeReader`,
    or a tensor in memory)."""

    numel: int
    dtype: torch.dtype

    def read(self, start: int, stop: int, out: torch.Tensor) -> torch.Tensor: ...
    def close(self) -> None: ...


class RangeSink(Protocol):
    """Where a merged tensor's blocks go (:class:`~hf_taskarith.io.writer.RangeWriter`)."""

    def write(self, start: int, block: torch.Tensor) -> None: ...
    def close(self) -> None: ...


def finite(t: torch.Tensor) -> bool:
    """True if ``t`` holds no NaN or inf (one fast pass: they propagate into a sum; an
    overflowing sum is re-checked exactly)."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


class BlockRunner:
    """Worker threads for block work, each with its own scratch buffers.

    Args:
        workers: threads (default: torch's intra-op thread count, at most the usable CPUs
            and :data:`MAX_WORKERS`).

    Note:
        During :meth:`map` torch runs single-threaded (each worker is one thread of work);
        the thread count is restored after, so whole-tensor work between maps keeps torch's
        own parallelism.

    Example:
        >>> with BlockRunner() as runner:
        ...     sums = runner.map(lambda r: float(x[r[0]:r[1]].sum()), [(0, 10), (10, 20)])
    """

    def __init__(self, workers: int | None = None):
        self.workers = workers or _default_workers()
        self._local = threading.local()
        self._pool: ThreadPoolExecutor | None = None

    def __enter__(self) -> BlockRunner:
        if self.workers > 1:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="hf_taskarith-block")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def map(self, fn: Callable[[tuple[int, int]], T], ranges: Iterable[tuple[int, int]]) -> list[T]:
        """``[fn(r) for r in ranges]``, spread over the workers; results in order.

        If one call raises, the calls not yet started are cancelled, the running ones
        finish, and the first error (in order) is raised.
        """
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            if self._pool is None:
                return [fn(r) for r in ranges]
            futures = [self._pool.submit(fn, r) for r in ranges]
            try:
                return [f.result() for f in futures]
            except BaseException:
                for f in futures:
                    f.cancel()
                wait(futures)
                raise
        finally:
            torch.set_num_threads(threads)

    def scratch(self, role: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """This thread's buffer for ``role`` (contents undefined), grown on demand and reused.

        Reusing buffers matters beyond allocation cost: block-sized temporaries allocated
        between long-lived small ones fragment the heap, and resident memory creeps up.
        """
        views = self._local.__dict__.setdefault("views", {})
        key = (role, shape, dtype)
        view = views.get(key)
        if view is None:
            buffers = self._local.__dict__.setdefault("buffers", {})
            need = math.prod(shape) * dtype.itemsize
            buf = buffers.get(role)
            if buf is None or buf.numel() < need:
                buf = buffers[role] = torch.empty(need, dtype=torch.uint8)
                for stale in [k for k in views if k[0] == role]:
                    del views[stale]
            view = views[key] = buf[:need].view(dtype).view(shape)
        return view


#: more block workers than this stop paying: memory bandwidth and the GIL saturate first
MAX_WORKERS = 8


def _default_workers() -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(torch.get_num_threads(), cpus, MAX_WORKERS))


class DeltaBlocks:
    """One tensor's base and input deltas, read and formed in float32 a block at a time.

    Args:
        name: the tensor's name (for error messages).
        base: the base tensor, as stored.
        inputs: per input, its tensor as stored, with as many entries as ``base``.
        is_model: per input, True if it holds model weights (delta = input - base), False if
            it already is a delta (a task vector).
        labels: per input, how error messages name it.
        runner: supplies per-thread buffers.

    Note:
        A model delta is ``float32(input) - float32(base)`` and a stored delta is
        ``float32(input)``, exactly as the whole-tensor path forms them.
    """

    def __init__(self, name: str, base: RangeSource, inputs: list[RangeSource], *, is_model: list[bool],
                 labels: list[str], runner: BlockRunner):
        self.name, self.n = name, base.numel
        self._base, self._inputs = base, inputs
        self._is_model, self._labels = is_model, labels
        self._runner = runner

    def __len__(self) -> int:
        return len(self._inputs)

    def ranges(self, align: int = 1) -> Iterator[tuple[int, int]]:
        """``(start, stop)`` of each block, in order; with ``align``, every block but the last
        holds a whole multiple of ``align`` entries (at least ``align``), so blocks split no row
        of that length."""
        step = max(align, BLOCK // align * align)
        for start in range(0, self.n, step):
            yield start, min(start + step, self.n)

    def _read(self, source: RangeSource, start: int, stop: int) -> torch.Tensor:
        raw = self._runner.scratch("raw", ((stop - start) * 8,), torch.uint8)
        return source.read(start, stop, raw)

    def base(self, start: int, stop: int) -> torch.Tensor:
        """The base's entries ``start:stop`` in float32 (this thread's buffer)."""
        out = self._runner.scratch("base", (stop - start,), torch.float32)
        return out.copy_(self._read(self._base, start, stop))

    def deltas(self, start: int, stop: int, base: torch.Tensor, *, check: bool = True) -> torch.Tensor:
        """Every input's delta over ``start:stop``: ``(n_inputs, stop - start)`` float32 (this
        thread's buffer). ``base`` is :meth:`base` of the same range.

        Raises:
            NonFiniteError: if ``check`` and the block holds NaN or inf, naming the first
                input (in input order) whose delta is not finite anywhere in the tensor.
        """
        stack = self._runner.scratch("deltas", (len(self._inputs), stop - start), torch.float32)
        for row, source in zip(stack, self._inputs):
            row.copy_(self._read(source, start, stop))
        if all(self._is_model):
            stack.sub_(base)
        else:
            for row, is_model in zip(stack, self._is_model):
                if is_model:
                    row.sub_(base)
        if check and not finite(stack):
            raise self.first_bad_input() or NonFiniteError(f"tensor {self.name!r}: an input delta is not finite.")
        return stack

    def weights(self, start: int, stop: int, base: torch.Tensor) -> torch.Tensor:
        """Every input's float32 *weights* over ``start:stop``: ``(n_inputs, stop - start)`` (this
        thread's buffer): a model's own entries (no delta round trip), or ``base + delta`` for a
        task vector, exactly as the whole-tensor path forms them for methods defined on weights.

        Raises:
            NonFiniteError: the block holds NaN or inf, naming the first input (in input order)
                whose delta is not finite anywhere in the tensor.
        """
        stack = self._runner.scratch("deltas", (len(self._inputs), stop - start), torch.float32)
        for row, source, is_model in zip(stack, self._inputs, self._is_model):
            row.copy_(self._read(source, start, stop))
            if not is_model:
                row.add_(base)
        if not finite(stack):
            raise self.first_bad_input() or NonFiniteError(f"tensor {self.name!r}: an input is not finite.")
        return stack

    def sample(self) -> torch.Tensor | None:
        """Every input's delta at :data:`RUNS` runs of :data:`RUN` entries spread over the
        tensor (a random run in each equal stratum; fixed seed): ``(n_inputs, RUNS * RUN)``.
        ``None`` for tensors under ``8 * RUNS * RUN`` entries, too small to be worth it."""
        starts = self.sample_starts()
        if starts is None:
            return None

        def gather(source: RangeSource) -> torch.Tensor:
            raw = torch.empty(RUNS, RUN * 8, dtype=torch.uint8)
            return torch.cat([source.read(s, s + RUN, buf) for s, buf in zip(starts, raw)]).to(torch.float32)

        base = gather(self._base)
        return torch.stack([gather(x).sub_(base) if m else gather(x) for x, m in zip(self._inputs, self._is_model)])

    def sample_starts(self) -> list[int] | None:
        """The first flat index of each run :meth:`sample` reads (``None`` where it reads none)."""
        if self.n < 8 * RUNS * RUN:
            return None
        stratum = self.n // RUNS
        gen = torch.Generator().manual_seed(0)
        return (torch.arange(RUNS) * stratum + torch.randint(stratum - RUN, (RUNS,), generator=gen)).tolist()

    def first_bad_input(self) -> NonFiniteError | None:
        """The error naming the first input (in input order) whose delta holds NaN or inf
        anywhere in the tensor, or ``None`` if all are finite (scans the whole tensor)."""
        for i, (source, is_model) in enumerate(zip(self._inputs, self._is_model)):
            for start, stop in self.ranges():
                d = self._read(source, start, stop).to(torch.float32, copy=True)
                if is_model:
                    d.sub_(self.base(start, stop))
                if not bool(torch.isfinite(d).all()):
                    return NonFiniteError(
                        f"input {self._labels[i]}: tensor {self.name!r} contains NaN or inf. Fix or re-export "
                        "that checkpoint; merging it would spread the bad values."
                    )
        return None


@dataclass(frozen=True)
class KernelContext:
    """What a kernel factory may need to know about one tensor besides the parameters.

    Attributes:
        shape: the tensor's shape (methods that work per row or per column need it).
        base_given: False when the caller gave no base model and the first input stands in as
            the reference (``MergeMethod.needs_base=False``).
        is_base: per contributing input, True if it is the base checkpoint itself.
    """

    shape: tuple[int, ...]
    base_given: bool = True
    is_base: tuple[bool, ...] = ()


class BlockKernel:
    """A merge method evaluated block by block.

    Subclasses implement :meth:`merge` and, if they need whole-tensor statistics first,
    :meth:`prepare`. One kernel serves one tensor; :meth:`merge` may run on several threads.
    """

    #: blocks hold whole multiples of this many entries (a kernel that works per row sets the
    #: row length, so no block splits a row)
    align: int = 1
    #: True for methods defined on weights (``MergeMethod.on_weights``): :meth:`merge` receives
    #: the inputs' float32 weights (:meth:`DeltaBlocks.weights`) and returns the merged weights,
    #: which are written as they are
    on_weights: bool = False
    #: True when a non-finite input delta cannot go unnoticed without a per-block check:
    #: :meth:`prepare` checked every delta, or any NaN/inf in a delta always reaches the
    #: merged block (linear combinations), whose check then names the input.
    catches_nonfinite_inputs: bool = False

    def prepare(self, deltas: DeltaBlocks, runner: BlockRunner) -> None:
        """Look at the whole tensor before any block is merged (default: nothing to do)."""

    def merge(self, deltas: torch.Tensor, base: torch.Tensor, start: int) -> torch.Tensor:
        """The merged delta of one block (the merged weights, for an :attr:`on_weights` kernel).

        Args:
            deltas: ``(n_inputs, m)`` float32, the inputs' deltas (their weights, for an
                :attr:`on_weights` kernel) over entries ``start:start + m``; the kernel may
                modify them.
            base: ``(m,)`` float32, the base over the same entries; read-only.
            start: the block's first flat index.
        """
        raise NotImplementedError


class ElementwiseKernel(BlockKernel):
    """Any elementwise method: its own function, called on each block.

    Args:
        linear: the function is a linear combination of the deltas (and the base), so a NaN
            or inf in any delta always reaches the result (``0 * inf`` is NaN): the inputs
            need no check of their own.
    """

    def __init__(self, fn: Callable[..., torch.Tensor], params: dict[str, Any], *, takes_base: bool,
                 linear: bool = False):
        self.fn, self.params, self.takes_base = fn, params, takes_base
        self.catches_nonfinite_inputs = linear

    def merge(self, deltas: torch.Tensor, base: torch.Tensor, start: int) -> torch.Tensor:
        rows = list(deltas.unbind(0))
        if self.takes_base:
            return self.fn(rows, self.params, None, base=base)
        return self.fn(rows, self.params, None)


class WeightsElementwiseKernel(BlockKernel):
    """An elementwise method defined on weights (``nearswap``): its own function, called on
    each block of the inputs' weights with the base's block as ``base=``."""

    on_weights = True

    def __init__(self, fn: Callable[..., torch.Tensor], params: dict[str, Any]):
        self.fn, self.params = fn, params

    def merge(self, deltas: torch.Tensor, base: torch.Tensor, start: int) -> torch.Tensor:
        return self.fn(list(deltas.unbind(0)), self.params, None, base=base)


def kernel_for(method: Any, params: dict[str, Any], context: KernelContext) -> BlockKernel | None:
    """The block kernel for a :class:`~hf_taskarith.merging.registry.MergeMethod`, if it has one.

    A method with a ``block_kernel`` factory (the TIES family, the spherical methods) supplies
    its own (for a method defined on weights, a kernel that returns a merged delta is fine: the
    base is added to it); other deterministic elementwise methods run their own function on
    blocks (of weights, for methods defined on weights); the rest return ``None`` and run on
    whole tensors.
    """
    if method.block_kernel is not None:
        kernel = method.block_kernel(params, context)
        if kernel is not None:
            return kernel
    if method.elementwise and not method.randomized:
        if method.on_weights:
            return WeightsElementwiseKernel(method.fn, params)
        return ElementwiseKernel(method.fn, params, takes_base=method.takes_base)
    return None


def merge_blocks(deltas: DeltaBlocks, kernel: BlockKernel | None, out: RangeSink, *, out_dtype: torch.dtype,
                 runner: BlockRunner, what: str, is_finite: Callable[[torch.Tensor], bool] = finite) -> None:
    """Write ``base + merged delta``, converted to ``out_dtype``, block by block to ``out``.

    Args:
        deltas: the tensor's base and inputs.
        kernel: the method's kernel (``None`` when there are no inputs: the base is copied).
        out: receives each block (the caller closes it).
        out_dtype: the output dtype (converted as ``.to(out_dtype)`` does).
        runner: the worker threads.
        what: the method and parameters, for the error message.
        is_finite: the check applied to each merged block.

    Raises:
        NonFiniteError: an input delta or the result holds NaN or inf.
    """
    active = kernel if kernel is not None and len(deltas) else None

    def run(block: tuple[int, int]) -> None:
        start, stop = block
        base = deltas.base(start, stop)
        if active is not None:
            if active.on_weights:
                merged = active.merge(deltas.weights(start, stop, base), base, start)
            else:
                merged = active.merge(deltas.deltas(start, stop, base, check=not active.catches_nonfinite_inputs),
                                      base, start)
            if merged.shape != base.shape:
                raise ValueError(f"block kernel returned shape {list(merged.shape)}, expected {list(base.shape)}.")
            if active.on_weights:
                base.copy_(merged)
            else:
                base.add_(merged)
        if not is_finite(base):
            raise deltas.first_bad_input() or NonFiniteError(
                f"merged tensor {deltas.name!r} is not finite ({what}). "
                "Check the weights and inputs for extreme values.")
        out.write(start, base if out_dtype == torch.float32 else
                  runner.scratch("out", (stop - start,), out_dtype).copy_(base))

    if active is not None:
        active.prepare(deltas, runner)
    runner.map(run, deltas.ranges(active.align if active is not None else 1))
