"""benchmarks/disentanglement_map.py's bookkeeping: pairs drawn by seed alone (the same in every
mode), quadrant means, and the paired summary over seeds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hf_taskarith.evaluation.generated_docs import generated_block

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def xi_map(load_benchmark):
    return load_benchmark("disentanglement_map")


def test_pairs_depend_on_the_seed_only(xi_map):
    tasks = ["d", "a", "c", "b"]
    assert xi_map.pairs_of(tasks, 2, 5) == xi_map.pairs_of(sorted(tasks), 2, 5)
    assert len(xi_map.pairs_of(tasks, 0, 1)) == 6 == len(xi_map.pairs_of(tasks, 99, 1))
    assert len(set(xi_map.pairs_of(tasks, 3, 1))) == 3
    assert any(xi_map.pairs_of(tasks, 2, s) != xi_map.pairs_of(tasks, 2, 0) for s in range(1, 6))


def test_quadrant_mean_keeps_non_negative_coefficients(xi_map):
    alphas = [-1.0, 0.0, 1.0]
    xi = [[9, 9, 9], [9, 0.0, 0.2], [9, 0.4, 0.6]]
    assert xi_map.quadrant_mean(alphas, xi, True) == pytest.approx(0.3)
    assert xi_map.quadrant_mean(alphas, xi, False) == pytest.approx((5 * 9 + 1.2) / 9)


def test_summary_pairs_modes_by_seed(xi_map):
    cells = [{"mode": m, "lr": 1e-3, "seed": s, "positive": base + s / 10, "all": base}
             for s in (0, 1, 2) for m, base in (("nonlinear", 0.5), ("linear", 0.2))]
    summary = xi_map.summarize(cells)
    rows = {r["mode"]: r for r in summary["rows"]}
    assert rows["linear"]["positive"][0] == pytest.approx(0.3) and rows["linear"]["seeds"] == [0, 1, 2]
    (pair,) = summary["paired_linear_minus_nonlinear"]
    assert pair["positive"] == pytest.approx([-0.3, -0.3, -0.3])  # the seed effect cancels in pairs


def test_adapter_modes_are_paired_among_themselves(xi_map):
    cells = [{"mode": m, "lr": 1e-3, "seed": s, "positive": base, "all": base}
             for s in (0, 1) for m, base in (("lora", 0.4), ("llora", 0.1), ("linear", 0.2))]
    summary = xi_map.summarize(cells)
    (pair,) = summary["paired_llora_minus_lora"]
    assert pair["seeds"] == [0, 1] and pair["positive"][0] == pytest.approx(-0.3)
    assert summary["paired_linear_minus_nonlinear"] == []  # no ordinary cells: nothing to pair linear with
    assert xi_map.FOLDER.match("llora-lr0.001-seed2")["mode"] == "llora"


def test_render_prints_percent_intervals_and_the_paired_rows(xi_map):
    cells = [{"mode": m, "lr": 2e-4, "seed": s, "positive": base + s / 10 + (s / 100 if m == "linear" else 0),
              "all": base, "pairs": [{}, {}, {}]}
             for s in (0, 1, 2) for m, base in (("nonlinear", 0.5), ("linear", 0.2))]
    config = {"split": "val", "alphas": [-3.0, 0.0, 3.0], "tasks": ["a", "b"]}
    results = {"commit": "0123456789abcdef", "config": config, "summary": xi_map.summarize(cells), "cells": cells}
    table = xi_map.render(results)
    assert "commit `0123456`" in table and "3 task pairs per seed" in table
    assert "| nonlinear | 0.0002 | 0, 1, 2 | 60.0 [" in table and "| 50.0 |" in table  # whole grid: no spread
    assert "| 0.0002 | linear - nonlinear | 0, 1, 2 | -29.0 [" in table



def test_merge_joins_runs_over_different_folders_and_refuses_other_grids(xi_map, tmp_path):
    def run(name, cells, alphas=(-1.0, 0.0, 1.0), commit="a" * 40):
        path = tmp_path / name
        path.write_text(json.dumps({"commit": commit, "config": {"tasks": ["a", "b"], "split": "val",
                                                                  "alphas": list(alphas), "pairs": 0},
                                    "cells": [{"mode": m, "lr": 2e-4, "seed": s, "positive": 0.5, "all": 0.4,
                                               "pairs": [{}]} for m, s in cells]}))
        return path

    first = run("a.json", [("nonlinear", 0), ("linear", 0), ("nonlinear", 1)])
    later = run("b.json", [("linear", 1)], commit="b" * 40)
    xi_map.merge([first, later], tmp_path / "all.json")
    merged = json.loads((tmp_path / "all.json").read_text())
    assert len(merged["cells"]) == 4 and merged["summary"]["paired_linear_minus_nonlinear"][0]["seeds"] == [0, 1]
    assert "commits `aaaaaaa`, `bbbbbbb`" in xi_map.render(merged)
    with pytest.raises(SystemExit, match="other settings.*alphas"):
        xi_map.merge([first, run("c.json", [("linear", 2)], alphas=(-3.0, 0.0, 3.0))], tmp_path / "bad.json")
    assert not (tmp_path / "bad.json").exists()


RESULTS = sorted((ROOT / "benchmarks" / "results").glob("disentanglement_map*.json"))


@pytest.mark.parametrize("path", RESULTS, ids=[p.stem for p in RESULTS])
def test_committed_xi_tables_are_rendered_from_their_results(xi_map, path):
    results = json.loads(path.read_text())
    assert json.loads(json.dumps(xi_map.summarize(results["cells"]))) == results["summary"]
    assert generated_block(xi_map.DOC, xi_map.markers_for(path)) == xi_map.render(results), \
        f"docs/regime_map.md is stale: run benchmarks/disentanglement_map.py --render --json {path.name}"


def test_each_results_file_renders_into_its_own_block(xi_map):
    first = xi_map.markers_for(Path("disentanglement_map.json"))
    assert first == xi_map.MARKERS and first[0].startswith("<!-- xi-map:begin ") and first[1] == "<!-- xi-map:end -->"
    other = xi_map.markers_for(Path("results/disentanglement_map_lr_5e-4.json"))
    assert other[0].startswith("<!-- xi-map-lr-5e-4:begin ") and other[1] == "<!-- xi-map-lr-5e-4:end -->"
