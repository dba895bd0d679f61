"""README and docs tables that are generated from committed results stay what the results say.

``benchmarks/regime_map.py --render`` writes the regime map's tables between markers in
docs/regime_map.md; this test re-renders them from the committed JSON (and
re-derives its summary from the per-cell records), so an edited figure or a stale table fails.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def regime_map():
    spec = importlib.util.spec_from_file_location("regime_map", ROOT / "benchmarks" / "regime_map.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _block(path: Path, markers) -> str:
    begin, end = markers
    found = re.search(re.escape(begin) + r"\n(.*?)\n" + re.escape(end), path.read_text(), re.S)
    assert found, f"{path.name}: no generated regime-map block"
    return found.group(1)


def _close(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, float):
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-12) or (math.isnan(a) and math.isnan(b))
    return a == b


def test_regime_map_tables_are_rendered_from_the_committed_results(regime_map):
    results = json.loads(regime_map.RESULTS.read_text())
    assert _close(json.loads(json.dumps(regime_map.summarize(results["cells"]))), results["summary"])
    table = regime_map.render(results)
    doc = ROOT / "docs" / "regime_map.md"
    assert _block(doc, regime_map.MARKERS) == table, f"{doc.name} is stale: run benchmarks/regime_map.py --render"


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
