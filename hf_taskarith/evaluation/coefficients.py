"""Learned merging coefficients (AdaMerging / aTLAS-style).

The coefficients ``lambda[t, g]`` (task ``t``, group ``g`` of tensors) are trained by gradient
descent on a few validation batches, with the model's weights ``theta0 + sum_t lambda[t, g(n)]
tau_t[n]`` substituted through ``torch.func.functional_call`` (the model itself is never
modified). The objective is the prediction entropy (unlabelled data, as in AdaMerging) or the
cross-entropy (labelled data).

For a :class:`~hf_taskarith.LinearizedModel` the coefficients are learned in the tangent
space, where linearized task vectors were trained and are meant to be combined: the model's
``delta`` is replaced by ``sum_t lambda[t, g(n)] tau_t[n]`` and the forward is
``f_lin(x; theta0 + delta)`` (exactly linear in the coefficients). Weight-space coefficients
for a linearized vector (an ordinary model given) remain possible, and are a first-order
approximation of what was trained.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch.func import functional_call
from tqdm.auto import tqdm

from ..state import float_state_dict
from ..task_vector import TaskVector

Forward = Callable[[torch.nn.Module, Any, str], torch.Tensor]  # (model, batch, task) -> logits
_LAYER = re.compile(r"(?:^|\.)(layers?|h|blocks?)\.(\d+)\.")  # also at the start: blocks.0.attn...


def layer_of(name: str) -> str:
    """The block a tensor belongs to (``encoder.layer.3``), or its first module for the rest."""
    m = _LAYER.search(name)
    return name[: m.end() - 1] if m else name.split(".")[0]


class _Call(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, forward: Forward):
        super().__init__()
        self.model, self._forward = model, forward

    def forward(self, batch: Any, task: str) -> torch.Tensor:
        return self._forward(self.model, batch, task)


def learn_coefficients(model: torch.nn.Module, task_vectors: Mapping[str, TaskVector],
                       batches: Mapping[str, Sequence[Any]], forward: Forward, *,
                       granularity: Literal["task", "layer", "tensor"] = "layer",
                       objective: Literal["entropy", "cross_entropy"] = "entropy",
                       labels: Callable[[Any], torch.Tensor] | None = None, steps: int = 50, lr: float = 1e-2,
                       init: float = 0.3, bounds: tuple[float, float] = (0.0, 1.0),
                       progress: bool = False) -> dict[str, dict[str, float]]:
    """Learn per-task (and per-layer or per-tensor) coefficients on a few batches.

    Args:
        model: the base model (left unchanged).
        task_vectors: ``{task: TaskVector}``.
        batches: ``{task: [batch, ...]}``; one batch per task is used per step, cycling.
        forward: ``forward(model, batch, task) -> logits`` (e.g. encoder + the task's head).
        granularity: one coefficient per task, per task and layer (block), or per task and tensor.
        objective: ``"entropy"`` (no labels needed) or ``"cross_entropy"`` (needs ``labels(batch)``).

    Returns:
        ``{task: {tensor name: coefficient}}``, usable with :class:`ModelEditor.set` (for a
        ``LinearizedModel``: learned in the tangent space, see the module docstring).

    Raises:
        KeyMismatchError: a ``LinearizedModel`` given, and a task vector holds tensors that are
            not among its linearized parameters.

    Note:
        Cost per step: one forward and backward per task through the model, plus building the
        merged weights (``n_tasks`` multiply-adds per parameter).
    """
    if objective == "cross_entropy" and labels is None:
        raise ValueError("objective='cross_entropy' needs labels=lambda batch: tensor_of_labels.")
    tasks = list(task_vectors)
    names = sorted({n for tv in task_vectors.values() for n in tv.keys()})
    tangent = hasattr(model, "load_task_vector") and hasattr(model, "deltas")  # a LinearizedModel
    if tangent:
        base, target = _tangent_targets(model, names)
    else:
        base = {k: v.detach() for k, v in float_state_dict(model).items()}
        target = {n: n for n in names}
    group = {n: ("all" if granularity == "task" else layer_of(n) if granularity == "layer" else n) for n in names}
    groups = sorted(set(group.values()))
    gi = {g: i for i, g in enumerate(groups)}
    deltas = {t: {n: tv[n].to(torch.float32) for n in tv.keys()} for t, tv in task_vectors.items()}
    lam = torch.nn.Parameter(torch.full((len(tasks), len(groups)), float(init)))
    opt = torch.optim.Adam([lam], lr=lr)
    call = _Call(model, forward)
    was_training = model.training
    model.eval()
    for step in tqdm(range(steps), desc="learning coefficients", disable=not progress):
        params = {}
        for n in names:
            w = base[n].to(torch.float32)
            for ti, t in enumerate(tasks):
                if n in deltas[t]:
                    w = w + lam[ti, gi[group[n]]] * deltas[t][n]
            params[f"model.{target[n]}"] = w.to(base[n].dtype)
        loss = 0.0
        for t in tasks:
            batch = batches[t][step % len(batches[t])]
            logits = functional_call(call, params, (batch, t))
            if objective == "entropy":
                logp = logits.log_softmax(-1)
                loss = loss + -(logp.exp() * logp).sum(-1).mean()
            else:
                loss = loss + torch.nn.functional.cross_entropy(logits, labels(batch))
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            lam.clamp_(*bounds)
    model.train(was_training)
    out = lam.detach()
    return {t: {n: float(out[ti, gi[group[n]]]) for n in names if n in deltas[t]} for ti, t in enumerate(tasks)}


def _tangent_targets(model: torch.nn.Module, names: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """For a LinearizedModel: ``delta`` at 0 as the base of every name, and each task-vector
    name's ``delta`` parameter path inside the model (what ``functional_call`` replaces)."""
    from ..errors import KeyMismatchError, format_names

    deltas = model.deltas()
    missing = [n for n in names if n not in deltas]
    if missing:
        raise KeyMismatchError(f"the task vectors hold {len(missing)} tensors that are not linearized parameters of "
                               f"this LinearizedModel: {format_names(missing)}. Learn coefficients for vectors "
                               "trained on this model, or pass the plain model to learn them in weight space.")
    path = {id(p): k for k, p in model.named_parameters(remove_duplicate=False)}
    base = {n: torch.zeros_like(deltas[n].detach()) for n in names}
    return base, {n: path[id(deltas[n])] for n in names}
