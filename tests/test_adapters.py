"""PEFT-style linearized adapters (L-LoRA, tangent) through peft's own entry points.

References are independent of the adapter code where possible: the base model itself (at
init), ``LinearizedModel`` with the dense task vector (``engine="jvp"``: ``torch.func.jvp``),
``TaskVector.apply_to`` (the weight-space model), peft's own ``merge_and_unload`` for LoRA.
"""

from __future__ import annotations

import copy
import json
import logging
import warnings

import pytest
import torch

peft = pytest.importorskip("peft")

from hf_taskarith import TaskVector  # noqa: E402
from hf_taskarith.adapters import (  # noqa: E402
    LLORA_PEFT_TYPE,
    TANGENT_PEFT_TYPE,
    LinearizedLoraConfig,
    TangentConfig,
    merge_adapters,
)
from hf_taskarith.adapters.registration import register  # noqa: E402
from hf_taskarith.errors import AdapterConfigError, IncompatibleBaseError  # noqa: E402
from hf_taskarith.linearize import LinearizedModel  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

GEN = torch.Generator().manual_seed(0)
IDS = torch.randint(1, 100, (2, 7), generator=GEN)
LABELS = torch.tensor([0, 2])


def tiny_bert(seed: int = 0, dtype=torch.float64, attn: str = "sdpa"):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                     vocab_size=100, num_labels=3, attn_implementation=attn)
    return BertForSequenceClassification(cfg).to(dtype).eval()


@pytest.fixture(scope="session")
def bert():
    return tiny_bert()


@pytest.fixture(scope="session")
def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100, max_position_embeddings=32, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).double().eval()


@pytest.fixture(scope="session")
def vit():
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(2)
    cfg = ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
                    num_attention_heads=2, intermediate_size=37, num_labels=3)
    return ViTForImageClassification(cfg).double().eval()


@pytest.fixture(scope="session")
def clip():
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(3)
    cfg = CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                                      vocab_size=100, max_position_embeddings=16),
                     vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                        num_attention_heads=2, image_size=16, patch_size=8),
                     projection_dim=16)
    return CLIPModel(cfg).double().eval()


def wrap(base, config):
    return peft.get_peft_model(copy.deepcopy(base), config)


def randomize(model, scale: float = 0.05, seed: int = 0) -> None:
    """Random values for every trainable parameter (a fake training run)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * scale)


def logits(model, **inputs):
    with torch.no_grad():
        return model(**(inputs or {"input_ids": IDS})).logits


MODES = ["model", "layer"]


# -- the L-LoRA maths ---------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_llora_at_init_equals_the_base(bert, mode):
    model = wrap(bert, LinearizedLoraConfig(r=4, target_modules=["query", "value"], linearization=mode))
    torch.testing.assert_close(logits(model), logits(bert), rtol=0, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_llora_trains_both_factors_and_nothing_else(bert, mode):
    model = wrap(bert, LinearizedLoraConfig(r=4, target_modules=["query", "value"], linearization=mode,
                                            init_seed=0))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".llora_delta_" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    losses = []
    for _ in range(5):
        loss = model(input_ids=IDS, labels=LABELS).loss
        losses.append(float(loss))
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert losses[-1] < losses[0]
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable
    assert any("llora_delta_A" in n for n in changed) and any("llora_delta_B" in n for n in changed)


def test_llora_model_mode_equals_linearized_model_on_its_task_vector(bert):
    """f(x; W0) + J_W f . dW with dW = s (B0 dA + dB A0): torch.func.jvp on the dense vector as reference."""
    model = wrap(bert, LinearizedLoraConfig(r=4, target_modules=["query", "value", "dense"], linearization="model"))
    randomize(model)
    tv = TaskVector.from_peft(model, complete=True, dtype=torch.float64)
    assert tv.metadata.base_fingerprint == LinearizedModel(bert).base_fingerprint
    ref = LinearizedModel.from_task_vector(bert, tv, engine="jvp")
    torch.testing.assert_close(logits(model), logits(ref), rtol=1e-9, atol=1e-10)


def test_llora_model_mode_is_linear_in_the_adapter(bert):
    model = wrap(bert, LinearizedLoraConfig(r=4, target_modules=["query", "value"]))
    f0 = logits(model)
    randomize(model, scale=0.2)
    f1 = logits(model)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.mul_(3)
    torch.testing.assert_close(logits(model) - f0, 3 * (f1 - f0), rtol=1e-9, atol=1e-10)


def test_llora_layer_mode_equals_the_weight_space_model(bert):
    model = wrap(bert, LinearizedLoraConfig(r=4, target_modules=["query", "value"], linearization="layer"))
    randomize(model, scale=0.2)
    edited = TaskVector.from_peft(model, dtype=torch.float64).apply_to(copy.deepcopy(bert))
    torch.testing.assert_close(logits(model), logits(edited), rtol=1e-10, atol=1e-10)
    merged = copy.deepcopy(model).merge_and_unload()
    torch.testing.assert_close(logits(merged), logits(edited), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("config", [LinearizedLoraConfig(r=4, target_modules=["query", "value"]), TangentConfig()],
                         ids=["llora", "tangent"])
def test_disable_adapter_gives_the_base(bert, config):
    model = wrap(bert, copy.deepcopy(config))
    randomize(model)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model), logits(bert), rtol=0, atol=1e-12)
    assert not torch.allclose(logits(model), logits(bert))
    status = model.get_model_status()
    assert status.enabled is True and status.active_adapters == ["default"]


# -- save / load through peft's entry points --------------------------------------------------
@pytest.mark.parametrize("config", [
    LinearizedLoraConfig(r=4, target_modules=["query", "value"]),
    LinearizedLoraConfig(r=2, target_modules=["query"], linearization="layer", lora_alpha=4),
    TangentConfig(),
    TangentConfig(linearize=r"attention"),
], ids=["llora-model", "llora-layer", "tangent", "tangent-partial"])
def test_save_and_load_round_trip(bert, tmp_path, config):
    model = wrap(bert, copy.deepcopy(config))
    randomize(model)
    expected = logits(model)
    model.save_pretrained(tmp_path)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in tmp_path.iterdir()}
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] in (LLORA_PEFT_TYPE, TANGENT_PEFT_TYPE)
    assert saved["hf_taskarith_version"] and saved["base_model_fingerprint"].startswith("fp1:")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(bert), tmp_path)
    torch.testing.assert_close(logits(loaded), expected, rtol=0, atol=0)
    assert not any(p.requires_grad for p in loaded.parameters())
    trainable = peft.PeftModel.from_pretrained(copy.deepcopy(bert), tmp_path, is_trainable=True)
    assert any(p.requires_grad for p in trainable.parameters())
    torch.testing.assert_close(TaskVector.from_peft(tmp_path).norm(), TaskVector.from_peft(model).norm())


def test_tangent_adapter_equals_linearized_model(bert):
    model = wrap(bert, TangentConfig(linearize=[r"attention", r"classifier"]))
    randomize(model)
    tv = TaskVector.from_peft(model)
    assert all(("attention" in k or "classifier" in k) for k in tv)
    dense = TaskVector.from_peft(model, complete=True, dtype=torch.float64)
    ref = LinearizedModel.from_task_vector(bert, dense, engine="jvp", linearize=[r"attention", r"classifier"])
    torch.testing.assert_close(logits(model), logits(ref), rtol=1e-9, atol=1e-10)


# -- model families ------------------------------------------------------------------------------
def _llama_inputs():
    return {"input_ids": IDS}


def _vit_inputs():
    return {"pixel_values": torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5), dtype=torch.float64)}


@pytest.mark.parametrize("family,targets", [("llama", ["q_proj", "v_proj"]), ("vit", ["q_proj", "v_proj"]),
                                            ("clip", ["q_proj", "v_proj"])])
def test_families_init_training_and_round_trip(family, targets, request, tmp_path):
    base = request.getfixturevalue(family)
    inputs = {"llama": _llama_inputs, "vit": _vit_inputs,
              "clip": lambda: {"input_ids": IDS[:, :5], **_vit_inputs()}}[family]()

    def out(m):
        with torch.no_grad():
            o = m(**inputs)
        return o.logits_per_image if family == "clip" else o.logits

    model = wrap(base, LinearizedLoraConfig(r=2, target_modules=targets))
    torch.testing.assert_close(out(model), out(base), rtol=0, atol=1e-12)
    if family == "llama":  # causal LM loss on the linearized logits, gradients reach both factors
        loss = model(**inputs, labels=IDS).loss
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        assert all(g is not None and g.abs().sum() > 0 for g in grads.values())
    randomize(model)
    expected = out(model)
    assert not torch.allclose(expected, out(base))
    model.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(out(loaded), expected, rtol=0, atol=0)
    ref = LinearizedModel.from_task_vector(
        base, TaskVector.from_peft(tmp_path, base_model=base, complete=True, dtype=torch.float64))
    torch.testing.assert_close(out(ref), expected, rtol=1e-8, atol=1e-9)


# -- conversion and merging -----------------------------------------------------------------------
def _lora(base, seed, **kw):
    model = wrap(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], **kw))
    randomize(model, scale=0.1, seed=seed)  # B is zero at init; make it non-zero
    return model


def test_lora_task_vector_matches_peft_merge_and_unload(bert, tmp_path):
    model = _lora(bert, 0, use_rslora=True, alpha_pattern={"value": 3.0})
    model.save_pretrained(tmp_path)
    merged = copy.deepcopy(model).merge_and_unload()
    want = TaskVector.from_models(bert, merged)
    for tv in (TaskVector.from_peft(model), TaskVector.from_peft(tmp_path)):
        assert sorted(tv) == sorted(k for k in want if want[k].abs().max() > 0)
        assert all(k.endswith(("query.weight", "value.weight")) for k in tv)
        for k in tv:
            torch.testing.assert_close(tv[k].double(), want[k].double(), rtol=1e-5, atol=1e-7)
    assert TaskVector.from_peft(model).metadata.base_fingerprint == want.metadata.base_fingerprint


def test_merge_adapters_sums_dense_deltas_without_cross_terms(bert, tmp_path):
    a, b = _lora(bert, 1), _lora(bert, 2)
    a.save_pretrained(tmp_path / "a")
    merged = merge_adapters(bert, [tmp_path / "a", b], weights=[0.5, 1.0])
    tv_a, tv_b = TaskVector.from_peft(a), TaskVector.from_peft(b)
    name = "bert.encoder.layer.0.attention.self.query.weight"
    want = bert.get_parameter(name) + 0.5 * tv_a[name].double() + tv_b[name].double()
    torch.testing.assert_close(merged.get_parameter(name), want)
    # what adding the factors would give instead: (B_a + B_b)(A_a + A_b) has the cross terms B_a A_b + B_b A_a
    la = a.get_submodule("base_model.model." + name[:-len(".weight")])
    lb = b.get_submodule("base_model.model." + name[:-len(".weight")])
    cross = (la.lora_B["default"].weight @ lb.lora_A["default"].weight) * la.scaling["default"]
    assert cross.abs().max() > 1e-4
    ties = merge_adapters(bert, [a, b], method="ties", density=0.5)
    assert not torch.equal(ties.get_parameter(name), bert.get_parameter(name))



def test_merge_adapters_runs_weight_space_methods_schedules_and_refuses_whole_model_passes(bert):
    """slerp (defined on weights) gets base + delta and its result is the weights; a filter picks
    per-tensor values; ties with trim_scope='global' (a whole-model pre-pass) is refused clearly."""
    from hf_taskarith.errors import MergeConfigError
    from hf_taskarith.merging import Case, Conditional
    from hf_taskarith.merging.methods.slerp import slerp

    a = _lora(bert, 1)
    tv = TaskVector.from_peft(a)
    name = "bert.encoder.layer.0.attention.self.query.weight"
    w0 = bert.get_parameter(name).detach().float()
    merged = merge_adapters(bert, [a], method="slerp", t=0.3)
    want = slerp(0.3, w0, w0 + tv[name].float())
    torch.testing.assert_close(merged.get_parameter(name).float(), want, rtol=1e-6, atol=1e-7)
    scheduled = merge_adapters(bert, [a], method="slerp", t=Conditional(Case("query", 1.0), default=0.0))
    torch.testing.assert_close(scheduled.get_parameter(name).float(), w0 + tv[name].float(), rtol=1e-6, atol=1e-7)
    value = name.replace("query", "value")
    torch.testing.assert_close(scheduled.get_parameter(value), bert.get_parameter(value))
    with pytest.raises(MergeConfigError, match="whole model"):
        merge_adapters(bert, [a, a], method="ties", density=0.5, trim_scope="global")

def test_llora_adapters_with_a_shared_seed_add_exactly_in_adapter_space(bert):
    config = LinearizedLoraConfig(r=4, target_modules=["query", "value"], init_seed=7, linearization="layer")
    a, b = wrap(bert, copy.deepcopy(config)), wrap(bert, copy.deepcopy(config))
    randomize(a, seed=1)
    randomize(b, seed=2)
    summed = wrap(bert, copy.deepcopy(config))
    with torch.no_grad():
        pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
        for n, p in summed.named_parameters():
            if p.requires_grad:
                p.copy_(pa[n] + pb[n])
    dense = TaskVector.from_peft(a) + TaskVector.from_peft(b)
    got = TaskVector.from_peft(summed)
    for k in got:
        torch.testing.assert_close(got[k], dense[k])


# -- trainers ----------------------------------------------------------------------------------------
def _dataset(n: int = 16):
    from datasets import Dataset

    g = torch.Generator().manual_seed(3)
    return Dataset.from_dict({"input_ids": torch.randint(1, 100, (n, 8), generator=g).tolist(),
                              "labels": torch.randint(0, 3, (n,), generator=g).tolist()})


def _args(tmp_path, **kw):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=4,
                             learning_rate=5e-2, report_to=[], save_strategy="no", logging_steps=1,
                             use_cpu=True, disable_tqdm=True, **kw)


@pytest.mark.parametrize("trainer_kind", ["transformers", "linearized"])
def test_trainers_train_only_the_adapter(tmp_path, trainer_kind):
    from transformers import Trainer

    from hf_taskarith.training import LinearizedTrainer

    base = tiny_bert(dtype=torch.float32)
    model = peft.get_peft_model(copy.deepcopy(base), LinearizedLoraConfig(
        r=4, target_modules=["query", "value"], task_type="SEQ_CLS", modules_to_save=["classifier"]))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cls = Trainer if trainer_kind == "transformers" else LinearizedTrainer
    trainer = cls(model=model, args=_args(tmp_path), train_dataset=_dataset())
    trainer.train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert any("llora_delta_A" in n for n in changed) and any("llora_delta_B" in n for n in changed)
    assert all(".llora_delta_" in n or ".modules_to_save." in n for n in changed)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    if trainer_kind == "linearized":
        tv = trainer.task_vector()
        assert "training" in tv.metadata.extra and "classifier.weight" in tv
        trainer.save_model(str(tmp_path / "final"))
        assert (tmp_path / "final" / "adapter_model.safetensors").is_file()
        assert TaskVector.from_pretrained(tmp_path / "final" / "task_vector").keys() == tv.keys()


# -- bad input ------------------------------------------------------------------------------------------
def test_unknown_target_modules_list_the_candidates(bert, vit):
    with pytest.raises(AdapterConfigError, match=r"\['qurey'\].*'query', 'key', 'value', 'dense'"):
        wrap(bert, LinearizedLoraConfig(target_modules=["query", "qurey"]))
    with pytest.raises(AdapterConfigError, match="no default target_modules for model type 'vit'.*'q_proj'"):
        wrap(vit, LinearizedLoraConfig())
    with pytest.raises(AdapterConfigError, match="nn.Linear layers only"):
        wrap(bert, LinearizedLoraConfig(target_modules=["LayerNorm"]))


@pytest.mark.parametrize("kw", [dict(r=0), dict(r=-2), dict(r=2.5), dict(lora_alpha=float("nan")),
                                dict(linearization="full")])
def test_bad_config_values(kw):
    with pytest.raises(AdapterConfigError):
        LinearizedLoraConfig(**kw)
    with pytest.raises(AdapterConfigError):
        TangentConfig(linearize=[3])


@pytest.mark.parametrize("config", [LinearizedLoraConfig(r=2, target_modules=["query"]), TangentConfig()],
                         ids=["llora", "tangent"])
def test_adapter_for_another_base_is_refused(bert, tmp_path, config):
    wrap(bert, copy.deepcopy(config)).save_pretrained(tmp_path)
    other = tiny_bert(seed=9)
    with pytest.raises(IncompatibleBaseError, match="fingerprint.*base_model_fingerprint = None"):
        peft.PeftModel.from_pretrained(other, tmp_path)
    cfg = peft.PeftConfig.from_pretrained(tmp_path)
    cfg.base_model_fingerprint = None
    peft.PeftModel.from_pretrained(tiny_bert(seed=9), tmp_path, config=cfg)  # the documented escape hatch


def test_config_from_a_newer_version_warns_and_loads(bert, tmp_path, caplog):
    model = wrap(bert, LinearizedLoraConfig(r=2, target_modules=["query"]))
    randomize(model)
    model.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    data.update(hf_taskarith_version="99.0", some_future_option=True)
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(bert), tmp_path)
    assert any("some_future_option" in str(w.message) for w in caught)
    assert "99.0" in caplog.text
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)


def test_from_peft_bad_input(tmp_path, bert):
    from hf_taskarith.errors import CheckpointNotFoundError

    with pytest.raises(CheckpointNotFoundError, match="adapter_config.json"):
        TaskVector.from_peft(tmp_path)
    with pytest.raises(TypeError, match="PeftModel or an adapter folder"):
        TaskVector.from_peft(bert)
    model = wrap(bert, peft.LoraConfig(r=2, target_modules=["query"], modules_to_save=["classifier"]))
    model.save_pretrained(tmp_path / "lora")
    with pytest.raises(ValueError, match="pass base_model="):
        TaskVector.from_peft(tmp_path / "lora")
    assert "classifier.weight" in TaskVector.from_peft(tmp_path / "lora", base_model=bert)


def test_registration_is_idempotent_and_uses_peft_registries():
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    register()
    register()
    assert PEFT_TYPE_TO_CONFIG_MAPPING[LLORA_PEFT_TYPE] is LinearizedLoraConfig
    assert PEFT_TYPE_TO_CONFIG_MAPPING[TANGENT_PEFT_TYPE] is TangentConfig
    assert PEFT_TYPE_TO_PREFIX_MAPPING[LLORA_PEFT_TYPE] == PEFT_TYPE_TO_TUNER_MAPPING[LLORA_PEFT_TYPE].prefix
    import hf_taskarith

    assert hf_taskarith.LinearizedLoraConfig is LinearizedLoraConfig and hf_taskarith.TangentConfig is TangentConfig


def test_model_mode_layers_refuse_to_run_outside_the_linearized_forward(bert):
    model = wrap(bert, LinearizedLoraConfig(r=2, target_modules=["query"]))
    layer = model.get_submodule("base_model.model.bert.encoder.layer.0.attention.self.query")
    with pytest.raises(RuntimeError, match="outside its PeftModel's forward"):
        layer(torch.randn(1, 32, dtype=torch.float64))
