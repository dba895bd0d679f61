"""Fine-tuning an encoder through a frozen head with LinearizedTrainer (both modes), the
offline ``evaluate`` accuracy module, and the offline task datasets."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from hf_taskarith.errors import NonFiniteError
from hf_taskarith.evaluation.metrics import MissingMetricError, compute_metrics_fn, list_metrics, load_metric
from hf_taskarith.evaluation.task_accuracy import task_accuracy
from hf_taskarith.io.fingerprint import fingerprint_state_dict
from hf_taskarith.state import float_state_dict
from hf_taskarith.training.encoders import encode, load_encoder, load_tokenizer
from hf_taskarith.training.frozen_head import FrozenHeadClassifier, encoder_task_vector, train_encoder
from hf_taskarith.training.heads import random_head
from hf_taskarith.training.tasks import RawTask, split_task

POS, NEG = ("great", "lovely", "superb"), ("awful", "boring", "dreadful")
FILLER = ("the", "a", "it", "was", "and", "this", "so", "really")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from transformers import BertConfig, BertModel, BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *FILLER, *POS, *NEG]
    folder = tmp_path_factory.mktemp("tiny") / "bert"
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config, add_pooling_layer=False).save_pretrained(folder)
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def task():
    rng = random.Random(0)
    texts = [" ".join(rng.sample(FILLER, 4) + [rng.choice((NEG, POS)[i % 2])]) for i in range(160)]
    return split_task("mood", RawTask(texts, [i % 2 for i in range(160)], ("neg", "pos")), train_size=96,
                      val_size=24, test_size=40)


def _head():
    return random_head(32, 2, generator=torch.Generator().manual_seed(0))


def test_task_dataset_is_a_datasets_dataset_with_class_labels(task):
    import datasets

    ds = task.dataset("train")
    assert isinstance(ds, datasets.Dataset) and ds.column_names == ["text", "label"]
    assert ds.features["label"].names == ["neg", "pos"] and len(ds) == 96
    assert ds["text"] == list(task.train.texts) and ds["label"] == list(task.train.labels)
    with pytest.raises(ValueError, match="unknown split"):
        task.dataset("dev")


def test_accuracy_metric_module_loads_offline_and_counts_right():
    assert "accuracy" in list_metrics()
    metric = load_metric("accuracy")
    assert metric.compute(predictions=[0, 1, 1, 2], references=[0, 1, 0, 1]) == {"accuracy": 0.5}
    assert metric.compute(predictions=[0, 1, 1], references=[0, 1, 0], normalize=False) == {"accuracy": 2.0}
    weighted = metric.compute(predictions=[0, 1], references=[0, 0], sample_weight=[3.0, 1.0])
    assert weighted["accuracy"] == pytest.approx(0.75)
    with pytest.raises(MissingMetricError, match="shipped metrics: \\['accuracy'\\]"):
        load_metric("f1_made_up")


def test_compute_metrics_fn_takes_the_argmax_of_the_logits():
    from transformers import EvalPrediction

    logits = np.array([[2.0, 1.0], [0.0, 3.0], [5.0, -1.0]])
    out = compute_metrics_fn("accuracy")(EvalPrediction(predictions=logits, label_ids=np.array([0, 1, 1])))
    assert out == {"accuracy": pytest.approx(2 / 3)}


def test_nonlinear_training_moves_the_encoder_not_the_head(tiny_dir, task):
    encoder, tok = load_encoder(tiny_dir), load_tokenizer(tiny_dir)
    base = load_encoder(tiny_dir)
    head = _head()
    head_before = {k: v.clone() for k, v in head.state_dict().items()}
    pre = task_accuracy(encoder, head, tok, task, "test", max_length=16)
    result = train_encoder(encoder, head, tok, task.dataset("train"), mode="nonlinear", steps=20, batch_size=16,
                           learning_rate=1e-3, max_length=16, progress=False)

    assert result.model is encoder and len(result.losses) == 20 and all(map(math.isfinite, result.losses))
    for k, v in head.state_dict().items():
        assert torch.equal(v, head_before[k]), k
    tv = result.task_vector
    assert set(tv.keys()) == set(float_state_dict(base))  # the encoder's names, no "encoder." prefix, no head
    assert tv.metadata.base_fingerprint == fingerprint_state_dict(float_state_dict(base))
    assert tv.metadata.created_with == "fine-tuning"
    assert tv.metadata.extra["training"]["mode"] == "nonlinear" and tv.metadata.extra["training"]["max_steps"] == 20
    # tau = fine-tuned - pre-trained: applying it to the base gives the trained encoder
    edited = tv.apply_to(base)
    for k, v in float_state_dict(encoder).items():
        torch.testing.assert_close(float_state_dict(edited)[k], v, msg=k)
    assert task_accuracy(encoder, head, tok, task, "test", max_length=16) > pre


def test_linear_training_leaves_the_encoder_and_returns_its_tangent_model(tiny_dir, task):
    from hf_taskarith.linearize import LinearizedModel

    encoder, tok = load_encoder(tiny_dir), load_tokenizer(tiny_dir)
    before = {k: v.clone() for k, v in float_state_dict(encoder).items()}
    head = _head()
    pre = task_accuracy(encoder, head, tok, task, "test", max_length=16)
    result = train_encoder(encoder, head, tok, task.dataset("train"), mode="linear", steps=20, batch_size=16,
                           learning_rate=1e-3, max_length=16, progress=False)

    for k, v in float_state_dict(encoder).items():
        assert torch.equal(v, before[k]), k  # linear mode trains delta of a copy
    tv = result.task_vector
    assert tv.metadata.created_with == "linearized" and tv.norm() > 0
    assert set(tv.keys()) == set(before) and tv.metadata.base_fingerprint == fingerprint_state_dict(before)
    assert isinstance(result.model, LinearizedModel)
    texts = list(task.test.texts[:8])
    again = LinearizedModel(encoder).load_task_vector(tv)
    torch.testing.assert_close(encode(result.model, tok, texts), encode(again, tok, texts))
    assert task_accuracy(result.model, head, tok, task, "test", max_length=16) > pre
    assert result.first_loss > result.last_loss


def test_a_nan_loss_raises(tiny_dir, task):
    encoder, tok = load_encoder(tiny_dir), load_tokenizer(tiny_dir)
    head = _head()
    with torch.no_grad():
        head.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteError, match="training loss is nan at step 1"):
        train_encoder(encoder, head, tok, task.dataset("train"), steps=2, batch_size=16, progress=False)


def test_bad_arguments_are_refused(tiny_dir, task):
    encoder, tok = load_encoder(tiny_dir), load_tokenizer(tiny_dir)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        train_encoder(encoder, _head(), tok, task.dataset("train"), steps=0)
    from hf_taskarith.errors import DatasetError

    with pytest.raises(DatasetError, match="no column 'sentence'"):
        train_encoder(encoder, _head(), tok, task.dataset("train"), steps=1, text_column="sentence")


def test_encoder_task_vector_refuses_a_trained_head(tiny_dir):
    from hf_taskarith import TaskVector

    encoder = load_encoder(tiny_dir)
    model = FrozenHeadClassifier(encoder, _head())
    deltas = {k: torch.zeros_like(v) for k, v in float_state_dict(model).items()}
    deltas["head.weight"] = torch.ones_like(deltas["head.weight"])
    with pytest.raises(ValueError, match="head.weight"):
        encoder_task_vector(TaskVector(deltas), base_fingerprint="fp1:x")


def test_pre_tokenized_data_trains_without_a_tokenizer(tiny_dir):
    import datasets

    from hf_taskarith.errors import DatasetError

    encoder = load_encoder(tiny_dir)
    before = {k: v.clone() for k, v in float_state_dict(encoder).items()}
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 13, (64, 6), generator=g)
    data = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": (ids[:, 0] % 2).tolist()})
    result = train_encoder(encoder, _head(), None, data, steps=3, batch_size=16, learning_rate=1e-3, progress=False,
                           lr_scheduler_type="constant", warmup_ratio=0.0)
    assert len(result.losses) == 3 and result.task_vector.norm() > 0
    assert result.task_vector.metadata.extra["training"]["lr_scheduler_type"] == "constant"
    moved = result.task_vector.apply_to(load_encoder(tiny_dir))
    for k, v in float_state_dict(encoder).items():
        torch.testing.assert_close(float_state_dict(moved)[k], v, msg=k)
    assert any(not torch.equal(v, before[k]) for k, v in float_state_dict(encoder).items())
    with pytest.raises(DatasetError, match="no column 'labels'"):
        train_encoder(encoder, _head(), None, data.rename_column("labels", "y"), steps=1)


def test_dropout_false_trains_as_an_encoder_without_dropout(tiny_dir, task):
    """``dropout=False`` keeps the encoder in eval(): the run equals one on a copy whose dropout is 0."""
    tok = load_tokenizer(tiny_dir)
    off = train_encoder(load_encoder(tiny_dir), _head(), tok, task.dataset("train"), mode="nonlinear", steps=4,
                        batch_size=16, learning_rate=1e-3, max_length=16, progress=False, dropout=False)
    zero = load_encoder(tiny_dir)
    for m in zero.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    ref = train_encoder(zero, _head(), tok, task.dataset("train"), mode="nonlinear", steps=4, batch_size=16,
                        learning_rate=1e-3, max_length=16, progress=False)
    on = train_encoder(load_encoder(tiny_dir), _head(), tok, task.dataset("train"), mode="nonlinear", steps=4,
                       batch_size=16, learning_rate=1e-3, max_length=16, progress=False)
    assert off.losses == ref.losses
    assert on.losses != ref.losses  # the default keeps the config's dropout (0.1) in nonlinear mode
    model = FrozenHeadClassifier(load_encoder(tiny_dir), _head(), encoder_dropout=False).train()
    assert model.training and not model.encoder.training and not model.head.training
    with pytest.raises(ValueError, match="dropout=True is not available in linear mode"):
        train_encoder(load_encoder(tiny_dir), _head(), tok, task.dataset("train"), mode="linear", steps=1,
                      dropout=True)


def test_cached_tangent_evaluation_scores_what_the_tangent_editor_scores(tiny_dir, task):
    from hf_taskarith.evaluation.editing import TangentEditor
    from hf_taskarith.evaluation.task_accuracy import cached_tangent_evaluation, evaluate_tasks
    from hf_taskarith.linearize import LinearizedModel

    encoder, tok = load_encoder(tiny_dir), load_tokenizer(tiny_dir)
    tv = train_encoder(load_encoder(tiny_dir), _head(), tok, task.dataset("train"), mode="linear", steps=8,
                       batch_size=16, learning_rate=1e-2, max_length=16, progress=False).task_vector
    editor = TangentEditor(LinearizedModel(encoder), {"mood": tv})
    heads = {"mood": _head()}
    cache, evaluate = cached_tangent_evaluation(editor, heads, tok, [task], max_length=16)
    for alpha in (0.0, 0.35, 1.0, -0.8):
        with editor.edited({"mood": alpha}) as model:
            want = evaluate_tasks(model, heads, tok, [task], "test", max_length=16)
        with cache.edited({"mood": alpha}) as point:
            assert evaluate(point, "test") == want, alpha


@pytest.mark.parametrize("mode", ["nonlinear", "linear"])
def test_best_on_validation_keeps_the_vector_of_the_best_step(tiny_dir, task, mode):
    from hf_taskarith.linearize import LinearizedModel

    encoder, tok = load_encoder(tiny_dir), load_tokenizer(tiny_dir)
    base = load_encoder(tiny_dir)
    # validation with the labels swapped: the better training goes, the worse it scores, so the
    # best check comes before the last and the kept vector is not the final one
    swapped = task.dataset("val").map(lambda row: {"label": 1 - row["label"]})
    result = train_encoder(encoder, _head(), tok, task.dataset("train"), mode=mode, steps=9, batch_size=16,
                           learning_rate=3e-3, max_length=16, progress=False, validation=swapped, eval_every=4)
    steps = [s for s, _ in result.validation_curve]
    assert steps == [4, 8, 9]  # every 4 steps and after the last
    accs = [a for _, a in result.validation_curve]
    assert result.best_step == steps[accs.index(max(accs))]  # the earliest best
    # the kept vector scores what was recorded for its step; the final one what the last check said
    assert result.best_step < 9 and accs[-1] < max(accs)
    for tv, expected in ((result.best_task_vector, max(accs)), (result.task_vector, accs[-1])):
        model = LinearizedModel(base).load_task_vector(tv) if mode == "linear" else tv.apply_to(base)
        assert 1 - task_accuracy(model, _head(), tok, task, "val", max_length=16) == pytest.approx(expected)


def test_best_on_validation_needs_both_arguments(tiny_dir, task):
    encoder, tok = load_encoder(tiny_dir), load_tokenizer(tiny_dir)
    for kwargs in ({"eval_every": 2}, {"validation": task.dataset("val")},
                   {"validation": task.dataset("val"), "eval_every": 0}):
        with pytest.raises(ValueError, match="needs both validation= .* and eval_every="):
            train_encoder(encoder, _head(), tok, task.dataset("train"), steps=2, progress=False, **kwargs)
    no_check = train_encoder(encoder, _head(), tok, task.dataset("train"), steps=2, progress=False, max_length=16)
    assert no_check.best_task_vector is None and no_check.best_step is None and no_check.validation_curve == []


def _adapter(kind: str):
    import peft

    from hf_taskarith.adapters import LinearizedLoraConfig

    if kind == "lora":
        return peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["query", "value"])
    return LinearizedLoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], init_seed=0)


@pytest.mark.parametrize("kind,mode", [("lora", "nonlinear"), ("llora", "linear")])
def test_adapters_train_on_a_copy_and_their_dense_vector_reproduces_the_trained_model(tiny_dir, task, kind, mode):
    from hf_taskarith.linearize import LinearizedModel

    encoder, tok = load_encoder(tiny_dir), load_tokenizer(tiny_dir)
    before = {k: v.clone() for k, v in float_state_dict(encoder).items()}
    result = train_encoder(encoder, _head(), tok, task.dataset("train"), mode=mode, steps=12, batch_size=16,
                           learning_rate=5e-3, max_length=16, progress=False, adapter=_adapter(kind),
                           validation=task.dataset("val"), eval_every=6)
    for k, v in float_state_dict(encoder).items():
        assert torch.equal(v, before[k]), k  # the adapter went on a copy
    tv = result.task_vector
    assert set(tv.keys()) == set(before)  # every encoder tensor, by the encoder's own names
    moved = {k for k in tv.keys() if tv[k].count_nonzero()}
    assert moved and all(".query." in k or ".value." in k for k in moved)
    assert tv.metadata.base_fingerprint == fingerprint_state_dict(before)
    assert tv.metadata.extra["training"]["max_steps"] == 12
    assert result.last_loss < result.first_loss and result.best_task_vector is not None
    # LoRA: the dense vector in weight space is the trained model; L-LoRA: in the tangent space
    texts = list(task.test.texts[:8])
    base = load_encoder(tiny_dir)
    rebuilt = tv.apply_to(base) if kind == "lora" else LinearizedModel(base).load_task_vector(tv)
    torch.testing.assert_close(encode(rebuilt.eval(), tok, texts), encode(result.model, tok, texts),
                               rtol=1e-4, atol=1e-5)


def test_adapters_must_fit_the_mode(tiny_dir, task):
    encoder, tok = load_encoder(tiny_dir), load_tokenizer(tiny_dir)
    for kind, mode in (("lora", "linear"), ("llora", "nonlinear")):
        with pytest.raises(ValueError, match="trains in mode="):
            train_encoder(encoder, _head(), tok, task.dataset("train"), mode=mode, steps=1, progress=False,
                          adapter=_adapter(kind))
    with pytest.raises(ValueError, match="adapter must be a peft.LoraConfig"):
        train_encoder(encoder, _head(), tok, task.dataset("train"), steps=1, progress=False, adapter=object())
