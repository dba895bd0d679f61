"""Models loaded the way users load them: ``save_pretrained`` then ``Auto*.from_pretrained``.

Tiny models of every supported family are saved once per session and loaded with the Auto
classes, with transformers' defaults (Hub kernels on where the ``kernels`` package is
installed), then trained in train mode through ``LinearizedModel``, ``LinearizedTrainer`` and
both adapters, in float32, bfloat16 and float16: autocast on float32 weights, and weights
stored in half precision (``from_pretrained(..., dtype=...)``). Half-precision gradients are
compared with the float32 ones by relative error.
"""

from __future__ import annotations

import math
import socket
from dataclasses import dataclass

import pytest
import torch

from hf_taskarith.linearize import LinearizedModel
from hf_taskarith.training import LinearizedTrainer

FAMILIES = ("vit", "clip", "bert_nli", "llama", "gpt2")
PRECISIONS = ("fp32", "bf16_autocast", "fp16_autocast", "bf16_weights", "fp16_weights")
# relative 2-norm error of the half-precision delta gradient against float32's
# (measured on these models: at most 0.016 for bfloat16, 0.0016 for float16)
GRAD_TOL = {"fp32": 1e-6, "bf16_autocast": 0.04, "fp16_autocast": 0.006, "bf16_weights": 0.05, "fp16_weights": 0.008}


@dataclass
class Saved:
    folder: str
    auto: str
    inputs: dict


def _configs():
    from transformers import BertConfig, CLIPConfig, GPT2Config, LlamaConfig, ViTConfig

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  image_size=16, patch_size=8)
    return {
        "vit": (ViTConfig(**vision, num_labels=3), "ViTForImageClassification", "AutoModelForImageClassification"),
        "clip": (CLIPConfig(vision_config=vision, text_config=dict(hidden_size=32, intermediate_size=64,
                                                                 num_hidden_layers=2, num_attention_heads=4,
                                                                 vocab_size=100),
                            projection_dim=16, num_labels=3),
                 "CLIPForImageClassification", "AutoModelForImageClassification"),
        "bert_nli": (BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                vocab_size=100, num_labels=3),
                     "BertForSequenceClassification", "AutoModelForSequenceClassification"),
        "llama": (LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, vocab_size=100, max_position_embeddings=64),
                  "LlamaForCausalLM", "AutoModelForCausalLM"),
        "gpt2": (GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64),
                 "GPT2LMHeadModel", "AutoModelForCausalLM"),
    }


def _inputs(family: str) -> dict:
    g = torch.Generator().manual_seed(0)
    if family in ("vit", "clip"):
        return {"pixel_values": torch.randn(4, 3, 16, 16, generator=g), "labels": torch.tensor([0, 1, 2, 1])}
    if family == "bert_nli":
        ids = torch.randint(5, 100, (4, 9), generator=g)
        types = torch.tensor([[0] * 5 + [1] * 4] * 4)
        return {"input_ids": ids, "token_type_ids": types, "attention_mask": torch.ones_like(ids),
                "labels": torch.tensor([0, 1, 2, 1])}
    ids = torch.randint(5, 100, (4, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # a left-padded sequence
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.fixture(scope="session")
def saved_families(tmp_path_factory) -> dict[str, Saved]:
    import transformers

    root = tmp_path_factory.mktemp("pretrained")
    out = {}
    for i, (family, (config, cls, auto)) in enumerate(_configs().items()):
        torch.manual_seed(i)
        model = getattr(transformers, cls)(config)
        model.save_pretrained(root / family)
        out[family] = Saved(str(root / family), auto, _inputs(family))
    return out


def load(saved: Saved, precision: str = "fp32", device: str = "cpu"):
    import transformers

    dtype = {"bf16_weights": torch.bfloat16, "fp16_weights": torch.float16}.get(precision, torch.float32)
    return getattr(transformers, saved.auto).from_pretrained(saved.folder, dtype=dtype).to(device)


def autocast(precision: str, device: str = "cpu"):
    dtype = {"bf16_autocast": torch.bfloat16, "fp16_autocast": torch.float16}.get(precision)
    return torch.autocast(device, dtype=dtype, enabled=dtype is not None)


def delta_grad(lin: LinearizedModel, saved: Saved, precision: str, device: str = "cpu") -> tuple[float, torch.Tensor]:
    lin.train()
    for p in lin.parameters():
        p.grad = None
    with autocast(precision, device):
        loss = lin(**{k: v.to(device) for k, v in saved.inputs.items()}).loss
    loss.backward()
    grads = [p.grad.flatten().double().cpu() for p in lin.deltas().values() if p.grad is not None]
    return float(loss), torch.cat(grads)


def test_loaded_models_are_kernelized_by_default(saved_families):
    """The path under test is the one users take: from_pretrained turns Hub kernels on."""
    pytest.importorskip("kernels")
    model = load(saved_families["llama"])
    assert model.use_kernels, "transformers no longer kernelizes by default; this test no longer covers kernels"
    lin = LinearizedModel(model)
    assert model.use_kernels  # the user's model is untouched (the wrapper works on a copy)
    assert not lin.model.use_kernels
    lin.train()
    assert lin.training and not lin.model.training and not lin.model.use_kernels


def test_kernels_off_and_the_wrapped_model_saves_like_any_model(saved_families, tmp_path):
    import transformers

    saved = saved_families["llama"]
    model = transformers.AutoModelForCausalLM.from_pretrained(saved.folder, use_kernels=False)
    lin = LinearizedModel(model).train()
    lin(**saved.inputs).loss.backward()
    assert lin.model.num_parameters() == model.num_parameters()
    lin.model.save_pretrained(tmp_path / "theta0")  # theta0 is an ordinary transformers model
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "theta0")
    for (n, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("family", FAMILIES)
def test_linearized_model_trains_in_every_precision(saved_families, family):
    saved = saved_families[family]
    ref_loss, ref = delta_grad(LinearizedModel(load(saved)), saved, "fp32")
    assert math.isfinite(ref_loss) and bool(torch.isfinite(ref).all()) and ref.norm() > 0
    for precision in PRECISIONS[1:]:
        model = load(saved, precision)
        lin = LinearizedModel(model)
        assert lin.model.device == torch.device("cpu") and lin.model.dtype == model.dtype
        assert all(d.dtype == torch.float32 for d in lin.deltas().values())  # master copy in float32
        loss, grad = delta_grad(lin, saved, precision)
        assert math.isfinite(loss) and bool(torch.isfinite(grad).all()), precision
        err = float((grad - ref).norm() / ref.norm())
        assert err < GRAD_TOL[precision], f"{family} {precision}: gradient relative error {err:.4f}"
        assert abs(loss - ref_loss) < 0.05 * max(1.0, abs(ref_loss)), (precision, loss, ref_loss)


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES)
def test_linearized_model_trains_in_every_precision_on_cuda(saved_families, family):
    """As above on a CUDA device, where autocast's op lists and the fused kernels differ (``pytest -m gpu``)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    saved = saved_families[family]
    ref_loss, ref = delta_grad(LinearizedModel(load(saved, device="cuda")), saved, "fp32", "cuda")
    assert math.isfinite(ref_loss) and bool(torch.isfinite(ref).all())
    for precision in PRECISIONS[1:]:
        lin = LinearizedModel(load(saved, precision, "cuda"))
        assert lin.model.device.type == "cuda"
        loss, grad = delta_grad(lin, saved, precision, "cuda")
        assert math.isfinite(loss) and bool(torch.isfinite(grad).all()), precision
        err = float((grad - ref).norm() / ref.norm())
        assert err < GRAD_TOL[precision], f"{family} {precision} on cuda: gradient relative error {err:.4f}"


@pytest.mark.parametrize("engine", ["dual", "jvp"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_left_padded_causal_lm_has_finite_gradients_in_both_engines(saved_families, family, engine):
    saved = saved_families[family]
    lin = LinearizedModel(load(saved), engine=engine)
    with torch.no_grad():  # away from theta0, where padding rows matter
        for d in lin.deltas().values():
            d.normal_(0, 1e-2, generator=torch.Generator().manual_seed(0))
    loss, grad = delta_grad(lin, saved, "fp32")
    assert math.isfinite(loss)
    bad = [n for n, d in lin.deltas().items() if d.grad is not None and not bool(torch.isfinite(d.grad).all())]
    assert not bad, f"non-finite gradients in {len(bad)} of {len(lin.deltas())} deltas: {bad[:4]}"


def test_engines_agree_on_a_left_padded_batch(saved_families):
    saved = saved_families["gpt2"]
    grads = {}
    for engine in ("dual", "jvp"):
        lin = LinearizedModel(load(saved), engine=engine)
        with torch.no_grad():
            for d in lin.deltas().values():
                d.normal_(0, 1e-2, generator=torch.Generator().manual_seed(0))
        grads[engine] = delta_grad(lin, saved, "fp32")[1]
    torch.testing.assert_close(grads["dual"], grads["jvp"], rtol=1e-4, atol=1e-6)


def test_nothing_touches_the_network_with_kernels_on(saved_families, monkeypatch):
    """HF_HUB_OFFLINE=1 (set by the suite) and kernels at their default: no socket is opened."""
    assert __import__("os").environ.get("HF_HUB_OFFLINE") == "1"
    attempts = []

    def refuse(self, address, *a, **k):
        attempts.append(address)
        raise OSError(f"network access attempted: {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", lambda address, *a, **k: refuse(None, address))
    for family in FAMILIES:
        saved = saved_families[family]
        lin = LinearizedModel(load(saved))
        lin.train()
        lin(**saved.inputs).loss.backward()
        lin.eval()
    assert not attempts


def _dataset(saved: Saved, n: int = 8):
    from datasets import Dataset

    rows = {k: v.repeat((n // len(v),) + (1,) * (v.dim() - 1)).tolist() for k, v in saved.inputs.items()}
    return Dataset.from_dict(rows).with_format("torch")


def _args(tmp_path, **kw):
    from transformers import TrainingArguments

    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, learning_rate=1e-3, max_steps=2,
                logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
                dataloader_num_workers=0)
    base.update(kw)
    return TrainingArguments(**base)


def _assert_trained(trainer, family: str, precision: str) -> None:
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses), (family, precision, losses)
    tv = trainer.task_vector()
    assert all(bool(torch.isfinite(t).all()) for t in tv.values())
    assert any(bool(t.any()) for t in tv.values()), "nothing was trained"


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16", "bf16_weights"])
@pytest.mark.parametrize("family", FAMILIES)
def test_linearized_trainer_on_loaded_models(saved_families, family, precision, tmp_path):
    saved = saved_families[family]
    model = load(saved, "bf16_weights" if precision == "bf16_weights" else "fp32")
    mixed = {"bf16": {"bf16": True}, "fp16": {"fp16": True}}.get(precision, {})
    trainer = LinearizedTrainer(model=model, args=_args(tmp_path, **mixed), train_dataset=_dataset(saved))
    trainer.train()
    _assert_trained(trainer, family, precision)
    assert trainer.linearized_model.model.device.type == "cpu"


@pytest.mark.parametrize("adapter", ["llora", "tangent"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_adapters_on_loaded_models(saved_families, family, precision, adapter, tmp_path):
    import peft

    from hf_taskarith.adapters import LinearizedLoraConfig, TangentConfig

    saved = saved_families[family]
    targets = {"vit": ["q_proj", "v_proj"], "clip": ["q_proj", "v_proj"], "bert_nli": ["query", "value"],
               "llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}[family]
    if adapter == "llora":
        config = LinearizedLoraConfig(r=4, lora_alpha=4, target_modules=targets)
        if family == "gpt2":  # GPT-2's projections are transformers' Conv1D: refused, naming the fix
            from hf_taskarith.errors import AdapterConfigError

            with pytest.raises(AdapterConfigError, match="is a Conv1D; L-LoRA adapts nn.Linear layers only"):
                peft.get_peft_model(load(saved), config)
            return
    else:
        config = TangentConfig()
    model = peft.get_peft_model(load(saved), config)
    mixed = {"bf16": True} if precision == "bf16" else {}
    trainer = LinearizedTrainer(model=model, args=_args(tmp_path, **mixed), train_dataset=_dataset(saved))
    trainer.train()
    _assert_trained(trainer, family, precision)
