"""TangentOutputs: a linearized model's outputs at any coefficients from one pass per vector,
equal to what TangentEditor computes (exact in float64), and usable by task_addition/task_negation."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from transformers import BertConfig, BertModel

from hf_taskarith import LinearizedModel
from hf_taskarith.errors import KeyMismatchError
from hf_taskarith.evaluation.arithmetic import task_addition, task_negation
from hf_taskarith.evaluation.editing import ModelEditor, TangentEditor
from hf_taskarith.evaluation.tangent_outputs import TangentOutputs
from hf_taskarith.training.encoders import mean_pool


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    encoder = BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=64, hidden_dropout_prob=0.0,
                                   attention_probs_dropout_prob=0.0), add_pooling_layer=False).double().eval()
    lin = LinearizedModel(encoder)
    tvs = {}
    for task, seed in (("a", 1), ("b", 2), ("c", 3)):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in lin.deltas().values():
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05)
        tvs[task] = lin.task_vector()
    with torch.no_grad():
        for p in lin.deltas().values():
            p.zero_()
    g = torch.Generator().manual_seed(4)
    batches = {s: {"input_ids": torch.randint(0, 50, (5, 9), generator=g),
                   "attention_mask": torch.ones(5, 9, dtype=torch.long).tril(4)[:, :9]} for s in ("val", "test")}
    for b in batches.values():
        b["attention_mask"][:, 0] = 1
    return encoder, lin, tvs, batches


def _pooled(model, batch):
    return mean_pool(model(**batch).last_hidden_state, batch["attention_mask"])


def _outputs(batches):
    return lambda model: {s: _pooled(model, b) for s, b in batches.items()}


def test_outputs_at_any_coefficients_equal_the_tangent_editor_in_float64(setup):
    _, lin, tvs, batches = setup
    editor = TangentEditor(lin, tvs)
    cache = TangentOutputs(editor, _outputs(batches))
    rng = random.Random(0)
    for _ in range(4):
        coefs = {t: rng.uniform(-1.5, 1.5) for t in rng.sample(sorted(tvs), rng.randint(1, 3))}
        with editor.edited(coefs) as model:
            want = {s: _pooled(model, b) for s, b in batches.items()}
        with cache.edited(coefs) as point:
            for s in batches:
                got = point.output(s)
                assert got.dtype == torch.float64
                torch.testing.assert_close(got, want[s], rtol=1e-10, atol=1e-10)
    with cache.edited({}) as point:  # no coefficients: theta0
        torch.testing.assert_close(point.output("val"), _pooled(lin, batches["val"]), rtol=0, atol=0)


def test_addition_and_negation_pick_the_same_coefficients_through_the_cache(setup):
    _, lin, tvs, batches = setup
    editor = TangentEditor(lin, tvs)
    cache = TangentOutputs(editor, _outputs(batches))
    probe = torch.randn(32, generator=torch.Generator().manual_seed(5), dtype=torch.float64)

    def score(features):  # a smooth, non-linear function of the features, per "task"
        return {t: float(torch.sigmoid(features @ probe * k).mean()) for k, t in enumerate(("a", "b", "c"), 1)}

    def direct(model, split):
        return score(_pooled(model, batches[split]))

    def cached(point, split):
        return score(point.output(split))

    ft = {"a": 0.9, "b": 0.8, "c": 0.7}
    want = task_addition(editor, direct, finetuned_val=ft, finetuned_test=ft)
    got = task_addition(cache, cached, finetuned_val=ft, finetuned_test=ft)
    assert got.coefficients == want.coefficients
    assert got.absolute == pytest.approx(want.absolute, rel=1e-9)
    n_want = task_negation(editor, direct, "a", controls=["b"])
    n_got = task_negation(cache, cached, "a", controls=["b"])
    assert (n_got.coefficient, n_got.budget_met) == (n_want.coefficient, n_want.budget_met)
    assert n_got.target_accuracy == pytest.approx(n_want.target_accuracy, rel=1e-9)


def test_refusals_are_clear(setup):
    encoder, lin, tvs, batches = setup
    with pytest.raises(TypeError, match="use ModelEditor"):
        TangentOutputs(ModelEditor(encoder, tvs), _outputs(batches))
    cache = TangentOutputs(TangentEditor(lin, {"a": tvs["a"]}), _outputs(batches))
    with pytest.raises(KeyMismatchError, match="no task vector for \\['z'\\]"):
        cache.set({"z": 1.0})
    with pytest.raises(ValueError, match="per-tensor coefficients"):
        cache.set({"a": {"embeddings.word_embeddings.weight": 1.0}})
    with pytest.raises(KeyError, match="no output 'train'"):
        cache.reset().output("train")
    calls = []

    def shifty(model):  # another shape for the second pass
        calls.append(1)
        return {"val": torch.zeros(len(calls), 3, dtype=torch.float64)}

    with pytest.raises(ValueError, match="other keys or shapes"):
        TangentOutputs(TangentEditor(lin, {"a": tvs["a"]}), shifty)


def test_restricted_views_add_a_subset_and_refuse_vectors_outside_it(setup):
    from hf_taskarith.evaluation.editing import restrict

    encoder, lin, tvs, batches = setup
    cache = TangentOutputs(TangentEditor(lin, tvs), _outputs(batches))
    view = restrict(cache, ["a", "c"])
    assert sorted(view.task_vectors) == ["a", "c"]
    with view.edited({"a": 0.3, "c": -0.7}) as point, cache.edited({"a": 0.3, "c": -0.7}) as direct:
        assert torch.equal(point.output("val"), direct.output("val"))
    with pytest.raises(KeyMismatchError, match="in this view"):
        view.set({"b": 1.0})
    with pytest.raises(KeyMismatchError, match="no task vector for"):
        restrict(cache, ["a", "zzz"])
    with pytest.raises(ValueError, match="twice"):
        restrict(cache, ["a", "a"])
    # task_addition over the view searches only the subset's coefficients; weight space too
    editor = ModelEditor(copy.deepcopy(encoder), tvs)
    sub = restrict(editor, ["b"])
    name = next(k for k in tvs["b"].keys() if k in editor.params)
    target = editor.base[name] + 0.4 * tvs["b"][name]

    def evaluate(model, split):  # best where the weights are theta0 + 0.4 tau_b
        return {"b": 1.0 - float((editor.params[name] - target).abs().max())}

    res = task_addition(sub, evaluate, finetuned_val={"b": 1.0}, finetuned_test={"b": 1.0})
    assert list(res.coefficients) == ["b"] and res.coefficients["b"] == pytest.approx(0.4)
    assert torch.equal(editor.params[name], editor.base[name])  # restored
