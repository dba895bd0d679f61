"""Layer slices: mergekit's ``slices:`` configs (frankenmerges, layer-range merges).

A sliced config stacks ranges of layers, in order, into a new model::

    merge_method: passthrough
    slices:
      - sources: [{model: A, layer_range: [0, 24]}]
      - sources: [{model: B, layer_range: [8, 32]}]

The output has 24 + 24 layers: A's layers 0-23 become 0-23, B's layers 8-31 become 24-47. A
slice with several sources (all spanning as many layers) merges them layer by layer with the
merge method: layer ``start_j + i`` of every source ``j`` gives output layer ``offset + i``. The
tensors outside the layers come, as in mergekit, from the first slice's sources (input
embeddings) and from the last slice's (final norm, LM head), merged with the method when a
slice has several. ``config.json`` (from ``base_model``, else the first slice's first model)
gets the new layer count, and its per-layer ``layer_types`` follow the layers they came from.

Parameters, in mergekit's order of precedence: a source's own ``parameters``, then its slice's,
then the top-level ones. Gradients (:mod:`.schedule`) run over the layers of each slice:
layer ``i`` of an ``n``-layer slice sits at ``t = i / (n - 1)`` (``1`` when ``n == 1``), and
tensors outside the layers at ``t = 0``.

Each slice (and the two groups of non-layer tensors) is one ordinary streaming merge
(:func:`~.engine.plan_merge` / :func:`~.engine.run_merge`) over :class:`~.layer_stack.RenamedSource`
views that show a source's layers ``start .. end - 1`` as layers ``0 .. n - 1``; every result goes
to its output name in one :class:`~hf_taskarith.io.writer.ShardedWriter`, inside one atomic
output folder, with one report and model card.

Note:
    Cost: the same as merging the output model's tensors from whole models: each output tensor
    reads its sources' matching tensors once, streamed; nothing is held beyond one tensor (or
    block) per input. Every layer range is checked against each model before anything is
    written.

Example:
    >>> cfg = MergeConfig.from_yaml("frankenmerge.yml")   # doctest: +SKIP
    >>> merge_slices(cfg, "out/")                          # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import MergeConfigError
from ..io.atomic import check_output_not_input
from ..io.writer import ShardedWriter, TensorSpec, atomic_output_dir
from .engine import MergePlan, plan_merge, run_merge
from .layer_stack import LayerStack, RenamedSource, layer_stack
from .output import write_side_files
from .registry import MergeMethod, get_merge_method
from .report import MergeReport, MergeSummary
from .slice_config import OutputSlice, parse_slices
from .sources import ModelDelta, TensorSource, open_tensor_source

logger = logging.getLogger(__name__)

#: the keyword arguments of :func:`merge_slices` besides the config's own
OVERRIDES = ("dtype", "seed", "max_shard_size", "allow_mismatch", "overwrite", "progress")
#: config.json keys holding the number of layers, the first present wins
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
#: config.json keys holding one entry per layer
PER_LAYER_KEYS = ("layer_types",)


@dataclass
class _Segment:
    """One streaming merge of the plan: a slice's layers, or the tensors before / after them."""

    where: str
    plan: MergePlan
    out_names: dict[str, str]   # name in the views -> name in the output


def merge_slices(config: Any, output_dir: str | os.PathLike, **overrides: Any) -> Path:
    """Run a sliced merge (``config.slices``) into ``output_dir``.

    Args:
        config: a :class:`~.config.MergeConfig` whose ``slices`` is set (model references
            resolved); its ``merge_method``, ``base_model``, ``parameters``, ``dtype``,
            ``tokenizer_source``, ``seed`` and ``max_shard_size`` apply.
        output_dir: where the merged checkpoint goes (written atomically).
        **overrides: ``dtype``, ``seed``, ``max_shard_size``, ``allow_mismatch``, ``overwrite``,
            ``progress`` (as for :func:`hf_taskarith.merge`); ``None`` values are ignored.

    Returns:
        The output folder.

    Raises:
        MergeConfigError: a malformed slice; a layer range outside a model's layers; models of
            different architectures; a slice with a number of sources its method cannot take, or
            without the base model a method needs; an unknown override; a task vector as a source.
        KeyMismatchError / ShapeMismatchError: layers that do not match across a slice's sources.
        and everything :func:`hf_taskarith.merge` raises.

    Note:
        Randomized methods draw from ``seed`` per output tensor: the first slice with the seed
        itself (so a single full-range slice merges as ``models:`` does), later slices from seeds
        derived from it and their first output layer, so repeated layers get fresh draws.
    """
    from .api import parse_dtype

    unknown = sorted(set(overrides) - set(OVERRIDES))
    if unknown:
        raise MergeConfigError(f"merge_slices: unknown option(s) {unknown}; valid: {list(OVERRIDES)}.")
    opts = {k: v for k, v in overrides.items() if v is not None}
    slices = parse_slices(config.slices)
    method = get_merge_method(config.merge_method)
    refs = _referenced(config, slices)
    check_output_not_input(output_dir, refs)
    sources = {ref: _open(ref) for ref in refs}
    stacks = _check_stacks(sources, slices)
    reference = config.base_model or slices[0].sources[0].model
    tok_ref = _tokenizer_model(config.tokenizer_source, reference, refs)
    out_dtype = parse_dtype(opts.get("dtype", config.dtype))
    seed = opts.get("seed", config.seed)
    if "seed" in opts:
        from .config import parse_seed

        seed = parse_seed(seed)
    common = {"out_dtype": out_dtype, "allow_mismatch": opts.get("allow_mismatch", False)}
    tok_view = _identity(sources[tok_ref], stacks[tok_ref].before + stacks[tok_ref].after)

    segments = [_outside(config, method, slices[0], sources, stacks, "before", tok_view, seed, common)]
    offset = 0
    for index, out_slice in enumerate(slices):
        segments.append(_layers(config, method, index, out_slice, offset, sources, stacks, seed, common))
        offset += out_slice.num_layers
    segments.append(_outside(config, method, slices[-1], sources, stacks, "after", tok_view, seed, common))
    specs = [TensorSpec(seg.out_names[s.name], s.shape, s.dtype) for seg in segments for s in seg.plan.specs()]

    progress = opts.get("progress", True)
    with atomic_output_dir(output_dir, overwrite=opts.get("overwrite", False)) as tmp:
        report = MergeReport()
        with ShardedWriter(tmp, specs, prefix="model", max_shard_size=opts.get("max_shard_size", config.max_shard_size),
                           metadata={"format": "pt"}) as writer:
            for seg in segments:
                names = seg.out_names
                part = run_merge(seg.plan, lambda n, t, names=names: writer.write(names[n], t), progress=progress,
                                 open_output=lambda n, names=names: writer.open_range(names[n]))
                _add(report, part)
        summary = _summary(method, segments, sources, reference, tok_ref, seed, out_dtype)
        write_side_files(tmp, summary, report, config_yaml=getattr(config, "source_text", None))
        _rewrite_layer_config(tmp / "config.json", slices, sources)
    logger.info("merge (slices): %d output layers; %s", offset, report.describe())
    return Path(output_dir)


def _referenced(config: Any, slices: list[OutputSlice]) -> list[str]:
    """Every model the config names, once each, the base model first."""
    refs = [config.base_model] if config.base_model else []
    for s in slices:
        refs += [src.model for src in s.sources] + ([s.base_model] if s.base_model else [])
    return list(dict.fromkeys(refs))


def _open(ref: str) -> TensorSource:
    from ..task_vector import TaskVector

    if Path(ref).is_dir() and TaskVector.is_task_vector_folder(Path(ref)):
        raise MergeConfigError(f"slices: {ref} is a saved task vector; slices take whole models (apply it to its "
                               "base first with hf-taskarith apply).")
    return open_tensor_source(ref, label=ref)


def _check_stacks(sources: dict[str, TensorSource], slices: list[OutputSlice]) -> dict[str, LayerStack]:
    """Every model's layer stack; ranges inside it; one architecture (model type, layer prefix)."""
    stacks = {ref: layer_stack(src.names(), label=ref) for ref, src in sources.items()}
    kinds = {ref: (_model_config(src).get("model_type"), stacks[ref].prefix) for ref, src in sources.items()}
    if len(set(kinds.values())) > 1:
        listed = ", ".join(f"{ref} (model_type {k[0]!r}, layers {k[1]}N)" for ref, k in kinds.items())
        raise MergeConfigError(f"slices: the models are of different architectures ({listed}); slices stack or "
                               "merge layers of one architecture.")
    for i, out_slice in enumerate(slices):
        for j, src in enumerate(out_slice.sources):
            n = stacks[src.model].num_layers
            if src.end > n:
                raise MergeConfigError(
                    f"slices[{i}].sources[{j}]: layer_range [{src.start}, {src.end}) is outside {src.model}, which "
                    f"has {n} layers (0..{n - 1}); the end is excluded, so at most [{min(src.start, n - 1)}, {n}).")
    return stacks


def _model_config(src: TensorSource) -> dict[str, Any]:
    path = src.folder / "config.json" if src.folder is not None else None
    if path is None or not path.is_file():
        return {}
    return json.loads(path.read_text())


def _tokenizer_model(tok: Any, reference: str, refs: list[str]) -> str:
    if tok in (None, "base"):
        return reference
    if tok == "union":
        raise MergeConfigError("tokenizer_source: union (mergekit's token re-mapping) is not supported with "
                               "slices; use 'base' or one of the models.")
    if tok not in refs:
        raise MergeConfigError(f"tokenizer_source {tok!r} is neither 'base' nor one of the config's models {refs}.")
    return tok


def _identity(src: TensorSource, names: list[str]) -> RenamedSource:
    return RenamedSource(src, {n: n for n in names})


def _roles(config: Any, method: MergeMethod, out_slice: OutputSlice, where: str) -> tuple[int, list[int], bool]:
    """Which source of a slice is the base (reference), which are the merged inputs, and
    whether a base model was given (mergekit's rules: the base must be among the sources)."""
    models = [s.model for s in out_slice.sources]
    base = out_slice.base_model or config.base_model
    if base is not None and base in models:
        at = models.index(base)
        inputs = [j for j in range(len(models)) if j != at] if method.needs_base else list(range(len(models)))
        return at, inputs, True
    if method.needs_base:
        wanted = f"its base model {base}" if base else "a base_model"
        raise MergeConfigError(f"{where}: merge method {method.name!r} needs {wanted} among the slice's sources "
                               f"{models} (give base_model and list it in every slice, with the layer_range to use).")
    return 0, list(range(len(models))), False


def _resolve(config: Any, method: MergeMethod, out_slice: OutputSlice, inputs: list[int], where: str) -> dict:
    """The method's parameters for a slice: source, then slice, then top-level values."""
    srcs = [out_slice.sources[j] for j in inputs]
    seg = _replace(config, models=[s.model for s in srcs], model_parameters=[dict(s.parameters) for s in srcs],
                   parameters={**(config.parameters or {}), **out_slice.parameters})
    try:
        return method.resolve_params(len(srcs), seg.merge_kwargs())
    except MergeConfigError as e:
        raise MergeConfigError(f"{where}: {e}") from None


def _replace(config: Any, **changes: Any) -> Any:
    if dataclasses.is_dataclass(config):
        return dataclasses.replace(config, **changes)
    return config.model_copy(update=changes)  # a pydantic model


def _outside(config, method, out_slice, sources, stacks, side, tok_view, seed, common) -> _Segment:
    """The tensors before the layers (from the first slice's sources) or after them (the last's)."""
    where = f"tensors {side} the layers (from slices[{'0' if side == 'before' else '-1'}])"
    at, inputs, given = _roles(config, method, out_slice, where)
    params = _resolve(config, method, out_slice, inputs, where)
    views = [_identity(sources[s.model], getattr(stacks[s.model], side)) for s in out_slice.sources]
    plan = plan_merge(views[at], [ModelDelta(views[j]) for j in inputs], method, params, vocab_source=tok_view,
                      seed=seed, base_given=given, **common)
    return _Segment(where, plan, {n: n for n in views[at].names()})


def _layers(config, method, index, out_slice, offset, sources, stacks, seed, common) -> _Segment:
    """Slice ``index``: each source's layers ``start + i`` seen as layers ``i``, written as ``offset + i``."""
    n = out_slice.num_layers
    where = f"slices[{index}] (output layers {offset}..{offset + n - 1})"
    at, inputs, given = _roles(config, method, out_slice, where)
    params = _resolve(config, method, out_slice, inputs, where)
    views = []
    for src in out_slice.sources:
        stack = stacks[src.model]
        names = {stack.name(i, rest): stack.name(src.start + i, rest)
                 for i in range(n) for rest in stack.layers[src.start + i]}
        views.append(RenamedSource(sources[src.model], names, label=f"{src.model} [{src.start}, {src.end})"))
    if offset:  # fresh random draws for repeated layers; the first slice keeps the seed itself
        digest = hashlib.sha256(f"{seed}:slice-offset:{offset}".encode()).digest()
        seed = int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
    plan = plan_merge(views[at], [ModelDelta(views[j]) for j in inputs], method, params, seed=seed,
                      base_given=given, **common)
    prefix = stacks[out_slice.sources[at].model].prefix
    out_names = {}
    for name in views[at].names():
        local, rest = name[len(prefix):].split(".", 1)
        out_names[name] = f"{prefix}{offset + int(local)}.{rest}"
    return _Segment(where, plan, out_names)


def _add(total: MergeReport, part: MergeReport) -> None:
    total.merged += part.merged
    for key in ("copied_non_float", "vocab", "skipped", "zero_for_missing", "fingerprint_mismatch"):
        getattr(total, key).extend(getattr(part, key))


def _summary(method, segments, sources, reference, tok_ref, seed, out_dtype) -> MergeSummary:
    """The card's and report's record: one readable line per slice (sources, base, parameters)."""
    described = {}
    for seg in segments[1:-1]:
        plan = seg.plan
        params = ", ".join(f"{k}={v}" for k, v in plan.summary(None).params.items())
        inputs = ", ".join(s.label for s in plan.inputs)
        described[seg.where] = f"base {plan.base.label}; inputs {inputs}" + (f"; {params}" if params else "")
    inputs = [ref for ref in sources if ref != reference]
    return MergeSummary(
        method=method.name, description=method.description, reference=method.reference, params=described,
        seed=seed, dtype=str(out_dtype).replace("torch.", "") if out_dtype else None, base_label=reference,
        input_labels=inputs, base_folder=sources[reference].folder,
        tokenizer_folder=sources[tok_ref].folder or sources[reference].folder)


def _rewrite_layer_config(path: Path, slices: list[OutputSlice], sources: dict[str, TensorSource]) -> None:
    """Set the layer count of the written config.json, and rebuild its per-layer lists from
    the config of the model each output layer came from (its slice's first source)."""
    if not path.is_file():
        return
    cfg = json.loads(path.read_text())
    origins = [(s.sources[0].model, s.sources[0].start + i) for s in slices for i in range(s.num_layers)]
    count_keys = [k for k in LAYER_COUNT_KEYS if isinstance(cfg.get(k), int)]
    if not count_keys:
        logger.warning("merge (slices): %s has none of %s; set the output's layer count (%d) by hand.", path.name,
                       list(LAYER_COUNT_KEYS), len(origins))
    for key in count_keys[:1]:
        cfg[key] = len(origins)
    configs = {ref: _model_config(src) for ref, src in sources.items()}
    for key in PER_LAYER_KEYS:
        if not isinstance(cfg.get(key), list):
            continue
        values = []
        for ref, layer in origins:
            theirs = configs[ref].get(key)
            if not isinstance(theirs, list) or layer >= len(theirs):
                raise MergeConfigError(f"slices: config.json of {ref} has no {key!r} entry for layer {layer}, so the "
                                       f"output's {key!r} cannot be rebuilt; fix that model's config.json.")
            values.append(theirs[layer])
        cfg[key] = values
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
