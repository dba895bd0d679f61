"""LinearizedTrainer: snapshot, train, assert that exactly delta changed; saved artifacts; resume."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from hf_taskarith import TaskVector
from hf_taskarith.linearize import LinearizedModel
from hf_taskarith.state import float_state_dict
from hf_taskarith.training import LinearizedTrainer


def tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=100,
        num_labels=2, hidden_dropout_prob=0.3)).eval()


def pair_dataset(n: int = 16, seed: int = 0):
    """Sentence pairs; label 1 when the second sentence starts with token 7 (learnable)."""
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)
    rows = {"input_ids": [], "token_type_ids": [], "attention_mask": [], "labels": [], "text": []}
    for i in range(n):
        a, b = torch.randint(10, 100, (4,), generator=g), torch.randint(10, 100, (3,), generator=g)
        label = i % 2
        if label:
            b[0] = 7
        rows["input_ids"].append([2, *a.tolist(), 3, *b.tolist(), 3])
        rows["token_type_ids"].append([0] * 6 + [1] * 4)
        rows["attention_mask"].append([1] * 10)
        rows["labels"].append(label)
        rows["text"].append(f"pair {i}")  # an extra column the Trainer must drop
    return Dataset.from_dict(rows)


def args(tmp_path, **kw):
    from transformers import TrainingArguments

    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, learning_rate=5e-3,
                max_steps=8, logging_steps=100, save_strategy="no", report_to=[], use_cpu=True,
                disable_tqdm=True, seed=0, dataloader_num_workers=0)
    base.update(kw)
    return TrainingArguments(**base)


def test_trains_only_delta_and_saves_a_task_vector(tmp_path):
    model = tiny_bert()
    original = copy.deepcopy(model)
    trainer = LinearizedTrainer(model=model, args=args(tmp_path), train_dataset=pair_dataset())
    lin = trainer.linearized_model
    theta0_before = {k: v.clone() for k, v in lin.theta0().items()}
    result = trainer.train()
    assert result.training_loss > 0
    for name, d in lin.deltas().items():
        assert d.abs().sum() > 0, f"{name} did not change"
    for name, t in lin.theta0().items():
        torch.testing.assert_close(t, theta0_before[name], rtol=0, atol=0, msg=name)
    for name, p in model.named_parameters():  # the user's model is untouched
        torch.testing.assert_close(p, original.get_parameter(name), rtol=0, atol=0)

    trainer.save_model()
    out = tmp_path / "out"
    tv = TaskVector.from_pretrained(out / "task_vector")
    assert list(tv.keys()) == list(float_state_dict(original))
    assert tv.metadata.created_with == "linearized"
    assert tv.metadata.extra["training"]["global_step"] == 8
    edited = tv.apply_to(copy.deepcopy(original))
    assert not torch.equal(edited.classifier.weight, original.classifier.weight)
    import safetensors.torch

    saved = safetensors.torch.load_file(out / "model.safetensors")
    assert sorted(saved) == sorted(f"delta.{n}" for n in lin.trainable_names)  # no copy of the base


def test_one_sgd_step_equals_a_manual_step(tmp_path):
    ds = pair_dataset(8)
    model = tiny_bert()
    trainer = LinearizedTrainer(model=model, train_dataset=ds, args=args(
        tmp_path, optim="sgd", learning_rate=0.1, lr_scheduler_type="constant", max_steps=1,
        weight_decay=0.0, max_grad_norm=0.0))
    trainer.train()

    manual = LinearizedModel(model)
    batch = {k: torch.tensor(ds[k]) for k in ("input_ids", "token_type_ids", "attention_mask", "labels")}
    manual(**batch).loss.backward()
    for name, d in trainer.linearized_model.deltas().items():
        torch.testing.assert_close(d.detach(), -0.1 * manual.deltas()[name].grad, rtol=1e-4, atol=1e-7, msg=name)


def test_causal_lm_and_resume_from_checkpoint(tmp_path):
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                                         max_position_embeddings=32)).eval()
    ids = torch.randint(0, 64, (8, 8), generator=torch.Generator().manual_seed(0)).tolist()
    ds = Dataset.from_dict({"input_ids": ids, "labels": ids})
    trainer = LinearizedTrainer(model=model, train_dataset=ds, args=args(
        tmp_path, max_steps=4, save_strategy="steps", save_steps=2, per_device_train_batch_size=4))
    trainer.train()
    ckpt = tmp_path / "out" / "checkpoint-4"
    assert (ckpt / "task_vector" / "task_vector_config.json").is_file()

    fresh = LinearizedTrainer(model=model, train_dataset=ds, args=args(tmp_path / "b", max_steps=4))
    fresh._load_from_checkpoint(str(ckpt))
    for name, d in trainer.linearized_model.deltas().items():
        torch.testing.assert_close(fresh.linearized_model.deltas()[name], d, msg=name)


def test_custom_loss_and_frozen_head_through_linearize_kwargs(tmp_path):
    from datasets import Dataset
    from torch import nn

    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Dropout(0.5))
            self.head = nn.Linear(16, 3)
            self.head.requires_grad_(False)  # e.g. a zero-shot head derived from text prompts

        def forward(self, features):
            return self.head(self.body(features))

    g = torch.Generator().manual_seed(0)
    ds = Dataset.from_dict({"features": torch.randn(12, 6, generator=g).tolist(),
                            "labels": torch.randint(0, 3, (12,), generator=g).tolist()})
    trainer = LinearizedTrainer(
        model=Classifier(), train_dataset=ds, args=args(tmp_path, max_steps=3, per_device_train_batch_size=4),
        linearize_kwargs={"loss_fn": lambda out, labels, num_items_in_batch=None: F.cross_entropy(out, labels)})
    trainer.train()
    tv = trainer.task_vector()
    assert set(tv) == {"body.0.weight", "body.0.bias", "head.weight", "head.bias"}
    assert not tv["head.weight"].any() and tv["body.0.weight"].any()
    with pytest.raises(TypeError, match="already a LinearizedModel"):
        LinearizedTrainer(model=trainer.linearized_model, linearize_kwargs={"engine": "jvp"})


def test_nonlinear_mode_is_ordinary_fine_tuning_with_the_same_code(tmp_path):
    model = tiny_bert()
    original = copy.deepcopy(model)
    trainer = LinearizedTrainer(model=model, mode="nonlinear", train_dataset=pair_dataset(8),
                                args=args(tmp_path, max_steps=2, per_device_train_batch_size=4))
    trainer.train()
    trained = trainer.trained_model
    assert not isinstance(trained, LinearizedModel) and trained is not model
    for name, p in model.named_parameters():  # the user's model is untouched, as in linear mode
        torch.testing.assert_close(p, original.get_parameter(name), rtol=0, atol=0)
    tv = trainer.task_vector()
    reference = TaskVector.from_models(original, trained)
    assert list(tv) == list(reference) == list(float_state_dict(original))
    for name in tv:
        torch.testing.assert_close(tv[name], reference[name], msg=name)
    assert tv.norm() > 0 and tv.metadata.created_with == "fine-tuning"
    assert tv.metadata.base_fingerprint == reference.metadata.base_fingerprint
    assert tv.metadata.extra["training"]["linearized"] is False
    trainer.save_model()
    assert TaskVector.is_task_vector_folder(tmp_path / "out" / "task_vector")
    with pytest.raises(ValueError, match="nonlinear"):
        _ = trainer.linearized_model
    with pytest.raises(TypeError, match="LinearizedModel"):
        LinearizedTrainer(model=LinearizedModel(original), mode="nonlinear")
    with pytest.raises(ValueError, match="mode"):
        LinearizedTrainer(model=original, mode="tangent")


def test_training_details_model_card_and_push_to_hub(tmp_path, monkeypatch):
    trainer = LinearizedTrainer(model=tiny_bert(), train_dataset=pair_dataset(4), args=args(
        tmp_path, max_steps=1, per_device_train_batch_size=2, gradient_accumulation_steps=2, learning_rate=1e-3,
        seed=3, hub_model_id="me/linear-bert"))
    trainer.train()
    training = trainer.task_vector().metadata.extra["training"]
    assert training["learning_rate"] == 1e-3 and training["global_step"] == 1 and training["seed"] == 3
    assert training["linearized"] is True and training["mode"] == "linear"
    assert training["per_device_train_batch_size"] == 2 and training["total_train_batch_size"] == 4
    assert "train_loss" in trainer.task_vector().metadata.extra["metrics"]

    calls = []

    def fake_push(self, repo_id, **kwargs):
        calls.append((self, repo_id, kwargs))
        return "pushed"

    monkeypatch.setattr(TaskVector, "push_to_hub", fake_push)
    assert trainer.push_to_hub(tag="v1", revision="dev", commit_message="first", dataset="pairs") == "pushed"
    (tv, repo_id, kwargs), = calls
    assert repo_id == "me/linear-bert"
    assert kwargs["tag"] == "v1" and kwargs["branch"] == "dev" and kwargs["commit_message"] == "first"
    assert tv.metadata.created_with == "linearized" and tv.metadata.extra["training"]["dataset"] == "pairs"
    assert tv.metadata.extra["training"]["learning_rate"] == 1e-3
    assert TaskVector.is_task_vector_folder(tmp_path / "out" / "task_vector")  # saved locally, like Trainer
    with pytest.raises(TypeError, match="unsupported"):
        trainer.push_to_hub(blocking=True, frobnicate=1)

    trainer.create_model_card(dataset="pairs")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "linearized" in card and "learning_rate" in card and "train_loss" in card


def test_partial_linearization_checkpoints_and_resumes_both_kinds(tmp_path):
    import safetensors.torch

    model = tiny_bert()
    ds = pair_dataset(8)
    kw = {"linearize": r"encoder\.layer\.1\.", "rest": "train"}
    trainer = LinearizedTrainer(model=model, train_dataset=ds, linearize_kwargs=kw, args=args(
        tmp_path, max_steps=2, per_device_train_batch_size=4, save_strategy="steps", save_steps=2))
    trainer.train()
    lin = trainer.linearized_model
    ckpt = tmp_path / "out" / "checkpoint-2"
    saved = safetensors.torch.load_file(ckpt / "model.safetensors")
    assert sorted(saved) == sorted([f"delta.{n}" for n in lin.trainable_names]
                                   + [f"nonlinear.{n}" for n in lin.nonlinear_names])
    tv = TaskVector.from_pretrained(ckpt / "task_vector")
    assert tv["bert.embeddings.word_embeddings.weight"].any()  # trained non-linearly, in the vector
    assert tv.metadata.extra["linearization"]["rest"] == "train"

    fresh = LinearizedTrainer(model=model, train_dataset=ds, linearize_kwargs=kw, args=args(tmp_path / "b"))
    fresh._load_from_checkpoint(str(ckpt))
    for name, p in lin.named_parameters():
        torch.testing.assert_close(fresh.linearized_model.get_parameter(name), p, rtol=0, atol=0, msg=name)
