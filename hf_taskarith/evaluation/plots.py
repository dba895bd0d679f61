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


def plot_similarity_matrices(matrices: Mapping[str, tuple[list[str], torch.Tensor]], path: str | os.PathLike, *,
                             digits: int = 3, title: str = "") -> Path:
    """Several similarity matrices side by side on one colour scale (e.g. the mean task-vector
    cosines of two fine-tuning modes), the diagonal left blank so small off-diagonal values show.

    Args:
        matrices: ``{panel title: (task names, square matrix)}``.
        path: the PNG to write.
        digits: decimals printed in each cell.
        title: a title over all panels.

    Raises:
        ValueError: no matrix, or a matrix that is not square with one name per row.
    """
    if not matrices:
        raise ValueError("plot_similarity_matrices needs at least one matrix.")
    for label, (names, m) in matrices.items():
        if tuple(m.shape) != (len(names), len(names)):
            raise ValueError(f"matrix {label!r} has shape {tuple(m.shape)}; expected ({len(names)}, {len(names)}) "
                             "for its names.")
    off = [m.masked_fill(torch.eye(len(n), dtype=torch.bool), float("nan")) for n, m in matrices.values()]
    top = max(float(o.nan_to_num(0.0).abs().max()) for o in off) or 1.0
    plt = _pyplot()
    n = max(len(names) for names, _ in matrices.values())
    cols = min(2, len(matrices))
    rows = -(-len(matrices) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=((1.8 + 0.75 * n) * cols + 0.8, (1.4 + 0.65 * n) * rows),
                             squeeze=False, layout="constrained")
    flat = list(axes.flat)
    for ax in flat[len(matrices):]:
        ax.axis("off")
    for ax, (label, (names, _)), m in zip(flat, matrices.items(), off):
        im = ax.imshow(m.numpy(), vmin=-top, vmax=top, cmap="coolwarm")
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        for i in range(len(names)):
            for j in range(len(names)):
                if i != j:
                    ax.text(j, i, f"{m[i, j]:.{digits}f}", ha="center", va="center", fontsize=7)
        ax.set_title(label, fontsize=10)
    fig.colorbar(im, ax=flat, fraction=0.03, shrink=0.8)
    if title:
        fig.suptitle(title)
    return _save(plt, fig, path, tight=False)


def _save(plt, fig, path: str | os.PathLike, *, tight: bool = True) -> Path:
    """Write ``fig`` to ``path`` (parent folders created), close it, return the path
    (``tight=False`` for figures laid out by matplotlib's constrained layout)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if tight:
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


#: one point of a curve: ``(x, estimate, low, high)`` (an interval, e.g. 95% over seeds)
Point = tuple[float, float, float, float]


def plot_interval_curves(panels: Mapping[str, Mapping[str, list[Point]]], path: str | os.PathLike, *,
                         xlabel: Mapping[str, str] | None = None, ylabel: str | Mapping[str, str] = "accuracy (%)",
                         logx: Mapping[str, bool] | None = None,
                         reference: Mapping[str, list[tuple[float, float]]] | None = None,
                         styles: Mapping[str, Mapping] | None = None, dodge: float = 0.0) -> Path:
    """Side-by-side panels of curves with interval bars (e.g. merged accuracy vs learning rate
    per training mode, and vs number of tasks).

    Args:
        panels: ``{panel title: {curve label: [(x, estimate, low, high), ...]}}``.
        xlabel, logx: per panel title (default: ``"x"``, linear axis).
        reference: per panel title, ``[(x, y), ...]`` drawn dashed and labelled "pre-trained".
        ylabel: one label, or one per panel title.
        styles: per curve label, keyword arguments for matplotlib's ``errorbar`` (colour, line style).
        dodge: spread the curves of a panel sideways by this much (in decades on a log axis), so
            their interval bars do not hide each other; the points' x values are unchanged.

    Raises:
        ValueError: no panel, or a panel without a curve.
    """
    if not panels or any(not curves for curves in panels.values()):
        raise ValueError(f"plot_interval_curves needs at least one panel, each with a curve; got "
                         f"{ {k: len(v) for k, v in panels.items()} }.")
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 3.6), squeeze=False)
    for ax, (title, curves) in zip(axes[0], panels.items()):
        log = bool((logx or {}).get(title))
        for i, (label, points) in enumerate(curves.items()):
            xs, est, lo, hi = (list(v) for v in zip(*sorted(points)))
            shift = dodge * (i - (len(curves) - 1) / 2)
            xs = [x * 10 ** shift if log else x + shift for x in xs]
            style = {"marker": "o", "capsize": 3, **(styles or {}).get(label, {})}
            ax.errorbar(xs, est, yerr=[[e - low for e, low in zip(est, lo)], [h - e for e, h in zip(est, hi)]],
                        label=label, **style)
        if reference and reference.get(title):
            rx, ry = zip(*sorted(reference[title]))
            ax.plot(rx, ry, "k--", marker="x", label="pre-trained")
        if log:
            ax.set_xscale("log")
            ax.minorticks_off()
        ticks = sorted({p[0] for points in curves.values() for p in points})  # the measured x values
        ax.set_xticks(ticks, [f"{x:g}" for x in ticks])
        ax.set_xlabel((xlabel or {}).get(title, "x"))
        ax.set_ylabel(ylabel if isinstance(ylabel, str) else ylabel.get(title, ""))
        ax.set_title(title)
        ax.legend(fontsize=8)
    return _save(plt, fig, path)
