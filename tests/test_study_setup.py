"""What the studies share: task lists, one frozen head per task, the provenance of a results file,
and one regime-map cell run end to end on a tiny BERT and synthetic tasks (the path the real
MiniLM study takes, at a size the CPU suite can afford)."""

from __future__ import annotations

import random
import subprocess

import pytest
import torch

from hf_taskarith.evaluation.provenance import commits_phrase, git_commit, package_versions, run_record, short_commit
from hf_taskarith.training.heads import make_head, task_heads
from hf_taskarith.training.tasks import RawTask, load_tasks, register_task

WORDS = {"_smoke_colour": (["red", "blue"], ["green", "grey"]), "_smoke_animal": (["cat", "dog"], ["owl", "bee"]),
         "_smoke_food": (["rice", "bread"], ["soup", "cake"]), "_smoke_control": (["sun", "rain"], ["snow", "wind"])}
FILLER = ["the", "a", "it", "was", "and", "this", "one", "very"]


def _raw(name: str) -> RawTask:
    rng = random.Random(name)
    texts, labels = [], []
    for i in range(120):
        y = i % 2
        words = [rng.choice(FILLER) for _ in range(rng.randint(3, 6))]
        words.insert(rng.randrange(len(words) + 1), rng.choice(WORDS[name][y]))
        texts.append(" ".join(words))
        labels.append(y)
    return RawTask(texts, labels, ("no", "yes"), "synthetic")


for _name in WORDS:
    register_task(_name, lambda n=_name: _raw(n), description="synthetic (tests)", replace=True)


@pytest.fixture(scope="module")
def tiny_bert():
    from transformers import BertConfig, BertModel, BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *FILLER, *(w for p, n in WORDS.values() for w in p + n)]
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    return BertModel(config, add_pooling_layer=False).eval(), BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})


def test_load_tasks_keeps_order_and_refuses_a_task_twice():
    tasks = load_tasks(["_smoke_food", "_smoke_colour"], train_size=40, val_size=20, test_size=20, seed=1)
    assert [t.name for t in tasks] == ["_smoke_food", "_smoke_colour"]
    assert len(tasks[0].test.texts) == 20
    with pytest.raises(ValueError, match=r"_smoke_food.*more than once"):
        load_tasks(["_smoke_food", "_smoke_food"], train_size=40, val_size=20, test_size=20)


def test_task_heads_are_the_per_task_heads_and_random_ones_differ(tiny_bert):
    base, tok = tiny_bert
    tasks = load_tasks(["_smoke_colour", "_smoke_animal"], train_size=40, val_size=20, test_size=20)
    probes = task_heads("probe", base, tok, tasks, generator=torch.Generator().manual_seed(0))
    alone = make_head("probe", base, tok, tasks[1].train.texts, tasks[1].train.labels, 2,
                      generator=torch.Generator())
    assert torch.equal(probes["_smoke_animal"].weight, alone.weight)
    rand = task_heads("random", base, tok, tasks, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(rand["_smoke_colour"].weight, rand["_smoke_animal"].weight)
    with pytest.raises(ValueError, match="more than once"):
        task_heads("probe", base, tok, [tasks[0], tasks[0]], generator=torch.Generator())


def _git(repo, *args):
    subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=repo, check=True,
                   capture_output=True)


def test_provenance_names_the_commit_and_marks_uncommitted_changes(tmp_path):
    assert git_commit(tmp_path) is None  # not a work tree
    _git(tmp_path, "init", "-q")
    (tmp_path / "f.txt").write_text("one")
    _git(tmp_path, "add", "f.txt")
    _git(tmp_path, "commit", "-qm", "one")
    head = git_commit(tmp_path)
    assert head is not None and len(head) == 40
    (tmp_path / "f.txt").write_text("two")
    assert git_commit(tmp_path) == f"{head}+dirty"
    assert short_commit(f"{head}+dirty") == f"{head[:7]}+dirty" and short_commit(head) == head[:7]
    assert short_commit(None) == "unknown"
    assert commits_phrase([head]) == f"commit `{head[:7]}`" and commits_phrase([]) == "commit `unknown`"
    assert commits_phrase([head, f"{head}+dirty"]) == f"commits `{head[:7]}`, `{head[:7]}+dirty`"
    versions = package_versions(("torch", "surely-not-an-installed-distribution"))
    assert versions["torch"] and versions["surely-not-an-installed-distribution"] is None
    env = run_record(tmp_path)["environment"]
    assert env["packages"]["transformers"] and env["python"].count(".") == 2


FINE = ["0:0.2:0.01", "0.25:1:0.05"]  # a negation grid finer near 0


@pytest.fixture(scope="module")
def regime_cells(load_benchmark, tiny_bert, tmp_path_factory):
    """Both modes of one regime-map cell on the tiny BERT: trained (vectors saved), then again from
    the saved vectors, and the linear one with the direct tangent evaluation."""
    rm = load_benchmark("regime_map")
    base, tok = tiny_bert
    saved = tmp_path_factory.mktemp("vectors")
    common = ["--tasks", "_smoke_colour", "_smoke_animal", "_smoke_food", "--control", "_smoke_control",
              "--steps", "3", "--train-size", "48", "--val-size", "24", "--test-size", "24", "--subsets", "2"]
    args = rm.parser().parse_args([*common, "--save-vectors", str(saved), "--per-task", "--cross"])
    setting = rm.Seed(0, args, base, tok)
    trained = {m: rm.one_cell(m, 1e-3, 0, args, base, tok, setting) for m in ("nonlinear", "linear")}
    again = rm.parser().parse_args([*common, "--from-vectors", str(saved), "--cross"])
    loaded = {m: rm.one_cell(m, 1e-3, 0, again, base, tok) for m in ("nonlinear", "linear")}
    direct = rm.one_cell("linear", 1e-3, 0, rm.parser().parse_args([*common, "--from-vectors", str(saved),
                                                                     "--direct-tangent"]), base, tok)
    chance = rm.one_cell("linear", 1e-3, 0, rm.parser().parse_args([*common, "--from-vectors", str(saved),
                                                                     "--negation-objective", "chance_distance",
                                                                     "--negation-grid", *FINE]),
                         base, tok)
    return rm, trained, loaded, direct, chance, saved


def test_regime_cell_runs_the_whole_protocol(regime_cells):
    rm, trained, *_ = regime_cells
    for mode, cell in trained.items():
        assert set(cell["negation"]) == {"_smoke_colour", "_smoke_animal", "_smoke_food"}
        for neg in cell["negation"].values():  # a separate control, a recorded budget, a coefficient on the grid
            assert isinstance(neg["budget_met"], bool) and 0.0 <= neg["coefficient"] <= 1.0
            assert neg["pretrained_control_test"] == cell["pretrained"]["test"]["_smoke_control"]
        assert 0.0 <= cell["coefficient"] <= 1.0 and 0.0 <= cell["added_mean_absolute"] <= 1.0
        assert [s["k"] for s in cell["subsets"]] == [2] and cell["per_task"]["coefficients"]
        assert cell["cross_space"]["space"] == ("weight" if mode == "linear" else "tangent")
        assert all(len(bits) == 24 for bits in cell["added_correct"].values())
    assert trained["linear"]["tangent_evaluation"] == "cached" and trained["nonlinear"]["tangent_evaluation"] is None
    summary = rm.summarize(list(trained.values()))
    pair = summary[rm.pair_key("linear", "nonlinear")][0]
    assert set(pair) >= {"added", "negated", "control", "added_bootstrap"}
    rows = {r["mode"]: r for r in summary["rows"]}
    met = sum(n["budget_met"] for n in trained["linear"]["negation"].values())
    assert rows["linear"]["budget_met"] == [met, 3]
    config = {"tasks": ["_smoke_colour", "_smoke_animal", "_smoke_food"], "control": "_smoke_control", "steps": 3,
              "test_size": 24}
    table = rm.render({"summary": summary, "config": config, "cells": list(trained.values()), "commit": "0" * 40})
    assert f"| {met}/3 |" in table and "negated target" in table


def test_saved_vectors_and_the_direct_tangent_path_reproduce_the_cell(regime_cells):
    _, trained, loaded, direct, *_ = regime_cells
    for mode in trained:
        for key in ("finetuned", "coefficient", "added_test", "negation", "subsets", "cross_space"):
            assert loaded[mode][key] == trained[mode][key], (mode, key)
        assert loaded[mode]["train_seconds"] is None
    for split in ("val", "test"):
        assert direct["finetuned"][split] == pytest.approx(trained["linear"]["finetuned"][split], abs=1e-9)
    assert direct["coefficient"] == trained["linear"]["coefficient"]
    assert direct["added_test"] == pytest.approx(trained["linear"]["added_test"], abs=1e-9)
    assert direct["tangent_evaluation"] == "direct"


def test_learned_coefficients_are_applied_in_the_space_of_the_cell(regime_cells, tiny_bert, monkeypatch):
    """``--learned``: with a zero learning rate every per-layer coefficient stays at its start
    (0.5 here), and the merge scored on test must be ``theta0 + 0.5 sum tau`` in weight space for
    ordinary vectors and ``delta = 0.5 sum tau`` of the linearized model for linearized ones;
    with a positive rate the coefficients move, within [0, 1]."""
    import torch

    rm, trained, *_, saved = regime_cells
    base, tok = tiny_bert
    tasks = ["_smoke_colour", "_smoke_animal", "_smoke_food"]
    args = rm.parser().parse_args(["--tasks", *tasks, "--control", "_smoke_control", "--steps", "3",
                                   "--train-size", "48", "--val-size", "24", "--test-size", "24", "--no-negation",
                                   "--learned", "cross_entropy", "--from-vectors", str(saved)])
    scored: list = []
    evaluate = rm.Analysis.evaluate

    def spy(self, model, split_name, which=None):  # what the model holds when it is scored
        if split_name == "test" and which is None:
            state = model.deltas() if hasattr(model, "deltas") else dict(model.named_parameters())
            scored.append({n: p.detach().clone() for n, p in state.items()})
        return evaluate(self, model, split_name, which)

    monkeypatch.setattr(rm.Analysis, "evaluate", spy)
    monkeypatch.setitem(rm.LEARNED, "lr", 0.0)
    monkeypatch.setitem(rm.LEARNED, "init", 0.5)
    original = {n: p.detach().clone() for n, p in base.named_parameters()}
    for mode in trained:
        scored.clear()
        learned = rm.one_cell(mode, 1e-3, 0, args, base, tok)["learned"]
        assert {c for per_layer in learned["coefficients"].values() for c in per_layer.values()} == {0.5}
        vectors, _, _ = rm.load_vectors(saved, mode, 1e-3, 0, tasks, 3)
        name = "encoder.layer.0.attention.self.query.weight"
        moved = 0.5 * sum(vectors[t][name].float() for t in tasks)
        expected = moved if mode == "linear" else original[name] + moved
        assert torch.allclose(scored[-1][name], expected, atol=1e-6), mode
        assert float(moved.abs().max()) > 0  # the vectors are not zero: the check can fail
    monkeypatch.setitem(rm.LEARNED, "lr", 0.05)
    moved = rm.one_cell("linear", 1e-3, 0, args, base, tok)["learned"]
    values = [c for per_layer in moved["coefficients"].values() for c in per_layer.values()]
    assert all(0.0 <= c <= 1.0 for c in values) and len({round(c, 6) for c in values}) > 1
    assert any(layer.startswith("encoder.layer.") for layer in moved["coefficients"]["_smoke_colour"])


def test_adapter_modes_run_a_cell_and_pair_llora_with_lora(load_benchmark, tiny_bert):
    rm = load_benchmark("regime_map")
    base, tok = tiny_bert
    args = rm.parser().parse_args(["--tasks", "_smoke_colour", "_smoke_animal", "--control", "_smoke_control",
                                   "--steps", "2", "--train-size", "32", "--val-size", "16", "--test-size", "16",
                                   "--rank", "2", "--adapter-targets", "query", "value"])
    setting = rm.Seed(1, args, base, tok)
    cells = [rm.one_cell(m, 1e-3, 1, args, base, tok, setting) for m in ("lora", "llora")]
    assert cells[1]["tangent_evaluation"] == "cached" and cells[0]["tangent_evaluation"] is None
    for cell in cells:
        assert set(cell["negation"]) == {"_smoke_colour", "_smoke_animal"}
        matrix = cell["cosines"]["matrix"]
        assert all(abs(cos) <= 1 + 1e-6 for row in matrix for cos in row)
        assert all(abs(matrix[i][i] - 1) < 1e-4 for i in range(2))  # non-zero vectors: the adapters trained
    summary = rm.summarize(cells)
    (pair,) = summary[rm.pair_key("llora", "lora")]
    assert pair["seeds"] == [1] and "added" in pair


def test_negation_can_select_on_the_distance_from_chance(regime_cells):
    """``--negation-objective chance_distance``: within the control budget, the coefficient whose
    target validation accuracy is closest to chance (the search records every candidate)."""
    rm, cell = regime_cells[0], regime_cells[4]
    for neg in cell["negation"].values():
        assert [alpha for alpha, *_ in neg["search"]] == rm.expand_grid(FINE)  # the --negation-grid candidates
        floor = 0.95 * cell["pretrained"]["val"]["_smoke_control"]
        distance = {alpha: abs(acc - neg["chance"]) for alpha, acc, _ in neg["search"]}
        allowed = [alpha for alpha, _, control in neg["search"] if alpha > 0 and control >= floor]
        assert neg["budget_met"] == bool(allowed)
        # the chosen one is the closest to chance among the allowed (or nothing, alpha 0, when none is closer)
        assert distance[neg["coefficient"]] == pytest.approx(min(distance[a] for a in [0.0, *allowed]), abs=1e-12)


def test_negation_grid_tokens_expand_and_bad_ones_are_refused_by_name(load_benchmark, capsys):
    rm = load_benchmark("regime_map")
    grid = rm.expand_grid(FINE)
    assert len(grid) == 37 and grid[:3] == [0.0, 0.01, 0.02] and grid[20:23] == [0.2, 0.25, 0.3] and grid[-1] == 1.0
    assert rm.expand_grid(["0.5", "0:0.1:0.05", "0.05"]) == [0.0, 0.05, 0.1, 0.5]  # sorted, distinct
    assert rm.grid_phrase(grid) == "0 to 0.2 step 0.01, 0.25 to 1 step 0.05"
    assert rm.grid_phrase([0, 0.01, 0.02, 0.1, 0.3, 0.5]) == "0 to 0.02 step 0.01, 0.1 to 0.5 step 0.2"
    assert rm.grid_phrase([0.1, 0.5]) == "0.1, 0.5" and rm.grid_phrase([0.5]) == "0.5"
    for bad, says in (("x", "neither a coefficient"), ("0:1", "neither a coefficient"), ("1:0:0.1", "START <= STOP"),
                      ("0:1:0", "STEP > 0"), ("-0.1", ">= 0"), ("0", "no coefficient > 0")):
        with pytest.raises(SystemExit):
            rm.parser().parse_args(["--negation-grid", bad])
        assert says in capsys.readouterr().err
    cfg = {"negation_objective": "chance_distance", "negation_grid": grid}
    assert "Negation coefficients: 0 to 0.2 step 0.01, 0.25 to 1 step 0.05." in rm._negation_rule(cfg)
    assert "Negation coefficients" not in rm._negation_rule({})  # older files: the paper's grid
