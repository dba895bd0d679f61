"""The addition and negation protocols shared by the text and vision studies.

Both studies score edits through ``evaluate(coefs, split, only=None) -> {task: accuracy}``
(``coefs``: task -> coefficient of its task vector; ``only``: the tasks to score, all when
``None``), so the selection rules live here once:

* addition: one shared coefficient from ``grid`` maximizing mean validation accuracy (ties
  go to the smaller coefficient), scored on test; absolute and normalized accuracy;
* negation: per target, the largest coefficient in ``grid`` whose control accuracy (the
  other tasks) stays >= 95% of the pre-trained one on validation (the smallest if none
  does, flagged ``control_budget_met: False``), scored on test.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence

Evaluate = Callable[..., dict[str, float]]


def addition(evaluate: Evaluate, names: Sequence[str], own: dict[str, float], grid: Sequence[float]) -> dict:
    """``theta0 + lambda * sum_t tau_t`` with ``lambda`` chosen on validation; ``own``: each
    task's own fine-tuned test accuracy (for normalized accuracy)."""
    search = {lam: statistics.mean(evaluate({n: lam for n in names}, "val").values()) for lam in grid}
    lam = max(search, key=lambda k: (search[k], -k))
    test = evaluate({n: lam for n in names}, "test")
    return {"lambda": lam, "test": test, "absolute": statistics.mean(test.values()),
            "normalized": statistics.mean(test[n] / own[n] for n in names), "val_search": search}


def negation(evaluate: Evaluate, names: Sequence[str], pre_val: dict[str, float], grid: Sequence[float]) -> dict:
    """``theta0 - lambda * tau_target`` for each task; ``pre_val``: pre-trained validation accuracy."""
    rows = {}
    for target in names:
        controls = [n for n in names if n != target]
        floor = 0.95 * statistics.mean(pre_val[c] for c in controls)
        chosen = None
        for lam in grid:
            val = evaluate({target: -lam}, "val", only=controls)
            if statistics.mean(val[c] for c in controls) >= floor:
                chosen = lam
        feasible = chosen is not None  # False: even the smallest lambda broke the control budget
        if chosen is None:
            chosen = grid[0]
        test = evaluate({target: -chosen}, "test")
        rows[target] = {"lambda": chosen, "control_budget_met": feasible, "target": test[target],
                        "control": statistics.mean(test[c] for c in controls)}
    return {"per_task": rows, "target": statistics.mean(r["target"] for r in rows.values()),
            "control": statistics.mean(r["control"] for r in rows.values())}
