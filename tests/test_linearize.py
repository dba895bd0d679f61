"""LinearizedModel against independent references: finite differences, torch.func.jvp, VJPs at theta0.

Families (tiny, built from configs): ViT image classification, CLIP image tower with a frozen
zero-shot head derived from the text tower, CLIP text tower, BERT sentence-pair
classification, Llama causal LM, GPT-2 LM (tied embeddings).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import trainable
from hf_taskarith import TaskVector
from hf_taskarith.errors import KeyMismatchError
from hf_taskarith.linearize import LinearizedModel, linearized_call, make_attention_jvp_safe
from hf_taskarith.state import float_state_dict

ENGINES = ("dual", "jvp")


class ZeroShotImageClassifier(nn.Module):
    """CLIP image tower + frozen head whose rows are normalised class-prompt text embeddings."""

    def __init__(self, vision, class_embeds: torch.Tensor, logit_scale: float):
        super().__init__()
        self.vision = vision
        self.head = nn.Linear(class_embeds.shape[1], class_embeds.shape[0], bias=False)
        with torch.no_grad():
            self.head.weight.copy_(F.normalize(class_embeds, dim=-1) * logit_scale)
        self.head.weight.requires_grad_(False)

    def forward(self, pixel_values):
        return self.head(F.normalize(self.vision(pixel_values=pixel_values).image_embeds, dim=-1))


def _ce(outputs, labels, num_items_in_batch=None):
    return F.cross_entropy(outputs, labels)


@dataclass
class Family:
    model: nn.Module
    inputs: dict[str, Any]
    labels: torch.Tensor | None
    out_key: str | None  # which output to compare (None: the output is a tensor)
    loss_fn: Callable | None = None

    def out(self, o):
        return o if self.out_key is None else o[self.out_key]


def _clip_parts():
    from transformers import CLIPConfig, CLIPModel

    cfg = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=99, max_position_embeddings=16, projection_dim=16),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=16, patch_size=8, projection_dim=16),
        projection_dim=16,
    )
    torch.manual_seed(3)
    return CLIPModel(cfg).eval(), cfg


def build_family(name: str, dtype: torch.dtype = torch.float64, attn: str = "eager") -> Family:
    import transformers as tr

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if name == "vit":
        cfg = tr.ViTConfig(image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, num_labels=3, attn_implementation=attn)
        m = tr.ViTForImageClassification(cfg)
        return Family(m.to(dtype).eval(), {"pixel_values": torch.randn(2, 3, 16, 16, generator=g, dtype=dtype)},
                      torch.tensor([0, 2]), "logits")
    if name == "bert_pairs":
        cfg = tr.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                            vocab_size=100, num_labels=3, attn_implementation=attn)
        m = tr.BertForSequenceClassification(cfg)
        ids = torch.randint(1, 100, (2, 9), generator=g)
        token_type = torch.tensor([[0] * 5 + [1] * 4, [0] * 4 + [1] * 3 + [0] * 2])   # sentence pairs
        mask = torch.tensor([[1] * 9, [1] * 7 + [0] * 2])                               # padding
        return Family(m.to(dtype).eval(), {"input_ids": ids, "token_type_ids": token_type, "attention_mask": mask},
                      torch.tensor([1, 2]), "logits")
    if name == "llama":
        cfg = tr.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=64, max_position_embeddings=32,
                             tie_word_embeddings=False, attn_implementation=attn)
        m = tr.LlamaForCausalLM(cfg)
        ids = torch.randint(0, 64, (2, 8), generator=g)
        return Family(m.to(dtype).eval(), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, ids, "logits")
    if name == "gpt2_tied":
        cfg = tr.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32,
                            tie_word_embeddings=True, attn_implementation=attn)
        m = tr.GPT2LMHeadModel(cfg)
        ids = torch.randint(0, 64, (2, 8), generator=g)
        return Family(m.to(dtype).eval(), {"input_ids": ids}, ids, "logits")
    if name == "clip_image":
        clip, _ = _clip_parts()
        clip.config._attn_implementation = attn
        with torch.no_grad():
            prompts = torch.randint(1, 99, (3, 6), generator=g)
            class_embeds = clip.get_text_features(input_ids=prompts)
            class_embeds = getattr(class_embeds, "pooler_output", class_embeds)
        vision = tr.CLIPVisionModelWithProjection(clip.config.vision_config)
        vision.vision_model.load_state_dict(clip.vision_model.state_dict())
        vision.visual_projection.load_state_dict(clip.visual_projection.state_dict())
        m = ZeroShotImageClassifier(vision, class_embeds, logit_scale=float(clip.logit_scale.exp()))
        return Family(m.to(dtype).eval(), {"pixel_values": torch.randn(2, 3, 16, 16, generator=g, dtype=dtype)},
                      torch.tensor([0, 2]), None, loss_fn=_ce)
    if name == "clip_text":
        clip, cfg = _clip_parts()
        m = tr.CLIPTextModelWithProjection(cfg.text_config)
        m.text_model.load_state_dict(clip.text_model.state_dict())
        ids = torch.randint(1, 99, (2, 6), generator=g)
        return Family(m.to(dtype).eval(), {"input_ids": ids}, None, "text_embeds")
    raise KeyError(name)


FAMILIES = ["vit", "clip_image", "clip_text", "bert_pairs", "llama", "gpt2_tied"]


def random_delta(lin: LinearizedModel, scale: float = 1e-2, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trainable(lin):
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


def shifted(model: nn.Module, tv: TaskVector, scaling: float) -> nn.Module:
    """A copy with ``scaling * tv`` added in the model's own dtype (float64 here; apply_to works in float32)."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, t in float_state_dict(out).items():
            t.add_(tv[name].to(t.dtype), alpha=scaling)
    return out


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("family", FAMILIES)
def test_zero_delta_is_the_model_and_the_models_own_loss(family, engine):
    fam = build_family(family, torch.float32)
    lin = LinearizedModel(fam.model, engine=engine, loss_fn=fam.loss_fn)
    out = lin(**fam.inputs)
    with torch.no_grad():
        ref = fam.model(**fam.inputs)
    assert type(out) is type(ref)
    torch.testing.assert_close(fam.out(out), fam.out(ref), rtol=1e-5, atol=1e-6)
    if fam.labels is not None:
        out = lin(**fam.inputs, labels=fam.labels)
        if fam.loss_fn is None:  # the transformers model computes its own loss
            ref = fam.model(**fam.inputs, labels=fam.labels)
            assert type(out) is type(ref) and list(out.keys())[0] == "loss"
            torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
        else:
            torch.testing.assert_close(out.loss, fam.loss_fn(ref, fam.labels))


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("family", FAMILIES)
def test_tangent_matches_central_finite_differences(family, engine, monkeypatch):
    if family == "llama":  # LlamaRMSNorm rounds through float32 by design; keep float64 throughout
        from transformers.models.llama import modeling_llama

        def rms_norm_float64(self, x):
            return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

        monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", rms_norm_float64)
    # sdpa: transformers' eager attention runs softmax in float32, which would swamp the differences
    fam = build_family(family, torch.float64, attn="sdpa")
    lin = LinearizedModel(fam.model, engine=engine, loss_fn=fam.loss_fn)
    random_delta(lin, scale=1e-2)
    tv = lin.task_vector(dtype=torch.float64)
    eps = 1e-4
    with torch.no_grad():
        f0 = fam.out(fam.model(**fam.inputs))
        plus = fam.out(shifted(fam.model, tv, eps)(**fam.inputs))
        minus = fam.out(shifted(fam.model, tv, -eps)(**fam.inputs))
        jvp_fd = (plus - minus) / (2 * eps)
        jvp_lin = fam.out(lin(**fam.inputs)) - f0
    assert jvp_lin.abs().max() > 1e-4  # the check is not vacuous
    torch.testing.assert_close(jvp_lin, jvp_fd, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_is_the_vjp_at_theta0(family):
    """d loss(f_lin) / d delta = J(theta0)^T g, with g = d loss / d f_lin: an ordinary backward at theta0."""
    fam = build_family(family, torch.float64, attn="sdpa")
    lin = LinearizedModel(fam.model, loss_fn=fam.loss_fn)
    random_delta(lin, scale=1e-2)
    out = fam.out(lin(**fam.inputs))
    weights = torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)
    (out.tanh() * weights).sum().backward()
    lin_out = out.detach().requires_grad_()
    g = torch.autograd.grad((lin_out.tanh() * weights).sum(), lin_out)[0]
    ref = copy.deepcopy(fam.model)
    fam.out(ref(**fam.inputs)).backward(g)
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    for name, d in lin.deltas().items():
        assert d.grad is not None, name
        torch.testing.assert_close(d.grad, ref_grads[name], rtol=1e-7, atol=1e-10, msg=name)


@pytest.mark.parametrize("family", ["bert_pairs", "llama", "gpt2_tied"])
def test_dual_engine_gradients_equal_torch_func_jvp(family):
    fam = build_family(family, torch.float64)
    grads = {}
    for engine in ENGINES:
        lin = LinearizedModel(fam.model, engine=engine)
        random_delta(lin, scale=1e-2)
        out = lin(**fam.inputs, labels=fam.labels)
        out.loss.backward()
        grads[engine] = {n: p.grad for n, p in lin.deltas().items()}
    for name in grads["dual"]:
        torch.testing.assert_close(grads["dual"][name], grads["jvp"][name], rtol=1e-8, atol=1e-12, msg=name)


@pytest.mark.parametrize("family", FAMILIES)
def test_task_vector_names_apply_and_first_order_agreement(family):
    fam = build_family(family, torch.float64)
    original = copy.deepcopy(fam.model)
    lin = LinearizedModel(fam.model, loss_fn=fam.loss_fn)
    random_delta(lin, scale=1e-4)
    tv = lin.task_vector()
    assert list(tv.keys()) == list(float_state_dict(original).keys())
    assert tv.metadata.created_with == "linearized"
    with torch.no_grad():
        lin_out = fam.out(lin(**fam.inputs))
        f0 = fam.out(original(**fam.inputs))
        edited = tv.apply_to(original)  # a new model; the fingerprint matches the original base
        nonlin = fam.out(edited(**fam.inputs))
    # f(theta0 + delta) - f_lin = O(|delta|^2): far smaller than the first-order change itself
    assert (nonlin - lin_out).abs().max() < 0.02 * (lin_out - f0).abs().max()
    # the wrapped copy was not edited by apply_to
    torch.testing.assert_close(fam.out(LinearizedModel(fam.model, loss_fn=fam.loss_fn)(**fam.inputs)), f0)


def test_tied_embeddings_share_one_delta():
    fam = build_family("gpt2_tied", torch.float32)
    lin = LinearizedModel(fam.model)
    assert "transformer.wte.weight" in lin.trainable_names and "lm_head.weight" not in lin.trainable_names
    assert "lm_head.weight" not in lin.task_vector()
    out = lin(**fam.inputs, labels=fam.labels)
    out.loss.backward()
    # the single delta receives gradient from both uses (input embedding and output head)
    ref = copy.deepcopy(fam.model)
    ref(**fam.inputs, labels=fam.labels).loss.backward()
    torch.testing.assert_close(lin.deltas()["transformer.wte.weight"].grad, ref.transformer.wte.weight.grad,
                               rtol=1e-4, atol=1e-6)


def test_frozen_head_is_held_constant():
    fam = build_family("clip_image", torch.float32)
    lin = LinearizedModel(fam.model, loss_fn=fam.loss_fn)
    assert "head.weight" not in lin.trainable_names
    lin(**fam.inputs, labels=fam.labels).loss.backward()
    tv = lin.task_vector()
    assert "head.weight" in tv and not tv["head.weight"].any()
    assert all(p.grad is not None for p in trainable(lin))


def test_linear_in_delta_tangent_space_task_arithmetic():
    """f_lin(a*tv1 + b*tv2) - f0 = a (f_lin(tv1) - f0) + b (f_lin(tv2) - f0), exactly."""
    fam = build_family("bert_pairs", torch.float64)
    lin = LinearizedModel(fam.model)
    f0 = lin(**fam.inputs).logits.detach()
    random_delta(lin, seed=1)
    tv1 = lin.task_vector(dtype=torch.float64)
    random_delta(lin, seed=2)
    tv2 = lin.task_vector(dtype=torch.float64)
    with torch.no_grad():
        d1 = lin.load_task_vector(tv1)(**fam.inputs).logits - f0
        d2 = lin.load_task_vector(tv2)(**fam.inputs).logits - f0
        both = lin.load_task_vector(0.7 * tv1 + (-0.3) * tv2)(**fam.inputs).logits - f0
    torch.testing.assert_close(both, 0.7 * d1 - 0.3 * d2, rtol=1e-9, atol=1e-12)


def test_dropout_is_off_at_the_linearization_point():
    from transformers import BertConfig, BertForSequenceClassification

    m = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                                 intermediate_size=64, vocab_size=50, num_labels=2,
                                                 hidden_dropout_prob=0.5, attention_probs_dropout_prob=0.5))
    m.train()
    lin = LinearizedModel(m).train()
    assert lin.training and not lin.model.training
    ids = torch.randint(0, 50, (2, 6))
    torch.testing.assert_close(lin(input_ids=ids).logits, lin(input_ids=ids).logits)


def test_sdpa_and_eager_agree():
    outs = {}
    for attn in ("eager", "sdpa"):
        fam = build_family("llama", torch.float64, attn=attn)
        lin = LinearizedModel(fam.model)
        assert lin.attn_implementation == attn
        random_delta(lin)
        out = lin(**fam.inputs, labels=fam.labels)
        out.loss.backward()
        outs[attn] = (out.logits.detach(), {n: p.grad for n, p in lin.deltas().items()})
    torch.testing.assert_close(outs["sdpa"][0], outs["eager"][0])
    for n, g in outs["eager"][1].items():
        torch.testing.assert_close(outs["sdpa"][1][n], g, msg=n)


def test_unsafe_attention_is_switched_to_sdpa():
    class Config:
        _attn_implementation = "flash_attention_2"
        sub_configs: dict = {}

    class Fake(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = Config()

        def set_attn_implementation(self, impl):
            self.config._attn_implementation = impl

    m = Fake()
    assert make_attention_jvp_safe(m) == "sdpa" and m.config._attn_implementation == "sdpa"
    assert make_attention_jvp_safe(nn.Linear(2, 2)) is None


def test_parameters_are_exactly_delta_and_state_dict_round_trips(tmp_path):
    fam = build_family("llama", torch.float32)
    lin = LinearizedModel(fam.model)
    names = [n for n, p in lin.named_parameters() if p.requires_grad]
    assert names == [f"delta.{n}" for n in lin.trainable_names]
    assert not any(p.requires_grad for p in lin.model.parameters())  # theta0: frozen parameters
    random_delta(lin)
    other = LinearizedModel(fam.model)
    other.load_state_dict(lin.state_dict())
    torch.testing.assert_close(other(**fam.inputs).logits, lin(**fam.inputs).logits)
    tv = lin.task_vector()
    tv.save_pretrained(tmp_path / "tv")
    loaded = TaskVector.from_pretrained(tmp_path / "tv")
    fresh = LinearizedModel(fam.model).load_task_vector(loaded)
    torch.testing.assert_close(fresh(**fam.inputs).logits, lin(**fam.inputs).logits)


def test_copy_model_false_takes_the_model_over():
    fam = build_family("vit", torch.float32)
    n_params = len(list(fam.model.parameters()))
    lin = LinearizedModel(fam.model, copy_model=False)
    assert lin.model is fam.model and not trainable(fam.model)  # theta0: frozen parameters, in place
    assert len(list(fam.model.parameters())) == n_params
    assert len(trainable(lin)) == n_params


def test_errors_are_explicit():
    fam = build_family("clip_image", torch.float32)
    with pytest.raises(ValueError, match="engine"):
        LinearizedModel(fam.model, engine="reverse")
    with pytest.raises(ValueError, match="loss_type"):
        LinearizedModel(fam.model, loss_type="ForNothing")
    lin = LinearizedModel(fam.model)
    with pytest.raises(ValueError, match="loss_fn"):
        lin(**fam.inputs, labels=fam.labels)
    frozen = copy.deepcopy(fam.model).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        LinearizedModel(frozen)
    tv = lin.task_vector()
    with pytest.raises(KeyMismatchError, match="missing"):
        lin.load_task_vector({k: v for k, v in list(tv.items())[1:]})


def test_linearized_call_is_stateless_and_validates():
    lin_layer = nn.Linear(3, 2).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    primals = {n: p.detach() for n, p in lin_layer.named_parameters()}
    tangents = {"weight": torch.randn(2, 3, dtype=torch.float64)}
    out, out_t = linearized_call(lin_layer, primals, tangents, (x,))
    torch.testing.assert_close(out, lin_layer(x))
    torch.testing.assert_close(out_t, x @ tangents["weight"].t())
    assert lin_layer.weight is not primals["weight"] and isinstance(lin_layer.weight, nn.Parameter)
    with pytest.raises(ValueError, match="shape"):
        linearized_call(lin_layer, primals, {"weight": torch.zeros(3, 3)}, (x,))
