"""The evaluation harness end to end, offline: addition, negation, learned coefficients, xi, plots.

A tiny BERT built from a config, three synthetic keyword tasks, one frozen head per task
(fitted on the pre-trained features, as zero-shot heads would be) and one task vector per
task (the encoder fine-tuned through that head). Then:

1. task addition with the shared coefficient searched on validation (grid 0..1, step 0.05),
   then refined per task, and with per-layer coefficients learned by ``learn_coefficients``;
2. task negation: the scale chosen on validation, controls kept >= 95% of pre-trained;
3. the weight disentanglement error xi of two tasks on a small grid;
4. heat maps of the task vectors' cosine similarities and of xi, written as PNGs.

Fine-tuning runs ``LinearizedTrainer`` (``mode="nonlinear"``); ``--linearized`` fine-tunes in
the tangent space (``mode="linear"``) and evaluates every combination there, learned per-layer
coefficients included, with ``TangentEditor`` instead of ``ModelEditor``.

    python examples/evaluation/evaluation.py                              # under a minute on 2 CPU cores
    python examples/evaluation/evaluation.py --linearized                 # tangent space, about 2x longer
    python examples/evaluation/evaluation.py --output-dir /tmp/eval --xi-alphas -2 -1 0 1 2
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from datasets import Dataset
from torch import nn
from transformers import BertConfig, BertModel

from hf_taskarith import LinearizedModel, TaskVector
from hf_taskarith.evaluation import (
    ModelEditor,
    TangentEditor,
    disentanglement_error,
    learn_coefficients,
    task_addition,
    task_negation,
)
from hf_taskarith.evaluation.coefficients import layer_of
from hf_taskarith.evaluation.plots import plot_cosine_matrix, plot_disentanglement
from hf_taskarith.training.frozen_head import train_encoder

# Each task: does the sequence hold one of the first three keywords (label 0) or of the last three (label 1)?
TASKS = {"mood": (2, 3, 4, 5, 6, 7), "topic": (8, 9, 10, 11, 12, 13), "tense": (14, 15, 16, 17, 18, 19)}
CLS, FILLER, SEQ_LEN, VOCAB = 1, range(20, 100), 12, 100
SIZES = {"train": 256, "val": 96, "test": 192}


def make_split(task: str, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` sequences ``[CLS] filler... keyword filler...`` and their labels (balanced)."""
    g = torch.Generator().manual_seed(seed)
    keywords = torch.tensor(TASKS[task])
    ids = torch.randint(FILLER.start, FILLER.stop, (n, SEQ_LEN), generator=g)
    ids[:, 0] = CLS
    labels = torch.arange(n) % 2
    pick = keywords[labels * 3 + torch.randint(0, 3, (n,), generator=g)]
    pos = torch.randint(1, SEQ_LEN, (n,), generator=g)
    ids[torch.arange(n), pos] = pick
    return ids, labels


def features(encoder: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean-pooled last hidden states (no padding: every sequence has the same length)."""
    return encoder(input_ids=ids).last_hidden_state.mean(dim=1)


def fit_head(encoder: nn.Module, ids: torch.Tensor, labels: torch.Tensor, seed: int) -> nn.Linear:
    """A linear probe on the pre-trained features, then frozen (the closed-vocabulary setting)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        f = features(encoder, ids)
    mu, sd = f.mean(0), f.std(0)
    probe = nn.Linear(f.shape[1], 2)
    opt = torch.optim.Adam(probe.parameters(), lr=0.05)
    for _ in range(100):  # logistic regression on standardized features
        opt.zero_grad()
        nn.functional.cross_entropy(probe((f - mu) / sd), labels).backward()
        opt.step()
    head = nn.Linear(f.shape[1], 2)
    with torch.no_grad():  # fold the standardization in: head(f) = probe((f - mu) / sd)
        head.weight.copy_(probe.weight / sd)
        head.bias.copy_(probe.bias - (probe.weight / sd) @ mu)
    return head.requires_grad_(False).eval()


def task_vector(base: nn.Module, head: nn.Module, ids: torch.Tensor, labels: torch.Tensor, *, steps: int,
                seed: int, linearized: bool) -> TaskVector:
    """Fine-tune a copy of the encoder through the frozen head with ``LinearizedTrainer`` on a
    ``datasets.Dataset`` of token ids; return the task vector (fine-tuned minus pre-trained).

    Ordinary fine-tuning (``mode="nonlinear"``) uses a small learning rate (small task vectors:
    the regime in which task arithmetic works); tangent-space fine-tuning (``mode="linear"``)
    trains ``delta`` of a ``LinearizedModel``. Adam (AdamW without weight decay) at a constant
    learning rate, batch 32, no gradient clipping.
    """
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})
    result = train_encoder(copy.deepcopy(base), head, None, data, mode="linear" if linearized else "nonlinear",
                           steps=steps, batch_size=32, learning_rate=1e-3 if linearized else 5e-4, warmup_ratio=0.0,
                           max_grad_norm=0.0, lr_scheduler_type="constant", seed=seed, progress=False,
                           base_model="example/tiny-bert")
    return result.task_vector


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="outputs/evaluation_example", help="where the PNGs and results.json go")
    parser.add_argument("--steps", type=int, default=60, help="fine-tuning steps per task")
    parser.add_argument("--linearized", action="store_true",
                        help="fine-tune in the tangent space and evaluate with TangentEditor (about 2x slower)")
    parser.add_argument("--xi-alphas", type=float, nargs="+", default=[-2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0],
                        help="grid of the disentanglement error (both axes)")
    args = parser.parse_args()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    # 1. Base model, data, frozen heads, one task vector per task -------------------------
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                     vocab_size=VOCAB, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    base = BertModel(cfg, add_pooling_layer=False).eval()
    data = {t: {split: make_split(t, n, seed=100 * i + j) for j, (split, n) in enumerate(SIZES.items())}
            for i, t in enumerate(TASKS)}
    heads = {t: fit_head(base, *data[t]["train"], seed=i) for i, t in enumerate(TASKS)}
    task_vectors = {t: task_vector(base, heads[t], *data[t]["train"], steps=args.steps, seed=i,
                                   linearized=args.linearized) for i, t in enumerate(TASKS)}

    # The two callables the harness needs: accuracy per task, and predictions on one task.
    @torch.no_grad()
    def evaluate(model: nn.Module, split: str) -> dict[str, float]:
        return {t: float((heads[t](features(model, data[t][split][0])).argmax(-1) == data[t][split][1])
                         .float().mean()) for t in TASKS}

    @torch.no_grad()
    def predict(model: nn.Module, task: str) -> torch.Tensor:
        return heads[task](features(model, data[task]["val"][0])).argmax(-1)

    if args.linearized:  # evaluate f_lin(x; theta0 + sum_t alpha_t tau_t), as the vectors were trained
        editor = TangentEditor(LinearizedModel(base), task_vectors)
    else:  # one copy of the weights, rewritten in place for each combination of coefficients
        editor = ModelEditor(copy.deepcopy(base), task_vectors)
    pre_test = evaluate(editor.reset(), "test")
    ft_val, ft_test = {}, {}
    for t in TASKS:  # each task's own fine-tuned accuracy: the normalizer
        with editor.edited({t: 1.0}) as model:
            ft_val[t], ft_test[t] = evaluate(model, "val")[t], evaluate(model, "test")[t]
    print(f"{len(TASKS)} tasks, {len(task_vectors['mood'])} tensors per vector, "
          f"{'tangent-space (TangentEditor)' if args.linearized else 'ordinary (ModelEditor)'} fine-tuning; "
          "test accuracy (chance 50%):")

    def row(name: str, acc: dict[str, float]) -> None:
        print(f"  {name:34s}" + "   ".join(f"{t} {100 * acc[t]:5.1f}%" for t in TASKS))

    row("pre-trained (frozen heads)", pre_test)
    row("fine-tuned, each on its own task", ft_test)

    # 2. Task addition ------------------------------------------------------------------------
    shared = task_addition(editor, evaluate, finetuned_val=ft_val, finetuned_test=ft_test)
    alpha = next(iter(shared.coefficients.values()))
    row(f"addition, shared alpha = {alpha:g}", shared.absolute)
    print(f"  {'':34s}mean absolute {100 * shared.mean_absolute:.1f}%, "
          f"mean normalized {100 * shared.mean_normalized:.1f}%"
          f"  (searched {len(shared.search)} values on val)")
    per_task = task_addition(editor, evaluate, finetuned_val=ft_val, finetuned_test=ft_test, per_task=True)
    row("addition, per-task alphas", per_task.absolute)
    print(f"  {'':34s}alphas {per_task.coefficients}, mean normalized {100 * per_task.mean_normalized:.1f}%")
    # learned per layer on unlabelled validation batches; for a LinearizedModel (--linearized) in
    # the tangent space, where the vectors were trained, and TangentEditor applies them there too
    batches = {t: [data[t]["val"][0][i:i + 32] for i in range(0, SIZES["val"], 32)] for t in TASKS}
    learned = learn_coefficients(editor.model, task_vectors, batches,
                                 lambda model, batch, task: heads[task](features(model, batch)),
                                 granularity="layer", objective="entropy", steps=20, lr=0.02)
    with editor.edited(learned) as model:  # {task: {tensor name: coefficient}}
        learned_test = evaluate(model, "test")
    row("addition, learned per-layer", learned_test)
    for t, coefs in learned.items():
        by_layer = {layer_of(name): c for name, c in coefs.items()}
        print(f"  {'':34s}{t}: " + ", ".join(f"{layer} {c:.2f}" for layer, c in by_layer.items()))

    # 3. Task negation -------------------------------------------------------------------------
    neg = task_negation(editor, evaluate, "mood")  # default grid: 0 to 1, step 0.05
    control = sum(neg.control_accuracy.values()) / len(neg.control_accuracy)
    pre_control = sum(neg.pretrained_control.values()) / len(neg.pretrained_control)
    print(f"negation of mood: alpha = {neg.coefficient:g} -> mood {100 * neg.pretrained_target:.1f}% -> "
          f"{100 * neg.target_accuracy:.1f}%, controls {100 * pre_control:.1f}% -> {100 * control:.1f}% "
          f"(val budget: >= 95% of pre-trained)")

    # 4. Disentanglement error and plots --------------------------------------------------------
    t1, t2 = "mood", "topic"
    grid = disentanglement_error(editor, predict, (t1, t2), alphas=args.xi_alphas)
    print(f"disentanglement error xi({t1}, {t2}) on a {len(grid.alphas)}x{len(grid.alphas)} grid: "
          f"mean {float(grid.xi.mean()):.3f}, mean within |alpha| <= 1: {grid.mean_within(1.0):.3f}, "
          f"max {float(grid.xi.max()):.3f} (0 = disentangled, 2 = every prediction changes)")
    cos_png = plot_cosine_matrix(task_vectors, out / "cosine.png")
    xi_png = plot_disentanglement(grid, out / f"xi_{t1}_{t2}.png")
    results = {
        "mode": "linearized" if args.linearized else "nonlinear", "pretrained_test": pre_test,
        "finetuned_test": ft_test,
        "addition_shared": {"coefficients": shared.coefficients, "absolute": shared.absolute,
                            "normalized": shared.normalized, "search": shared.search},
        "addition_per_task": {"coefficients": per_task.coefficients, "absolute": per_task.absolute,
                              "normalized": per_task.normalized},
        "addition_learned": {
            "absolute": learned_test,
            "coefficients": {t: {layer_of(n): c for n, c in d.items()} for t, d in learned.items()}},
        "negation": {"target": neg.target, "coefficient": neg.coefficient, "target_accuracy": neg.target_accuracy,
                     "control_accuracy": neg.control_accuracy, "search": neg.search},
        "disentanglement": {"tasks": list(grid.tasks), "alphas": list(grid.alphas), "xi": grid.xi.tolist()},
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {cos_png}, {xi_png} and {out / 'results.json'} in {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
