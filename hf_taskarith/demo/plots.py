"""The demo's accuracy plot: mean test accuracy of every model, with the per-task values."""

from __future__ import annotations

import os
from pathlib import Path

from ..evaluation.plots import _pyplot
from .report import DemoResults


def plot_accuracies(results: DemoResults, path: str | os.PathLike, *, title: str = "") -> Path:
    """Horizontal bars of each row's mean accuracy; one marker per task on top."""
    plt = _pyplot()
    rows = results.rows
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(rows) + 1.4))
    y = list(range(len(rows)))[::-1]
    ax.barh(y, [100 * r.average for r in rows], color="#9ecae1", label="mean over tasks")
    markers = "osD^v<>"
    for k, task in enumerate(results.tasks):
        ax.scatter([100 * r.accuracies[task] for r in rows], y, s=18, marker=markers[k % len(markers)],
                   zorder=3, label=task)
    ax.set_yticks(y, [r.name for r in rows], fontsize=8)
    ax.set_xlabel("test accuracy (%)")
    ax.set_xlim(0, 100)
    ax.legend(fontsize=7, loc="lower right")
    mode = results.config.get("mode", "")
    ax.set_title(title or f"hf_taskarith demo ({mode})".replace(" ()", ""))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
