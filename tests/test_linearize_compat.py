"""A LinearizedModel in the places users put it: torch's own attention modules, the plain
``transformers.Trainer``, gradient checkpointing, and the private Trainer hooks we depend on."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

from hf_taskarith.linearize import LinearizedModel, linearized_call


class TorchEncoder(nn.Module):
    """open_clip-style: nn.TransformerEncoderLayer (batch first) and nn.MultiheadAttention."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.mha = nn.MultiheadAttention(16, 4, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x, key_padding_mask=None):
        h = self.layer(x, src_key_padding_mask=key_padding_mask)
        h, _ = self.mha(h, h, h, key_padding_mask=key_padding_mask, need_weights=False)
        return self.head(h.mean(1))


@pytest.mark.parametrize("engine", ["dual", "jvp"])
@pytest.mark.parametrize("padding", [False, True])
def test_torch_multihead_attention_modules_linearize(engine, padding):
    model = TorchEncoder().double().eval()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    if padding:
        mask[1, 3:] = True
    kw = {"key_padding_mask": mask} if padding else {}
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(1)
    tangents = {n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in params.items()}
    out, out_t = linearized_call(model, {n: p.detach() for n, p in params.items()}, tangents, (x,), kw, engine=engine)

    def f(scale):  # the ordinary model (fused kernels allowed) at theta0 + scale * tangent
        values = {n: p.detach() + scale * tangents[n] for n, p in params.items()}
        with torch.no_grad():
            return torch.func.functional_call(model, values, (x,), kw)

    eps = 1e-6
    ref_t = (f(eps) - f(-eps)) / (2 * eps)  # central differences in float64: error ~1e-10
    torch.testing.assert_close(out, f(0.0))
    torch.testing.assert_close(out_t, ref_t, rtol=1e-6, atol=1e-8)
    assert torch.backends.mha.get_fastpath_enabled()  # restored


def test_linearized_model_of_torch_encoder_trains():
    lin = LinearizedModel(TorchEncoder(),
                          loss_fn=lambda out, y, num_items_in_batch=None: nn.functional.cross_entropy(out, y))
    lin.train()
    out = lin(torch.randn(2, 5, 16), labels=torch.tensor([0, 2]))
    out.loss.backward()
    assert all(d.grad is not None and bool(torch.isfinite(d.grad).all()) for d in lin.deltas().values())


def tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                    intermediate_size=64, vocab_size=100, num_labels=2)).eval()


def test_forward_signature_is_the_wrapped_models():
    bert = tiny_bert()
    lin = LinearizedModel(bert)
    names = list(inspect.signature(lin.forward).parameters)
    wrapped = list(inspect.signature(bert.forward).parameters)
    assert [n for n in names if n != "num_items_in_batch"] == wrapped and "labels" in names
    assert "num_items_in_batch" in names
    plain = LinearizedModel(nn.Linear(3, 2), loss_fn=lambda *a, **k: 0)
    assert list(inspect.signature(plain.forward).parameters) == ["input", "labels", "num_items_in_batch"]


def _pair_dataset(n=16):
    from datasets import Dataset

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 100, (n, 8), generator=g)
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * 8] * n,
                              "token_type_ids": [[0] * 4 + [1] * 4] * n, "labels": [i % 2 for i in range(n)],
                              "text": [f"row {i}" for i in range(n)]})


def _args(tmp_path, **kw):
    from transformers import TrainingArguments

    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, learning_rate=1e-3, max_steps=2,
                logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0)
    base.update(kw)
    return TrainingArguments(**base)


def test_plain_trainer_with_remove_unused_columns(tmp_path):
    from transformers import Trainer

    lin = LinearizedModel(tiny_bert())
    trainer = Trainer(model=lin, args=_args(tmp_path), train_dataset=_pair_dataset())
    trainer.train()
    assert any(bool(d.any()) for d in lin.deltas().values())


def tiny_llama():
    from transformers import LlamaForCausalLM

    from conftest import tiny_llama_config

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config()).eval()


@pytest.mark.parametrize("use_trainer", [False, True])
@pytest.mark.parametrize("family", ["bert", "llama"])
def test_gradient_checkpointing(tmp_path, use_trainer, family):
    from hf_taskarith.training import LinearizedTrainer

    if family == "bert":
        data = _pair_dataset(4)
        batch = {k: torch.tensor(data[k]) for k in ("input_ids", "attention_mask", "token_type_ids", "labels")}
        build = tiny_bert
    else:
        ids = torch.randint(0, 128, (3, 9), generator=torch.Generator().manual_seed(0))
        mask = torch.ones_like(ids)
        mask[1, :2] = 0
        batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
        build = tiny_llama
    grads = {}
    for checkpointing in (False, True):
        lin = LinearizedModel(build())
        with torch.no_grad():
            for d in lin.deltas().values():
                d.normal_(0, 1e-2, generator=torch.Generator().manual_seed(0))
        if checkpointing:
            lin.gradient_checkpointing_enable()
            assert lin.is_gradient_checkpointing and lin.is_activation_checkpointing
        lin.train()
        lin(**batch).loss.backward()
        grads[checkpointing] = {n: d.grad.clone() for n, d in lin.deltas().items()}
    for n in grads[False]:
        torch.testing.assert_close(grads[True][n], grads[False][n], rtol=1e-5, atol=1e-7, msg=n)
    if use_trainer and family == "bert":
        # transformers 5.x renamed the flag (activation_checkpointing) and keeps the old name until
        # v6: both must reach the linearized model, whichever this release accepts.
        import dataclasses

        from transformers import TrainingArguments

        fields = {f.name for f in dataclasses.fields(TrainingArguments)}
        names = [n for n in ("gradient_checkpointing", "activation_checkpointing") if n in fields]
        assert names, f"TrainingArguments has neither checkpointing flag: {sorted(fields)}"
        for name in names:
            trainer = LinearizedTrainer(model=tiny_bert(), args=_args(tmp_path / name, **{name: True}),
                                        train_dataset=_pair_dataset())
            trainer.train()
            assert trainer.linearized_model.is_activation_checkpointing, name


def test_gradient_checkpointing_refusals():
    with pytest.raises(ValueError, match="engine='dual'"):
        LinearizedModel(tiny_bert(), engine="jvp").gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="rest='train'"):
        LinearizedModel(tiny_bert(), linearize="attention", rest="train").gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="GradientCheckpointingLayer"):
        LinearizedModel(nn.Linear(3, 2), loss_fn=lambda *a, **k: 0).gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="offload"):
        LinearizedModel(tiny_bert()).activation_checkpointing_enable(offload=True)


def test_private_trainer_hooks_we_override_still_exist():
    """LinearizedTrainer overrides these private Trainer methods; fail loudly if transformers renames them."""
    from transformers import Trainer

    expected = {"_save": ["self", "output_dir", "state_dict"],
                "_set_signature_columns_if_needed": ["self"],
                "_issue_warnings_after_load": ["self", "load_result"]}
    for name, params in expected.items():
        assert hasattr(Trainer, name), f"transformers.Trainer.{name} is gone; LinearizedTrainer overrides it"
        got = list(inspect.signature(getattr(Trainer, name)).parameters)
        assert got[:len(params)] == params, f"Trainer.{name}{got} changed; LinearizedTrainer expects {params}"


def test_peft_hooks_the_adapters_override_still_exist():
    """The adapters subclass peft's BaseTuner / BaseTunerLayer and override these (partly private)
    methods; fail loudly, naming the method, if peft renames one or changes its arguments."""
    from peft.tuners._buffer_dict import BufferDict  # noqa: F401  (imported by adapters/layer.py)
    from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer

    expected = {
        BaseTuner: {"_pre_injection_hook": ["self", "model", "config", "adapter_name"],
                    "_prepare_adapter_config": ["self", "peft_config", "model_config"],
                    "_check_target_module_exists": ["peft_config", "key"],
                    "_create_and_replace": ["self", "peft_config", "adapter_name", "target", "target_name", "parent",
                                            "current_key"],
                    "_check_new_adapter_config": ["self", "config"],
                    "_post_injection_hook": ["self", "model", "config", "adapter_name"],
                    "_enable_adapter_layers": ["self", "enabled"],
                    "inject_adapter": ["self", "model", "adapter_name"],
                    "disable_adapter_layers": ["self"], "enable_adapter_layers": ["self"]},
        BaseTunerLayer: {"_get_available_adapters": ["self"], "enable_adapters": ["self", "enabled"]},
    }
    for cls, methods in expected.items():
        for name, params in methods.items():
            assert hasattr(cls, name), f"peft {cls.__name__}.{name} is gone; hf_taskarith.adapters overrides it"
            got = [p for p in inspect.signature(getattr(cls, name)).parameters if p not in ("args", "kwargs")]
            assert got[:len(params)] == params, f"peft {cls.__name__}.{name}{got} changed; expected {params}"
    for prop in ("disable_adapters", "active_adapters", "merged_adapters"):
        assert hasattr(BaseTunerLayer, prop), f"peft BaseTunerLayer.{prop} is gone; TangentStatus reports it"


@pytest.mark.parametrize("engine", ["dual", "jvp"])
def test_torch_compile_gives_the_eager_result(engine):
    """A compiled LinearizedModel must not silently differ from the eager one (the dual engine used
    to lose its tangent under dynamo: outputs off by the whole J delta term)."""
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.LayerNorm(8), nn.Linear(8, 2))
    lin = LinearizedModel(model, engine=engine, loss_fn=lambda o, y, num_items_in_batch=None: o.sum())
    with torch.no_grad():
        for d in lin.deltas().values():
            d.normal_(generator=torch.Generator().manual_seed(0))
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    expected = lin(x)
    compiled = torch.compile(lin, backend="eager")
    torch.testing.assert_close(compiled(x), expected)
    compiled(x).sum().backward()
    assert all(d.grad is not None for d in lin.deltas().values())


def _compile_case(family):
    """A model in train mode on a batch with padding, deltas set, and its eager loss gradients."""
    if family == "bert":
        model = tiny_bert()
        data = _pair_dataset(4)
        batch = {k: torch.tensor(data[k]) for k in ("input_ids", "attention_mask", "token_type_ids", "labels")}
    else:
        model = tiny_llama()
        ids = torch.randint(0, 128, (3, 9), generator=torch.Generator().manual_seed(0))
        mask = torch.ones_like(ids)
        mask[1, :2] = 0
        batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    return model, batch


@pytest.mark.parametrize("engine", ["dual", "jvp"])
@pytest.mark.parametrize("family", ["bert", "llama"])
def test_torch_compile_traces_one_graph_with_eager_gradients(engine, family):
    """Under torch.compile(fullgraph=True) the linearized forward and backward are one graph (no
    break), on transformers models with SDPA and padding, and equal the eager dual engine."""
    torch._dynamo.reset()
    model, batch = _compile_case(family)
    results = {}
    for compiled in (False, True):
        lin = LinearizedModel(model, engine="dual" if not compiled else engine)
        with torch.no_grad():
            for d in lin.deltas().values():
                d.normal_(0, 1e-2, generator=torch.Generator().manual_seed(0))
        lin.train()
        run = torch.compile(lin, backend="aot_eager", fullgraph=True) if compiled else lin
        out = run(**batch)
        out.loss.backward()
        results[compiled] = (out.logits.detach(), {n: d.grad.clone() for n, d in lin.deltas().items()})
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-5, atol=1e-6)
    for n, g in results[False][1].items():
        torch.testing.assert_close(results[True][1][n], g, rtol=1e-4, atol=1e-7, msg=n)


def test_torch_compile_with_activation_checkpointing_runs_the_dual_engine_eagerly():
    """Checkpointing replays dual layers, which dynamo cannot trace: the call runs eagerly behind a
    graph break, and still gives the unchecked gradients."""
    torch._dynamo.reset()
    model, batch = _compile_case("bert")
    grads = {}
    for checkpointing in (False, True):
        lin = LinearizedModel(model)
        with torch.no_grad():
            for d in lin.deltas().values():
                d.normal_(0, 1e-2, generator=torch.Generator().manual_seed(0))
        if checkpointing:
            lin.gradient_checkpointing_enable()
        lin.train()
        torch.compile(lin, backend="eager")(**batch).loss.backward()
        grads[checkpointing] = {n: d.grad.clone() for n, d in lin.deltas().items()}
    for n, g in grads[False].items():
        torch.testing.assert_close(grads[True][n], g, rtol=1e-5, atol=1e-7, msg=n)


def test_linearized_trainer_with_torch_compile(tmp_path):
    """TrainingArguments(torch_compile=True) trains through the traced linearized forward, and the
    task vector equals the eager run's after the same steps."""
    from torch._dynamo.utils import counters

    from hf_taskarith.training import LinearizedTrainer

    torch._dynamo.reset()
    counters.clear()
    vectors = {}
    for compiled in (False, True):
        extra = dict(torch_compile=True, torch_compile_backend="aot_eager") if compiled else {}
        trainer = LinearizedTrainer(model=tiny_bert(), args=_args(tmp_path / str(compiled), **extra),
                                    train_dataset=_pair_dataset())
        trainer.train()
        vectors[compiled] = trainer.linearized_model.task_vector()
    assert counters["stats"]["unique_graphs"] >= 1, "Trainer did not compile the model"
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert any(bool(t.any()) for t in vectors[True].values())
    for n, t in vectors[False].items():
        torch.testing.assert_close(vectors[True][n], t, rtol=1e-4, atol=1e-6, msg=n)
