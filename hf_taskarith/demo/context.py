"""The demo's shared state and its registry of named steps.

A step is a function ``step(ctx: DemoContext) -> None`` that reads what earlier steps left
in the context and adds its own results. :data:`DEMO_STEPS` lists them in order; later
features (linearized fine-tuning, Hub push/pull) add theirs with :func:`register_demo_step`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from ..evaluation.task_accuracy import evaluate_tasks
from ..task_vector import TaskVector
from ..training.encoders import load_encoder, progress_disabled
from ..training.tasks import TaskData
from .config import DemoConfig
from .report import DemoResults


@dataclass
class DemoContext:
    """State shared by the demo's steps.

    Attributes:
        config: the run's settings.
        output_dir: the (absolute) output folder.
        tasks: the loaded tasks, in ``config.tasks`` order.
        base_dir: the pre-trained encoder's checkpoint folder (under ``output_dir``).
        base_encoder, tokenizer: the pre-trained encoder (never modified) and its tokenizer.
        heads: task -> frozen head.
        finetuned_dirs, task_vector_dirs: task -> folder.
        task_vectors: task -> the task vector the merge and negation steps use (the local
            one, or the copy pulled back from the Hub by tag).
        hub: what the hub step pushed and pulled (endpoint, repos, tags, commit shas).
        val_pretrained: task -> validation accuracy of the pre-trained encoder.
        results: what the report step writes.
    """

    config: DemoConfig
    output_dir: Path
    tasks: list[TaskData] = field(default_factory=list)
    base_dir: Path | None = None
    base_model_id: str = ""
    base_encoder: nn.Module | None = None
    tokenizer: Any = None
    heads: dict[str, nn.Module] = field(default_factory=dict)
    finetuned_dirs: dict[str, Path] = field(default_factory=dict)
    task_vector_dirs: dict[str, Path] = field(default_factory=dict)
    task_vectors: dict[str, TaskVector] = field(default_factory=dict)
    hub: dict[str, Any] = field(default_factory=dict)
    val_pretrained: dict[str, float] = field(default_factory=dict)
    results: DemoResults | None = None
    xi_grid: Any = None
    _tangent: nn.Module | None = field(default=None, repr=False)

    @property
    def linear(self) -> bool:
        return self.config.mode == "linear"

    def tangent_model(self) -> nn.Module:
        """One :class:`LinearizedModel` of the base encoder, reused for every tangent-space evaluation."""
        if self._tangent is None:
            from ..linearize import LinearizedModel

            self._tangent = LinearizedModel(self.base_encoder).eval()
        return self._tangent

    def edited_encoder(self, task_vector: TaskVector, scaling: float = 1.0) -> nn.Module:
        """The encoder at ``theta0 + scaling * tau``: in the tangent space in linear mode
        (``f_lin``, how linearized vectors were trained), else the non-linear model."""
        if self.linear:
            return self.tangent_model().load_task_vector(task_vector, scaling=scaling)
        return task_vector.apply_to(self.base_encoder, scaling=scaling)  # a new model

    def evaluate(self, encoder: nn.Module, split: str, *, desc: str = "") -> dict[str, float]:
        """Accuracy of ``encoder`` on every task's ``split`` (a progress bar over tasks)."""
        c = self.config
        bar = tqdm(self.tasks, desc=f"eval {desc} ({split})".replace("  ", " "), unit="task", leave=False,
                   disable=progress_disabled(c.progress))
        return {t.name: evaluate_tasks(encoder, self.heads, self.tokenizer, [t], split, batch_size=c.eval_batch_size,
                                       max_length=c.max_length)[t.name] for t in bar}

    def evaluate_folder(self, folder: Path, split: str, *, desc: str = "") -> dict[str, float]:
        """Accuracy of the checkpoint in ``folder`` (written by the merge engine). In linear
        mode its difference from the base is evaluated in the tangent space."""
        if self.linear:
            edited = self.edited_encoder(TaskVector.from_checkpoints(self.base_dir, folder))
        else:
            edited = load_encoder(folder)
        return self.evaluate(edited, split, desc=desc or folder.name)


StepFn = Callable[[DemoContext], None]


@dataclass(frozen=True)
class DemoStep:
    name: str
    fn: StepFn
    description: str


DEMO_STEPS: list[DemoStep] = []


def register_demo_step(name: str, fn: StepFn, *, description: str, before: str | None = None) -> None:
    """Add a step to the demo, at the end or before the step named ``before``.

    Raises:
        ValueError: ``name`` is already a step, or ``before`` is not one.
    """
    names = [s.name for s in DEMO_STEPS]
    if name in names:
        raise ValueError(f"demo step {name!r} is already registered.")
    step = DemoStep(name, fn, description)
    if before is None:
        DEMO_STEPS.append(step)
    elif before in names:
        DEMO_STEPS.insert(names.index(before), step)
    else:
        raise ValueError(f"cannot insert before unknown demo step {before!r}; steps: {names}.")
