"""Weight disentanglement error (Ortiz-Jimenez et al., 2023, eq. 5).

For two tasks with vectors tau_1, tau_2 and coefficients (a1, a2)::

    xi(a1, a2) = sum_{t in {1, 2}} E_{x ~ D_t} [ 1{ f(x; theta0 + a_t tau_t) != f(x; theta0 + a1 tau1 + a2 tau2) } ]

i.e. how often adding the *other* task changes the predictions on each task's own inputs.
0 means perfectly disentangled. No other library ships this metric.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .editing import ModelEditor

#: predict(model, task) -> predicted labels (LongTensor) on that task's evaluation inputs
Predict = Callable[[object, str], torch.Tensor]
DEFAULT_ALPHAS = tuple(round(-3.0 + 0.5 * i, 2) for i in range(13))  # -3 ... 3, as in the paper's plots


@dataclass
class DisentanglementGrid:
    tasks: tuple[str, str]
    alphas: tuple[float, ...]
    xi: torch.Tensor  # [len(alphas), len(alphas)]: xi[i, j] = xi(alphas[i], alphas[j])

    def mean_within(self, radius: float) -> float:
        """Mean xi over the grid points with |a1|, |a2| <= radius (a summary number)."""
        a = torch.tensor(self.alphas)
        keep = (a.abs() <= radius)
        return float(self.xi[keep][:, keep].mean())

    def mean_positive_quadrant(self) -> float:
        """Mean xi over the grid points with both coefficients >= 0: where task addition operates
        (the paper's figures span negative coefficients too, which negation uses).

        Raises:
            ValueError: the grid has no coefficient >= 0.
        """
        keep = torch.tensor(self.alphas) >= 0
        if not bool(keep.any()):
            raise ValueError(f"no coefficient >= 0 in the grid {self.alphas}: the positive quadrant is empty.")
        return float(self.xi[keep][:, keep].mean())


@torch.no_grad()
def disentanglement_error(editor: ModelEditor, predict: Predict, tasks: tuple[str, str], *,
                          alphas: Sequence[float] = DEFAULT_ALPHAS, progress: bool = False) -> DisentanglementGrid:
    """Compute xi over ``alphas x alphas`` for two tasks of ``editor``.

    Cost: ``2 * len(alphas)`` single-task evaluations plus ``2 * len(alphas)**2`` joint ones.
    """
    t1, t2 = tasks
    single: dict[tuple[str, float], torch.Tensor] = {}
    for t in (t1, t2):
        for a in alphas:
            with editor.edited({t: a}) as model:
                single[(t, a)] = predict(model, t).cpu()
    xi = torch.zeros(len(alphas), len(alphas))
    grid = [(i, j) for i in range(len(alphas)) for j in range(len(alphas))]
    for i, j in tqdm(grid, desc=f"disentanglement {t1}/{t2}", disable=not progress):
        a1, a2 = alphas[i], alphas[j]
        with editor.edited({t1: a1, t2: a2}) as model:
            d1 = (predict(model, t1).cpu() != single[(t1, a1)]).float().mean()
            d2 = (predict(model, t2).cpu() != single[(t2, a2)]).float().mean()
        xi[i, j] = d1 + d2
    return DisentanglementGrid((t1, t2), tuple(alphas), xi)
