"""Editing a model in place to ``theta0 + sum_t alpha_t * tau_t``, cheaply and reversibly.

Evaluation sweeps (coefficient grids, negation scales, disentanglement grids) visit many
combinations of the same task vectors. :class:`ModelEditor` keeps one copy of the base
weights and rewrites the model's parameters for each combination, instead of deep-copying
the model each time.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..errors import KeyMismatchError, format_names
from ..state import float_state_dict
from ..task_vector import TaskVector

#: a coefficient per task: one float, or one per parameter name (per-layer coefficients)
Coefficients = Mapping[str, "float | Mapping[str, float]"]


class ModelEditor:
    """Set ``model``'s weights to ``base + sum_t coef_t * tv_t`` for any coefficients.

    Args:
        model: the pre-trained model (its current weights are the base).
        task_vectors: ``{task name: TaskVector}``; every vector's tensors must exist in the model.

    Example:
        >>> editor = ModelEditor(model, {"spam": tv_spam, "movies": tv_movies})
        >>> with editor.edited({"spam": 0.4, "movies": 0.4}):
        ...     accuracy = evaluate(model)
    """

    def __init__(self, model: torch.nn.Module, task_vectors: Mapping[str, TaskVector]):
        self.model = model
        self.params = float_state_dict(model)
        self.base = {k: v.detach().clone() for k, v in self.params.items()}
        self.task_vectors = {}
        for task, tv in task_vectors.items():
            missing = [k for k in tv.keys() if k not in self.params]
            if missing:
                raise KeyMismatchError(f"task vector {task!r} has tensors the model lacks: [{format_names(missing)}].")
            self.task_vectors[task] = {k: v.to(torch.float32) for k, v in tv.items()}

    @torch.no_grad()
    def set(self, coefficients: Coefficients) -> torch.nn.Module:
        """Write ``base + sum coef * tau`` into the model; unknown task names are an error."""
        unknown = sorted(set(coefficients) - set(self.task_vectors))
        if unknown:
            raise KeyMismatchError(f"no task vector for {unknown}; known: {sorted(self.task_vectors)}.")
        for name, p in self.params.items():
            value = self.base[name].to(torch.float32)
            for task, coef in coefficients.items():
                delta = self.task_vectors[task].get(name)
                if delta is None:
                    continue
                c = coef.get(name, 0.0) if isinstance(coef, Mapping) else coef
                if c:
                    value = value + c * delta.to(value.device)
            p.copy_(value.to(p.dtype))
        return self.model

    @torch.no_grad()
    def reset(self) -> torch.nn.Module:
        """Restore the base weights."""
        for name, p in self.params.items():
            p.copy_(self.base[name])
        return self.model

    def edited(self, coefficients: Coefficients):
        """Context manager: edit, yield the model, restore the base afterwards."""
        import contextlib

        @contextlib.contextmanager
        def ctx():
            try:
                yield self.set(coefficients)
            finally:
                self.reset()

        return ctx()


class TangentEditor:
    """:class:`ModelEditor`'s interface for a :class:`~hf_taskarith.LinearizedModel`.

    Each edit sets the linearized model to ``f_lin(x; theta0 + sum_t coef_t * tau_t)``, how
    tangent-space task vectors are meant to be combined (exactly linear in the coefficients).
    A task's coefficient is one number, or ``{tensor name: coefficient}`` (what
    :func:`~hf_taskarith.evaluation.coefficients.learn_coefficients` returns; names left out get 0).

    Example:
        >>> editor = TangentEditor(LinearizedModel(model), {"spam": tv_spam, "movies": tv_movies})
        >>> with editor.edited({"spam": 0.5, "movies": 0.5}) as lin:
        ...     accuracy = evaluate(lin)
    """

    def __init__(self, model: torch.nn.Module, task_vectors: Mapping[str, TaskVector]):
        if not hasattr(model, "load_task_vector"):
            raise TypeError(f"TangentEditor needs a LinearizedModel, got {type(model).__name__}; use ModelEditor "
                            "to edit the weights of an ordinary model.")
        if not task_vectors:
            raise ValueError("TangentEditor needs at least one task vector.")
        self.model = model
        self.task_vectors = {t: tv.materialize() if hasattr(tv, "materialize") else tv
                             for t, tv in task_vectors.items()}

    @torch.no_grad()
    def set(self, coefficients: Coefficients) -> torch.nn.Module:
        unknown = sorted(set(coefficients) - set(self.task_vectors))
        if unknown:
            raise KeyMismatchError(f"no task vector for {unknown}; known: {sorted(self.task_vectors)}.")
        # every vector takes part (coefficient 0 when absent), so every delta is rewritten
        pairs: list[tuple[Any, float]] = []
        for t, tv in self.task_vectors.items():
            c = coefficients.get(t, 0.0)
            if not isinstance(c, Mapping):
                pairs.append((tv, float(c)))
                continue
            stray = sorted(set(c) - set(tv.keys()))
            if stray:
                raise KeyMismatchError(f"coefficients for task {t!r} name tensors its task vector does not hold: "
                                       f"{format_names(stray)}.")
            # per tensor (learned per layer): delta gets c[name] * tau[name]; names without one get 0
            pairs.append(({n: tv[n] * float(c.get(n, 0.0)) for n in tv.keys()}, 1.0))
        return self.model.load_task_vectors(pairs)

    def reset(self) -> torch.nn.Module:
        return self.set({})

    edited = ModelEditor.edited  # edit, yield the model, restore delta = 0 afterwards


class EditorView:
    """An editor restricted to some of its task vectors (what :func:`restrict` returns).

    Edits go to the underlying editor, so nothing is copied: sweeping subsets of one set of
    vectors (accuracy vs number of tasks) shares one base copy, one linearized model or one
    :class:`~.tangent_outputs.TangentOutputs` cache. Coefficients for a vector outside the view
    are an error, as they are for an unknown task.
    """

    def __init__(self, editor: Any, tasks: list[str]):
        self.editor = editor
        self.task_vectors = {t: editor.task_vectors[t] for t in tasks}

    def set(self, coefficients: Coefficients) -> Any:
        outside = sorted(set(coefficients) - set(self.task_vectors))
        if outside:
            raise KeyMismatchError(f"no task vector for {outside} in this view; it holds {sorted(self.task_vectors)}.")
        return self.editor.set(coefficients)

    def reset(self) -> Any:
        return self.editor.reset()

    edited = ModelEditor.edited  # edit, yield what the underlying editor yields, restore afterwards


def restrict(editor: Any, tasks: Any) -> EditorView:
    """A view of ``editor`` (:class:`ModelEditor`, :class:`TangentEditor`, a
    :class:`~.tangent_outputs.TangentOutputs` or another view) holding only ``tasks``' vectors,
    for :func:`~.arithmetic.task_addition` over a subset.

    Raises:
        KeyMismatchError: a task without a vector in ``editor``.
        ValueError: no task, or a task named twice.
    """
    tasks = list(tasks)
    if not tasks:
        raise ValueError("restrict() needs at least one task.")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"restrict(): a task is named twice in {tasks}.")
    unknown = sorted(set(tasks) - set(editor.task_vectors))
    if unknown:
        raise KeyMismatchError(f"no task vector for {unknown}; known: {sorted(editor.task_vectors)}.")
    return EditorView(editor, tasks)
