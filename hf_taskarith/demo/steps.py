"""The demo's built-in steps, registered in order on import.

Steps (``DEMO_STEPS``, in order):

1. ``prepare``: load the pre-trained encoder and tokenizer, save them as the base
   checkpoint folder, load the tasks' splits.
2. ``heads``: make one frozen head per task from the pre-trained encoder.
3. ``pretrained``: score the pre-trained encoder on every task (zero-shot through the heads).
4. ``finetune``: fine-tune a copy of the encoder on each task with ``LinearizedTrainer``
   (:func:`hf_taskarith.training.frozen_head.train_encoder`, on the task's ``datasets.Dataset``),
   save the checkpoint (non-linear mode), save its task vector, score it on every task.
5. ``task_vectors``: reload the saved task vectors; norms and pairwise cosine similarities.
6. ``merge``: for each merge method, choose the coefficient on validation among the grid,
   each candidate a checkpoint written by the streaming :func:`hf_taskarith.merge`
   (base folder + task-vector folders in, merged folder out); score the chosen one on test.
7. ``negation``: subtract one task vector (:meth:`TaskVector.apply_to` on the base folder),
   the coefficient chosen on validation by the library's rule
   (:func:`hf_taskarith.evaluation.choose_negation`: the lowest target accuracy keeping the
   other tasks at >= 95% of their pre-trained accuracy; nothing negated, and said so, when no
   coefficient keeps that budget); the report adds the chance-adjusted retention and flags a
   target below chance (an inverted classifier, not forgetting).
8. ``report``: write ``results.json`` and ``results.md``.

Later features add steps with :func:`register_demo_step`.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import TaskArithError
from ..evaluation.task_accuracy import mean
from ..io.writer import atomic_output_dir
from ..merging.api import merge
from ..merging.registry import get_merge_method
from ..task_vector import TaskVector
from ..training.assets import minilm_path
from ..training.encoders import (
    load_encoder,
    load_tokenizer,
    progress_disabled,
    quiet_transformers,
)
from ..training.frozen_head import train_encoder
from ..training.heads import make_head, save_heads
from ..training.tasks import load_task
from .context import DemoContext, register_demo_step
from .report import DemoResults, NegationResult, ResultRow

logger = logging.getLogger(__name__)


def step_prepare(ctx: DemoContext) -> None:
    c = ctx.config
    source = Path(c.base_model) if c.base_model else minilm_path()
    ctx.base_model_id = str(c.base_model) if c.base_model else "sentence-transformers/all-MiniLM-L6-v2"
    ctx.tokenizer = load_tokenizer(source)
    encoder = load_encoder(source)
    ctx.base_dir = ctx.output_dir / "checkpoints" / "base"
    _save_encoder(encoder, ctx.tokenizer, ctx.base_dir)  # without the unused pooler: one key set for all
    ctx.base_encoder = load_encoder(ctx.base_dir)
    if not ctx.tasks:
        ctx.tasks = [load_task(name, train_size=c.train_size, val_size=c.val_size, test_size=c.test_size,
                               seed=c.seed) for name in c.tasks]
    ctx.results = DemoResults(tasks=[t.name for t in ctx.tasks], config=c.to_dict(),
                              base_model=ctx.base_model_id, output_dir=str(ctx.output_dir),
                              data=[t.summary() for t in ctx.tasks])


def step_heads(ctx: DemoContext) -> None:
    c = ctx.config
    g = torch.Generator().manual_seed(c.seed)
    for t in ctx.tasks:
        ctx.heads[t.name] = make_head(c.head, ctx.base_encoder, ctx.tokenizer, t.train.texts, t.train.labels,
                                      t.num_labels, generator=g, max_length=c.max_length,
                                      batch_size=c.eval_batch_size, probe_l2=c.probe_l2, progress=c.progress,
                                      desc=f"probe {t.name}")
    save_heads(ctx.heads, {t.name: t.label_names for t in ctx.tasks}, ctx.output_dir / "heads")


def step_pretrained(ctx: DemoContext) -> None:
    ctx.val_pretrained = ctx.evaluate(ctx.base_encoder, "val", desc="pre-trained")
    test = ctx.evaluate(ctx.base_encoder, "test", desc="pre-trained")
    ctx.results.rows.append(ResultRow("pre-trained (zero-shot)", "pretrained", test,
                                      {"path": str(ctx.base_dir), "val": ctx.val_pretrained}))


def step_finetune(ctx: DemoContext) -> None:
    """Fine-tune on each task with :class:`~hf_taskarith.training.LinearizedTrainer` (``mode`` =
    the demo's mode) through the task's frozen head, on the task's ``datasets.Dataset``."""
    c = ctx.config
    own: dict[str, float] = {}
    for i, t in enumerate(ctx.tasks):
        encoder = copy.deepcopy(ctx.base_encoder)
        fit = train_encoder(encoder, ctx.heads[t.name], ctx.tokenizer, t.dataset("train"), mode=c.mode,
                            steps=c.steps, batch_size=c.batch_size, learning_rate=c.learning_rate,
                            weight_decay=c.weight_decay, warmup_ratio=c.warmup_ratio, max_length=c.max_length,
                            seed=c.seed + 1 + i, progress=c.progress, desc=f"fine-tune {t.name} ({c.mode})",
                            base_model=ctx.base_model_id)
        details = {"task": t.name, "mode": c.mode, "steps": c.steps, "batch_size": c.batch_size,
                   "learning_rate": c.learning_rate, "seed": c.seed + 1 + i}
        row = {"train_seconds": round(fit.seconds, 2), "first_loss": fit.first_loss, "last_loss": fit.last_loss}
        tv = fit.task_vector  # over the encoder's names; in linear mode f_lin(x; theta0 + tau) is all there is
        tv.metadata.finetuned_model = f"{ctx.base_model_id}+{t.name}"
        if not ctx.linear:
            folder = ctx.output_dir / "checkpoints" / "finetuned" / t.name
            _save_encoder(encoder, ctx.tokenizer, folder)
            ctx.finetuned_dirs[t.name] = row["path"] = folder
        tv.metadata.extra.update(details)
        ctx.task_vector_dirs[t.name] = tv.save_pretrained(ctx.output_dir / "task_vectors" / t.name, overwrite=True)
        ctx.task_vectors[t.name] = TaskVector.from_pretrained(ctx.task_vector_dirs[t.name])
        acc = ctx.evaluate(fit.model, "test", desc=f"fine-tuned {t.name}")
        own[t.name] = acc[t.name]
        ctx.results.rows.append(ResultRow(f"fine-tuned on {t.name}", "finetuned", acc, row))
        del encoder, fit, tv
    ctx.results.rows.append(ResultRow("fine-tuned (each task's own model)", "individual", own))


def step_hub(ctx: DemoContext) -> None:
    """Push every task vector to an embedded Hub (tag ``v1``), pull it back by tag, check it."""
    c = ctx.config
    if not c.hub:
        return
    from ..hub.pull import list_task_vector_versions, pull_task_vector
    from ..hub.push import push_task_vector
    from ..hub.server import embedded_hub

    root, cache = ctx.output_dir / "hub", ctx.output_dir / "hub_cache"
    record: dict[str, Any] = {"root": str(root), "repos": {}}
    with embedded_hub(root) as url:
        record["endpoint"] = url
        bar = tqdm(ctx.tasks, desc="hub: push, tag v1, pull v1", unit="vector", disable=progress_disabled(c.progress))
        for t in bar:
            repo = f"demo/minilm-{t.name}-{c.mode}"
            local = ctx.task_vectors[t.name]
            pushed = push_task_vector(local, repo, tag="v1", endpoint=url,
                                      commit_message=f"{t.name} task vector ({c.mode} fine-tuning, {c.steps} steps)")
            versions = list_task_vector_versions(repo, endpoint=url)
            pulled = pull_task_vector(repo, revision="v1", endpoint=url, cache_dir=cache)
            different = [k for k in local.keys() if not torch.equal(local[k], pulled[k])]
            if different or set(local.keys()) != set(pulled.keys()):
                raise TaskArithError(f"{repo}@v1 pulled back different tensors than were pushed: {different[:5]}.")
            ctx.task_vectors[t.name] = pulled
            record["repos"][t.name] = {"repo_id": repo, "tag": "v1",
                                       "commit_sha": pulled.metadata.extra["hub"]["commit_sha"],
                                       "pushed_commit": pushed.commit_sha,
                                       "versions": [{"name": v.name, "kind": v.kind, "commit": v.commit_sha,
                                                     "date": str(v.date) if v.date else None} for v in versions]}
    ctx.hub = record
    ctx.results.hub = record
def step_task_vectors(ctx: DemoContext) -> None:
    tvs = {name: tv.materialize() for name, tv in ctx.task_vectors.items()}
    ctx.results.task_vectors = {
        "paths": {k: str(v) for k, v in ctx.task_vector_dirs.items()},
        "norms": {k: tv.norm() for k, tv in tvs.items()},
        "cosine": {a: {b: tvs[a].cosine_similarity(tvs[b]) for b in tvs} for a in tvs},
    }


def step_merge(ctx: DemoContext) -> None:
    c = ctx.config
    names = [t.name for t in ctx.tasks]
    models = [ctx.task_vectors[n] for n in names]  # pulled from the Hub by tag when c.hub
    search_root = ctx.output_dir / "merged" / "_search"
    for method_name in c.merge_methods:
        method = get_merge_method(method_name)
        params: dict[str, Any] = {}
        if "density" in method.param_index:
            params["density"] = c.density
        averaging = "normalize" in method.param_index and bool(method.param_index["normalize"].default)
        grid = c.ties_scaling_grid if averaging else c.scaling_grid
        search: list[dict[str, Any]] = []
        best: tuple[float, float, Path] | None = None
        bar = tqdm(grid, desc=f"{method_name}: choose lambda", unit="merge", disable=progress_disabled(c.progress))
        for lam in bar:
            folder = search_root / f"{method_name}-lambda{lam:g}"
            merge(str(ctx.base_dir), models, method=method_name, weights=[1.0] * len(models), lambda_=lam,
                  output_dir=folder, overwrite=True, seed=c.seed, progress=False, **params)
            val = ctx.evaluate_folder(folder, "val", desc=f"{method_name} lambda={lam:g}")
            bar.set_postfix(lam=lam, val_avg=f"{mean(val.values()):.3f}")
            search.append({"lambda": lam, "val_avg": mean(val.values()), **{f"val_{k}": v for k, v in val.items()}})
            logger.info("%s lambda=%g: val avg %.4f", method_name, lam, mean(val.values()))
            if best is None or mean(val.values()) > best[0]:
                if best is not None:
                    shutil.rmtree(best[2], ignore_errors=True)  # keep one candidate on disk at a time
                best = (mean(val.values()), lam, folder)
            else:
                shutil.rmtree(folder, ignore_errors=True)
        _, lam, folder = best
        final = ctx.output_dir / "merged" / method_name
        if final.exists():
            shutil.rmtree(final)
        folder.rename(final)
        test = ctx.evaluate_folder(final, "test", desc=f"{method_name} lambda={lam:g}")
        label = f"{method_name} (lambda={lam:g}" + (f", density={c.density:g})" if params else ")")
        ctx.results.rows.append(ResultRow(label, "merged", test, {
            "method": method_name, "lambda": lam, "params": params, "path": str(final), "val_search": search}))
    shutil.rmtree(search_root, ignore_errors=True)


def step_negation(ctx: DemoContext) -> None:
    """Subtract the target's vector at each scale of ``negation_grid``, choose one on validation
    by the library's rule (:func:`~hf_taskarith.evaluation.choose_negation`), evaluate it on
    test. When no scale keeps the controls within budget nothing is negated (coefficient 0,
    the pre-trained model) and ``budget_met`` is False."""
    c = ctx.config
    target = c.negated_task
    if target is None:
        return
    from ..evaluation import choose_negation

    controls = [t.name for t in ctx.tasks if t.name != target]
    chance = 1.0 / next(t.num_labels for t in ctx.tasks if t.name == target)
    tv = ctx.task_vectors[target]
    floor = c.control_threshold * mean(ctx.val_pretrained[k] for k in controls)
    search_root = ctx.output_dir / "merged" / "_negation_search"
    search, folders = [], {}
    bar = tqdm(sorted(c.negation_grid), desc=f"negate {target}: choose lambda", unit="edit",
               disable=progress_disabled(c.progress))
    for lam in bar:
        if lam == 0:
            continue  # the pre-trained model, already measured
        folder = search_root / f"lambda{lam:g}"
        tv.apply_to(str(ctx.base_dir), -lam, output_dir=folder, overwrite=True, progress=False)
        val = ctx.evaluate_folder(folder, "val", desc=f"negate {target} lambda={lam:g}")
        search.append({"lambda": lam, "val_target": val[target], "val_control": mean(val[k] for k in controls)})
        folders[lam] = folder
    lam, met = choose_negation([(s["lambda"], s["val_target"], s["val_control"]) for s in search], floor=floor,
                               pretrained_target=ctx.val_pretrained[target], objective=c.negation_objective,
                               chance=chance)
    pre = ctx.results.rows_of("pretrained")[0].accuracies
    own = ctx.results.rows_of("individual")[0].accuracies
    final: Path | None = None
    if lam > 0:
        final = ctx.output_dir / "merged" / f"negate_{target}"
        if final.exists():
            shutil.rmtree(final)
        folders[lam].rename(final)
        test = ctx.evaluate_folder(final, "test", desc=f"negate {target} lambda={lam:g}")
    else:  # nothing negated: the pre-trained model is the answer (never a silent fallback to some scale)
        test = dict(pre)
    shutil.rmtree(search_root, ignore_errors=True)
    ctx.results.rows.append(ResultRow(f"negate {target} (lambda={lam:g})", "negation", test,
                                      {"task": target, "lambda": lam, "path": str(final) if final else None,
                                       "budget_met": met}))
    ctx.results.negation = NegationResult(
        task=target, scaling=lam, target_pretrained=pre[target], target_finetuned=own[target],
        target_negated=test[target], control_pretrained=mean(pre[k] for k in controls),
        control_negated=mean(test[k] for k in controls), path=str(final) if final else None, val_search=search,
        budget_met=met, chance=chance, objective=c.negation_objective)


def step_disentanglement(ctx: DemoContext) -> None:
    """xi over ``config.xi_alphas`` for the first two tasks, on their validation inputs.

    In linear mode the encoder's features are exactly linear in the task-vector
    coefficients (``f_lin(x; theta0 + a1 tau1 + a2 tau2) = f0 + a1 (f1 - f0) + a2 (f2 - f0)``,
    and mean pooling is linear), so three tangent-space passes per task give every grid
    point; in non-linear mode each grid point is a forward pass of the edited encoder.
    """
    c = ctx.config
    if not c.xi_alphas:
        return
    from ..evaluation import ModelEditor, disentanglement_error
    from ..training.encoders import encode

    t1, t2 = (t.name for t in ctx.tasks[:2])
    by_name = {t.name: t for t in ctx.tasks}

    def features(model: nn.Module, task: str) -> torch.Tensor:
        return encode(model, ctx.tokenizer, by_name[task].val.texts, batch_size=c.eval_batch_size,
                      max_length=c.max_length)

    if ctx.linear:
        lin = ctx.tangent_model()
        feats = {}
        for task in (t1, t2):
            f0 = features(lin.load_task_vector(ctx.task_vectors[t1], scaling=0.0), task)
            feats[task] = (f0, features(ctx.edited_encoder(ctx.task_vectors[t1]), task) - f0,
                           features(ctx.edited_encoder(ctx.task_vectors[t2]), task) - f0)
        editor = _CoefficientEditor()

        def predict(coefs: dict[str, float], task: str) -> torch.Tensor:
            f0, d1, d2 = feats[task]
            return ctx.heads[task](f0 + coefs.get(t1, 0.0) * d1 + coefs.get(t2, 0.0) * d2).argmax(-1)
    else:
        tvs = {t: ctx.task_vectors[t].materialize() for t in (t1, t2)}
        editor = ModelEditor(copy.deepcopy(ctx.base_encoder), tvs)

        def predict(model: nn.Module, task: str) -> torch.Tensor:
            return ctx.heads[task](features(model, task)).argmax(-1)

    grid = disentanglement_error(editor, predict, (t1, t2), alphas=c.xi_alphas,
                                 progress=not progress_disabled(c.progress))
    ctx.xi_grid = grid
    ctx.results.disentanglement = {"tasks": [t1, t2], "alphas": list(grid.alphas), "xi": grid.xi.tolist(),
                                   "split": "val", "mode": c.mode}


class _CoefficientEditor:
    """Hands the coefficients themselves to ``predict`` (features are linear in them)."""

    def edited(self, coefficients: dict[str, float]):
        return contextlib.nullcontext(dict(coefficients))


def step_plots(ctx: DemoContext) -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        logger.warning("plots skipped: matplotlib is not installed (pip install 'hf_taskarith[plots]').")
        return
    from ..evaluation.plots import plot_cosine_matrix, plot_disentanglement
    from .plots import plot_accuracies

    folder = ctx.output_dir / "plots"
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"accuracy": plot_accuracies(ctx.results, folder / "accuracy.png"),
             "cosine": plot_cosine_matrix({k: v.materialize() for k, v in ctx.task_vectors.items()},
                                          folder / "cosine.png", title=f"task vector cosine ({ctx.config.mode})")}
    grid = ctx.xi_grid
    if grid is not None:
        paths["disentanglement"] = plot_disentanglement(
            grid, folder / f"xi_{grid.tasks[0]}_{grid.tasks[1]}.png",
            title=f"xi ({ctx.config.mode}): {grid.tasks[0]} + {grid.tasks[1]}")
    ctx.results.plots = {k: str(v) for k, v in paths.items()}


def step_report(ctx: DemoContext) -> None:
    if not ctx.config.keep_checkpoints:
        for sub in ("checkpoints/finetuned", "merged"):
            shutil.rmtree(ctx.output_dir / sub, ignore_errors=True)
    ctx.results.save(ctx.output_dir)


register_demo_step("prepare", step_prepare, description="load the pre-trained encoder and the tasks")
register_demo_step("heads", step_heads, description="fit a frozen head per task")
register_demo_step("pretrained", step_pretrained, description="evaluate the pre-trained encoder")
register_demo_step("finetune", step_finetune, description="fine-tune on each task, extract task vectors")
register_demo_step("hub", step_hub,
                   description="push the task vectors to an embedded Hub (tag v1), pull them back by tag")
register_demo_step("task_vectors", step_task_vectors, description="task-vector norms and cosine similarities")
register_demo_step("merge", step_merge, description="merge the task vectors (coefficient chosen on validation)")
register_demo_step("negation", step_negation, description="negate one task vector")
register_demo_step("disentanglement", step_disentanglement,
                   description="weight disentanglement error of the first two tasks (validation)")
register_demo_step("plots", step_plots, description="heat maps (cosine similarity, disentanglement) and accuracy bars")
register_demo_step("report", step_report, description="write results.json and results.md")


def _save_encoder(encoder: nn.Module, tokenizer: Any, folder: Path) -> Path:
    bad = [n for n, p in encoder.state_dict().items() if p.is_floating_point() and not torch.isfinite(p).all()]
    if bad:
        raise TaskArithError(f"refusing to save {folder}: NaN/inf in {bad[:5]}.")
    with atomic_output_dir(folder, overwrite=True) as tmp, quiet_transformers():
        encoder.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return folder
