"""Metrics through ``evaluate``, from the modules shipped in :mod:`.metric_modules` (offline).

``evaluate.load("accuracy")`` fetches a script from the Hub; :func:`load_metric` loads the
package's own copy from a local path instead, so metrics work with ``HF_HUB_OFFLINE=1`` and
without a network. :func:`compute_metrics_fn` adapts a metric to the Trainer's
``compute_metrics``.

Example:
    >>> load_metric("accuracy").compute(predictions=[0, 1], references=[0, 0])
    {'accuracy': 0.5}
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import TaskArithError

METRIC_MODULES = Path(__file__).resolve().parent / "metric_modules"


class MissingMetricError(TaskArithError, LookupError):
    """No such metric module, or the ``evaluate`` package is not installed."""


def list_metrics() -> list[str]:
    """Names of the metric modules shipped with the package."""
    return sorted(p.name for p in METRIC_MODULES.iterdir() if (p / f"{p.name}.py").is_file())


def metric_path(name: str) -> Path:
    """The folder of the shipped metric module ``name`` (what ``evaluate.load`` takes).

    Raises:
        MissingMetricError: no module of that name (the message lists the ones there are).
    """
    folder = METRIC_MODULES / name
    if not (folder / f"{name}.py").is_file():
        raise MissingMetricError(f"no metric module {name!r} in {METRIC_MODULES}; shipped metrics: {list_metrics()}. "
                                 "Pass one of those, or call evaluate.load() yourself for another metric.")
    return folder


def load_metric(name: str = "accuracy", **kwargs: Any):
    """``evaluate.load`` of a shipped metric module, from its local path (no Hub access).

    Args:
        name: a shipped metric (:func:`list_metrics`), e.g. ``"accuracy"``.
        **kwargs: passed to ``evaluate.load`` (``experiment_id``, ``keep_in_memory``, ...).

    Returns:
        An ``evaluate.EvaluationModule``.

    Raises:
        MissingMetricError: unknown name, or ``evaluate`` is not installed.

    Note:
        Cost: the first load copies the module into the ``evaluate`` modules cache
        (``HF_MODULES_CACHE``); later loads import it from there (milliseconds).
    """
    folder = metric_path(name)
    try:
        import evaluate
    except ImportError:
        raise MissingMetricError("metrics go through the `evaluate` package, which is not installed. "
                                 "Run: pip install 'hf_taskarith[eval]' (or pip install evaluate).") from None
    kwargs.setdefault("keep_in_memory", True)
    return evaluate.load(str(folder), **kwargs)


def compute_metrics_fn(name: str = "accuracy") -> Callable[[Any], dict[str, float]]:
    """A Trainer ``compute_metrics`` that takes the argmax of the logits and computes ``name``.

    Example:
        >>> trainer = LinearizedTrainer(..., compute_metrics=compute_metrics_fn("accuracy"))
    """
    metric = load_metric(name)

    def compute(eval_pred: Any) -> dict[str, float]:
        logits, labels = eval_pred.predictions, eval_pred.label_ids
        logits = logits[0] if isinstance(logits, tuple) else logits
        return metric.compute(predictions=logits.argmax(-1).tolist(), references=labels.tolist())

    return compute
