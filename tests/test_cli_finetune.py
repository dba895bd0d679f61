"""``hf-taskarith finetune`` end to end, in-process, on a tiny BERT and a 32-row CSV.

Each mode trains 2 steps on CPU and must leave a task vector that loads, is non-zero, and fits
the base it records (the saved ``base/`` folder: the encoder plus the classification head that
training started from). The slow test runs two DDP processes under ``accelerate launch``.
"""

from __future__ import annotations

import csv
import json

import pytest
import torch

from hf_taskarith import TaskVector, check_compatibility
from hf_taskarith.cli.main import main

POS, NEG = ["good", "great", "fine", "nice"], ["bad", "awful", "poor", "sad"]
NOUNS = ["movie", "film", "show", "book"]
TRAIN_ARGS = ["--max_steps", "2", "--per_device_train_batch_size", "8", "--report_to", "none", "--use_cpu",
              "--save_strategy", "no", "--learning_rate", "1e-3"]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A 2-layer BertModel (hidden 32, no pooler, no head) and its WordPiece tokenizer, saved."""
    from transformers import BertConfig, BertModel, BertTokenizer

    folder = tmp_path_factory.mktemp("finetune") / "bert"
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *POS, *NEG, *NOUNS]
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config, add_pooling_layer=False).save_pretrained(folder)
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def reviews_csv(tmp_path_factory):
    """32 two-word reviews with string labels pos/neg (and an unused id column)."""
    path = tmp_path_factory.mktemp("data") / "reviews.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "text", "label"])
        for i in range(32):
            adjectives, label = (POS, "pos") if i % 2 else (NEG, "neg")
            w.writerow([i, f"{adjectives[i // 2 % 4]} {NOUNS[i // 8]}", label])
    return path


def _finetune(model, data, out, *extra):
    return main(["finetune", "--model", str(model), "--dataset", str(data), "--output-dir", str(out), "-q",
                 *extra, *TRAIN_ARGS])


@pytest.mark.parametrize("mode", ["linear", "nonlinear", "llora"])
def test_each_mode_writes_a_task_vector_that_fits_its_base(tiny_bert, reviews_csv, tmp_path, capsys, mode):
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "out"
    assert _finetune(tiny_bert, reviews_csv, out, "--mode", mode, "--text-column", "text",
                     "--label-column", "label", "--eval-split", "train[:50%]") == 0
    stdout = capsys.readouterr().out
    assert f"written to {out / 'task_vector'}" in stdout
    assert "eval accuracy" in stdout

    tv = TaskVector.from_pretrained(out / "task_vector")
    assert tv.norm() > 0
    training = tv.metadata.extra["training"]
    assert training["mode"] == mode and training["global_step"] == 2
    assert training["labels"] == ["neg", "pos"] and training["dataset"] == str(reviews_csv)
    assert 0.0 <= tv.metadata.extra["metrics"]["eval_accuracy"] <= 1.0

    # the recorded base is the saved encoder + new head, and it reproduces the vector's base weights
    assert tv.metadata.base_model == str((out / "base").absolute())
    base = AutoModelForSequenceClassification.from_pretrained(tv.metadata.base_model)
    assert base.config.id2label == {0: "neg", 1: "pos"}
    report = check_compatibility(tv, base)
    assert report.compatible, report.describe()
    assert any(name.startswith("classifier.") for name in tv if tv[name].abs().sum() > 0)  # the head trained
    if mode == "llora":
        assert tv.metadata.created_with == "peft:HF_TASKARITH_LLORA"
        assert any(".query." in name for name in tv)
    tv.apply_to(base)  # strict: raises if anything does not fit


def test_push_to_pushes_the_saved_vector_with_its_tag(tiny_bert, reviews_csv, tmp_path, capsys, monkeypatch):
    import hf_taskarith.hub.push as push_module

    calls = []

    def fake_push(tv, repo_id, **kwargs):
        calls.append((tv, repo_id, kwargs))
        return push_module.PushResult(repo_id=repo_id, commit_sha="abc123", commit_url="", branch="main",
                                      tag=kwargs.get("tag"))

    monkeypatch.setattr(push_module, "push_task_vector", fake_push)
    out = tmp_path / "out"
    assert _finetune(tiny_bert, reviews_csv, out, "--mode", "nonlinear", "--push-to", "me/reviews",
                     "--tag", "v1") == 0
    (tv, repo_id, kwargs), = calls
    assert repo_id == "me/reviews" and kwargs["tag"] == "v1"
    assert torch.equal(tv["classifier.weight"], TaskVector.from_pretrained(out / "task_vector")["classifier.weight"])
    assert "pushed me/reviews@main: commit abc123, tag v1" in capsys.readouterr().out


def test_a_missing_column_names_the_columns_there_are(tiny_bert, reviews_csv, tmp_path, capsys):
    out = tmp_path / "out"
    assert _finetune(tiny_bert, reviews_csv, out, "--text-column", "sentence") == 1
    err = capsys.readouterr().err
    assert "no column 'sentence' (--text-column)" in err
    assert "['id', 'text', 'label']" in err
    assert not out.exists()  # refused before any training or writing


def test_option_errors_say_what_was_expected(tiny_bert, reviews_csv, tmp_path, capsys):
    base = ["finetune", "--model", str(tiny_bert), "--dataset", str(reviews_csv), "--output-dir", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as exit_info:
        main([*base, "--mode", "lora"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --mode: invalid choice: 'lora'" in err and "llora" in err

    assert main([*base, "--learning_rat", "1e-4"]) == 2  # a misspelt TrainingArguments flag
    err = capsys.readouterr().err
    assert "unrecognized arguments: --learning_rat 1e-4" in err and "did you mean --learning_rate" in err

    assert main([*base, "--tag", "v1"]) == 2
    assert "add --push-to" in capsys.readouterr().err

    with pytest.raises(SystemExit):  # other commands still refuse unknown options
        main(["methods", "--learning_rate", "1e-4"])
    assert "unrecognized arguments: --learning_rate 1e-4" in capsys.readouterr().err


def test_bad_data_is_refused_with_the_fix(tiny_bert, tmp_path, capsys):
    one_class = tmp_path / "one.jsonl"
    one_class.write_text("".join(json.dumps({"text": "good movie", "label": "pos"}) + "\n" for _ in range(4)))
    assert _finetune(tiny_bert, one_class, tmp_path / "a") == 1
    assert "at least two" in capsys.readouterr().err

    assert _finetune(tiny_bert, tmp_path / "missing.csv", tmp_path / "b") == 1
    assert "no such file or folder" in capsys.readouterr().err

    assert _finetune(tiny_bert, one_class, tmp_path / "c", "--eval-split", "test") == 1
    assert "has no split 'test'" in capsys.readouterr().err


def test_an_existing_task_vector_is_not_overwritten(tiny_bert, reviews_csv, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "task_vector").mkdir(parents=True)
    (out / "task_vector" / "keep.txt").write_text("keep me")
    assert _finetune(tiny_bert, reviews_csv, out) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "task_vector" / "keep.txt").read_text() == "keep me"


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_ddp_processes_take_the_single_process_step(tmp_path):
    """``accelerate launch`` with two gloo CPU processes: one SGD step on a batch split across the
    ranks equals the single-process step. Guards the default ``average_tokens_across_devices=False``:
    with transformers' default the ordinary (nonlinear) step was 2x, because sequence-classification
    losses are means that ignore ``num_items_in_batch`` while the Trainer multiplies them by the
    process count."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from transformers import BertConfig, BertModel, BertTokenizer

    model_dir, data = tmp_path / "bert", tmp_path / "eight.csv"  # no dropout, so both runs compute the same step
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *POS, *NEG, *NOUNS]
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0), add_pooling_layer=False).save_pretrained(model_dir)
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(model_dir)
    data.write_text("text,label\n" + "".join(f"{POS[i % 4]} {NOUNS[i % 4]},pos\n{NEG[i % 4]} {NOUNS[i % 4]},neg\n"
                                             for i in range(4)))
    common = ["finetune", "--model", str(model_dir), "--dataset", str(data), "--mode", "nonlinear", "-q",
              "--max_steps", "1", "--optim", "sgd", "--learning_rate", "0.5", "--report_to", "none", "--use_cpu",
              "--save_strategy", "no"]  # 8 rows: one step sees all of them in both runs
    assert main([*common, "--output-dir", str(tmp_path / "one"), "--per_device_train_batch_size", "8"]) == 0

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), "-m", "hf_taskarith.cli.main",
           *common, "--output-dir", str(tmp_path / "two"), "--per_device_train_batch_size", "4"]
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]

    one, two = (TaskVector.from_pretrained(tmp_path / name / "task_vector") for name in ("one", "two"))
    assert two.metadata.extra["training"]["world_size"] == 2
    assert one.norm() > 0
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-7, msg=name)
