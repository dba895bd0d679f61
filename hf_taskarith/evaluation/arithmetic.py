"""Task addition and task negation, with the scaling coefficients chosen on validation data.

Both follow the protocols of Ilharco et al. (2023) and Ortiz-Jimenez et al. (2023):

- **Addition**: ``theta0 + alpha * sum_t tau_t``; alpha maximizes the mean *normalized*
  validation accuracy (merged accuracy / the task's own fine-tuned accuracy) on a grid
  (0 to 1, step 0.05 by default). Per-task coefficients are found by coordinate ascent.
- **Negation**: ``theta0 - alpha * tau_target``; alpha is the one with the lowest target
  validation accuracy among those keeping control accuracy >= 95% of the pre-trained one
  (the control tasks are the other tasks, or the separate, unedited ones given as
  ``controls``). When no ``alpha > 0`` keeps the control budget, nothing is negated
  (``alpha = 0``) and ``budget_met`` is False: never a silent fallback to some scale.
  ``objective="chance_distance"`` selects on ``|accuracy - chance|`` instead, so an *inverted*
  classifier (below chance: the task is still known, with its labels swapped) does not count
  as forgetting; both metrics are reported either way.

Evaluation is delegated to callables, so any model family, metric or data pipeline fits:
``evaluate(model, split) -> {task: accuracy}``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from .editing import ModelEditor

Evaluate = Callable[[object, str], Mapping[str, float]]
DEFAULT_GRID = tuple(round(0.05 * i, 2) for i in range(21))


def normalized(acc: Mapping[str, float], reference: Mapping[str, float]) -> dict[str, float]:
    """Accuracy divided by the reference (fine-tuned) accuracy of the same task."""
    return {t: (acc[t] / reference[t] if reference[t] else float("nan")) for t in acc}


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


@dataclass
class AdditionResult:
    coefficients: dict[str, float]
    absolute: dict[str, float]           # test accuracy per task
    normalized: dict[str, float]         # test accuracy / fine-tuned test accuracy
    search: list[tuple[float, float]] = field(default_factory=list)  # (alpha, mean normalized val acc)

    @property
    def mean_absolute(self) -> float:
        return _mean(self.absolute.values())

    @property
    def mean_normalized(self) -> float:
        return _mean(self.normalized.values())


def task_addition(editor: ModelEditor, evaluate: Evaluate, *, finetuned_val: Mapping[str, float],
                  finetuned_test: Mapping[str, float], grid: Sequence[float] = DEFAULT_GRID,
                  per_task: bool = False, rounds: int = 2, progress: bool = False) -> AdditionResult:
    """Add every task vector with a shared (or per-task) coefficient chosen on validation.

    Args:
        editor: a :class:`ModelEditor` over the base model and the task vectors.
        evaluate: ``evaluate(model, split) -> {task: accuracy}`` for ``split`` in ``{"val", "test"}``.
        finetuned_val, finetuned_test: each task's own fine-tuned accuracy (normalizers).
        grid: candidate coefficients.
        per_task: after the shared search, refine each task's coefficient by coordinate ascent.
    """
    tasks = list(editor.task_vectors)
    search = []
    best_alpha, best_score = 0.0, float("-inf")
    for alpha in tqdm(grid, desc="addition: shared coefficient", disable=not progress):
        with editor.edited({t: alpha for t in tasks}) as model:
            score = _mean(normalized(evaluate(model, "val"), finetuned_val).values())
        search.append((alpha, score))
        if score > best_score:
            best_alpha, best_score = alpha, score
    coefs = {t: best_alpha for t in tasks}
    if per_task:
        for _ in range(rounds):
            for t in tqdm(tasks, desc="addition: per-task coefficients", disable=not progress):
                for alpha in grid:
                    trial = {**coefs, t: alpha}
                    with editor.edited(trial) as model:
                        score = _mean(normalized(evaluate(model, "val"), finetuned_val).values())
                    if score > best_score + 1e-12:
                        best_score, coefs = score, trial
    with editor.edited(coefs) as model:
        test = dict(evaluate(model, "test"))
    return AdditionResult(coefs, test, normalized(test, finetuned_test), search)


@dataclass
class NegationResult:
    target: str
    coefficient: float
    target_accuracy: float
    control_accuracy: dict[str, float]
    pretrained_target: float
    pretrained_control: dict[str, float]
    search: list[tuple[float, float, float]] = field(default_factory=list)  # (alpha, target val, mean control val)
    budget_met: bool = True  # some alpha > 0 kept the controls within budget (else coefficient is 0)
    chance: float | None = None  # the target's chance accuracy, when given

    @property
    def target_retained(self) -> float:
        """Chance-adjusted target: ``|acc - chance| / (pretrained - chance)``; 0 is forgotten (at
        chance), 1 is as known as before; an inverted classifier scores high, not low. NaN
        without ``chance``."""
        return retained(self.target_accuracy, self.pretrained_target, self.chance)


def retained(accuracy: float, pretrained: float, chance: float | None) -> float:
    """Chance-adjusted share of a task still known: ``|accuracy - chance| / |pretrained - chance|``
    (0 forgotten, 1 as before; an inverted classifier scores high). NaN without ``chance`` or
    when the pre-trained accuracy is at chance."""
    if chance is None or pretrained == chance:
        return float("nan")
    return abs(accuracy - chance) / abs(pretrained - chance)


def check_negation_grid(grid: Sequence[float]) -> list[float]:
    """The negation grid as floats, refused unless each scale is finite and >= 0 with one > 0.

    Raises:
        ValueError: naming the offending scales and an example of a valid grid.
    """
    grid = [float(a) for a in grid]
    bad = [a for a in grid if not math.isfinite(a) or a < 0]
    if bad or not any(a > 0 for a in grid):
        raise ValueError(f"the negation grid holds the scales subtracted, each finite and >= 0 with at least one > 0; "
                         f"got {grid if not bad else bad} (e.g. the paper's 0, 0.05, ..., 1: DEFAULT_GRID).")
    return grid


NEGATION_OBJECTIVES = ("accuracy", "chance_distance")


def choose_negation(search: Sequence[tuple[float, float, float]], *, floor: float, pretrained_target: float,
                    objective: str = "accuracy", chance: float | None = None) -> tuple[float, bool]:
    """The negation rule on a finished search, as a pure function: which scale to subtract.

    Args:
        search: ``(alpha, target validation accuracy, mean control validation accuracy)`` per
            candidate scale, in any order.
        floor: the control budget in accuracy (``control_threshold * pre-trained control``).
        pretrained_target: the target's validation accuracy before the edit; a scale is only
            taken when it does better than that by ``objective``.
        objective: ``"accuracy"`` (the lowest target accuracy, the paper's rule) or
            ``"chance_distance"`` (the smallest ``|accuracy - chance|``).
        chance: the target's chance accuracy; needed for ``"chance_distance"``.

    Returns:
        ``(alpha, budget_met)``: the best ``alpha > 0`` whose control accuracy is ``>= floor``
        (the smallest on ties), or ``(0.0, False)`` when no ``alpha > 0`` meets the budget:
        nothing is negated, never a silent fallback to some other scale. ``budget_met`` is
        True as soon as some ``alpha > 0`` meets the budget, even when none of them beats the
        pre-trained target (then alpha is 0 as well).

    Raises:
        ValueError: an unknown ``objective``, or ``"chance_distance"`` without ``chance``.
    """
    if objective not in NEGATION_OBJECTIVES:
        raise ValueError(f"objective must be one of {NEGATION_OBJECTIVES}, got {objective!r}.")
    if objective == "chance_distance" and chance is None:
        raise ValueError("objective='chance_distance' needs the target's chance accuracy: pass chance=.")

    def badness(acc: float) -> float:  # lower is more forgotten
        return abs(acc - chance) if objective == "chance_distance" else acc  # type: ignore[operator]

    within = sorted((alpha, target) for alpha, target, control in search if alpha > 0 and control >= floor)
    best_alpha, best_score = 0.0, badness(pretrained_target)
    for alpha, target in within:
        if badness(target) < best_score:
            best_alpha, best_score = alpha, badness(target)
    return best_alpha, bool(within)


def task_negation(editor: ModelEditor, evaluate: Evaluate, target: str, *, grid: Sequence[float] = DEFAULT_GRID,
                  control_threshold: float = 0.95, controls: Sequence[str] | None = None,
                  chance: float | None = None, objective: str = "accuracy",
                  progress: bool = False) -> NegationResult:
    """Subtract ``tau_target``; pick the scale that most lowers the target's validation accuracy
    while the control tasks keep >= ``control_threshold`` of their pre-trained accuracy.

    Args:
        editor: a :class:`ModelEditor` holding the target's task vector.
        evaluate: ``evaluate(model, split) -> {task: accuracy}``; must return the target and
            the control tasks.
        target: the task to forget.
        grid: candidate ``alpha`` (the paper's: 0 to 1, step 0.05); each finite and >= 0, at
            least one > 0 (a finer grid near 0 suits vectors that act at small scales).
        control_threshold: the control budget, a fraction of the pre-trained control accuracy.
        controls: the control tasks (default: every other task ``evaluate`` returns). The
            paper's protocol uses a separate task that no vector was trained on.
        chance: the target's chance accuracy (``1 / classes`` for balanced classes); enables
            ``target_retained`` and ``objective="chance_distance"``.
        objective: ``"accuracy"`` (the paper: the lowest target accuracy) or
            ``"chance_distance"`` (the smallest ``|accuracy - chance|``).

    Returns:
        :class:`NegationResult`; ``budget_met`` is False (and ``coefficient`` 0) when no
        ``alpha > 0`` kept the controls within budget.

    Raises:
        KeyError: no vector for ``target``, or a control task ``evaluate`` does not return.
        ValueError: an unknown ``objective``, ``chance_distance`` without ``chance``, no
            control task, or a grid with no positive scale or with a negative or non-finite one.
    """
    if target not in editor.task_vectors:
        raise KeyError(f"no task vector for target {target!r}; known: {sorted(editor.task_vectors)}.")
    if objective not in NEGATION_OBJECTIVES:
        raise ValueError(f"objective must be one of {NEGATION_OBJECTIVES}, got {objective!r}.")
    if objective == "chance_distance" and chance is None:
        raise ValueError("objective='chance_distance' needs the target's chance accuracy: pass chance=.")
    grid = check_negation_grid(grid)
    model = editor.reset()
    pre_val, pre_test = dict(evaluate(model, "val")), dict(evaluate(model, "test"))
    controls = [t for t in pre_val if t != target] if controls is None else list(controls)
    missing = [t for t in controls if t not in pre_val]
    if missing or target in controls:
        raise KeyError(f"control tasks must be tasks that evaluate() returns, other than the target; got "
                       f"{controls} (evaluate returns {sorted(pre_val)}).")
    if not controls:
        raise ValueError("task negation needs at least one control task: pass controls= or evaluate more tasks.")
    floor = control_threshold * _mean(pre_val[t] for t in controls)

    search = []
    for alpha in tqdm(grid, desc=f"negation of {target}", disable=not progress):
        with editor.edited({target: -alpha}) as model:
            acc = evaluate(model, "val")
        search.append((alpha, acc[target], _mean(acc[t] for t in controls)))
    best_alpha, met = choose_negation(search, floor=floor, pretrained_target=pre_val[target], objective=objective,
                                      chance=chance)
    with editor.edited({target: -best_alpha}) as model:
        test = dict(evaluate(model, "test"))
    return NegationResult(target, best_alpha, test[target], {t: test[t] for t in controls},
                          pre_test[target], {t: pre_test[t] for t in controls}, search, budget_met=met,
                          chance=chance)
