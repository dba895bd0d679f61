"""The vision study's protocol (benchmarks/vision_tasks.py) end to end on a tiny convolutional
network and synthetic image tasks: the cells the real EfficientNet-Lite0 run computes, their
summary, tables and merging, at a size the CPU suite affords."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn


def _raw(vs, pattern: int, num_labels: int):
    """8x8 images whose label is which of ``num_labels`` cells (selected by ``pattern``) is bright."""
    rng = np.random.default_rng(pattern)
    n = 160
    labels = rng.integers(0, num_labels, size=n)
    images = rng.integers(0, 60, size=(n, 8, 8)).astype(np.uint8)
    for img, y in zip(images, labels):
        r, c = divmod((int(y) + pattern) % 4, 2)
        img[4 * r:4 * r + 4, 4 * c:4 * c + 4] += 12  # faint: the probe must not be perfect
    return vs.RawTask(f"synthetic pattern {pattern}", num_labels, images, labels.astype(np.int64))


class _TinyFeatures(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU6(),
                                 nn.AdaptiveAvgPool2d(2), nn.Flatten())

    def forward(self, pixel_values):
        return self.net(pixel_values)


@pytest.fixture(scope="module")
def vs(load_benchmark):
    return load_benchmark("vision_tasks")


@pytest.fixture()
def study_args(vs, monkeypatch, tmp_path):
    for name, (pattern, k) in {"_a": (0, 4), "_b": (1, 4), "_c": (2, 2), "_ctl": (3, 4)}.items():
        monkeypatch.setitem(vs.LOADERS, name, lambda p=pattern, k=k: _raw(vs, p, k))

    def tiny_backbone(image_size):
        torch.manual_seed(0)
        return _TinyFeatures().eval()

    monkeypatch.setattr(vs, "load_lite0", tiny_backbone)
    args = vs.parser().parse_args(
        ["--tasks", "_a", "_b", "_c", "--control", "_ctl", "--image-size", "8", "--probe-size", "40",
         "--train-size", "60", "--val-size", "30", "--test-size", "30", "--steps", "6", "--batch-size", "16",
         "--xi-alphas", "-1", "0", "1", "--lrs", "0.005", "--seeds", "0", "--no-progress",
         "--json", str(tmp_path / "vision.json")])
    return args


def test_a_cell_follows_the_library_protocol_in_both_modes(vs, study_args):
    study = vs.Study(study_args)
    assert [t.name for t in study.tasks] == ["_a", "_b", "_c"] and study.control.name == "_ctl"
    cells = [study.cell(mode, 0.005, 0) for mode in ("nonlinear", "linear")]
    for cell in cells:
        assert set(cell["addition"]["test"]) == {"_a", "_b", "_c"}  # the control is never added
        assert 0.0 <= cell["addition"]["coefficient"] <= 1.0
        for neg in cell["negation"].values():
            assert isinstance(neg["budget_met"], bool)
            allowed = [a for a, _, control in neg["search"]
                       if a > 0 and control >= 0.95 * cell["pretrained"]["control"]["val"]]
            if neg["budget_met"]:  # the paper's rule: lowest target validation accuracy within the budget
                val = dict((a, t) for a, t, _ in neg["search"])  # nothing below pre-trained: alpha 0 stays
                assert neg["coefficient"] in [0.0, *allowed]
                assert val[neg["coefficient"]] == min([val[0.0], *(val[a] for a in allowed)])
            else:
                assert not allowed and neg["coefficient"] == 0.0  # nothing negated, never a silent fallback
        assert len(cell["xi"]) == 3  # every pair of edited tasks
        for x in cell["xi"]:
            xi = torch.tensor(x["xi"])
            assert xi.shape == (3, 3) and float(xi[1, 1]) == 0.0 and float(xi.min()) >= 0.0
            assert x["positive"] == pytest.approx(float(xi[1:, 1:].mean()))
    assert cells[1]["tangent_cache_check_rel_err"] < 1e-4  # the cache equals a direct tangent forward
    # linearized vectors are scored in the tangent space: at coefficient 0 every mode is the pre-trained model
    for cell in cells:
        search = dict((a, t) for a, t, _ in cell["negation"]["_a"]["search"])
        assert search[0.0] == pytest.approx(cell["pretrained"]["val"]["_a"])


def test_summary_pairs_by_seed_and_tunes_the_lr_on_validation(vs):
    def cell(mode, lr, seed, added, added_val):
        acc = {"_a": added, "_b": added}
        neg = {"coefficient": 0.5, "budget_met": True, "target": 0.3, "retained": 0.2, "control": 0.8,
               "pretrained_target": 0.6, "search": []}
        return {"mode": mode, "lr": lr, "seed": seed, "finetuned": {"test": {"_a": 0.9, "_b": 0.9}},
                "pretrained": {"test": {"_a": 0.5, "_b": 0.5}, "val": {"_a": 0.5, "_b": 0.5},
                               "control": {"val": 0.8, "test": 0.8}},
                "addition": {"coefficient": 0.5, "test": acc, "normalized": acc, "val": {"_a": added_val,
                                                                                         "_b": added_val}},
                "negation": {"_a": neg, "_b": neg}, "xi_alphas": [0.0, 1.0],
                "xi": [{"tasks": ["_a", "_b"], "xi": [[0, 0], [0, 0.5]], "positive": 0.125, "within_1": 0.125}],
                "cosine": {"_a": {"_a": 1.0, "_b": 0.1}, "_b": {"_a": 0.1, "_b": 1.0}}}

    # test accuracy favours lr 1 for nonlinear, but validation favours lr 2: the choice must follow validation
    cells = [cell("nonlinear", 1.0, s, 0.9, 0.6) for s in (0, 1)]
    cells += [cell("nonlinear", 2.0, s, 0.7, 0.8) for s in (0, 1)]
    cells += [cell("linear", lr, s, 0.75 + 0.01 * s, 0.7) for lr in (1.0, 2.0) for s in (0, 1)]
    s = vs.summarize(cells)
    assert s["tuned"]["nonlinear"]["lrs"] == [2.0, 2.0]
    assert s["tuned"]["linear"]["lrs"] == [1.0, 1.0]  # a tie goes to the smaller lr
    assert s["tuned"]["paired_linear_minus_nonlinear"][0] == pytest.approx(0.755 - 0.7)
    pair = next(p for p in s["paired_linear_minus_nonlinear"] if p["lr"] == 1.0)
    assert pair["seeds"] == [0, 1] and pair["added"][0] == pytest.approx(0.755 - 0.9)
    table = vs.render({"config": {"tasks": ["_a", "_b"], "control": "_ctl", "steps": 6, "test_size": 30},
                       "summary": s, "cells": cells})
    assert "| nonlinear | 1 | 90.0 | 50.0 | 90.0" in table and "4/4" in table


def test_merge_refuses_a_cell_twice_and_other_settings(vs, study_args, tmp_path):
    config = vs._config(study_args)
    cell = {"mode": "linear", "lr": 0.005, "seed": 0}
    a, b, c = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    a.write_text(json.dumps({"config": config, "cells": [cell]}))
    b.write_text(json.dumps({"config": config, "cells": [cell]}))
    with pytest.raises(SystemExit, match="more than one file"):
        vs.merge([a, b], tmp_path / "out.json")
    c.write_text(json.dumps({"config": {**config, "steps": 7}, "cells": []}))
    with pytest.raises(SystemExit, match="other settings"):
        vs.merge([a, c], tmp_path / "out.json")
    assert not (tmp_path / "out.json").exists()  # nothing half-written
