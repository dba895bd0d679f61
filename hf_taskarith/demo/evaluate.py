"""Accuracy of an encoder on every task through the tasks' frozen heads."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..errors import NonFiniteError
from .data import TaskData
from .models import encode


@torch.no_grad()
def task_accuracy(encoder: nn.Module, head: nn.Module, tokenizer, task: TaskData, split: str = "test", *,
                  batch_size: int = 64, max_length: int = 64, progress: bool = False) -> float:
    """Fraction of ``task``'s ``split`` that ``head(encoder(text))`` classifies correctly.

    Raises:
        NonFiniteError: the encoder produced NaN/inf features.
    """
    data = task.split(split)
    feats = encode(encoder, tokenizer, data.texts, batch_size=batch_size, max_length=max_length,
                   progress=progress, desc=f"eval {task.name}/{split}")
    if not torch.isfinite(feats).all():
        raise NonFiniteError(f"the encoder produced NaN/inf features on {task.name}/{split}.")
    pred = head(feats).argmax(-1)
    acc = float((pred == torch.tensor(data.labels)).float().mean())
    if not math.isfinite(acc):
        raise NonFiniteError(f"accuracy on {task.name}/{split} is not finite.")
    return acc


def evaluate_tasks(encoder: nn.Module, heads: Mapping[str, nn.Module], tokenizer, tasks: Sequence[TaskData],
                   split: str = "test", **kwargs) -> dict[str, float]:
    """``{task name: accuracy}`` over ``tasks`` (each through its own frozen head)."""
    return {t.name: task_accuracy(encoder, heads[t.name], tokenizer, t, split, **kwargs) for t in tasks}


def mean(values: Sequence[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")
