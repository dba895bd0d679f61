"""Accuracy of a sentence encoder on classification tasks through the tasks' frozen heads.

Predictions are ``head(encode(encoder, texts)).argmax(-1)``; the score is computed by the
``accuracy`` metric module through ``evaluate`` (:func:`~.metrics.load_metric`, offline).

Example:
    >>> evaluate_tasks(encoder, heads, tokenizer, tasks, "test")   # {"sms_spam": 0.93, ...}
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..errors import NonFiniteError
from ..training.encoders import encode
from ..training.tasks import TaskData
from .editing import TangentEditor
from .metrics import load_metric


@functools.lru_cache(maxsize=1)
def _accuracy_metric():
    return load_metric("accuracy")


@torch.no_grad()
def task_accuracy(encoder: nn.Module, head: nn.Module, tokenizer, task: TaskData, split: str = "test", *,
                  batch_size: int = 64, max_length: int = 64, progress: bool = False) -> float:
    """Fraction of ``task``'s ``split`` that ``head(encoder(text))`` classifies correctly.

    Args:
        encoder: a transformers encoder (or a :class:`~hf_taskarith.LinearizedModel` of one).
        head: the task's frozen head.
        task: the task; ``split`` is ``"train"``, ``"val"`` or ``"test"``.

    Returns:
        The accuracy, from the ``evaluate`` accuracy module.

    Raises:
        NonFiniteError: the encoder produced NaN/inf features.
        MissingMetricError: ``evaluate`` is not installed.

    Note:
        Cost: one forward pass of ``encoder`` over the split (length-sorted batches).
    """
    data = task.split(split)
    feats = encode(encoder, tokenizer, data.texts, batch_size=batch_size, max_length=max_length,
                   progress=progress, desc=f"eval {task.name}/{split}")
    return features_accuracy(feats, head, task, split)


@torch.no_grad()
def features_accuracy(features: torch.Tensor, head: nn.Module, task: TaskData, split: str) -> float:
    """Accuracy of ``head(features).argmax(-1)`` against ``task``'s ``split`` labels.

    Raises:
        NonFiniteError: NaN/inf features or accuracy.
    """
    if not torch.isfinite(features).all():
        raise NonFiniteError(f"the encoder produced NaN/inf features on {task.name}/{split}.")
    pred = head(features).argmax(-1)
    labels = list(task.split(split).labels)
    acc = float(_accuracy_metric().compute(predictions=pred.tolist(), references=labels)["accuracy"])
    if not math.isfinite(acc):
        raise NonFiniteError(f"accuracy on {task.name}/{split} is not finite.")
    return acc


@torch.no_grad()
def features_correct(features: torch.Tensor, head: nn.Module, task: TaskData, split: str) -> list[int]:
    """Per example of ``task``'s ``split``, 1 where ``head(features).argmax(-1)`` is the label,
    else 0 (what :func:`~.statistics.paired_bootstrap` resamples).

    Raises:
        NonFiniteError: NaN/inf features.
        ValueError: not one row of features per example.
    """
    if not torch.isfinite(features).all():
        raise NonFiniteError(f"the encoder produced NaN/inf features on {task.name}/{split}.")
    labels = torch.as_tensor(list(task.split(split).labels))
    if features.shape[0] != labels.numel():
        raise ValueError(f"{task.name}/{split}: {features.shape[0]} rows of features for {labels.numel()} examples.")
    return (head(features).argmax(-1).cpu() == labels).int().tolist()


@torch.no_grad()
def task_correct(encoder: nn.Module, head: nn.Module, tokenizer, task: TaskData, split: str = "test", *,
                 batch_size: int = 64, max_length: int = 64) -> list[int]:
    """:func:`features_correct` of ``encoder``'s features (one forward pass over the split, as
    :func:`task_accuracy` makes)."""
    feats = encode(encoder, tokenizer, task.split(split).texts, batch_size=batch_size, max_length=max_length,
                   progress=False, desc=f"eval {task.name}/{split}")
    return features_correct(feats, head, task, split)


def cached_tangent_evaluation(editor: TangentEditor, heads: Mapping[str, nn.Module], tokenizer,
                              tasks: Sequence[TaskData], splits: Sequence[str] = ("val", "test"), *,
                              batch_size: int = 64, max_length: int = 64, progress: bool = False):
    """A :class:`~.tangent_outputs.TangentOutputs` of pooled features and its ``evaluate``.

    The features of every task's ``splits`` are computed once at ``theta0`` and once per task
    vector; afterwards any coefficients cost a weighted sum and a head, exactly what
    ``editor`` would give (mean pooling is linear). Use the pair wherever a
    :class:`~.editing.TangentEditor` and :func:`evaluate_tasks` would go::

        cache, evaluate = cached_tangent_evaluation(TangentEditor(lin, vectors), heads, tok, tasks)
        result = task_addition(cache, evaluate, finetuned_val=..., finetuned_test=...)

    Returns:
        ``(cache, evaluate)`` with ``evaluate(point, split) -> {task: accuracy}`` over ``tasks``.
    """
    from .tangent_outputs import TangentOutputs

    def outputs(model):
        return {(t.name, s): encode(model, tokenizer, t.split(s).texts, batch_size=batch_size, max_length=max_length,
                                    progress=False, desc=f"{t.name}/{s}") for t in tasks for s in splits}

    cache = TangentOutputs(editor, outputs, progress=progress)

    def evaluate(point, split: str) -> dict[str, float]:
        return {t.name: features_accuracy(point.output((t.name, split)), heads[t.name], t, split) for t in tasks}

    return cache, evaluate


def evaluate_tasks(encoder: nn.Module, heads: Mapping[str, nn.Module], tokenizer, tasks: Sequence[TaskData],
                   split: str = "test", **kwargs) -> dict[str, float]:
    """``{task name: accuracy}`` over ``tasks`` (each through its own frozen head)."""
    return {t.name: task_accuracy(encoder, heads[t.name], tokenizer, t, split, **kwargs) for t in tasks}


def mean(values: Sequence[float]) -> float:
    """The average of ``values`` (NaN when empty)."""
    values = list(values)
    return sum(values) / len(values) if values else float("nan")
