"""Weight disentanglement (xi) of the regime map's saved task vectors, over many pairs and seeds.

The paper's measure (``hf_taskarith.evaluation.disentanglement_error``): for two tasks, how often
adding the other task's vector changes the predictions on a task's own inputs, on a grid of
coefficients; 0 is perfectly disentangled. This script reads the vectors that
``benchmarks/regime_map.py --save-vectors DIR`` kept (one folder per mode, learning rate and
seed), rebuilds that run's splits and heads from its results file, and computes xi for
``--pairs`` task pairs per folder, drawn by the seed alone so both modes are scored on the same
pairs (a paired comparison). Linearized vectors are scored in the tangent space from one pass per
vector (``TangentOutputs``: every pair and grid point is then free); ordinary ones need a
forward pass per grid point and task.

Reported per mode and learning rate (mean and 95% t-interval over seeds of the per-seed mean
over pairs): mean xi over the positive quadrant of the grid (both coefficients >= 0, where
addition lives) and over the whole grid; and per learning rate the paired differences
linear - nonlinear and L-LoRA - LoRA (the adapter modes' folders are read too). The grid
defaults to the paper's range, -3..3 step 1 (49 points).

Usage:
    python benchmarks/disentanglement_map.py --vectors benchmarks/_work/regime8_vectors \\
        --results benchmarks/results/regime_map_8tasks.json --pairs 6
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import re
import time
from pathlib import Path

from hf_taskarith.evaluation.modes import PAIRS, TANGENT_MODES
from hf_taskarith.evaluation.provenance import run_record
from hf_taskarith.evaluation.statistics import mean_interval
from hf_taskarith.evaluation.task_accuracy import mean

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "disentanglement_map.json"
FOLDER = re.compile(r"^(?P<mode>nonlinear|linear|lora|llora)-lr(?P<lr>[0-9.e+-]+)-seed(?P<seed>\d+)$")


def pairs_of(tasks: list[str], n: int, seed: int) -> list[tuple[str, str]]:
    """``n`` task pairs drawn by ``seed`` alone (all of them when ``n`` is 0 or too large)."""
    every = list(itertools.combinations(sorted(tasks), 2))
    if not n or n >= len(every):
        return every
    return sorted(random.Random(seed).sample(every, n))


def quadrant_mean(alphas: list[float], xi: list[list[float]], positive: bool) -> float:
    """Mean of ``xi`` over the grid points with both coefficients >= 0 (``positive``), or all."""
    keep = [i for i, a in enumerate(alphas) if a >= 0 or not positive]
    return mean(xi[i][j] for i in keep for j in keep)


def one_folder(folder: Path, mode: str, lr: float, seed: int, config: dict, args, base, tok) -> dict:
    import torch

    from hf_taskarith import LinearizedModel, TaskVector
    from hf_taskarith.evaluation.disentanglement import disentanglement_error
    from hf_taskarith.evaluation.editing import ModelEditor, TangentEditor
    from hf_taskarith.evaluation.task_accuracy import cached_tangent_evaluation
    from hf_taskarith.training.encoders import encode
    from hf_taskarith.training.heads import task_heads
    from hf_taskarith.training.tasks import load_tasks

    t0 = time.perf_counter()  # the splits and heads of the regime-map run (same sizes and seed)
    tasks = {t.name: t for t in load_tasks(config["tasks"], train_size=config["train_size"],
                                           val_size=config["val_size"], test_size=config["test_size"], seed=seed)}
    heads = task_heads("probe", base, tok, list(tasks.values()), generator=torch.Generator().manual_seed(seed))
    pairs = pairs_of(list(tasks), args.pairs, seed)
    needed = sorted({n for p in pairs for n in p})
    vectors = {n: TaskVector.from_pretrained(folder / n) for n in needed}
    split = args.split
    if mode in TANGENT_MODES:
        editor, _ = cached_tangent_evaluation(TangentEditor(LinearizedModel(base), vectors), heads, tok,
                                              [tasks[n] for n in needed], splits=(split,))

        def predict(point, task):
            return heads[task](point.output((task, split))).argmax(-1)
    else:
        editor = ModelEditor(base, vectors)

        def predict(model, task):
            return heads[task](encode(model, tok, tasks[task].split(split).texts)).argmax(-1)

    grids = []
    for pair in pairs:
        grid = disentanglement_error(editor, predict, pair, alphas=args.alphas)
        xi = grid.xi.tolist()
        grids.append({"tasks": list(pair), "xi": xi, "positive": quadrant_mean(args.alphas, xi, True),
                      "all": quadrant_mean(args.alphas, xi, False)})
    cell = {"mode": mode, "lr": lr, "seed": seed, "split": split, "alphas": list(args.alphas), "pairs": grids,
            "positive": mean(g["positive"] for g in grids), "all": mean(g["all"] for g in grids),
            "seconds": time.perf_counter() - t0}
    print(f"{mode:9s} lr {lr:g} seed {seed}: xi positive quadrant {cell['positive']:.3f}, whole grid "
          f"{cell['all']:.3f} over {len(grids)} pairs ({cell['seconds']:.0f} s)", flush=True)
    return cell


def _interval(values) -> list[float]:
    i = mean_interval(values)
    return [i.estimate, i.low, i.high]


def summarize(cells: list[dict]) -> dict:
    """Per (mode, lr): xi over seeds; per lr and pair of :data:`PAIRS`: the paired difference
    (``paired_linear_minus_nonlinear``, ``paired_llora_minus_lora``)."""
    rows: list[dict] = []
    pairs: dict[str, list[dict]] = {f"paired_{a}_minus_{b}": [] for a, b in PAIRS}
    modes = [m for m in ("nonlinear", "linear", "lora", "llora") if any(c["mode"] == m for c in cells)]
    for lr in sorted({c["lr"] for c in cells}):
        by_mode = {m: {c["seed"]: c for c in cells if c["mode"] == m and c["lr"] == lr} for m in modes}
        for mode, by_seed in by_mode.items():
            if by_seed:
                rows.append({"mode": mode, "lr": lr, "seeds": sorted(by_seed),
                             **{k: _interval([c[k] for c in by_seed.values()]) for k in ("positive", "all")}})
        for a, b in PAIRS:
            common = sorted(set(by_mode.get(a, {})) & set(by_mode.get(b, {})))
            if common:
                pairs[f"paired_{a}_minus_{b}"].append({"lr": lr, "seeds": common, **{
                    k: _interval([by_mode[a][s][k] - by_mode[b][s][k] for s in common]) for k in ("positive", "all")}})
    return {"rows": rows, **pairs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vectors", type=Path, required=True, help="the --save-vectors folder of a regime_map run")
    ap.add_argument("--results", type=Path, required=True, help="that run's results JSON (splits and sizes)")
    ap.add_argument("--pairs", type=int, default=6, help="task pairs per folder (0: all)")
    ap.add_argument("--alphas", type=float, nargs="+", default=[-3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0])
    ap.add_argument("--split", default="val", choices=["val", "test"])
    ap.add_argument("--modes", nargs="+", default=["nonlinear", "linear", "lora", "llora"])
    ap.add_argument("--json", type=Path, default=OUT)
    args = ap.parse_args()
    config = json.loads(args.results.read_text())["config"]
    folders = []
    for folder in sorted(args.vectors.iterdir()):
        m = FOLDER.match(folder.name)
        if m and m["mode"] in args.modes:
            folders.append((folder, m["mode"], float(m["lr"]), int(m["seed"])))
    if not folders:
        raise SystemExit(f"no <mode>-lr<lr>-seed<seed> folders under {args.vectors} (a regime_map --save-vectors "
                         "folder); best-on-validation folders (-best) are not read.")

    from hf_taskarith.training.assets import minilm_path
    from hf_taskarith.training.encoders import load_encoder, load_tokenizer

    record = run_record(ROOT)  # taken at the start: the work tree may move while this runs
    path = minilm_path()
    tok, base = load_tokenizer(path), load_encoder(path).eval()
    cells = [one_folder(f, mode, lr, seed, config, args, base, tok) for f, mode, lr, seed in folders]
    results = {**record,
               "config": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                             if k != "json"}, "tasks": config["tasks"]},
               "summary": summarize(cells), "cells": cells}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.json.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(args.json)
    for r in results["summary"]["rows"]:
        print(f"{r['mode']:9s} lr {r['lr']:g}: xi positive {r['positive'][0]:.3f} [{r['positive'][1]:.3f}, "
              f"{r['positive'][2]:.3f}], all {r['all'][0]:.3f}")
    for a, b in PAIRS:
        for p in results["summary"][f"paired_{a}_minus_{b}"]:
            print(f"lr {p['lr']:g}: {a} - {b}, positive quadrant {p['positive'][0]:+.3f} "
                  f"[{p['positive'][1]:+.3f}, {p['positive'][2]:+.3f}]")
    print(f"results written to {args.json}")


if __name__ == "__main__":
    main()
