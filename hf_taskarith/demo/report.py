"""The demo's results: rows of per-task accuracies, rendered as a table and saved as JSON."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..errors import NonFiniteError
from ..evaluation.arithmetic import retained
from ..version import __version__

RowKind = Literal["pretrained", "finetuned", "individual", "merged", "negation"]
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"


@dataclass
class ResultRow:
    """Test accuracy of one model on every task.

    Attributes:
        name: shown in the table, e.g. ``"ties (lambda=1.0)"``.
        kind: pretrained, finetuned (one task's model), individual (each task by its own
            fine-tuned model), merged, or negation.
        accuracies: task -> test accuracy in [0, 1].
        details: method, coefficient, checkpoint path, validation scores, ...
    """

    name: str
    kind: RowKind
    accuracies: dict[str, float]
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def average(self) -> float:
        return sum(self.accuracies.values()) / len(self.accuracies)


@dataclass
class NegationResult:
    """Forgetting one task: its accuracy should drop, the others' should hold.

    Attributes:
        task: the negated task; ``control`` the others (their mean accuracy).
        scaling: the chosen coefficient (the model is ``base - scaling * tv``); 0 when no
            coefficient kept the controls within budget (``budget_met`` False).
        budget_met: some coefficient > 0 kept the controls within budget on validation.
        chance: the target's chance accuracy (``1 / classes``; the demo's tasks are balanced).
        objective: the rule that chose ``scaling`` (``"accuracy"`` or ``"chance_distance"``).
    """

    task: str
    scaling: float
    target_pretrained: float
    target_finetuned: float
    target_negated: float
    control_pretrained: float
    control_negated: float
    path: str | None = None
    val_search: list[dict[str, float]] = field(default_factory=list)
    budget_met: bool = True
    chance: float | None = None
    objective: str = "accuracy"

    @property
    def target_retained(self) -> float:
        """Chance-adjusted target: ``|negated - chance| / |pre-trained - chance|``; 0 is
        forgotten, 1 as known as before; an inverted classifier (below chance) scores high.
        NaN without ``chance``."""
        return retained(self.target_negated, self.target_pretrained, self.chance)


@dataclass
class DemoResults:
    """Everything the demo measured; :meth:`save` writes ``results.json`` and ``results.md``."""

    tasks: list[str]
    rows: list[ResultRow] = field(default_factory=list)
    negation: NegationResult | None = None
    task_vectors: dict[str, Any] = field(default_factory=dict)
    data: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    hub: dict[str, Any] = field(default_factory=dict)
    disentanglement: dict[str, Any] = field(default_factory=dict)
    plots: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    base_model: str = ""
    output_dir: str = ""
    library_version: str = __version__

    def row(self, name: str) -> ResultRow:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(f"no row {name!r}; rows: {[r.name for r in self.rows]}.")

    def rows_of(self, kind: RowKind) -> list[ResultRow]:
        return [r for r in self.rows if r.kind == kind]

    def normalized(self, row: ResultRow) -> float | None:
        """Mean of ``acc / individual fine-tuned acc`` over tasks (the papers' normalized accuracy)."""
        ind = self.rows_of("individual")
        if not ind:
            return None
        ref = ind[0].accuracies
        vals = [row.accuracies[t] / ref[t] for t in self.tasks if ref.get(t)]
        return sum(vals) / len(vals) if vals else None

    # -- rendering ------------------------------------------------------------------------
    def to_markdown(self) -> str:
        """The results as markdown tables (readable as plain text too)."""
        head = ["model", *self.tasks, "avg", "normalized"]
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
        for r in self.rows:
            norm = self.normalized(r)
            cells = [r.name, *(_pct(r.accuracies[t]) for t in self.tasks), _pct(r.average),
                     "-" if norm is None else _pct(norm)]
            lines.append("| " + " | ".join(cells) + " |")
        out = ["Test accuracy (%) per task, each through its frozen head. \"normalized\" is accuracy "
               "divided by the task's own fine-tuned accuracy, averaged over tasks.", "", *lines]
        n = self.negation
        if n is not None:
            out += ["", f"Negation of `{n.task}` (base - {n.scaling:g} x task vector; control = the other tasks):", "",
                    "| | target acc | control acc |", "|---|---:|---:|",
                    f"| pre-trained | {_pct(n.target_pretrained)} | {_pct(n.control_pretrained)} |",
                    f"| fine-tuned on {n.task} | {_pct(n.target_finetuned)} | - |",
                    f"| negated (lambda={n.scaling:g}) | {_pct(n.target_negated)} | {_pct(n.control_negated)} |",
                    "", _negation_note(n)]
        xi = self.disentanglement
        if xi:
            a = xi["alphas"]
            out += ["", f"Weight disentanglement error xi(a1, a2) of {xi['tasks'][0]} (rows, a1) and "
                    f"{xi['tasks'][1]} (columns, a2) on validation; 0 = the two edits do not interfere:", "",
                    "| a1 \\ a2 | " + " | ".join(f"{x:g}" for x in a) + " |", "|---|" + "---:|" * len(a)]
            out += [f"| {a[i]:g} | " + " | ".join(f"{v:.3f}" for v in row) + " |" for i, row in enumerate(xi["xi"])]
        hub = self.hub.get("repos") if self.hub else None
        if hub:
            out += ["", f"Task vectors pushed to the embedded Hub ({self.hub.get('endpoint')}) and pulled back by tag:",
                    "",
                    "| task | repo | tag | commit |", "|---|---|---|---|"]
            out += [f"| {t} | {r['repo_id']} | {r['tag']} | {r['commit_sha'][:12]} |" for t, r in hub.items()]
        cos = self.task_vectors.get("cosine")
        if cos:
            names = list(cos)
            out += ["", "Cosine similarity of the task vectors:", "",
                    "| | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
            out += [f"| {a} | " + " | ".join(f"{cos[a][b]:.3f}" for b in names) + " |" for a in names]
        return "\n".join(out) + "\n"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for r, rd in zip(self.rows, d["rows"]):
            rd["average"] = r.average
            rd["normalized"] = self.normalized(r)
        return d

    def save(self, folder: str | os.PathLike) -> tuple[Path, Path]:
        """Write ``results.json`` and ``results.md`` (each atomically).

        Raises:
            NonFiniteError: an accuracy is NaN/inf (nothing is written).
        """
        for r in self.rows:
            bad = {t: a for t, a in r.accuracies.items() if not math.isfinite(a)}
            if bad:
                raise NonFiniteError(f"row {r.name!r} has non-finite accuracies {bad}; results not written.")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = folder / RESULTS_JSON, folder / RESULTS_MD
        _write_atomic(paths[0], json.dumps(self.to_dict(), indent=2, default=str) + "\n")
        _write_atomic(paths[1], "# hf_taskarith demo results\n\n" + self.to_markdown())
        return paths


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _negation_note(n: NegationResult) -> str:
    """What the negation row means: the rule, the budget, and whether the target was forgotten
    (near chance) or inverted (below chance: still known, labels swapped)."""
    rule = ("the lowest target validation accuracy" if n.objective == "accuracy"
            else "the target validation accuracy nearest chance")
    if not n.budget_met:
        return (f"Budget not met: no coefficient kept the controls at the required share of their pre-trained "
                f"validation accuracy, so nothing was negated (lambda=0, the pre-trained model). Rule: {rule} "
                "within the control budget.")
    if n.scaling == 0:
        return (f"Nothing negated: coefficients within the control budget exist, but none moved the target "
                f"below its pre-trained validation accuracy by the rule ({rule} within the control budget), "
                "so the answer is the pre-trained model (lambda=0).")
    text = f"Rule: {rule} within the control budget (met on validation)."
    if n.chance is not None:
        text += (f" Chance is {_pct(n.chance)}; retained (chance-adjusted, 0 = forgotten, 100 = as before): "
                 f"{100 * n.target_retained:.0f}%.")
        if n.target_negated < n.chance:
            text += (" The target is below chance: an inverted classifier (the task is still known, its labels "
                     "swapped), not forgetting; `--negation-objective chance_distance` stops nearest chance.")
    return text
