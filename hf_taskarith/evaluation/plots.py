"""Heat maps: weight disentanglement error and task-vector cosine similarities (PNG)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from ..task_vector import TaskVector
from .disentanglement import DisentanglementGrid


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # optional dependency
        raise ImportError("plots need matplotlib: pip install 'hf_taskarith[plots]'") from e
    return plt


def cosine_matrix(task_vectors: Mapping[str, TaskVector]) -> tuple[list[str], torch.Tensor]:
    """Pairwise cosine similarities of task vectors."""
    names = list(task_vectors)
    m = torch.eye(len(names))
    for i, a in enumerate(names):
        for j in range(i + 1, len(names)):
            m[i, j] = m[j, i] = task_vectors[a].cosine_similarity(task_vectors[names[j]])
    return names, m


def plot_cosine_matrix(task_vectors: Mapping[str, TaskVector], path: str | os.PathLike, *, title: str = "") -> Path:
    names, m = cosine_matrix(task_vectors)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * len(names), 1.0 + 0.6 * len(names)))
    im = ax.imshow(m.numpy(), vmin=-1, vmax=1, cmap="coolwarm")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_title(title or "task vector cosine similarity")
    return _save(plt, fig, path)


def _save(plt, fig, path: str | os.PathLike) -> Path:
    """Write ``fig`` to ``path`` (parent folders created), close it, return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_disentanglement(grid: DisentanglementGrid, path: str | os.PathLike, *, title: str = "",
                         vmax: float | None = None) -> Path:
    """Heat map of ``grid.xi`` over the two coefficients. ``vmax`` fixes the top of the colour
    scale (e.g. the same for several modes, so their maps compare); ``None``: the grid's max."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.6, 4))
    a = list(grid.alphas)
    half = (a[-1] - a[0]) / (2 * (len(a) - 1)) if len(a) > 1 else 0.5  # cells centred on their alphas
    lo, hi = a[0] - half, a[-1] + half
    im = ax.imshow(grid.xi.T.numpy(), origin="lower", cmap="viridis", vmin=0, vmax=vmax,
                   extent=(lo, hi, lo, hi), aspect="auto")
    ax.set_xlabel(f"alpha ({grid.tasks[0]})")
    ax.set_ylabel(f"alpha ({grid.tasks[1]})")
    fig.colorbar(im, ax=ax, label="disentanglement error xi")
    ax.set_title(title or f"xi: {grid.tasks[0]} + {grid.tasks[1]}")
    return _save(plt, fig, path)
