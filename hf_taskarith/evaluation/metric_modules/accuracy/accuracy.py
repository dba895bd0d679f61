"""Accuracy: the fraction of predictions equal to their references.

An ``evaluate`` metric module shipped with hf_taskarith so that ``evaluate.load`` works
offline: ``evaluate.load("<this folder>")``. The result matches the Hub's ``accuracy``
metric (``{"accuracy": float}``; ``normalize=False`` gives the count, ``sample_weight``
weights each example) without needing scikit-learn.

Example:
    >>> metric = evaluate.load("hf_taskarith/evaluation/metric_modules/accuracy")
    >>> metric.compute(predictions=[0, 1, 1], references=[0, 1, 0])
    {'accuracy': 0.6666666666666666}
"""

from __future__ import annotations

import datasets
import evaluate

_DESCRIPTION = "Accuracy = (number of correct predictions) / (number of predictions)."
_INPUTS = """
Args:
    predictions (list of int): predicted class ids.
    references (list of int): true class ids.
    normalize (bool): True (default) returns the fraction correct, False the number correct.
    sample_weight (list of float): optional weight of each example.
Returns:
    accuracy (float): the fraction (or weighted count) of correct predictions.
"""


class Accuracy(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_INPUTS,
            features=datasets.Features({"predictions": datasets.Value("int64"),
                                        "references": datasets.Value("int64")}))

    def _compute(self, predictions, references, normalize: bool = True, sample_weight=None) -> dict[str, float]:
        if len(predictions) != len(references):
            raise ValueError(f"got {len(predictions)} predictions but {len(references)} references; "
                             "pass one prediction per reference.")
        weights = [1.0] * len(predictions) if sample_weight is None else [float(w) for w in sample_weight]
        if len(weights) != len(predictions):
            raise ValueError(f"sample_weight has {len(weights)} entries for {len(predictions)} predictions.")
        correct = sum(w for p, r, w in zip(predictions, references, weights) if int(p) == int(r))
        if not normalize:
            return {"accuracy": float(correct)}
        total = sum(weights)
        if total <= 0:
            raise ValueError("accuracy of zero examples (or zero total weight) is undefined.")
        return {"accuracy": float(correct / total)}
