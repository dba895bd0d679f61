"""The steps axis of the regime map (benchmarks/regime_steps.py): which files it joins, what it
tunes on validation, and that its docs block and figure are generated from the committed results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hf_taskarith.evaluation.generated_docs import generated_block

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def steps_axis(load_benchmark):
    return load_benchmark("regime_steps")


def _cell(mode, lr, seed, val, test):
    tasks = {"a": test, "b": test}
    return {"mode": mode, "lr": lr, "seed": seed, "coefficient": 0.5, "added_mean_absolute": test,
            "added_val_mean": val, "finetuned": {"test": tasks}, "pretrained": {"test": {"a": 0.5, "b": 0.5}}}


CONFIG = {"tasks": ["a", "b"], "control": "z", "train_size": 1, "val_size": 1, "test_size": 1, "no_negation": True}


def _write(path: Path, steps: int, cells: list[dict], **config) -> Path:
    path.write_text(json.dumps({"commit": "0" * 40, "config": {**CONFIG, "steps": steps, **config}, "cells": cells}))
    return path


def test_each_mode_is_tuned_over_learning_rate_and_steps_on_validation_not_test(steps_axis, tmp_path):
    short, long_ = [], []
    for s in (0, 1, 2):
        # nonlinear: best on validation with few steps; linear: best on validation with many steps,
        # although its short run is (misleadingly) better on test -- the choice must follow validation
        short += [_cell("nonlinear", 1e-3, s, 0.90, 0.88 + s / 100), _cell("linear", 1e-3, s, 0.80, 0.95)]
        long_ += [_cell("nonlinear", 1e-3, s, 0.70, 0.70), _cell("linear", 1e-3, s, 0.85, 0.80 + 2 * s / 100)]
    runs, summary = steps_axis.build([_write(tmp_path / "a.json", 30, short), _write(tmp_path / "b.json", 120, long_)])
    tuned = summary["tuned"]
    assert tuned["nonlinear"]["settings"] == [[1e-3, 30]] * 3 and tuned["linear"]["settings"] == [[1e-3, 120]] * 3
    assert tuned["linear"]["added"][0] == pytest.approx(0.82)
    # paired by seed: linear's seeds differ by 1 point more than nonlinear's, a narrow interval
    assert tuned["paired_linear_minus_nonlinear"] == pytest.approx([-0.07, -0.07 - 0.0248, -0.07 + 0.0248], abs=1e-3)
    assert [(p["steps"], round(p["added"][0], 6)) for p in summary["pairs"]] == [(30, 0.06), (120, 0.12)]
    # each mode's 120-step run against its 30-step run (the first file), paired by seed
    longer = {r["mode"]: r for r in summary["vs_reference"]}
    assert longer["nonlinear"]["steps"] == 120 and longer["nonlinear"]["reference"] == 30
    assert longer["nonlinear"]["added"][0] == pytest.approx(0.70 - 0.89)
    assert longer["linear"]["added"] == pytest.approx([-0.13, -0.13 - 0.0497, -0.13 + 0.0497], abs=1e-3)
    text = steps_axis.render(runs, summary)
    assert "| linear | 0.001 | 120 | -13.0 [-18.0, -8.0]: 30 steps higher (120 steps worse) |" in text
    assert "| 0.001 | 30 | linear | 95.0 [" in text and "| 0.001 | +6.0 [+3.5, +8.5]: linear higher | +12.0 [" in text
    assert "nonlinear 89.0 [86.5, 91.5] (lr, steps: 0.001 x 30, 0.001 x 30, 0.001 x 30)" in text
    assert "linear - nonlinear -7.0 [-9.5, -4.5]: nonlinear higher (linear worse)." in text


def test_a_tie_on_validation_goes_to_the_gentler_setting(steps_axis, tmp_path):
    a = [_cell("nonlinear", 2e-4, 0, 0.8, 0.6), _cell("nonlinear", 1e-3, 0, 0.8, 0.9)]
    b = [_cell("nonlinear", 2e-4, 0, 0.8, 0.7)]
    _, cells = steps_axis.load([_write(tmp_path / "a.json", 60, a), _write(tmp_path / "b.json", 120, b)])
    assert steps_axis.summarize(cells)["tuned"]["nonlinear"]["settings"] == [[2e-4, 60]]


def test_files_must_differ_in_their_steps_only(steps_axis, tmp_path):
    one = _write(tmp_path / "a.json", 30, [_cell("linear", 1e-3, 0, 0.8, 0.8)])
    with pytest.raises(SystemExit, match="same --steps"):
        steps_axis.load([one, _write(tmp_path / "b.json", 30, [])])
    with pytest.raises(SystemExit, match=r"more than --steps \(tasks\)"):
        steps_axis.load([one, _write(tmp_path / "c.json", 60, [], tasks=["a", "c"])])
    with pytest.raises(SystemExit, match="at least two"):
        steps_axis.load([one])


def test_the_docs_block_and_figure_are_generated_from_the_committed_results(steps_axis):
    runs, summary = steps_axis.build(steps_axis.RUNS)
    doc = ROOT / "docs" / "regime_map.md"
    assert generated_block(doc, steps_axis.MARKERS) == steps_axis.render(runs, summary), \
        "docs/regime_map.md is stale: run benchmarks/regime_steps.py"
    assert steps_axis.FIGURE.is_file() and f"]({steps_axis.FIGURE.name})" in doc.read_text()
