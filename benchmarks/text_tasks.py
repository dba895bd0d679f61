"""Task addition and negation on real MiniLM with 6+ real text tasks: linearized vs non-linear.

The small-scale check of the central claim of Ortiz-Jimenez et al. (2023): task vectors
fine-tuned in the tangent space add (and negate) better than ordinary ones; and of its
parameter-efficient version (Tang et al., ICLR 2024): L-LoRA against LoRA. For each seed and
each mode --

* ``nonlinear``: ordinary full fine-tuning;
* ``linear``: full linearized fine-tuning (:class:`LinearizedModel`);
* ``lora``: peft LoRA (dense task vector ``B A scaling``, edits applied to the non-linear model);
* ``llora``: L-LoRA (:class:`~hf_taskarith.adapters.LinearizedLoraConfig`, the paper's "model"
  linearization), edits evaluated in the adapters' tangent space --

every task's encoder is fine-tuned through a frozen linear-probe head (closed-vocabulary
setting); the checkpoint with the best validation accuracy (scored every ``--eval-every``
steps) is kept, so each task is trained to convergence on its validation split. Then:

* **single task**: each task's own fine-tuned model on its test split;
* **addition**: ``theta0 + lambda * sum_t tau_t`` with one shared ``lambda`` chosen on the
  validation splits over ``0, 0.05, ..., 1`` (the paper's grid), scored on test: absolute
  accuracy and normalized accuracy (divided by the task's own fine-tuned accuracy, same mode);
* **negation**: for each task, ``theta0 - lambda * tau_t`` with the largest ``lambda`` on the
  grid whose control accuracy (the other tasks) stays >= 95% of the pre-trained one on
  validation; target and control test accuracy, averaged over tasks.

* **weight disentanglement** xi (alpha1, alpha2) for the first two tasks on a grid of
  ``-2, -1, 0, 1, 2`` (first seed only), as heat maps under ``benchmarks/results/text/``.

Linearized edits (``linear``, ``llora``) are evaluated as the papers do, in the tangent space
(``f_lin(x; theta0 + sum lambda_t tau_t)``). There the features are exactly linear in the
coefficients, so the pre-trained features and each fine-tuned model's features give every
grid point; non-linear edits need a forward pass per grid point
(:class:`~hf_taskarith.evaluation.ModelEditor`).

Usage::

    python benchmarks/text_tasks.py                               # 6 tasks, 4 modes, seeds 0 1 2 (hours on 2 cores)
    python benchmarks/text_tasks.py --seeds 0 --modes nonlinear linear --steps 40   # a quicker look
    python benchmarks/text_tasks.py --resume --seeds 0 1 2        # add missing (seed, mode) runs
    python benchmarks/text_tasks.py --report                      # table + summary plot from the results file
    python benchmarks/text_tasks.py --seeds 0 --modes linear --output b.json   # in parallel with another run,
    python benchmarks/text_tasks.py --report benchmarks/results/text_tasks.json b.json   # then combine
    python benchmarks/text_tasks.py --tasks sms_spam trec ...     # any registered demo tasks

Writes ``benchmarks/results/text_tasks.json``, prints a markdown table (mean and spread
over seeds) and draws ``benchmarks/results/text/summary.png``. Needs the offline assets of ``scripts/setup.sh``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from edit_protocols import addition, negation
from hf_taskarith import LinearizedModel, TaskVector
from hf_taskarith.evaluation import ModelEditor
from hf_taskarith.evaluation.disentanglement import disentanglement_error
from hf_taskarith.evaluation.plots import plot_disentanglement
from hf_taskarith.training.assets import minilm_path
from hf_taskarith.training.encoders import encode, load_encoder, load_tokenizer
from hf_taskarith.training.heads import task_heads
from hf_taskarith.training.manual_loop import finetune_encoder
from hf_taskarith.training.tasks import load_task

TASKS = ("sms_spam", "movie_sentiment", "trec", "disaster_tweets", "tweet_sentiment", "amazon_sentiment")
MODES = ("nonlinear", "linear", "lora", "llora")
TANGENT_MODES = {"linear", "llora"}  # edits evaluated in tangent space: features linear in the coefficients
GRID = tuple(round(0.05 * i, 2) for i in range(21))
NEG_GRID = tuple(round(0.25 * i, 2) for i in range(1, 9))  # 0.25 ... 2
XI_ALPHAS = (-2.0, -1.0, 0.0, 1.0, 2.0)
RESULTS = Path(__file__).parent / "results" / "text_tasks.json"
PLOTS = Path(__file__).parent / "results" / "text"
# knobs that change results: a --resume run only reuses runs made with the same values
RESULT_KNOBS = ("tasks", "steps", "lr", "adapter_lr", "batch_size", "max_length", "train_size", "val_size",
                "test_size", "eval_every", "rank", "adapter_targets")


def accuracy(logits: torch.Tensor, labels) -> float:
    return float((logits.argmax(-1) == torch.as_tensor(labels)).float().mean())


class _CoefficientEditor:
    """The slice of :class:`ModelEditor` that :func:`disentanglement_error` uses, for tangent-space
    edits: the "edited model" is just the coefficients; predictions come from cached features."""

    @contextlib.contextmanager
    def edited(self, coefs):
        yield dict(coefs)


class Study:
    def __init__(self, args):
        self.args = args
        self.tokenizer = load_tokenizer(minilm_path())
        self.base = load_encoder(minilm_path())
        self.tasks = [load_task(t, train_size=args.train_size, val_size=args.val_size, test_size=args.test_size,
                                seed=0) for t in args.tasks]
        self.heads = task_heads("probe", self.base, self.tokenizer, self.tasks,
                                generator=torch.Generator().manual_seed(0), max_length=args.max_length)
        self.f0 = self.all_feats(self.base)
        self.pre = {s: {t.name: self.acc(self.f0[(t.name, s)], t, s) for t in self.tasks} for s in ("val", "test")}

    def feats(self, model, task, split):
        return encode(model, self.tokenizer, task.split(split).texts, batch_size=64, max_length=self.args.max_length)

    def all_feats(self, model) -> dict[tuple[str, str], torch.Tensor]:
        return {(t.name, s): self.feats(model, t, s) for t in self.tasks for s in ("val", "test")}

    def acc(self, feats, task, split) -> float:
        return accuracy(self.heads[task.name](feats), task.split(split).labels)

    def scores(self, model, split, only=None) -> dict[str, float]:
        return {t.name: self.acc(self.feats(model, t, split), t, split) for t in self.tasks
                if only is None or t.name in only}

    # -- fine-tuning ---------------------------------------------------------------------
    def build(self, mode: str, seed: int):
        a = self.args
        enc = copy.deepcopy(self.base)
        if mode == "nonlinear":
            return enc
        if mode == "linear":
            return LinearizedModel(enc, copy_model=False)
        import peft

        if mode == "lora":
            config = peft.LoraConfig(r=a.rank, lora_alpha=2 * a.rank, lora_dropout=0.0,
                                     target_modules=list(a.adapter_targets))
        else:
            from hf_taskarith.adapters import LinearizedLoraConfig

            config = LinearizedLoraConfig(r=a.rank, lora_alpha=2 * a.rank, target_modules=list(a.adapter_targets),
                                          init_seed=seed)
        torch.manual_seed(seed)  # LoRA's A init
        return peft.get_peft_model(enc, config)

    def finetune(self, mode: str, seed: int):
        """Fine-tune every task; keep each task's best-on-validation checkpoint.

        Returns ``(task vectors, own test accuracy, features of each fine-tuned model, log)``.
        """
        a = self.args
        tvs, own, feats, log = {}, {}, {}, {}
        lr = a.adapter_lr if mode in ("lora", "llora") else a.lr
        for i, t in enumerate(self.tasks):
            model = self.build(mode, seed)
            trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
            best = {"acc": -1.0, "step": 0, "state": None}
            curve = []

            def on_step(step, model=model, t=t, trainable=trainable, best=best, curve=curve):
                if step % a.eval_every and step != a.steps:
                    return
                acc = self.acc(self.feats(model, t, "val"), t, "val")
                curve.append((step, round(acc, 4)))
                if acc > best["acc"]:
                    best.update(acc=acc, step=step, state={n: p.detach().clone() for n, p in trainable.items()})

            fit = finetune_encoder(model, self.heads[t.name], self.tokenizer, t.train, steps=a.steps,
                                   batch_size=a.batch_size, learning_rate=lr, max_length=a.max_length,
                                   seed=1000 * seed + i, progress=not a.no_progress, desc=f"{mode} {t.name} s{seed}",
                                   on_step=on_step)
            with torch.no_grad():
                for n, p in trainable.items():
                    p.copy_(best["state"][n])
            model.eval()
            if mode == "nonlinear":
                tvs[t.name] = TaskVector.from_models(self.base, model)
            elif mode == "linear":
                tvs[t.name] = model.task_vector()
            else:
                tvs[t.name] = TaskVector.from_peft(model)
            if mode in TANGENT_MODES:
                feats[t.name] = self.all_feats(model)
                own[t.name] = self.acc(feats[t.name][(t.name, "test")], t, "test")
            else:
                own[t.name] = self.acc(self.feats(model, t, "test"), t, "test")
            log[t.name] = {"seconds": round(fit.seconds, 1), "best_step": best["step"],
                           "best_val": round(best["acc"], 4), "val_curve": curve,
                           "trainable_params": sum(p.numel() for p in trainable.values())}
            del model, trainable, best
        return tvs, own, feats, log

    # -- edited models: a function (coefficients, split) -> {task: accuracy} --------------
    def tangent_logits(self, feats):
        """Logits at any coefficients from the pre-trained and fine-tuned features (exact in tangent space)."""
        names = list(feats)

        def logits(coefs, task, split):
            f = self.f0[(task.name, split)] + sum(coefs.get(n, 0.0) * (feats[n][(task.name, split)] -
                                                                       self.f0[(task.name, split)]) for n in names)
            return self.heads[task.name](f)

        return logits

    def tangent_evaluator(self, feats):
        logits = self.tangent_logits(feats)

        def evaluate(coefs, split, only=None):
            return {t.name: accuracy(logits(coefs, t, split), t.split(split).labels) for t in self.tasks
                    if only is None or t.name in only}

        return evaluate

    def nonlinear_evaluator(self, editor):
        def evaluate(coefs, split, only=None):
            with editor.edited(coefs) as model:
                return self.scores(model, split, only)

        return evaluate

    def disentanglement(self, mode, seed, names, editor, feats):
        pair = (names[0], names[1])
        by_name = {t.name: t for t in self.tasks}
        if mode in TANGENT_MODES:
            logits = self.tangent_logits(feats)
            editor = _CoefficientEditor()

            def predict(coefs, task):
                return logits(coefs, by_name[task], "val").argmax(-1)
        else:
            def predict(model, task):
                return self.heads[task](self.feats(model, by_name[task], "val")).argmax(-1)

        grid = disentanglement_error(editor, predict, pair, alphas=XI_ALPHAS, progress=not self.args.no_progress)
        path = plot_disentanglement(grid, PLOTS / f"xi_{mode}_s{seed}.png",
                                    title=f"xi, {mode} (MiniLM, {pair[0]} / {pair[1]})", vmax=1.0)
        return {"tasks": list(pair), "alphas": list(XI_ALPHAS), "xi": grid.xi.tolist(),
                "mean_within_1": grid.mean_within(1.0), "mean_within_2": grid.mean_within(2.0), "plot": str(path)}

    def run(self, runs):
        done = {(r["seed"], r["mode"]) for r in runs}
        for seed in self.args.seeds:
            for mode in self.args.modes:
                if (seed, mode) in done:
                    continue
                t0 = time.perf_counter()
                tvs, own, feats, log = self.finetune(mode, seed)
                names = list(tvs)
                editor = None
                if mode in TANGENT_MODES:
                    evaluate = self.tangent_evaluator(feats)
                else:
                    editor = ModelEditor(copy.deepcopy(self.base), {k: v.materialize() for k, v in tvs.items()})
                    evaluate = self.nonlinear_evaluator(editor)
                add = addition(evaluate, names, own, GRID)
                neg = negation(evaluate, names, self.pre["val"], NEG_GRID)
                xi = self.disentanglement(mode, seed, names, editor, feats) if seed == self.args.seeds[0] else None
                cos = {a: {b: tvs[a].cosine_similarity(tvs[b]) for b in names} for a in names}
                run = {"seed": seed, "mode": mode, "single": own, "single_mean": statistics.mean(own.values()),
                       "addition": add, "negation": neg, "xi": xi, "train": log, "cosine": cos,
                       "seconds": round(time.perf_counter() - t0, 1)}
                runs.append(run)
                print(f"seed {seed} {mode:9s}: single {run['single_mean']:.3f} | addition abs {add['absolute']:.3f} "
                      f"norm {add['normalized']:.3f} (lambda {add['lambda']}) | negation target {neg['target']:.3f} "
                      f"control {neg['control']:.3f}" + (f" | xi(|a|<=1) {xi['mean_within_1']:.3f}" if xi else "")
                      + f" | {run['seconds']:.0f}s", flush=True)
                self.save(runs)
                del editor, tvs, feats
        return runs

    def config(self) -> dict:
        return {k: v for k, v in vars(self.args).items()}

    def save(self, runs):
        write_results(Path(self.args.output), {"config": self.config(), "pretrained": self.pre, "runs": runs,
                                               "summary": summarize(runs, self.pre)})


def write_results(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def mismatched_knobs(a: dict, b: dict) -> list[str]:
    return [k for k in RESULT_KNOBS if json.dumps(a.get(k), default=str) != json.dumps(b.get(k), default=str)]


def previous_runs(args) -> list[dict]:
    """Runs of an earlier invocation with the same result knobs (for ``--resume``)."""
    out = Path(args.output)
    if not out.exists():
        return []
    old = json.loads(out.read_text())
    mismatched = mismatched_knobs(old["config"], vars(args))
    if mismatched:
        sys.exit(f"--resume: {out} was made with different settings ({', '.join(mismatched)}); "
                 "run without --resume to start over.")
    return old["runs"]


def summarize(runs, pre) -> dict:
    out = {}
    for mode in [m for m in MODES if any(r["mode"] == m for r in runs)]:
        rs = [r for r in runs if r["mode"] == mode]

        def stat(xs):
            return {"mean": statistics.mean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs)}

        out[mode] = {"single": stat([r["single_mean"] for r in rs]),
                     "addition_absolute": stat([r["addition"]["absolute"] for r in rs]),
                     "addition_normalized": stat([r["addition"]["normalized"] for r in rs]),
                     "addition_lambda": [r["addition"]["lambda"] for r in rs],
                     "negation_target": stat([r["negation"]["target"] for r in rs]),
                     "negation_control": stat([r["negation"]["control"] for r in rs]),
                     "xi_mean_within_1": [r["xi"]["mean_within_1"] for r in rs if r.get("xi")],
                     "seeds": [r["seed"] for r in rs]}
    out["pretrained_test_mean"] = statistics.mean(pre["test"].values())
    return out


def table(summary) -> str:
    def f(s):
        return f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}"

    pre = 100 * summary["pretrained_test_mean"]
    lines = ["| mode | seeds | single-task | addition abs. | addition norm. | lambda | negation target | "
             "negation control | xi, abs(alpha) <= 1 |",
             "|---|---|---:|---:|---:|---|---:|---:|---:|",
             f"| pre-trained (probe heads) | | {pre:.1f} | {pre:.1f} | | | {pre:.1f} | {pre:.1f} | |"]
    for mode in MODES:
        if mode in summary:
            s = summary[mode]
            xi = ", ".join(f"{x:.3f}" for x in s["xi_mean_within_1"])
            lines.append(f"| {mode} | {len(s['seeds'])} | {f(s['single'])} | {f(s['addition_absolute'])} | "
                         f"{f(s['addition_normalized'])} | {', '.join(str(x) for x in s['addition_lambda'])} | "
                         f"{f(s['negation_target'])} | {f(s['negation_control'])} | {xi} |")
    return "\n".join(lines)


def plot_summary(summary, path: Path, n_tasks: int) -> Path:
    """Grouped bars (mean, std over seeds) of the table's accuracies for each mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("single", "single-task"), ("addition_absolute", "addition"),
               ("negation_target", "negation: target"), ("negation_control", "negation: control")]
    modes = [m for m in MODES if m in summary]
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    width = 0.8 / max(1, len(modes))
    for i, mode in enumerate(modes):
        means = [100 * summary[mode][k]["mean"] for k, _ in metrics]
        stds = [100 * summary[mode][k]["std"] for k, _ in metrics]
        ax.bar([j + (i - (len(modes) - 1) / 2) * width for j in range(len(metrics))], means, width, yerr=stds,
               capsize=2, label=f"{mode} ({len(summary[mode]['seeds'])} seeds)")
    ax.axhline(100 * summary["pretrained_test_mean"], color="grey", linestyle="--", linewidth=1,
               label="pre-trained (probe heads)")
    ax.set_xticks(range(len(metrics)), [label for _, label in metrics])
    ax.set_ylabel("mean test accuracy (%)")
    ax.set_title(f"MiniLM, {n_tasks} text tasks: task arithmetic by fine-tuning mode")
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.1))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def report(inputs: list[str], output: str) -> None:
    """Combine results files (e.g. of runs made in parallel), write ``output``, print the table
    and draw the summary plot. No training."""
    runs, data = [], None
    for name in inputs:
        path = Path(name)
        if not path.exists():
            sys.exit(f"no results: {path} does not exist; run the study first.")
        part = json.loads(path.read_text())
        if data is None:
            data = part
        elif mismatched_knobs(data["config"], part["config"]):
            knobs = ", ".join(mismatched_knobs(data["config"], part["config"]))
            sys.exit(f"{path} was made with different settings ({knobs}) than {inputs[0]}; they cannot be combined.")
        seen = {(r["seed"], r["mode"]) for r in runs}
        runs += [r for r in part["runs"] if (r["seed"], r["mode"]) not in seen]
    runs.sort(key=lambda r: (r["seed"], MODES.index(r["mode"])))
    summary = summarize(runs, data["pretrained"])
    if [str(Path(i).resolve()) for i in inputs] != [str(Path(output).resolve())]:
        write_results(Path(output), {**data, "runs": runs, "summary": summary, "combined_from": inputs})
    print(table(summary))
    print(f"written to {output}; plot: {plot_summary(summary, PLOTS / 'summary.png', len(data['config']['tasks']))}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", nargs="+", default=list(TASKS))
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=20, help="score validation every N steps; keep the best")
    p.add_argument("--lr", type=float, default=2e-4, help="full fine-tuning (nonlinear, linear)")
    p.add_argument("--adapter-lr", type=float, default=1e-3, help="lora, llora (adapters usually need ~10x)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--adapter-targets", nargs="+", default=["query", "key", "value", "dense"])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--train-size", type=int, default=1000)
    p.add_argument("--val-size", type=int, default=150)
    p.add_argument("--test-size", type=int, default=300)
    p.add_argument("--threads", type=int)
    p.add_argument("--resume", action="store_true", help="keep the (seed, mode) runs already in the results file")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--output", default=str(RESULTS), help="results file (runs in parallel need their own)")
    p.add_argument("--report", nargs="*", metavar="RESULTS_JSON",
                   help="no training: combine these results files (default: --output) into --output, print the "
                        "table, draw the plot")
    args = p.parse_args()
    if args.report is not None:
        return report(args.report or [args.output], args.output)
    if len(args.tasks) < 2:
        sys.exit("give at least two tasks")
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    runs = previous_runs(args) if args.resume else []
    study = Study(args)
    print(f"pre-trained test mean {statistics.mean(study.pre['test'].values()):.3f}: {study.pre['test']}", flush=True)
    runs = study.run(runs)
    summary = summarize(runs, study.pre)
    print(table(summary))
    print(f"written to {args.output}; plot: {plot_summary(summary, PLOTS / 'summary.png', len(args.tasks))}")


if __name__ == "__main__":
    main()
