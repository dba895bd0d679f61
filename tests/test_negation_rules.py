"""Two negation rules on the same vectors (benchmarks/negation_rules.py): the paper's rule, the
distance from chance, custom grids. Which files it pairs, what it counts and the paired
differences, on synthetic cells whose answer is known."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hf_taskarith.evaluation.generated_docs import generated_block

CONFIG = {"tasks": ["a", "b"], "control": "z", "steps": 60, "train_size": 1, "val_size": 1, "test_size": 1,
          "no_negation": False}


@pytest.fixture(scope="module")
def rules(load_benchmark):
    return load_benchmark("negation_rules")


def _target(coefficient, test, chance=0.5, pretrained=0.9, control=0.8, budget_met=True):
    return {"coefficient": coefficient, "budget_met": budget_met, "target_test": test, "chance": chance,
            "target_retained": abs(test - chance) / (pretrained - chance), "control_test": control,
            "pretrained_target_test": pretrained, "pretrained_control_test": 0.82}


def _cell(mode, seed, negation, finetuned=0.9):
    return {"mode": mode, "lr": 5e-4, "seed": seed, "finetuned": {"test": {"a": finetuned, "b": finetuned}},
            "added_mean_absolute": 0.85, "negation": negation}


def _write(path: Path, cells, **config) -> Path:
    path.write_text(json.dumps({"commit": "1" * 40, "config": {**CONFIG, **config}, "cells": cells}))
    return path


def test_an_inverted_target_counts_below_chance_and_the_chance_rule_is_paired_by_seed(rules, tmp_path):
    paper, chance = [], []
    for s in (0, 1, 2):
        # the paper's rule drives "a" to an inverted classifier (10%, chance 50%): it retains all
        # the encoder knew (|0.1 - 0.5| / (0.9 - 0.5) = 1); the chance rule stops near chance
        # (55%, 56%, 57%: retained 0.125, 0.15, 0.175) and costs some control
        paper.append(_cell("linear", s, {"a": _target(0.9, 0.10, control=0.80), "b": _target(0.3, 0.6)}))
        chance.append(_cell("linear", s, {"a": _target(0.2, 0.55 + s / 100, control=0.80 - s / 100),
                                          "b": _target(0.3, 0.6)}))
    # a paper-rule cell the chance run lacks is left out, its commit too
    paper.append({**_cell("linear", 0, {"a": _target(0.5, 0.3)}), "lr": 1e-3, "commit": "2" * 40})
    a, b = rules.load(_write(tmp_path / "p.json", paper),
                           _write(tmp_path / "c.json", chance, negation_objective="chance_distance"))
    [row] = rules.summarize(a, b)
    assert (row["mode"], row["seeds"], row["targets"]) == ("linear", [0, 1, 2], 6)
    assert (row["same_vectors"], row["moved"]) == (3, 3)
    assert (row["a"]["below_chance"], row["b"]["below_chance"]) == (3, 0)
    d = row["b_minus_a"]
    # per seed, over two targets: negated (0.45, 0.46, 0.47) / 2, retained (0.125 - 1, ...) / 2,
    # control (0, -0.01, -0.02) / 2; t-intervals of 4.30 standard errors (2 degrees of freedom)
    assert d["negated"] == pytest.approx([0.230, 0.230 - 0.0124, 0.230 + 0.0124], abs=1e-4)
    assert d["retained"] == pytest.approx([-0.425, -0.425 - 0.0311, -0.425 + 0.0311], abs=1e-4)
    assert d["control"] == pytest.approx([-0.005, -0.005 - 0.0124, -0.005 + 0.0124], abs=1e-4)
    text = rules.render(a, b, [row])
    assert "commit `1111111` (the compared cells)" in text and "2222222" not in text
    assert "| linear | 0.0005 | 0, 1, 2 | 3/3 | 3/6 | 3/6 | 0/6 | 6/6 / 6/6 |" in text
    assert "| 35.0 [35.0, 35.0] / 58.0 [56.8, 59.2] | +23.0 [+21.8, +24.2]: chance rule higher (worse) |" in text
    assert "| -42.5 [-45.6, -39.4]: paper rule higher | -0.5 [-1.7, +0.7]: not resolved |" in text


def test_different_trainings_are_not_reported_as_the_same_vectors(rules, tmp_path):
    neg = {"a": _target(0.5, 0.3)}
    a, b = rules.load(_write(tmp_path / "p.json", [_cell("nonlinear", 0, neg)]),
                           _write(tmp_path / "c.json", [_cell("nonlinear", 0, neg, finetuned=0.91)],
                                  negation_objective="chance_distance"))
    [row] = rules.summarize(a, b)
    assert row["same_vectors"] == 0 and row["moved"] == 0
    assert "| nonlinear | 0.0005 | 0 | 0/1 | 0/1 |" in rules.render(a, b, [row])


def test_only_runs_that_differ_in_their_negation_rule_alone_are_compared(rules, tmp_path):
    cells = [_cell("linear", 0, {"a": _target(0.5, 0.3)})]
    paper = _write(tmp_path / "p.json", cells)
    chance = _write(tmp_path / "c.json", cells, negation_objective="chance_distance")
    fine = _write(tmp_path / "f.json", cells, negation_objective="chance_distance", negation_grid=[0.0, 0.01, 0.02])
    with pytest.raises(SystemExit, match=r"same rule \(lowest target validation accuracy .* 0 to 1 step 0.05\)"):
        rules.load(paper, paper)
    with pytest.raises(SystemExit, match=r"more than their negation rule \(steps\)"):
        rules.load(paper, _write(tmp_path / "s.json", cells, negation_objective="chance_distance", steps=30))
    with pytest.raises(SystemExit, match="without negation"):
        rules.load(_write(tmp_path / "n.json", cells, no_negation=True), chance)
    with pytest.raises(SystemExit, match="custom grids"):
        rules.load(fine, _write(tmp_path / "g.json", cells, negation_objective="chance_distance",
                                negation_grid=[0.0, 0.5]))
    other = _write(tmp_path / "o.json", [{**cells[0], "seed": 5}], negation_objective="chance_distance")
    with pytest.raises(SystemExit, match="share no"):
        rules.summarize(*rules.load(paper, other))
    # a grid alone may differ: the rule is then named by it
    a, b = rules.load(chance, fine)
    text = rules.render(a, b, rules.summarize(a, b))
    assert text.startswith("**chance rule, custom grid** against **chance rule**.")
    assert "chance rule, custom grid: target validation accuracy closest to chance within the control budget, " \
           "coefficients 0 to 0.02 step 0.01." in text


def test_the_docs_block_is_generated_from_the_committed_results(rules):
    doc = Path(__file__).resolve().parent.parent / "docs" / "regime_map.md"
    assert rules.COMPARISONS
    for name, pairs in rules.COMPARISONS.items():
        assert generated_block(doc, rules.markers(name)) == rules.block(pairs), \
            f"docs/regime_map.md block {rules.markers(name)[0]} is stale: run benchmarks/negation_rules.py"


def test_each_named_block_is_written_and_a_missing_block_writes_nothing(rules, tmp_path, monkeypatch, capsys):
    cells = [_cell("linear", 0, {"a": _target(0.5, 0.3)})]
    paper = _write(tmp_path / "p.json", cells)
    chance = _write(tmp_path / "c.json", cells, negation_objective="chance_distance")
    (tmp_path / "docs").mkdir()
    doc = tmp_path / "docs" / "regime_map.md"
    first, grids = rules.markers(""), rules.markers("grids")
    assert first[0].startswith("<!-- negation-rules:begin") and grids[0].startswith("<!-- negation-rules-grids:begin")
    page = f"intro\n{first[0]}\nold\n{first[1]}\nmiddle\n"
    doc.write_text(page)
    monkeypatch.setattr(rules, "ROOT", tmp_path)
    monkeypatch.setattr(rules, "COMPARISONS", {"": [(paper, chance)], "grids": [(chance, paper)]})
    monkeypatch.setattr("sys.argv", ["negation_rules.py"])
    with pytest.raises(SystemExit, match="negation-rules-grids:begin"):
        rules.main()
    assert doc.read_text() == page  # the first block was not written either
    doc.write_text(page + f"{grids[0]}\n{grids[1]}\nend\n")
    rules.main()
    assert generated_block(doc, first).startswith("**chance rule** against **paper rule**.")
    assert generated_block(doc, grids).startswith("**paper rule** against **chance rule**.")
    assert doc.read_text().startswith("intro\n") and "\nmiddle\n" in doc.read_text()
    capsys.readouterr()
