"""Evaluation harness: editing, addition, negation, disentanglement, learned coefficients, plots."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from hf_taskarith import TaskVector
from hf_taskarith.evaluation import (
    ModelEditor,
    choose_negation,
    disentanglement_error,
    learn_coefficients,
    task_addition,
    task_negation,
)
from hf_taskarith.evaluation.plots import plot_cosine_matrix, plot_disentanglement


class TwoHeads(nn.Module):
    """A shared trunk with one frozen head per task (the closed-vocabulary setting)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16))
        self.heads = nn.ModuleDict({"a": nn.Linear(16, 2), "b": nn.Linear(16, 2)})

    def forward(self, x, task):
        return self.heads[task](self.trunk(x))


def _data(task, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 8, generator=g)
    y = (x[:, 0] > 0).long() if task == "a" else (x[:, 1] * x[:, 2] > 0).long()
    return x, y


@pytest.fixture(scope="module")
def setup():
    base = TwoHeads()
    data = {t: {"val": _data(t, 1 + i), "test": _data(t, 10 + i), "train": _data(t, 20 + i)}
            for i, t in enumerate("ab")}
    tvs = {}
    for t in "ab":
        ft = copy.deepcopy(base)
        opt = torch.optim.SGD(ft.trunk.parameters(), lr=0.5)
        x, y = data[t]["train"]
        for _ in range(60):
            opt.zero_grad()
            nn.functional.cross_entropy(ft(x, t), y).backward()
            opt.step()
        tvs[t] = TaskVector.from_models(base, ft)

    def evaluate(model, split):
        with torch.no_grad():
            return {t: float((model(*data[t][split][:1], t).argmax(-1) == data[t][split][1]).float().mean())
                    for t in "ab"}

    return base, tvs, data, evaluate


def test_editor_sets_and_restores_exactly(setup):
    base, tvs, _, _ = setup
    model = copy.deepcopy(base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    editor = ModelEditor(model, tvs)
    editor.set({"a": 0.5, "b": {"trunk.0.weight": 2.0}})
    w = model.state_dict()["trunk.0.weight"]
    torch.testing.assert_close(
        w, before["trunk.0.weight"] + 0.5 * tvs["a"]["trunk.0.weight"] + 2 * tvs["b"]["trunk.0.weight"])
    torch.testing.assert_close(
        model.state_dict()["trunk.2.bias"], before["trunk.2.bias"] + 0.5 * tvs["a"]["trunk.2.bias"])
    editor.reset()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(KeyError, match="no task vector"):
        editor.set({"c": 1.0})


def test_addition_picks_the_best_validated_coefficient(setup):
    base, tvs, _, evaluate = setup
    editor = ModelEditor(copy.deepcopy(base), tvs)
    ft_val, ft_test = {}, {}
    for t in "ab":
        with editor.edited({t: 1.0}) as m:
            ft_val[t], ft_test[t] = evaluate(m, "val")[t], evaluate(m, "test")[t]
    res = task_addition(editor, evaluate, finetuned_val=ft_val, finetuned_test=ft_test,
                        grid=[0.0, 0.25, 0.5, 0.75, 1.0])
    best = max(res.search, key=lambda s: s[1])[0]
    assert res.coefficients == {"a": best, "b": best}
    assert res.normalized["a"] == pytest.approx(res.absolute["a"] / ft_test["a"])
    assert res.mean_absolute > 0.6  # the sum does better than chance on both tasks
    per_task = task_addition(editor, evaluate, finetuned_val=ft_val, finetuned_test=ft_test,
                             grid=[0.0, 0.5, 1.0], per_task=True, rounds=1)
    assert max(s for _, s in per_task.search) <= 1.5


def test_negation_lowers_target_within_control_budget(setup):
    base, tvs, _, evaluate = setup
    editor = ModelEditor(copy.deepcopy(base), tvs)
    res = task_negation(editor, evaluate, "a", grid=[0.0, 0.5, 1.0, 2.0, 4.0])
    pre_control = dict((a, c) for a, _, c in res.search)[0.0]
    feasible = [(t, a) for a, t, c in res.search if c >= 0.95 * pre_control]
    assert res.coefficient == min(feasible)[1]  # lowest target accuracy among the allowed scales
    with pytest.raises(KeyError):
        task_negation(editor, evaluate, "zzz")


def test_disentanglement_error_properties(setup, tmp_path):
    base, tvs, data, _ = setup
    editor = ModelEditor(copy.deepcopy(base), tvs)

    def predict(model, task):
        return model(data[task]["test"][0], task).argmax(-1)

    grid = disentanglement_error(editor, predict, ("a", "b"), alphas=(-1.0, 0.0, 1.0))
    assert grid.xi.shape == (3, 3)
    assert grid.xi[1, 1] == 0  # nothing added: no disagreement
    assert (grid.xi >= 0).all() and (grid.xi <= 2).all()
    assert float(grid.xi.max()) > 0  # these non-linear vectors do interfere somewhere
    png = plot_disentanglement(grid, tmp_path / "new" / "dir" / "xi.png", vmax=1.0)  # parents are created
    png2 = plot_cosine_matrix(tvs, tmp_path / "cos.png")
    assert png.stat().st_size > 1000 and png2.read_bytes()[:4] == b"\x89PNG"


def test_disentanglement_grid_summaries_pick_the_right_points():
    from hf_taskarith.evaluation.disentanglement import DisentanglementGrid

    alphas = (-1.0, 0.0, 1.0, 2.0)
    xi = torch.arange(16, dtype=torch.float32).reshape(4, 4)  # xi[i, j] = 4 i + j
    grid = DisentanglementGrid(("a", "b"), alphas, xi)
    assert grid.mean_positive_quadrant() == pytest.approx(float(xi[1:, 1:].mean()))  # rows/cols of alpha >= 0
    assert grid.mean_within(1.0) == pytest.approx(float(xi[:3, :3].mean()))
    with pytest.raises(ValueError, match="positive quadrant is empty"):
        DisentanglementGrid(("a", "b"), (-2.0, -1.0), torch.zeros(2, 2)).mean_positive_quadrant()


def test_learned_coefficients_improve_the_objective(setup):
    base, tvs, data, evaluate = setup
    model = copy.deepcopy(base)
    batches = {t: [data[t]["val"]] for t in "ab"}

    def forward(m, batch, task):
        return m(batch[0], task)

    coefs = learn_coefficients(model, tvs, batches, forward, granularity="layer", objective="cross_entropy",
                               labels=lambda b: b[1], steps=30, lr=0.05, init=0.0)
    assert set(coefs) == {"a", "b"} and all(0.0 <= c <= 1.0 for d in coefs.values() for c in d.values())
    assert len({round(c, 6) for c in coefs["a"].values()}) >= 2  # per-layer values differ
    editor = ModelEditor(model, tvs)
    with editor.edited({"a": 0.0, "b": 0.0}) as m:
        before = sum(evaluate(m, "val").values())
    with editor.edited(coefs) as m:
        after = sum(evaluate(m, "val").values())
    assert after > before
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), base.state_dict().values()))


def test_tangent_editor_sums_in_the_tangent_space_and_restores(setup):
    from hf_taskarith import LinearizedModel
    from hf_taskarith.evaluation import TangentEditor

    base, tvs, data, _ = setup
    x = data["a"]["val"][0][:16]
    lin = LinearizedModel(base)
    editor = TangentEditor(lin, tvs)
    with torch.no_grad():
        f0 = lin(x, "a").clone()
        with editor.edited({"a": 0.7, "b": -0.4}) as model:
            both = model(x, "a").clone()
        assert torch.equal(lin(x, "a"), f0)  # restored to delta = 0
        ref = LinearizedModel.from_task_vector(base, [(tvs["a"], 0.7), (tvs["b"], -0.4)])(x, "a")
        singles = [LinearizedModel.from_task_vector(base, tvs[t])(x, "a") - f0 for t in "ab"]
    torch.testing.assert_close(both, ref)
    torch.testing.assert_close(both - f0, 0.7 * singles[0] - 0.4 * singles[1], rtol=1e-4, atol=1e-5)  # exactly linear
    assert not torch.allclose(both, f0)
    # per-tensor coefficients (learned per layer): only the named tensor of "a" moves, by its coefficient
    deltas = editor.set({"a": {"trunk.0.weight": 0.5}}).deltas()
    for n, d in deltas.items():
        want = 0.5 * tvs["a"][n] if n == "trunk.0.weight" else torch.zeros_like(d)
        torch.testing.assert_close(d.detach(), want.to(d.dtype))
    editor.reset()
    with pytest.raises(KeyError, match="no task vector"):
        editor.set({"c": 1.0})
    with pytest.raises(TypeError, match="LinearizedModel"):
        TangentEditor(base, tvs)


class _ScriptedEditor:
    """An editor whose 'model' is the negation scale: evaluate() reads accuracies from a table."""

    def __init__(self):
        self.task_vectors = {"target": None}
        self.alpha = 0.0

    def reset(self):
        self.alpha = 0.0
        return self

    def edited(self, coefs):
        import contextlib

        @contextlib.contextmanager
        def block():
            self.alpha = -coefs["target"]
            yield self
            self.alpha = 0.0
        return block()


def _scripted(table):
    def evaluate(model, split):
        return table[round(model.alpha, 2)]
    return evaluate


def test_negation_with_an_unreachable_budget_negates_nothing_and_says_so():
    table = {0.0: {"target": 0.9, "control": 0.8}, 0.5: {"target": 0.6, "control": 0.5},
             1.0: {"target": 0.5, "control": 0.3}}
    res = task_negation(_ScriptedEditor(), _scripted(table), "target", grid=[0.5, 1.0])
    assert res.budget_met is False and res.coefficient == 0.0 and res.target_accuracy == 0.9


def test_negation_on_a_separate_control_task_and_inverted_classifiers():
    # binary target; alpha=1 inverts the classifier (10%: still known), alpha=0.5 reaches chance
    table = {0.0: {"target": 0.9, "edited_peer": 0.9, "control": 0.8},
             0.5: {"target": 0.52, "edited_peer": 0.2, "control": 0.79},
             1.0: {"target": 0.10, "edited_peer": 0.1, "control": 0.78}}
    paper = task_negation(_ScriptedEditor(), _scripted(table), "target", grid=[0.5, 1.0], controls=["control"],
                          chance=0.5)
    assert paper.budget_met and paper.coefficient == 1.0  # lowest accuracy: the inverted classifier
    assert paper.target_retained == pytest.approx(0.4 / 0.4)  # ...which retains everything
    forget = task_negation(_ScriptedEditor(), _scripted(table), "target", grid=[0.5, 1.0], controls=["control"],
                           chance=0.5, objective="chance_distance")
    assert forget.coefficient == 0.5 and forget.target_retained == pytest.approx(0.02 / 0.4)
    # with the edited peer as control the budget fails (its accuracy collapses)
    assert not task_negation(_ScriptedEditor(), _scripted(table), "target", grid=[0.5, 1.0]).budget_met
    with pytest.raises(ValueError, match="chance="):
        task_negation(_ScriptedEditor(), _scripted(table), "target", objective="chance_distance")
    with pytest.raises(KeyError, match="control tasks"):
        task_negation(_ScriptedEditor(), _scripted(table), "target", controls=["nope"])
    for grid in ([], [0.0], [0.5, -0.5], [0.5, float("nan")]):
        with pytest.raises(ValueError, match="negation grid"):
            task_negation(_ScriptedEditor(), _scripted(table), "target", grid=grid, controls=["control"])


def test_choose_negation_is_the_rule_on_a_finished_search():
    # (alpha, target val, mean control val); floor 0.76, binary target (chance 0.5) at 0.9 before the edit
    search = [(1.0, 0.10, 0.78), (0.25, 0.70, 0.80), (0.5, 0.52, 0.79), (0.75, 0.30, 0.70)]
    pick = dict(floor=0.76, pretrained_target=0.9)
    assert choose_negation(search, **pick) == (1.0, True)  # lowest accuracy in budget: 0.75 breaks it
    assert choose_negation(search, **pick, objective="chance_distance", chance=0.5) == (0.5, True)
    # no alpha > 0 within budget: nothing negated, flagged; alpha 0 itself never counts as meeting it
    assert choose_negation([(0.0, 0.9, 0.8), (0.5, 0.4, 0.5)], **pick) == (0.0, False)
    assert choose_negation([], **pick) == (0.0, False)
    # within budget but the target never drops below its pre-trained accuracy: budget met, nothing to take
    assert choose_negation([(0.5, 0.95, 0.8)], **pick) == (0.0, True)
    # ties go to the smallest scale, whatever the order of the search
    assert choose_negation([(0.6, 0.5, 0.8), (0.3, 0.5, 0.8)], **pick) == (0.3, True)
    with pytest.raises(ValueError, match="chance="):
        choose_negation(search, **pick, objective="chance_distance")
    with pytest.raises(ValueError, match="objective must be one of"):
        choose_negation(search, **pick, objective="loss")


def test_interval_curves_plot_and_refuse_empty_panels(tmp_path):
    from hf_taskarith.evaluation.plots import plot_interval_curves

    panels = {"vs lr": {"linear": [(1e-3, 80, 78, 82), (2e-4, 81, 80, 83)], "nonlinear": [(2e-4, 83, 81, 85)]},
              "vs tasks": {"linear": [(2, 85, 84, 86), (8, 80, 79, 81)]}}
    png = plot_interval_curves(panels, tmp_path / "curves.png", logx={"vs lr": True},
                               reference={"vs tasks": [(2, 75.0), (8, 74.0)]})
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 1000
    with pytest.raises(ValueError, match="each with a curve"):
        plot_interval_curves({"empty": {}}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="at least one panel"):
        plot_interval_curves({}, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_similarity_matrices_share_one_scale_and_refuse_bad_shapes(tmp_path):
    from hf_taskarith.evaluation.plots import plot_similarity_matrices

    m = torch.tensor([[1.0, 0.02], [0.02, 1.0]])
    png = plot_similarity_matrices({"a": (["x", "y"], m), "b": (["x", "y"], 2 * m), "c": (["x", "y"], -m)},
                                   tmp_path / "cos.png")
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 1000
    with pytest.raises(ValueError, match=r"shape \(2, 2\); expected \(3, 3\)"):
        plot_similarity_matrices({"a": (["x", "y", "z"], m)}, tmp_path / "bad.png")
    with pytest.raises(ValueError, match="at least one matrix"):
        plot_similarity_matrices({}, tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_features_correct_marks_each_example():
    from hf_taskarith.errors import NonFiniteError
    from hf_taskarith.evaluation.task_accuracy import features_correct
    from hf_taskarith.training.tasks import RawTask, split_task

    task = split_task("toy", RawTask([f"t{i}" for i in range(12)], [i % 2 for i in range(12)], ("x", "y")),
                      train_size=4, val_size=4, test_size=4)
    head = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.eye(2))
    labels = list(task.test.labels)
    feats = torch.nn.functional.one_hot(torch.tensor([labels[0], 1 - labels[1], labels[2], labels[3]]), 2).float()
    assert features_correct(feats, head, task, "test") == [1, 0, 1, 1]
    with pytest.raises(ValueError, match="3 rows of features for 4 examples"):
        features_correct(feats[:3], head, task, "test")
    with pytest.raises(NonFiniteError):
        features_correct(feats * float("nan"), head, task, "test")
