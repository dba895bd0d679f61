"""The demo's built-in steps, registered in order on import.

Steps (``DEMO_STEPS``, in order):

1. ``prepare``: load the pre-trained encoder and tokenizer, save them as the base
   checkpoint folder, load the tasks' splits.
2. ``heads``: make one frozen head per task from the pre-trained encoder.
3. ``pretrained``: score the pre-trained encoder on every task (zero-shot through the heads).
4. ``finetune``: fine-tune a copy of the encoder on each task, save the checkpoint, extract
   and save its task vector (:meth:`TaskVector.from_models`), score it on every task.
5. ``task_vectors``: reload the saved task vectors; norms and pairwise cosine similarities.
6. ``merge``: for each merge method, choose the coefficient on validation among the grid,
   each candidate a checkpoint written by the streaming :func:`hf_taskarith.merge`
   (base folder + task-vector folders in, merged folder out); score the chosen one on test.
7. ``negation``: subtract one task vector (:meth:`TaskVector.apply_to` on the base folder),
   with the largest coefficient that keeps the other tasks near their pre-trained accuracy.
8. ``report``: write ``results.json`` and ``results.md``.

Later features add steps with :func:`register_demo_step`.
"""

from __future__ import annotations

import copy
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import TaskArithError
from ..io.writer import atomic_output_dir
from ..merging.api import merge
from ..merging.registry import get_merge_method
from ..task_vector import TaskVector
from .assets import minilm_path
from .context import DemoContext, register_demo_step
from .data import load_task
from .evaluate import mean
from .models import load_encoder, load_tokenizer, make_head, progress_disabled, quiet_transformers, save_heads
from .report import DemoResults, NegationResult, ResultRow
from .train import finetune_encoder

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
    c = ctx.config
    own: dict[str, float] = {}
    for i, t in enumerate(ctx.tasks):
        encoder = copy.deepcopy(ctx.base_encoder)
        fit = finetune_encoder(encoder, ctx.heads[t.name], ctx.tokenizer, t.train, steps=c.steps,
                               batch_size=c.batch_size, learning_rate=c.learning_rate,
                               weight_decay=c.weight_decay, warmup_ratio=c.warmup_ratio,
                               max_length=c.max_length, seed=c.seed + 1 + i, progress=c.progress,
                               desc=f"fine-tune {t.name}")
        folder = ctx.output_dir / "checkpoints" / "finetuned" / t.name
        _save_encoder(encoder, ctx.tokenizer, folder)
        ctx.finetuned_dirs[t.name] = folder
        tv = TaskVector.from_models(ctx.base_encoder, encoder, base_model=ctx.base_model_id,
                                    finetuned_model=f"{ctx.base_model_id}+{t.name}")
        tv.metadata.extra.update({"task": t.name, "steps": c.steps, "batch_size": c.batch_size,
                                  "learning_rate": c.learning_rate, "seed": c.seed + 1 + i})
        ctx.task_vector_dirs[t.name] = tv.save_pretrained(ctx.output_dir / "task_vectors" / t.name, overwrite=True)
        acc = ctx.evaluate(encoder, "test", desc=f"fine-tuned {t.name}")
        own[t.name] = acc[t.name]
        ctx.results.rows.append(ResultRow(f"fine-tuned on {t.name}", "finetuned", acc, {
            "path": str(folder), "train_seconds": round(fit.seconds, 2), "first_loss": fit.first_loss,
            "last_loss": fit.last_loss}))
        del encoder, tv
    ctx.results.rows.append(ResultRow("fine-tuned (each task's own model)", "individual", own))


def step_task_vectors(ctx: DemoContext) -> None:
    tvs = {name: TaskVector.from_pretrained(d).materialize() for name, d in ctx.task_vector_dirs.items()}
    ctx.results.task_vectors = {
        "paths": {k: str(v) for k, v in ctx.task_vector_dirs.items()},
        "norms": {k: tv.norm() for k, tv in tvs.items()},
        "cosine": {a: {b: tvs[a].cosine_similarity(tvs[b]) for b in tvs} for a in tvs},
    }


def step_merge(ctx: DemoContext) -> None:
    c = ctx.config
    names = [t.name for t in ctx.tasks]
    models = [str(ctx.task_vector_dirs[n]) for n in names]
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
    c = ctx.config
    target = c.negated_task
    if target is None:
        return
    controls = [t.name for t in ctx.tasks if t.name != target]
    tv = TaskVector.from_pretrained(ctx.task_vector_dirs[target])
    floor = c.control_threshold * mean(ctx.val_pretrained[k] for k in controls)
    search_root = ctx.output_dir / "merged" / "_negation_search"
    search, chosen = [], None
    bar = tqdm(sorted(c.negation_grid), desc=f"negate {target}: choose lambda", unit="edit",
               disable=progress_disabled(c.progress))
    for lam in bar:
        folder = search_root / f"lambda{lam:g}"
        tv.apply_to(str(ctx.base_dir), -lam, output_dir=folder, overwrite=True, progress=False)
        val = ctx.evaluate_folder(folder, "val", desc=f"negate {target} lambda={lam:g}")
        control = mean(val[k] for k in controls)
        search.append({"lambda": lam, "val_target": val[target], "val_control": control})
        if control >= floor or chosen is None:  # the largest lambda that keeps the controls (else the smallest)
            if chosen is not None:
                shutil.rmtree(chosen[1], ignore_errors=True)
            chosen = (lam, folder)
        else:
            shutil.rmtree(folder, ignore_errors=True)
    lam, folder = chosen
    final = ctx.output_dir / "merged" / f"negate_{target}"
    if final.exists():
        shutil.rmtree(final)
    folder.rename(final)
    shutil.rmtree(search_root, ignore_errors=True)
    test = ctx.evaluate_folder(final, "test", desc=f"negate {target} lambda={lam:g}")
    pre = ctx.results.rows_of("pretrained")[0].accuracies
    own = ctx.results.rows_of("individual")[0].accuracies
    ctx.results.rows.append(ResultRow(f"negate {target} (lambda={lam:g})", "negation", test,
                                      {"task": target, "lambda": lam, "path": str(final)}))
    ctx.results.negation = NegationResult(
        task=target, scaling=lam, target_pretrained=pre[target], target_finetuned=own[target],
        target_negated=test[target], control_pretrained=mean(pre[k] for k in controls),
        control_negated=mean(test[k] for k in controls), path=str(final), val_search=search)


def step_report(ctx: DemoContext) -> None:
    if not ctx.config.keep_checkpoints:
        for sub in ("checkpoints/finetuned", "merged"):
            shutil.rmtree(ctx.output_dir / sub, ignore_errors=True)
    ctx.results.save(ctx.output_dir)


register_demo_step("prepare", step_prepare, description="load the pre-trained encoder and the tasks")
register_demo_step("heads", step_heads, description="fit a frozen head per task")
register_demo_step("pretrained", step_pretrained, description="evaluate the pre-trained encoder")
register_demo_step("finetune", step_finetune, description="fine-tune on each task, extract task vectors")
register_demo_step("task_vectors", step_task_vectors, description="task-vector norms and cosine similarities")
register_demo_step("merge", step_merge, description="merge the task vectors (coefficient chosen on validation)")
register_demo_step("negation", step_negation, description="negate one task vector")
register_demo_step("report", step_report, description="write results.json and results.md")


def _save_encoder(encoder: nn.Module, tokenizer: Any, folder: Path) -> Path:
    bad = [n for n, p in encoder.state_dict().items() if p.is_floating_point() and not torch.isfinite(p).all()]
    if bad:
        raise TaskArithError(f"refusing to save {folder}: NaN/inf in {bad[:5]}.")
    with atomic_output_dir(folder, overwrite=True) as tmp, quiet_transformers():
        encoder.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return folder
