"""README and docs tables that are generated from committed results stay what the results say.

``benchmarks/regime_map.py --render`` writes the regime map's tables between markers in
docs/regime_map.md; this test re-renders them from the committed JSON (and
re-derives its summary from the per-cell records), so an edited figure or a stale table fails.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from hf_taskarith.evaluation.generated_docs import generated_block

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def regime_map(load_benchmark):
    return load_benchmark("regime_map")


def _block(path: Path, markers) -> str:
    return generated_block(path, markers)


def _close(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, float):
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-12) or (math.isnan(a) and math.isnan(b))
    return a == b


RUNS = sorted((ROOT / "benchmarks" / "results").glob("regime_map*.json"))


@pytest.mark.parametrize("path", RUNS, ids=[p.stem for p in RUNS])
def test_regime_map_tables_are_rendered_from_the_committed_results(regime_map, path):
    results = json.loads(path.read_text())
    assert _close(json.loads(json.dumps(regime_map.summarize(results["cells"]))), results["summary"])
    table = regime_map.render(results)
    doc = ROOT / "docs" / "regime_map.md"
    assert _block(doc, regime_map.markers_for(path)) == table, \
        f"{doc.name} is stale: run benchmarks/regime_map.py --render --json {path.relative_to(ROOT)}"
    figure = regime_map.plot_path(path)
    assert figure.is_file() and f"]({figure.name})" in doc.read_text(), f"{figure.name} missing or not shown"
    if any(c.get("cosines") for c in results["cells"]):
        cosines = regime_map.cosines_path(path)
        assert cosines.is_file() and f"]({cosines.name})" in doc.read_text(), f"{cosines.name} missing or not shown"


def _cell(mode, lr, seed, val, test):
    tasks = {"a": test, "b": test}
    return {"mode": mode, "lr": lr, "seed": seed, "coefficient": 0.5, "added_mean_absolute": test,
            "added_val_mean": val, "finetuned": {"test": tasks}, "pretrained": {"test": {"a": 0.5, "b": 0.5}}}


def test_each_mode_gets_its_learning_rate_from_validation_not_test(regime_map):
    cells = []
    for seed in (0, 1, 2):
        # nonlinear: the low lr is better on validation (and test); linear: the high lr on validation,
        # while the low one is (misleadingly) better on test -- selection must follow validation
        cells += [_cell("nonlinear", 1e-4, seed, 0.90, 0.88 + seed / 100), _cell("nonlinear", 1e-3, seed, 0.70, 0.70),
                  _cell("linear", 1e-4, seed, 0.80, 0.95), _cell("linear", 1e-3, seed, 0.85, 0.80 + seed / 100)]
    tuned = regime_map.summarize(cells)["tuned"]
    assert tuned["nonlinear"]["lrs"] == [1e-4] * 3 and tuned["linear"]["lrs"] == [1e-3] * 3
    assert tuned["linear"]["added"][0] == pytest.approx(0.81)
    assert tuned["paired_linear_minus_nonlinear"][0] == pytest.approx(0.81 - 0.89)
    pairs = regime_map.summarize(cells)["paired_linear_minus_nonlinear"]
    assert [p["lr"] for p in pairs] == [1e-4, 1e-3]
    assert pairs[0]["added"][0] == pytest.approx(0.95 - 0.89)


def _subset_cell(mode, seed, gain):
    """A cell over tasks a, b, c whose merges beat pre-trained (0.5) by ``gain``; a 2-task subset."""
    cell = _cell(mode, 1e-3, seed, 0.6, 0.5 + gain)
    cell["finetuned"]["test"] = {"a": 0.9, "b": 0.9, "c": 0.9}
    cell["pretrained"]["test"] = {"a": 0.5, "b": 0.5, "c": 0.5}
    cell["added_mean_normalized"] = (0.5 + gain) / 0.9
    cell["subsets"] = [{"k": 2, "tasks": ["a", "b"], "coefficient": 0.5, "added_mean_absolute": 0.5 + 2 * gain,
                        "added_mean_normalized": (0.5 + 2 * gain) / 0.9, "pretrained_mean": 0.5, "finetuned_mean": 0.9}]
    cell["cosines"] = {"tasks": ["a", "b", "c"], "matrix": [[1, gain, -gain], [gain, 1, 0.0], [-gain, 0.0, 1]]}
    return cell


def test_number_of_tasks_rows_pair_the_modes_by_seed_and_show_the_gain_over_pre_trained(regime_map):
    cells = [_subset_cell(m, s, g + s / 100) for s in (0, 1, 2) for m, g in (("nonlinear", 0.1), ("linear", 0.05))]
    summary = regime_map.summarize(cells)
    k2, k3 = summary["number_of_tasks"]
    assert (k2["k"], k3["k"]) == (2, 3)
    assert k2["nonlinear"]["gain_over_pretrained"][0] == pytest.approx(2 * 0.11)
    assert k3["linear"]["gain_over_pretrained"][0] == pytest.approx(0.06)
    # paired by seed: the seed-to-seed spread cancels, so the interval is a point
    assert k2["paired_linear_minus_nonlinear"] == pytest.approx([-0.1, -0.1, -0.1])
    cos = {r["mode"]: r["mean_abs_off_diagonal"][0] for r in summary["cosines"]}
    assert cos["nonlinear"] == pytest.approx(2 * 0.11 / 3) and cos["linear"] == pytest.approx(2 * 0.06 / 3)
    assert "| 0.001 | 2 | 50.0 |" in regime_map.render({"summary": summary, "cells": cells, "config": {
        "tasks": ["a", "b", "c"], "control": "z", "steps": 1, "test_size": 1}})


def test_subsets_are_drawn_by_seed_alone_and_must_be_proper(regime_map):
    tasks = [f"t{i}" for i in range(8)]
    assert regime_map.subset_of(tasks, 4, 1) == regime_map.subset_of(list(reversed(tasks)), 4, 1)
    assert regime_map.subset_of(tasks, 4, 1) != regime_map.subset_of(tasks, 4, 2)
    for bad in (1, 8):
        with pytest.raises(SystemExit, match="between 2 and 7"):
            regime_map.subset_of(tasks, bad, 0)


def test_merge_joins_side_by_side_runs_and_refuses_clashes(regime_map, tmp_path):
    config = {"tasks": ["a", "b"], "control": "z", "steps": 1, "train_size": 1, "val_size": 1, "test_size": 1,
              "no_negation": True, "cross": False, "subsets": [], "modes": ["nonlinear", "linear"], "seeds": [0]}
    runs = []
    for lr in (1e-4, 1e-3):
        cells = [_cell(m, lr, 0, 0.5, 0.6) for m in ("nonlinear", "linear")]
        runs.append(tmp_path / f"{lr:g}.json")
        runs[-1].write_text(json.dumps({"commit": "abc", "config": dict(config, lrs=[lr]), "cells": cells}))
    regime_map.merge(runs, tmp_path / "all.json")
    merged = json.loads((tmp_path / "all.json").read_text())
    assert merged["config"]["lrs"] == [1e-4, 1e-3] and len(merged["cells"]) == 4
    assert [p["lr"] for p in merged["summary"]["paired_linear_minus_nonlinear"]] == [1e-4, 1e-3]
    with pytest.raises(SystemExit, match="more than one file"):
        regime_map.merge([runs[0], runs[0]], tmp_path / "twice.json")
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"config": dict(config, steps=2, lrs=[0.1]), "cells": []}))
    with pytest.raises(SystemExit, match="other settings.*steps"):
        regime_map.merge([runs[0], other], tmp_path / "bad.json")
    assert not (tmp_path / "twice.json").exists() and not (tmp_path / "bad.json").exists()


def test_from_vectors_loads_a_saved_cell_and_refuses_other_training(regime_map, tmp_path):
    import torch

    from hf_taskarith import TaskVector
    from hf_taskarith.metadata import TaskVectorMetadata

    def save(folder, lr):
        for task in ("a", "b"):
            meta = TaskVectorMetadata(base_model="tiny", extra={"training": {"max_steps": 60, "learning_rate": lr}})
            TaskVector({"w": torch.full((2,), lr)}, meta).save_pretrained(folder / task)

    save(tmp_path / "linear-lr0.0002-seed1", 2e-4)
    final, best, checks = regime_map.load_vectors(tmp_path, "linear", 2e-4, 1, ["a", "b"], 60)
    assert sorted(final) == ["a", "b"] and best == {} and checks == {}
    assert torch.equal(final["a"]["w"], torch.full((2,), 2e-4))
    save(tmp_path / "linear-lr0.0002-seed1-best", 2e-4)
    (tmp_path / "linear-lr0.0002-seed1-best" / "checks.json").write_text(json.dumps({"a": {"best_step": 20}}))
    _, best, checks = regime_map.load_vectors(tmp_path, "linear", 2e-4, 1, ["a", "b"], 60)
    assert sorted(best) == ["a", "b"] and checks["a"]["best_step"] == 20
    with pytest.raises(SystemExit, match="no nonlinear-lr0.0002-seed1 under"):
        regime_map.load_vectors(tmp_path, "nonlinear", 2e-4, 1, ["a", "b"], 60)
    with pytest.raises(SystemExit, match="holds no vector for \\['c'\\]"):
        regime_map.load_vectors(tmp_path, "linear", 2e-4, 1, ["a", "c"], 60)
    with pytest.raises(SystemExit, match="trained with 60 steps"):
        regime_map.load_vectors(tmp_path, "linear", 2e-4, 1, ["a", "b"], 80)
    save(tmp_path / "linear-lr0.001-seed1", 5e-4)  # a folder whose vectors say another lr
    with pytest.raises(SystemExit, match="at lr 0.0005"):
        regime_map.load_vectors(tmp_path, "linear", 1e-3, 1, ["a", "b"], 60)


def test_paired_bootstrap_over_test_examples_sits_beside_the_seed_interval(regime_map):
    cells = []
    for seed in (0, 1, 2):
        for mode, correct in (("nonlinear", "1100"), ("linear", "1110")):
            cell = _cell(mode, 1e-3, seed, 0.5, correct.count("1") / 4)
            cell["added_correct"] = {"a": correct, "b": correct}
            cells.append(cell)
    (pair,) = regime_map.summarize(cells)["paired_linear_minus_nonlinear"]
    est, lo, hi = pair["added_bootstrap"]
    assert est == pytest.approx(0.25) and lo <= est <= hi and lo < hi  # one example in four, resampled
    table = regime_map.render({"summary": regime_map.summarize(cells), "cells": cells, "config": {
        "tasks": ["a", "b"], "control": "z", "steps": 1, "test_size": 4}})
    assert "test sampling only (paired bootstrap)" in table
    del cells[0]["added_correct"]  # a cell without per-example records: no bootstrap, no column
    assert "added_bootstrap" not in regime_map.summarize(cells)["paired_linear_minus_nonlinear"][0]


def test_settings_older_files_do_not_record_take_their_defaults(regime_map, tmp_path):
    config = {"tasks": ["a", "b"], "control": "z", "steps": 1, "train_size": 1, "val_size": 1, "test_size": 1,
              "no_negation": True, "modes": ["nonlinear"], "seeds": [0]}
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"config": dict(config, lrs=[1e-4]), "cells": [_cell("nonlinear", 1e-4, 0, 0.5, 0.6)]}))
    new = tmp_path / "new.json"
    new.write_text(json.dumps({"config": dict(config, lrs=[1e-3], **regime_map.SETTING_DEFAULTS),
                               "cells": [_cell("nonlinear", 1e-3, 0, 0.5, 0.6)]}))
    regime_map.merge([old, new], tmp_path / "both.json")  # no "other settings" for what old files lack
    assert len(json.loads((tmp_path / "both.json").read_text())["cells"]) == 2


def test_per_task_coefficients_get_their_own_table(regime_map):
    cells = []
    for seed in (0, 1):
        for mode in ("nonlinear", "linear"):
            cell = _cell(mode, 1e-3, seed, 0.5, 0.6)
            cell["per_task"] = {"added_mean_absolute": 0.7}
            cells.append(cell)
    summary = regime_map.summarize(cells)
    assert all(r["per_task"][0] == pytest.approx(0.7) for r in summary["rows"])
    table = regime_map.render({"summary": summary, "cells": cells, "config": {
        "tasks": ["a", "b"], "control": "z", "steps": 1, "test_size": 1}})
    assert "| linear | 0.001 | 60.0 | 70.0 |" in table  # identical seeds: no interval printed


@pytest.mark.parametrize("key, values, header, reading", [
    # unpaired, the intervals of 70 and 72 overlap widely; paired, each seed gains 2-3 points
    ("per_task", [(0.60, 0.62), (0.70, 0.73), (0.80, 0.82)],
     "| mode | lr | shared coefficient | per-task coefficients | per-task - shared |", ": per-task higher |"),
    # every seed loses 1-2 points: resolved, below zero
    ("learned", [(0.60, 0.59), (0.70, 0.68), (0.80, 0.785)],
     "| mode | lr | shared coefficient | learned per layer | learned - shared |", "| -1.5 [-2.7, -0.3]: shared higher"),
])
def test_finer_coefficients_are_paired_by_seed_with_the_shared_one(regime_map, key, values, header, reading):
    cells = []
    for seed, (shared, finer) in enumerate(values):
        cell = _cell("linear", 1e-3, seed, 0.5, shared)
        cell[key] = {"added_mean_absolute": finer}
        cells.append(cell)
    row = regime_map.summarize(cells)["rows"][0]
    diff = row[f"{key}_minus_shared"]
    if all(finer > shared for shared, finer in values):  # unpaired overlap, paired above zero
        assert row["added"][1] < row[key][0] and diff[1] > 0
    else:
        assert diff[2] < 0
    table = regime_map.render({"summary": regime_map.summarize(cells), "cells": cells, "config": {
        "tasks": ["a", "b"], "control": "z", "steps": 1, "test_size": 1}})
    assert header in table and "| linear | 0.001 | 70.0 [" in table and reading in table


def test_merge_can_keep_only_seeds_every_mode_finished(regime_map, tmp_path):
    config = {"tasks": ["a", "b"], "control": "z", "steps": 1, "train_size": 1, "val_size": 1, "test_size": 1,
              "no_negation": True, "modes": ["nonlinear", "linear"], "seeds": [0, 1], "lrs": [1e-3]}
    cells = [_cell("nonlinear", 1e-3, 0, 0.5, 0.6), _cell("linear", 1e-3, 0, 0.5, 0.6),
             _cell("nonlinear", 1e-3, 1, 0.5, 0.6)]  # seed 1's linear cell never finished
    (tmp_path / "run.json").write_text(json.dumps({"config": config, "cells": cells}))
    regime_map.merge([tmp_path / "run.json"], tmp_path / "out.json", complete_seeds=True)
    out = json.loads((tmp_path / "out.json").read_text())
    assert [(c["mode"], c["seed"]) for c in out["cells"]] == [("nonlinear", 0), ("linear", 0)]
    assert out["left_out_incomplete_seeds"] == [["nonlinear", 1e-3, 1]]


def test_vision_tables_are_rendered_from_the_committed_results(load_benchmark):
    vs = load_benchmark("vision_tasks")
    results = json.loads(vs.RESULTS.read_text())
    assert _close(json.loads(json.dumps(vs.summarize(results["cells"]))), results["summary"])
    doc = vs.DOC.read_text()
    assert _block(vs.DOC, vs.MARKERS) == vs.render(results), \
        "docs/vision_benchmark.md is stale: run benchmarks/vision_tasks.py --render"
    assert vs.tiny_table(results["tiny_transformers"]) in doc, "the tiny ViT/CLIP table differs from the results"
    for lr in sorted({c["lr"] for c in results["cells"]}):
        for mode in ("nonlinear", "linear"):
            name = f"vision_xi_{mode}_lr{lr:g}.png"
            assert (vs.DOCS / name).is_file() and f"]({name})" in doc, f"{name} missing or not linked"
    assert (vs.DOCS / "vision_cosines.png").is_file() and "](vision_cosines.png)" in doc


def test_cross_space_and_best_checkpoints_are_paired_by_seed(regime_map):
    cells = []
    for seed in (0, 1, 2):
        for mode in ("nonlinear", "linear"):
            cell = _cell(mode, 1e-3, seed, 0.5, 0.6 + seed / 10)  # a seed spread far larger than the effects
            cell["cross_space"] = {"added_mean_absolute": 0.65 + seed / 10 + seed / 100}  # +5, +6, +7 points
            best = _cell(mode, 1e-3, seed, 0.5, 0.58 + seed / 10 - seed / 200)  # merges 2-3 points worse
            best["finetuned"]["test"] = {"a": 0.62 + seed / 10 + seed / 200, "b": 0.62 + seed / 10 + seed / 200}
            cell["best_on_validation"] = {k: v for k, v in best.items() if k not in ("mode", "lr", "seed")}
            cell["best_on_validation"]["cross_space"] = None
            cells.append(cell)
    summary = regime_map.summarize(cells)
    row = summary["rows"][0]
    assert row["cross_minus_own"][0] == pytest.approx(0.06) and row["cross_minus_own"][1] > 0  # resolved when paired
    assert row["cross"][1] < row["added"][0]  # ... though unpaired the intervals overlap
    assert "cross" not in summary["best_on_validation"]["rows"][0]  # the final cells' cross run is not borrowed
    diff = {r["mode"]: r for r in summary["best_minus_final"]}
    assert diff["linear"]["added"][0] == pytest.approx(-0.025) and diff["linear"]["added"][2] < 0
    assert diff["linear"]["finetuned"][0] == pytest.approx(0.025) and diff["linear"]["finetuned"][1] > 0
    table = regime_map.render({"summary": summary, "cells": cells, "config": {
        "tasks": ["a", "b"], "control": "z", "steps": 1, "test_size": 1, "eval_every": 20}})
    assert re.search(r"\| nonlinear \| 0\.001 \| [^|]+ \| [^|]+ \| \+6\.0 \[[^]]+\]: other space higher \|", table)
    assert re.search(r"\| linear \| 0\.001 \| \+2\.5 \[[^]]+\]: best higher \| -2\.5 \[[^]]+\]: final higher "
                     r"\(best worse\) \|", table)


def test_per_task_negation_counts_seeds_below_chance(regime_map):
    cells = []
    for seed, (a, b) in enumerate([(0.30, 0.70), (0.45, 0.60), (0.55, 0.40)]):
        cell = _cell("linear", 5e-4, seed, 0.5, 0.6)
        cell["added_test"] = {"a": 0.6, "b": 0.6}
        rest = {"target_retained": 0.5, "control_test": 0.9, "pretrained_control_test": 0.9, "budget_met": True}
        cell["negation"] = {"a": {"target_test": a, "chance": 0.5, **rest},
                            "b": {"target_test": b, "chance": 0.25, **rest}}
        cells.append(cell)
    rows = regime_map.summarize(cells)["per_task"]
    a, b = ({**r, **r["modes"][0]} for r in rows)
    assert a["below_chance"] == 2 and b["below_chance"] == 0  # 0.30 and 0.45 < 0.5; nothing < 0.25
    assert a["negated"][0] == pytest.approx(0.4333333) and b["chance"] == 0.25
    assert a["negated"][1] == pytest.approx(math.sqrt(0.015833333 / 3))
    table = regime_map.render({"summary": regime_map.summarize(cells), "cells": cells, "config": {
        "tasks": ["a", "b"], "control": "z", "steps": 1, "test_size": 1}})
    assert "| a | 50.0 | 50.0 ± 0.0 | 43.3 ± 7.3 (2/3 below) |" in table
    cells[2].pop("negation")  # a seed without negation: no per-task negation column for the group
    assert "negated" not in regime_map.summarize(cells)["per_task"][0]["modes"][0]


def test_best_checkpoint_phrase_names_the_checks_of_a_training_run_and_of_saved_vectors(regime_map):
    trained = {"config": {"eval_every": 20}, "cells": []}
    assert regime_map.check_phrase(trained) == "every 20 steps and after the last"
    curve = {"curve": [[20, 0.7], [40, 0.8], [60, 0.75]]}
    from_vectors = {"config": {}, "cells": [{"best_on_validation": {"checks": {"a": curve, "b": curve}}}]}
    assert regime_map.check_phrase(from_vectors) == "at steps 20, 40, 60, as the saved vectors record"
    assert "None" not in regime_map.check_phrase({"config": {}, "cells": [{}]})


def test_a_zero_width_interval_reads_as_one_seed_or_as_no_difference_at_all(regime_map):
    # two negation rules that chose the same coefficients in all three seeds differ by exactly 0:
    # that is no difference, not a missing interval
    assert regime_map._reading([0.0, 0.0, 0.0], True) == "no difference in any seed"
    assert regime_map._reading([0.02, 0.02, 0.02], True) == "one seed, no interval"
    assert regime_map._reading([0.02, 0.01, 0.03], True) == "linear higher"
    assert regime_map._reading([-0.02, -0.03, -0.01], False, "a", "b") == "b higher"
    assert regime_map._reading([0.0, -0.01, 0.01], True) == "not resolved"
