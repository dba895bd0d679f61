"""``learn_coefficients`` on a LinearizedModel learns in the tangent space: the forward it
optimizes is ``f_lin(x; theta0 + sum_t lambda_t tau_t)``, what ``TangentEditor`` evaluates."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from hf_taskarith import LinearizedModel
from hf_taskarith.errors import KeyMismatchError
from hf_taskarith.evaluation.coefficients import learn_coefficients
from hf_taskarith.evaluation.editing import ModelEditor, TangentEditor


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).eval()
    lin = LinearizedModel(model)
    tvs = {}
    for task, seed in (("a", 1), ("b", 2)):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in lin.deltas().values():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        tvs[task] = lin.task_vector()
    with torch.no_grad():
        for p in lin.deltas().values():
            p.zero_()
    batch = {"input_ids": torch.randint(0, 50, (6, 7), generator=torch.Generator().manual_seed(3))}
    return model, lin, tvs, batch


def _logits_seen(model, tvs, batch, init):
    """The logits learn_coefficients computes at its first step (lr 0: lambda stays at init)."""
    seen = {}

    def forward(m, b, task):
        out = m(**b).logits
        seen[task] = out.detach().clone()
        return out

    learn_coefficients(model, tvs, {"a": [batch], "b": [batch]}, forward, granularity="task", steps=1, lr=0.0,
                       init=init)
    return seen["a"]


def test_a_linearized_model_is_edited_in_the_tangent_space(setup):
    model, lin, tvs, batch = setup
    got = _logits_seen(lin, tvs, batch, 0.7)
    with TangentEditor(lin, tvs).edited({"a": 0.7, "b": 0.7}) as edited:
        want = edited(**batch).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # the same vectors in weight space give another function (the model is not linear in its weights)
    weight_space = _logits_seen(model, tvs, batch, 0.7)
    with ModelEditor(model, tvs).edited({"a": 0.7, "b": 0.7}) as edited:
        torch.testing.assert_close(weight_space, edited(**batch).logits, rtol=1e-5, atol=1e-6)
    assert (weight_space - got).abs().max() > 1e-3
    assert all(float(p.abs().max()) == 0 for p in lin.deltas().values())  # the model is left unchanged


def test_learning_in_the_tangent_space_lowers_its_loss(setup):
    _, lin, tvs, batch = setup
    with TangentEditor(lin, tvs).edited({"a": 1.0, "b": 0.0}) as edited:
        labels = edited(**batch).logits.argmax(-1)  # the labels task a's vector alone gives

    def loss_at(coefs):
        with TangentEditor(lin, tvs).edited(coefs) as edited:
            return float(torch.nn.functional.cross_entropy(edited(**batch).logits, labels))

    learned = learn_coefficients(lin, tvs, {"a": [batch], "b": [batch]}, lambda m, b, t: m(**b).logits,
                                 granularity="task", objective="cross_entropy", labels=lambda b: labels,
                                 steps=40, lr=0.05, init=0.3)
    coefs = {t: next(iter(c.values())) for t, c in learned.items()}
    assert loss_at(coefs) < loss_at({"a": 0.3, "b": 0.3})
    assert coefs["a"] > 0.3  # towards the vector that made the labels


def test_vectors_of_another_model_are_refused(setup):
    _, lin, tvs, batch = setup
    stranger = tvs["a"].__class__({"not.a.parameter": torch.zeros(2)})
    with pytest.raises(KeyMismatchError, match="not linearized parameters"):
        learn_coefficients(lin, {"x": stranger}, {"x": [batch]}, lambda m, b, t: m(**b).logits, steps=1)


def test_per_layer_coefficients_are_evaluated_in_the_tangent_space(setup):
    """TangentEditor takes learn_coefficients' per-tensor mappings: delta = sum_t c_t[name] tau_t[name]."""
    _, lin, tvs, batch = setup
    coefs = learn_coefficients(lin, tvs, {"a": [batch], "b": [batch]}, lambda m, b, t: m(**b).logits,
                               granularity="layer", steps=3, lr=0.05, init=0.4)
    assert len({round(v, 6) for v in coefs["a"].values()}) > 1  # per layer: not one shared value
    with TangentEditor(lin, tvs).edited(coefs) as edited:
        got = {n: p.detach().clone() for n, p in edited.deltas().items()}
    for n, d in got.items():
        torch.testing.assert_close(d, coefs["a"][n] * tvs["a"][n] + coefs["b"][n] * tvs["b"][n])
    with pytest.raises(KeyMismatchError, match="does not hold"):
        TangentEditor(lin, tvs).set({"a": {"nope": 1.0}})
