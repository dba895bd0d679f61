"""Task addition and negation on real MiniLM with 6+ real text tasks: linearized vs non-linear.

The small-scale check of the central claim of Ortiz-Jimenez et al. (2023): task vectors
fine-tuned in the tangent space add (and negate) better than ordinary ones. For each seed
and each mode (``nonlinear``: ordinary fine-tuning; ``linear``: :class:`LinearizedModel`),
every task's encoder is fine-tuned through a frozen linear-probe head (closed-vocabulary
setting), then:

* **single task**: each task's own fine-tuned model on its test split;
* **addition**: ``theta0 + lambda * sum_t tau_t`` with one shared ``lambda`` chosen on the
  validation splits over ``0, 0.05, ..., 1`` (the paper's grid), scored on test: absolute
  accuracy and normalized accuracy (divided by the task's own fine-tuned accuracy, same mode);
* **negation**: for each task, ``theta0 - lambda * tau_t`` with the largest ``lambda`` on the
  grid whose control accuracy (the other tasks) stays >= 95% of the pre-trained one on
  validation; target and control test accuracy, averaged over tasks.

Linearized edits are evaluated as the paper does, in the tangent space
(``f_lin(x; theta0 + sum lambda_t tau_t)``). There the features are exactly linear in the
coefficients, so ``1 + T`` tangent-space passes per split give every grid point; non-linear
edits need a forward pass per grid point (:class:`~hf_taskarith.evaluation.ModelEditor`).

Usage::

    python benchmarks/text_tasks.py                               # 6 tasks, seeds 0 1, ~1 h on 2 cores
    python benchmarks/text_tasks.py --seeds 0 --steps 40          # a quicker look
    python benchmarks/text_tasks.py --tasks sms_spam trec ...     # any registered demo tasks

Writes ``benchmarks/results/text_tasks.json`` and prints a markdown table (mean and spread
over seeds). Needs the offline assets of ``scripts/setup.sh``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from hf_taskarith import LinearizedModel, TaskVector
from hf_taskarith.demo.assets import minilm_path
from hf_taskarith.demo.data import load_task
from hf_taskarith.demo.models import encode, load_encoder, load_tokenizer, make_head
from hf_taskarith.demo.train import finetune_encoder
from hf_taskarith.evaluation import ModelEditor

TASKS = ("sms_spam", "movie_sentiment", "trec", "disaster_tweets", "tweet_sentiment", "amazon_sentiment")
GRID = tuple(round(0.05 * i, 2) for i in range(21))
NEG_GRID = tuple(round(0.25 * i, 2) for i in range(1, 9))  # 0.25 ... 2
RESULTS = Path(__file__).parent / "results" / "text_tasks.json"


def accuracy(logits: torch.Tensor, labels) -> float:
    return float((logits.argmax(-1) == torch.as_tensor(labels)).float().mean())


class Study:
    def __init__(self, args):
        self.args = args
        self.tokenizer = load_tokenizer(minilm_path())
        self.base = load_encoder(minilm_path())
        self.tasks = [load_task(t, train_size=args.train_size, val_size=args.val_size, test_size=args.test_size,
                                seed=0) for t in args.tasks]
        g = torch.Generator().manual_seed(0)
        self.heads = {t.name: make_head("probe", self.base, self.tokenizer, t.train.texts, t.train.labels,
                                        t.num_labels, generator=g, max_length=args.max_length)
                      for t in self.tasks}
        self.pre = {s: self.scores(self.base, s) for s in ("val", "test")}

    def feats(self, model, task, split):
        return encode(model, self.tokenizer, task.split(split).texts, batch_size=64, max_length=self.args.max_length)

    def scores(self, model, split) -> dict[str, float]:
        return {t.name: accuracy(self.heads[t.name](self.feats(model, t, split)), t.split(split).labels)
                for t in self.tasks}

    # -- fine-tuning ---------------------------------------------------------------------
    def finetune(self, mode: str, seed: int) -> tuple[dict[str, TaskVector], dict[str, float], dict[str, float]]:
        a = self.args
        tvs, own, secs = {}, {}, {}
        for i, t in enumerate(self.tasks):
            enc = copy.deepcopy(self.base)
            model = LinearizedModel(enc, copy_model=False) if mode == "linear" else enc
            fit = finetune_encoder(model, self.heads[t.name], self.tokenizer, t.train, steps=a.steps,
                                   batch_size=a.batch_size, learning_rate=a.lr, max_length=a.max_length,
                                   seed=1000 * seed + i, progress=not a.no_progress, desc=f"{mode} {t.name} s{seed}")
            tvs[t.name] = model.task_vector() if mode == "linear" else TaskVector.from_models(self.base, enc)
            own[t.name] = accuracy(self.heads[t.name](self.feats(model, t, "test")), t.test.labels)
            secs[t.name] = round(fit.seconds, 1)
        return tvs, own, secs

    # -- edited models: a function coefficients -> {task: logits on split} ----------------
    def linear_evaluator(self, tvs):
        """Features at every coefficient from 1 + T tangent passes per split (exact)."""
        lin = LinearizedModel(self.base)
        names = list(tvs)
        cache = {}
        for split in ("val", "test"):
            for t in self.tasks:
                f0 = self.feats(lin.load_task_vector(tvs[names[0]], scaling=0.0), t, split)
                d = [self.feats(lin.load_task_vector(tvs[n]), t, split) - f0 for n in names]
                cache[(t.name, split)] = (f0, d)

        def evaluate(coefs: dict[str, float], split: str) -> dict[str, float]:
            out = {}
            for t in self.tasks:
                f0, d = cache[(t.name, split)]
                f = f0 + sum(coefs.get(n, 0.0) * di for n, di in zip(names, d))
                out[t.name] = accuracy(self.heads[t.name](f), t.split(split).labels)
            return out

        return evaluate

    def nonlinear_evaluator(self, tvs):
        editor = ModelEditor(copy.deepcopy(self.base), {k: v.materialize() for k, v in tvs.items()})

        def evaluate(coefs: dict[str, float], split: str) -> dict[str, float]:
            with editor.edited(coefs) as model:
                return self.scores(model, split)

        return evaluate

    # -- the protocols ------------------------------------------------------------------
    def addition(self, evaluate, names, own):
        search = {lam: statistics.mean(evaluate({n: lam for n in names}, "val").values()) for lam in GRID}
        lam = max(search, key=lambda k: (search[k], -k))
        test = evaluate({n: lam for n in names}, "test")
        return {"lambda": lam, "test": test, "absolute": statistics.mean(test.values()),
                "normalized": statistics.mean(test[n] / own[n] for n in names), "val_search": search}

    def negation(self, evaluate, names):
        rows = {}
        for target in names:
            controls = [n for n in names if n != target]
            floor = 0.95 * statistics.mean(self.pre["val"][c] for c in controls)
            chosen = None
            for lam in NEG_GRID:
                val = evaluate({target: -lam}, "val")
                if statistics.mean(val[c] for c in controls) >= floor:
                    chosen = lam
            if chosen is None:
                chosen = NEG_GRID[0]
            test = evaluate({target: -chosen}, "test")
            rows[target] = {"lambda": chosen, "target": test[target],
                            "control": statistics.mean(test[c] for c in controls)}
        return {"per_task": rows, "target": statistics.mean(r["target"] for r in rows.values()),
                "control": statistics.mean(r["control"] for r in rows.values())}

    def run(self):
        runs = []
        for seed in self.args.seeds:
            for mode in self.args.modes:
                t0 = time.perf_counter()
                tvs, own, secs = self.finetune(mode, seed)
                names = list(tvs)
                evaluate = self.linear_evaluator(tvs) if mode == "linear" else self.nonlinear_evaluator(tvs)
                add = self.addition(evaluate, names, own)
                neg = self.negation(evaluate, names)
                cos = {a: {b: tvs[a].cosine_similarity(tvs[b]) for b in names} for a in names}
                run = {"seed": seed, "mode": mode, "single": own, "single_mean": statistics.mean(own.values()),
                       "addition": add, "negation": neg, "train_seconds": secs, "cosine": cos,
                       "seconds": round(time.perf_counter() - t0, 1)}
                runs.append(run)
                print(f"seed {seed} {mode:9s}: single {run['single_mean']:.3f} | addition abs {add['absolute']:.3f} "
                      f"norm {add['normalized']:.3f} (lambda {add['lambda']}) | negation target {neg['target']:.3f} "
                      f"control {neg['control']:.3f} | {run['seconds']:.0f}s", flush=True)
                self.save(runs)
        return runs

    def save(self, runs):
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        data = {"config": {k: v for k, v in vars(self.args).items()}, "pretrained": self.pre, "runs": runs,
                "summary": summarize(runs, self.pre)}
        tmp = RESULTS.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
        os.replace(tmp, RESULTS)


def summarize(runs, pre) -> dict:
    out = {}
    for mode in sorted({r["mode"] for r in runs}):
        rs = [r for r in runs if r["mode"] == mode]

        def stat(xs):
            return {"mean": statistics.mean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs)}

        out[mode] = {"single": stat([r["single_mean"] for r in rs]),
                     "addition_absolute": stat([r["addition"]["absolute"] for r in rs]),
                     "addition_normalized": stat([r["addition"]["normalized"] for r in rs]),
                     "addition_lambda": [r["addition"]["lambda"] for r in rs],
                     "negation_target": stat([r["negation"]["target"] for r in rs]),
                     "negation_control": stat([r["negation"]["control"] for r in rs])}
    out["pretrained_test_mean"] = statistics.mean(pre["test"].values())
    return out


def table(summary) -> str:
    def f(s):
        return f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}"

    lines = ["| mode | single-task | addition abs. | addition norm. | lambda | negation target | negation control |",
             "|---|---:|---:|---:|---|---:|---:|"]
    for mode in ("nonlinear", "linear"):
        if mode in summary:
            s = summary[mode]
            lines.append(f"| {mode} | {f(s['single'])} | {f(s['addition_absolute'])} | {f(s['addition_normalized'])} | "
                         f"{', '.join(str(x) for x in s['addition_lambda'])} | {f(s['negation_target'])} | "
                         f"{f(s['negation_control'])} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", nargs="+", default=list(TASKS))
    p.add_argument("--modes", nargs="+", choices=("nonlinear", "linear"), default=["nonlinear", "linear"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--train-size", type=int, default=1000)
    p.add_argument("--val-size", type=int, default=150)
    p.add_argument("--test-size", type=int, default=300)
    p.add_argument("--threads", type=int)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args()
    if len(args.tasks) < 2:
        sys.exit("give at least two tasks")
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    study = Study(args)
    print(f"pre-trained test mean {statistics.mean(study.pre['test'].values()):.3f}: {study.pre['test']}", flush=True)
    runs = study.run()
    print(table(summarize(runs, study.pre)))
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
