"""LinearizedModel beyond the forward: from_task_vector, partial linearization, save/load, bad input.

References are independent of the code under test where possible: a fully linearized model
loaded with a partial vector, a model whose non-linear part is shifted by hand, the ordinary
backward at theta0, ``torch.func.jvp`` (``engine="jvp"``), and float64 for half precision.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

from conftest import trainable
from hf_taskarith import TaskVector
from hf_taskarith.errors import IncompatibleBaseError, KeyMismatchError
from hf_taskarith.linearize import LinearizedModel
from hf_taskarith.state import float_state_dict


def tiny_bert(seed: int = 0, dtype: torch.dtype = torch.float64):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     vocab_size=100, num_labels=3)
    return BertForSequenceClassification(cfg).to(dtype).eval()


@pytest.fixture(scope="module")
def bert():
    return tiny_bert()


INPUTS = {"input_ids": torch.randint(1, 100, (2, 9), generator=torch.Generator().manual_seed(1)),
          "token_type_ids": torch.tensor([[0] * 5 + [1] * 4, [0] * 4 + [1] * 5])}


def randomize(params, scale: float = 1e-2, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * scale)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**INPUTS).logits


# -- from_task_vector -------------------------------------------------------------------
def test_from_task_vector_is_linear_in_the_coefficients_in_every_form(bert):
    """f_lin(theta0 + a tau1 + b tau2) - f0 = a [f_lin(theta0 + tau1) - f0] + b [f_lin(theta0 + tau2) - f0]."""
    lin = LinearizedModel(bert)
    f0 = logits(bert)
    randomize(trainable(lin), seed=1)
    tv1 = lin.task_vector(dtype=torch.float64)
    lin.load_task_vector({k: torch.zeros_like(v) for k, v in tv1.items()})
    randomize(trainable(lin), seed=2)
    tv2 = lin.task_vector(dtype=torch.float64)
    d1 = logits(LinearizedModel.from_task_vector(bert, tv1)) - f0
    d2 = logits(LinearizedModel.from_task_vector(bert, tv2)) - f0
    assert d1.abs().max() > 1e-3 and d2.abs().max() > 1e-3
    a, b = 0.7, -0.3
    expected = a * d1 + b * d2
    for got in (LinearizedModel.from_task_vector(bert, [(tv1, a), (tv2, b)]),
                LinearizedModel.from_task_vector(bert, [tv1, tv2], [a, b]),
                LinearizedModel.from_task_vector(bert, [(tv1, 2 * a), (tv2, 2 * b)], 0.5),
                LinearizedModel.from_task_vector(bert, a * tv1 + b * tv2)):
        torch.testing.assert_close(logits(got) - f0, expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(logits(LinearizedModel.from_task_vector(bert, [tv1, tv2], 0.5)) - f0,
                               0.5 * (d1 + d2), rtol=1e-9, atol=1e-12)
    # weight space (what apply_to does) agrees to first order only: the gap shrinks like t^2
    def gap(t: float) -> float:
        nonlin = logits(shifted(bert, {k: t * (a * tv1[k] + b * tv2[k]) for k in tv1})) - f0
        return float((nonlin - t * expected).abs().max())

    assert gap(1.0) > 0 and gap(0.1) < gap(1.0) / 30
    with pytest.raises(ValueError, match="2 task vectors but 3 scalings"):
        LinearizedModel.from_task_vector(bert, [tv1, tv2], [1.0, 2.0, 3.0])
    with pytest.raises(TypeError, match="real number"):
        LinearizedModel.from_task_vector(bert, tv1, [1.0])
    with pytest.raises(TypeError, match="TaskVector"):
        LinearizedModel.from_task_vector(bert, "path/to/tv")


def shifted(model: nn.Module, delta) -> nn.Module:
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, t in float_state_dict(out).items():
            if name in delta:
                t.add_(delta[name].to(t.dtype))
    return out


def test_from_task_vector_checks_the_base(bert, caplog):
    other = tiny_bert(seed=5)
    tv = LinearizedModel(other).task_vector()  # zeros, but recorded for another base
    with pytest.raises(IncompatibleBaseError, match="fingerprint"):
        LinearizedModel.from_task_vector(bert, tv)
    with caplog.at_level(logging.WARNING, logger="hf_taskarith"):
        lin = LinearizedModel.from_task_vector(bert, tv, allow_mismatch=True)
    assert "allow_mismatch=True" in caplog.text
    torch.testing.assert_close(logits(lin), logits(bert))
    good = LinearizedModel(bert).task_vector()
    partial = TaskVector({k: v for k, v in list(good.items())[1:]}, good.metadata)
    with pytest.raises(KeyMismatchError, match="missing"):
        LinearizedModel.from_task_vector(bert, partial)
    with pytest.raises(KeyMismatchError, match="missing"):  # bare mappings too
        LinearizedModel.from_task_vector(bert, dict(partial))


# -- partial linearization ----------------------------------------------------------------
def test_partial_linearization_with_the_rest_frozen(bert):
    lin = LinearizedModel(bert, linearize=r"attention")
    assert lin.trainable_names and all("attention" in n for n in lin.trainable_names)
    assert [n for n, p in lin.named_parameters() if p.requires_grad] == [f"delta.{n}" for n in lin.trainable_names]
    randomize(trainable(lin))
    out = lin(**INPUTS, labels=torch.tensor([0, 2]))
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable(lin))
    tv = lin.task_vector(dtype=torch.float64)
    assert list(tv) == list(float_state_dict(bert))
    assert all(not tv[n].any() for n in tv if n not in lin.trainable_names)
    assert tv.metadata.extra["linearization"]["linearize"] == ["attention"]
    # reference: the fully linearized model with delta = 0 outside attention
    full = LinearizedModel(bert).load_task_vector(tv)
    torch.testing.assert_close(out.logits.detach(), logits(full), rtol=1e-10, atol=1e-12)
    # a callable selects the same parameters; its record reproduces the selection
    by_fn = LinearizedModel(bert, linearize=lambda name, t: "attention" in name)
    assert by_fn.trainable_names == lin.trainable_names
    again = LinearizedModel(bert, linearize=by_fn.task_vector().metadata.extra["linearization"]["linearize"])
    assert again.trainable_names == lin.trainable_names
    with pytest.raises(ValueError, match=r"\['atention'\] match no trainable parameter"):
        LinearizedModel(bert, linearize=["attention", "atention"])
    with pytest.raises(ValueError, match="not a valid regular expression"):
        LinearizedModel(bert, linearize="layer.(")
    with pytest.raises(ValueError, match="rest="):
        LinearizedModel(bert, linearize="attention", rest="ignore")


def test_partial_linearization_with_the_rest_trained_normally(bert):
    pattern = r"encoder\.layer\.1\."  # the last block linearized, everything else trained as usual
    lin = LinearizedModel(bert, linearize=pattern, rest="train")
    assert all(".layer.1." in n for n in lin.trainable_names)
    assert set(lin.trainable_names).isdisjoint(lin.nonlinear_names)
    assert len(lin.trainable_names) + len(lin.nonlinear_names) == len(list(bert.parameters()))
    names = [n for n, p in lin.named_parameters() if p.requires_grad]
    assert names == [f"delta.{n}" for n in lin.trainable_names] + [f"nonlinear.{n}" for n in lin.nonlinear_names]

    # at theta0 the gradients of both kinds are the ordinary gradients
    labels = torch.tensor([0, 2])
    lin(**INPUTS, labels=labels).loss.backward()
    ref = copy.deepcopy(bert)
    ref(**INPUTS, labels=labels).loss.backward()
    for n, p in {**lin.deltas(), **lin.nonlinear_parameters()}.items():
        torch.testing.assert_close(p.grad, ref.get_parameter(n).grad, rtol=1e-8, atol=1e-12, msg=n)

    # away from theta0: the dual engine's gradients equal torch.func.jvp's
    randomize(trainable(lin), seed=3)
    grads = {}
    for engine in ("dual", "jvp"):
        other = LinearizedModel(bert, linearize=pattern, rest="train", engine=engine)
        other.load_state_dict(lin.state_dict())
        other(**INPUTS, labels=labels).loss.backward()
        grads[engine] = {n: p.grad for n, p in other.named_parameters()}
    for n, g in grads["dual"].items():
        torch.testing.assert_close(g, grads["jvp"][n], rtol=1e-8, atol=1e-12, msg=n)

    # the task vector holds theta - theta0 of the non-linear part too
    tv = lin.task_vector(dtype=torch.float64)
    for n, w in lin.nonlinear_parameters().items():
        torch.testing.assert_close(tv[n], (w - bert.get_parameter(n)).detach(), msg=n)
        assert tv[n].any()
    # reference: move the non-linear part of the base by hand, linearize the last block around it
    moved = shifted(bert, {n: tv[n] for n in lin.nonlinear_names})
    ref_lin = LinearizedModel(moved, linearize=pattern)
    with torch.no_grad():
        for n, d in ref_lin.deltas().items():
            d.copy_(tv[n])
    torch.testing.assert_close(logits(lin), logits(ref_lin), rtol=1e-10, atol=1e-12)
    # from_task_vector picks the recorded settings up; forcing rest="frozen" refuses to drop the non-linear part
    torch.testing.assert_close(logits(LinearizedModel.from_task_vector(bert, tv)), logits(lin), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="holds constant"):
        LinearizedModel.from_task_vector(bert, tv, rest="frozen")


# -- saving and loading -------------------------------------------------------------------
def test_save_pretrained_writes_only_the_task_vector_and_round_trips(tmp_path):
    import safetensors.torch

    bert = tiny_bert(dtype=torch.float32)
    lin = LinearizedModel(bert, linearize=r"attention|classifier", rest="train")
    lin.save_pretrained(tmp_path / "zero")
    zero = safetensors.torch.load_file(tmp_path / "zero" / "task_vector.safetensors")
    assert sorted(zero) == sorted(float_state_dict(bert)) and not any(t.any() for t in zero.values())  # no base weights
    randomize(trainable(lin), seed=4)
    path = lin.save_pretrained(tmp_path / "lin", training={"note": "test"})
    assert sorted(p.name for p in path.iterdir()) == ["task_vector.safetensors", "task_vector_config.json"]
    numel = sum(t.numel() for t in float_state_dict(bert).values())
    assert (path / "task_vector.safetensors").stat().st_size < 4 * numel + 64 * 1024  # one float32 copy, no theta0
    loaded = LinearizedModel.from_pretrained(path, base_model=bert)
    assert loaded.trainable_names == lin.trainable_names and loaded.nonlinear_names == lin.nonlinear_names
    # delta round-trips exactly; theta0 + (theta - theta0) of the non-linear part to float32 rounding
    for n, d in lin.deltas().items():
        assert torch.equal(loaded.deltas()[n], d), n
    torch.testing.assert_close(logits(loaded), logits(lin), rtol=1e-5, atol=1e-6)
    meta = TaskVector.from_pretrained(path).metadata
    assert meta.base_fingerprint == lin.base_fingerprint and meta.extra["training"] == {"note": "test"}
    with pytest.raises(ValueError, match="records no base model id"):  # built from a config: no id to reload
        LinearizedModel.from_pretrained(path)


def test_from_pretrained_reloads_the_base_from_the_recorded_folder(tmp_path):
    from transformers import AutoModelForSequenceClassification

    tiny_bert(dtype=torch.float32).save_pretrained(tmp_path / "base")
    base = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base").eval()
    lin = LinearizedModel(base)
    randomize(trainable(lin), seed=6)
    lin.save_pretrained(tmp_path / "lin")
    meta = TaskVector.from_pretrained(tmp_path / "lin").metadata
    assert meta.base_model == str(tmp_path / "base")
    assert meta.extra["linearization"]["auto_class"] == "AutoModelForSequenceClassification"
    loaded = LinearizedModel.from_pretrained(tmp_path / "lin")  # base loaded from the recorded id (a folder)
    assert torch.equal(logits(loaded), logits(lin))
    tiny_bert(seed=9, dtype=torch.float32).save_pretrained(tmp_path / "other")
    with pytest.raises(IncompatibleBaseError, match="fingerprint"):
        LinearizedModel.from_pretrained(tmp_path / "lin", base_model=str(tmp_path / "other"))


# -- bad input ------------------------------------------------------------------------
def test_models_without_float_parameters_are_refused():
    with pytest.raises(ValueError, match="has no parameters"):
        LinearizedModel(nn.ReLU())

    class Quantized(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(2, 2, dtype=torch.int8), requires_grad=False)

    with pytest.raises(ValueError, match=r"no floating-point parameters \(found \['int8'\]"):
        LinearizedModel(Quantized())


def test_operations_without_forward_ad_name_the_workaround():
    class NoJvp(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):
            return g * 2

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.second = nn.Linear(3, 3), nn.Linear(3, 2)

        def forward(self, x):
            return self.second(NoJvp.apply(self.first(x)))

    x = torch.randn(4, 3)
    with pytest.raises(NotImplementedError, match=r"jvp function(.|\n)*linearize only parameters after"):
        LinearizedModel(Net())(x)
    LinearizedModel(Net(), linearize=r"^second\.")(x)  # the workaround: linearize downstream of the op


def test_half_precision_keeps_the_tangent_term():
    """bf16 weights or bf16 autocast: delta in float32, f0 + J delta summed in float32."""
    base = tiny_bert(dtype=torch.float64)
    ref = LinearizedModel(base)
    randomize(trainable(ref), scale=1e-5, seed=7)
    tv = ref.task_vector()
    expected = logits(ref) - logits(base)

    bf16 = tiny_bert(dtype=torch.float32).to(torch.bfloat16)
    lin = LinearizedModel(bf16, linearize=r"attention|classifier", rest="train")
    assert all(p.dtype == torch.float32 for p in lin.deltas().values())
    assert all(p.dtype == torch.bfloat16 for p in lin.nonlinear_parameters().values())  # trained as usual
    lin = LinearizedModel.from_task_vector(bf16, tv)  # fingerprints round to bf16: same base
    out = logits(lin)
    assert out.dtype == torch.float32
    err = ((out - logits(bf16).float()) - expected.float()).abs().max() / expected.abs().max()
    assert err < 0.05  # a bf16 sum would round the ~1e-5 tangent away entirely (error ~1)

    fp32 = LinearizedModel(tiny_bert(dtype=torch.float32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        f0 = logits(fp32)  # the same bf16 primal computation, delta = 0
        out = logits(fp32.load_task_vector(tv))
    assert out.dtype == torch.float32
    err = ((out - f0.float()) - expected.float()).abs().max() / expected.abs().max()
    assert err < 0.05
