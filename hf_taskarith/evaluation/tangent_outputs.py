"""Coefficient sweeps in the tangent space from one pass per task vector.

A linearized model is affine in its task vectors: at ``theta0 + sum_t c_t tau_t`` its output is
``f(x; theta0) + sum_t c_t J tau_t`` exactly, and so is anything computed linearly from that
output (mean pooling, a linear read-out). :class:`TangentOutputs` computes, for the inputs you
name, the base output once and each vector's direction ``J tau_t`` once (the linearized model at
coefficient 1 minus the base), then serves *any* coefficients as a weighted sum. A shared
coefficient grid of 21 points over 3 vectors costs 4 passes instead of 21 (each a forward pass
plus a forward-mode JVP); the negation of each of the 3 vectors on the same grid, 4 instead of 63.

It has :class:`~.editing.TangentEditor`'s interface, so :func:`~.arithmetic.task_addition` and
:func:`~.arithmetic.task_negation` take it unchanged: ``edited(coefficients)`` yields a
:class:`TangentPoint` instead of a model, and your ``evaluate(point, split)`` reads
``point.output(key)`` (e.g. pooled features) and scores them with any head or metric, as the
non-linear function of the output it may be. :func:`~.task_accuracy.cached_tangent_evaluation`
builds both for frozen-head classifiers.

Written by hand because nothing in torch or peft caches tangent-space outputs across
coefficients; the sum is the only arithmetic, and it is exact up to the float rounding of the
model's own passes (directions are kept in float64).

Example:
    >>> outputs = TangentOutputs(TangentEditor(lin, vectors), lambda m: {"val": pooled(m, val_texts)})
    >>> with outputs.edited({"spam": 0.5, "movies": 0.5}) as point:
    ...     features = point.output("val")       # == pooled(lin at theta0 + 0.5 tau_spam + 0.5 tau_movies)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Iterator, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import KeyMismatchError, NonFiniteError
from .editing import Coefficients, TangentEditor

Outputs = Callable[[nn.Module], Mapping[Hashable, torch.Tensor]]


class TangentPoint:
    """The linearized model's outputs at one set of coefficients (what ``edited`` yields)."""

    def __init__(self, cache: TangentOutputs, coefficients: Mapping[str, float]):
        self.cache = cache
        self.coefficients = dict(coefficients)

    def output(self, key: Hashable) -> torch.Tensor:
        """``base[key] + sum_t c_t * direction_t[key]``, in the outputs' dtype.

        Raises:
            KeyError: ``key`` is not one of the outputs computed at construction.
        """
        cache = self.cache
        if key not in cache.base:
            raise KeyError(f"no output {key!r}; computed: {sorted(map(str, cache.base))}.")
        value = cache.base[key].clone()
        for task, c in self.coefficients.items():
            if c:
                value += c * cache.directions[task][key]
        return value.to(cache.dtypes[key])


class TangentOutputs:
    """:class:`~.editing.TangentEditor`'s interface, served from cached tangent-space outputs.

    Args:
        editor: a :class:`~.editing.TangentEditor` over the linearized model and the task vectors.
        outputs: ``outputs(model) -> {key: tensor}``: every output the evaluation needs (e.g.
            pooled features of each task's validation and test texts), computed from the model.
            It must depend linearly on the model's output (pooling, slicing, a linear map) for
            the cache to be exact; a head, argmax or metric belongs in ``evaluate`` instead.
        progress: a progress bar over the ``1 + K`` passes.

    Attributes:
        task_vectors: the editor's task vectors (names are what coefficients refer to).
        base, directions: the cached outputs at ``theta0`` and each vector's ``J tau`` (float64).

    Raises:
        TypeError: ``editor`` is not a :class:`~.editing.TangentEditor` (an ordinary model is not
            affine in its weights: sweep it with :class:`~.editing.ModelEditor`).
        ValueError: ``outputs`` returned different keys or shapes for different vectors.
        NonFiniteError: an output is NaN/inf.
    """

    def __init__(self, editor: TangentEditor, outputs: Outputs, *, progress: bool = False):
        if not isinstance(editor, TangentEditor):
            raise TypeError(f"TangentOutputs needs a TangentEditor (a linearized model), got {type(editor).__name__}; "
                            "an ordinary model's outputs are not affine in its weights: use ModelEditor.")
        self.editor = editor
        self.task_vectors = editor.task_vectors
        bar = tqdm(total=1 + len(self.task_vectors), desc="tangent outputs", disable=not progress)
        with torch.no_grad():
            base = self._collect(outputs(editor.reset()), "theta0")
            bar.update()
            self.dtypes = {k: v.dtype for k, v in base.items()}
            self.base = {k: v.to(torch.float64) for k, v in base.items()}
            self.directions: dict[str, dict[Hashable, torch.Tensor]] = {}
            try:
                for task in self.task_vectors:
                    with editor.edited({task: 1.0}) as model:
                        at_one = self._collect(outputs(model), f"tau[{task!r}]")
                    if at_one.keys() != base.keys() or any(at_one[k].shape != base[k].shape for k in base):
                        raise ValueError(f"outputs() returned other keys or shapes for task {task!r} than at theta0: "
                                         f"{ {k: tuple(v.shape) for k, v in at_one.items()} } vs "
                                         f"{ {k: tuple(v.shape) for k, v in base.items()} }.")
                    self.directions[task] = {k: at_one[k].to(torch.float64) - self.base[k] for k in base}
                    bar.update()
            finally:
                bar.close()
                editor.reset()

    @staticmethod
    def _collect(values: Mapping[Hashable, torch.Tensor], where: str) -> dict[Hashable, torch.Tensor]:
        out = {}
        for k, v in values.items():
            if not isinstance(v, torch.Tensor):
                raise TypeError(f"outputs() must return tensors; {k!r} is a {type(v).__name__}.")
            if not torch.isfinite(v).all():
                raise NonFiniteError(f"output {k!r} is NaN/inf at {where}.")
            out[k] = v.detach()
        return out

    def set(self, coefficients: Coefficients) -> TangentPoint:
        """The outputs at ``theta0 + sum_t c_t tau_t`` (one number per task).

        Raises:
            KeyMismatchError: a task without a vector.
            ValueError: a per-tensor coefficient mapping (its directions are not cached:
                evaluate those with the :class:`~.editing.TangentEditor` itself).
        """
        unknown = sorted(set(coefficients) - set(self.task_vectors))
        if unknown:
            raise KeyMismatchError(f"no task vector for {unknown}; known: {sorted(self.task_vectors)}.")
        per_tensor = sorted(t for t, c in coefficients.items() if isinstance(c, Mapping))
        if per_tensor:
            raise ValueError(f"per-tensor coefficients for {per_tensor}: TangentOutputs caches one direction per "
                             "task vector; evaluate per-tensor coefficients with the TangentEditor itself.")
        return TangentPoint(self, {t: float(c) for t, c in coefficients.items()})

    def reset(self) -> TangentPoint:
        return TangentPoint(self, {})

    @contextlib.contextmanager
    def edited(self, coefficients: Coefficients) -> Iterator[TangentPoint]:
        yield self.set(coefficients)
