"""join_runs: the results files of one study, run as several processes, read back as one."""

from __future__ import annotations

import json

import pytest

from hf_taskarith.evaluation.study_runs import join_runs, write_results


def _run(path, config, cells):
    path.write_text(json.dumps({"config": config, "cells": [{"mode": m, "lr": lr, "seed": s} for m, lr, s in cells]}))
    return path


def test_join_runs_keeps_every_cell_in_file_order(tmp_path):
    a = _run(tmp_path / "a.json", {"steps": 60, "lrs": [1e-4]}, [("linear", 1e-4, 0), ("nonlinear", 1e-4, 0)])
    b = _run(tmp_path / "b.json", {"steps": 60, "lrs": [1e-3]}, [("linear", 1e-3, 0)])
    runs, cells = join_runs([a, str(b)], ["steps"])
    assert [r["config"]["lrs"] for r in runs] == [[1e-4], [1e-3]]
    assert [(c["mode"], c["lr"]) for c in cells] == [("linear", 1e-4), ("nonlinear", 1e-4), ("linear", 1e-3)]


def test_join_runs_refuses_other_settings_and_names_them(tmp_path):
    a = _run(tmp_path / "a.json", {"steps": 60, "tasks": ["x"]}, [("linear", 1e-4, 0)])
    b = _run(tmp_path / "b.json", {"steps": 80, "tasks": ["x"]}, [("linear", 1e-3, 0)])
    with pytest.raises(ValueError, match=r"b\.json was run with other settings than .*a\.json \(steps\)"):
        join_runs([a, b], ["steps", "tasks"])


def test_join_runs_fills_unrecorded_settings_from_defaults(tmp_path):
    old = _run(tmp_path / "old.json", {"steps": 60}, [("linear", 1e-4, 0)])  # written before "cross" existed
    new = _run(tmp_path / "new.json", {"steps": 60, "cross": False}, [("linear", 1e-3, 0)])
    with pytest.raises(ValueError, match="cross"):
        join_runs([old, new], ["steps", "cross"])
    assert len(join_runs([old, new], ["steps", "cross"], defaults={"cross": False})[1]) == 2


def test_join_runs_refuses_a_cell_twice_and_no_files(tmp_path):
    a = _run(tmp_path / "a.json", {"steps": 60}, [("linear", 1e-4, 2)])
    b = _run(tmp_path / "b.json", {"steps": 60}, [("nonlinear", 1e-4, 2), ("linear", 1e-4, 2)])
    twice = r"cell \('linear', 0\.0001, 2\) is in more than one file \(again in .*b\.json\)"
    with pytest.raises(ValueError, match=twice):
        join_runs([a, b], ["steps"])
    with pytest.raises(ValueError, match="no results files"):
        join_runs([], ["steps"])


def test_write_results_is_atomic_and_round_trips(tmp_path, monkeypatch):
    target = tmp_path / "new" / "run.json"
    write_results(target, {"cells": [{"lr": 1e-3}], "path": tmp_path})  # folder created; Path written as str
    assert json.loads(target.read_text()) == {"cells": [{"lr": 1e-3}], "path": str(tmp_path)}

    def broken(self, text):
        self.open("w").write(text[:5])  # a crash mid-write: only the temporary file is touched
        raise OSError("disk full")

    monkeypatch.setattr(type(target), "write_text", broken)
    with pytest.raises(OSError, match="disk full"):
        write_results(target, {"cells": []})
    monkeypatch.undo()
    assert json.loads(target.read_text())["cells"] == [{"lr": 1e-3}]  # the previous file is intact
