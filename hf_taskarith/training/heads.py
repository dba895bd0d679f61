"""Frozen classification heads on sentence features: a linear probe or a random projection.

This is the closed-vocabulary setting of the task-arithmetic papers: every task keeps a
fixed classification head, so fine-tuning, and hence every task vector, lives entirely in
the shared encoder, and any edited encoder can be scored on every task by plugging in the
frozen heads. Heads are made from the *pre-trained* encoder and never change afterwards.

Example:
    >>> head = make_head("probe", encoder, tokenizer, texts, labels, 2, generator=torch.Generator())
    >>> save_heads({"spam": head}, {"spam": ("ham", "spam")}, "heads/")
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from ..errors import NonFiniteError
from .encoders import encode

HEADS_FILE = "heads.safetensors"
HEADS_CONFIG = "heads_config.json"


def fit_linear_probe(features: torch.Tensor, labels: Sequence[int] | torch.Tensor, num_labels: int, *,
                     l2: float = 0.05, max_iter: int = 200,
                     scaling: Literal["per_feature", "global"] = "per_feature") -> nn.Linear:
    """Multinomial logistic regression on frozen features, returned as one ``nn.Linear``.

    Features are standardized for the fit and the standardization is folded into the
    layer, so it applies to raw features. Full-batch L-BFGS; deterministic. ``l2`` (on the
    standardized weights) is fairly strong by default: a probe that fits its training set
    perfectly leaves fine-tuning on the same examples almost no signal.

    ``scaling="per_feature"`` divides every centred feature by its own standard deviation;
    ``"global"`` divides all of them by one scale (their mean standard deviation), so the
    penalty treats all raw weights alike. Use ``"global"`` when many features are nearly
    constant (e.g. pooled ReLU6 features of a CNN on small images): per-feature scaling gives
    them huge weights, and fine-tuning, which moves such a feature a little, makes the
    logits explode.

    Note:
        Cost: ``max_iter`` full passes over a ``(n, hidden)`` matrix; well under a second
        for a few thousand 384-d features.
    """
    x = features.detach().double()
    y = torch.as_tensor(labels if isinstance(labels, torch.Tensor) else list(labels), dtype=torch.long)
    if scaling == "per_feature":
        mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    elif scaling == "global":
        mu, sd = x.mean(0), x.std(0).mean().clamp_min(1e-12)
    else:
        raise ValueError(f"unknown scaling {scaling!r}; expected 'per_feature' or 'global'.")
    z = (x - mu) / sd
    w = torch.zeros(num_labels, z.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_labels, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(z @ w.T + b, y) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    head = nn.Linear(z.shape[1], num_labels)
    with torch.no_grad():
        weight = w.detach() / sd
        head.weight.copy_(weight.float())
        head.bias.copy_((b.detach() - weight @ mu).float())
    return freeze(head)


def random_head(hidden: int, num_labels: int, *, generator: torch.Generator) -> nn.Linear:
    """A fixed random projection head (rows of unit norm scaled to give O(1) logits)."""
    head = nn.Linear(hidden, num_labels)
    with torch.no_grad():
        w = torch.randn(num_labels, hidden, generator=generator)
        head.weight.copy_(w / w.norm(dim=1, keepdim=True) * hidden ** 0.5)
        head.bias.zero_()
    return freeze(head)


def freeze(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


def make_head(kind: Literal["probe", "random"], encoder: nn.Module, tokenizer, texts: Sequence[str],
              labels: Sequence[int], num_labels: int, *, generator: torch.Generator, max_length: int = 64,
              batch_size: int = 64, probe_l2: float = 0.05, progress: bool = False,
              desc: str = "probe") -> nn.Linear:
    """A frozen head for one task, made from the *pre-trained* encoder."""
    if kind == "probe":
        feats = encode(encoder, tokenizer, texts, batch_size=batch_size, max_length=max_length,
                       progress=progress, desc=desc)
        return fit_linear_probe(feats, labels, num_labels, l2=probe_l2)
    if kind == "random":
        hidden = int(encoder.config.hidden_size)
        return random_head(hidden, num_labels, generator=generator)
    raise ValueError(f"unknown head kind {kind!r}; expected 'probe' or 'random'.")


def task_heads(kind: Literal["probe", "random"], encoder: nn.Module, tokenizer, tasks: Sequence, *,
               generator: torch.Generator, **options) -> dict[str, nn.Linear]:
    """One frozen head per task (``task.name -> head``), each made by :func:`make_head` from its
    training split; random heads draw from ``generator`` in task order, so they differ between tasks.

    Args:
        kind: ``"probe"`` (a linear probe on the pre-trained features) or ``"random"``.
        encoder, tokenizer: the *pre-trained* encoder and its tokenizer.
        tasks: :class:`~hf_taskarith.training.tasks.TaskData` objects (anything with ``name``,
            ``train.texts``, ``train.labels`` and ``num_labels``).
        generator: seeds random heads (probes are deterministic and ignore it).
        options: passed to :func:`make_head` (``max_length``, ``probe_l2``, ...).

    Raises:
        ValueError: two tasks share a name (their heads would overwrite each other).
    """
    names = [t.name for t in tasks]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"tasks {twice} appear more than once; pass each task once.")
    return {t.name: make_head(kind, encoder, tokenizer, t.train.texts, t.train.labels, t.num_labels,
                              generator=generator, **options) for t in tasks}


def save_heads(heads: Mapping[str, nn.Linear], label_names: Mapping[str, Sequence[str]],
               folder: str | os.PathLike) -> Path:
    """Write every head to ``heads.safetensors`` (keys ``<task>.weight``/``<task>.bias``) + a JSON config."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for task, head in heads.items():
        for k, v in head.state_dict().items():
            if not torch.isfinite(v).all():
                raise NonFiniteError(f"head of task {task!r}: {k} has NaN/inf.")
            tensors[f"{task}.{k}"] = v.detach().contiguous()
    tmp = folder / (HEADS_FILE + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "hf_taskarith.demo_heads"})
    os.replace(tmp, folder / HEADS_FILE)
    cfg = {t: {"labels": list(label_names[t]), "hidden_size": int(h.in_features)} for t, h in heads.items()}
    (folder / HEADS_CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True))
    return folder


def load_heads(folder: str | os.PathLike) -> dict[str, nn.Linear]:
    """Read heads written by :func:`save_heads` (frozen)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg = json.loads((folder / HEADS_CONFIG).read_text())
    tensors = load_file(str(folder / HEADS_FILE))
    heads = {}
    for task, info in cfg.items():
        head = nn.Linear(info["hidden_size"], len(info["labels"]))
        head.load_state_dict({"weight": tensors[f"{task}.weight"], "bias": tensors[f"{task}.bias"]})
        heads[task] = freeze(head)
    return heads
