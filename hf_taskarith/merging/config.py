"""Merge configuration files (YAML), compatible with mergekit's format.

Accepted keys (mergekit's meaning)::

    merge_method: ties              # any registered method
    base_model: path/or/hub-id
    models:
      - model: path/or/hub-id/or/saved-task-vector
        parameters: {weight: 1.0, density: 0.5}
    parameters: {normalize: true, lambda: 1.0, int8_mask: true}   # shared
    dtype: bfloat16                 # output dtype (out_dtype also accepted)
    tokenizer_source: base          # or one of the models, or union
    chat_template: chatml           # auto, a built-in name, or a Jinja template
    name: my-merge                  # the title of the model card
    # instead of models: layer ranges to merge and stack (frankenmerges)
    # slices: [{sources: [{model: ..., layer_range: [0, 16]}]}]
    # hf_taskarith extensions:
    seed: 0
    max_shard_size: 5GB

The structure and types are checked by the schema (:mod:`.schema`: one line per mistake;
its JSON schema is ``docs/merge_config.schema.json``); parameter names and values by the
merge method (:class:`~.registry.ParamSpec`). ``tokenizer:`` blocks and ``modules`` are
refused with a clear error. A model listed under ``models`` that equals ``base_model`` is the
base (as in mergekit); for ``linear`` (which averages whole models) it is averaged with its weight.
"""

from __future__ import annotations

import copy
import operator
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import MergeArgumentTypeError, MergeConfigError

#: how a one-line string that is YAML text (not a file name) starts
YAML_STARTS = ("merge_method", "{", "#")


@dataclass
class MergeConfig:
    """A parsed, validated merge configuration.

    Attributes:
        merge_method: the registered method's name.
        base_model: the base (a resolved local path or a Hub id), or ``None``.
        models: the inputs (resolved paths or Hub ids), the base left out for task-vector
            methods; empty when ``slices`` is given.
        model_parameters: each model's ``parameters:``, verbatim (gradients are lists,
            filters ``{filter, value}`` dicts).
        parameters: the shared ``parameters:``, verbatim.
        dtype: the output dtype name (``out_dtype`` wins over ``dtype``), or ``None``.
        tokenizer_source: ``"base"``, ``"union"``, a model (resolved), or ``None``.
        seed, max_shard_size: hf_taskarith extensions.
        name: the merged model's name (the model card's title), or ``None``.
        chat_template: ``auto``, a built-in template name or a Jinja template, or ``None``.
        slices: the validated ``slices:`` (plain dicts, each source's ``model`` resolved), or ``None``.
        source_text: the YAML text the config came from (a dump of the mapping for dicts).
    """

    merge_method: str
    base_model: str | None
    models: list[str]
    model_parameters: list[dict[str, Any]]
    parameters: dict[str, Any] = field(default_factory=dict)
    dtype: str | None = None
    tokenizer_source: str | None = "base"
    seed: int = 0
    max_shard_size: str | int = "5GB"
    name: str | None = None
    chat_template: str | None = None
    slices: list[dict[str, Any]] | None = None
    source_text: str | None = None

    @classmethod
    def from_yaml(cls, path_or_text: str | os.PathLike, *, base_dir: str | os.PathLike | None = None) -> MergeConfig:
        """Parse a YAML file (or YAML text). Relative model paths resolve against the file's folder.

        An existing path is always read as a file, whatever its name (``merge_method_ties.yml``,
        ``{a}.yml``); only a string that is not an existing path may be YAML text. A one-line
        string that is not a file and does not start like YAML (``merge_method``, ``{``, ``#``)
        is a missing file.

        Raises:
            MergeConfigError: the file is missing, a folder or unreadable; the YAML is invalid.
        """
        text = str(path_or_text)
        one_line = "\n" not in text  # a candidate file name (os.path checks never raise)
        is_file = one_line and os.path.isfile(text)
        if is_file:  # an existing path is a file, whatever its name
            path = Path(text)
            try:
                text = path.read_text()
            except (OSError, UnicodeDecodeError) as e:
                raise MergeConfigError(f"cannot read merge config file {path}: {e}") from None
            base_dir = base_dir or path.parent
        elif one_line and os.path.isdir(text):
            raise MergeConfigError(f"merge config {path_or_text} is a folder; give the YAML file inside it.")
        elif isinstance(path_or_text, os.PathLike) or (one_line and not text.lstrip().startswith(YAML_STARTS)):
            raise MergeConfigError(f"merge config file not found: {path_or_text}")
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise MergeConfigError(f"merge config is not valid YAML: {e}") from None
        if one_line and not is_file and not isinstance(data, dict):
            raise MergeConfigError(f"merge config file not found: {path_or_text} (and it is not YAML config text)")
        cfg = cls.from_dict(data, base_dir=base_dir)
        cfg.source_text = text
        return cfg

    @classmethod
    def from_dict(cls, data: Any, *, base_dir: str | os.PathLike | None = None) -> MergeConfig:
        """Validate a parsed config (:mod:`.schema`) and resolve its model references.

        Relative model paths resolve against ``base_dir`` when they exist there; anything else
        (a Hub id, an absolute path) is kept as written.

        Raises:
            MergeConfigError: one line per mistake (where, what was received, what was
                expected); a config whose models are all the base model.
            UnknownMethodError: ``merge_method`` is not registered.
        """
        from .registry import get_merge_method
        from .schema import validate_config

        valid = validate_config(data)
        method = get_merge_method(valid.merge_method)
        resolve = _resolver(base_dir)
        base = resolve(valid.base_model) if valid.base_model is not None else None
        models, params = [], []
        for entry in valid.models or []:
            model = resolve(entry.model)
            if base is not None and model == base and method.needs_base:
                continue  # the base of a task-vector method is the reference, not an input (as in mergekit)
            models.append(model)
            params.append(copy.deepcopy(entry.parameters or {}))
        if valid.models is not None and not models:
            raise MergeConfigError("config lists no models besides the base model.")
        slices = None
        if valid.slices is not None:
            slices = [{"sources": [{"model": resolve(src.model), "layer_range": list(src.layer_range),
                                    "parameters": copy.deepcopy(src.parameters or {})} for src in piece.sources],
                       "parameters": copy.deepcopy(piece.parameters or {})} for piece in valid.slices]
        tok = valid.tokenizer_source
        if tok not in (None, "base", "union"):
            tok = resolve(tok)
        return cls(
            merge_method=valid.merge_method, base_model=base, models=models, model_parameters=params,
            parameters=copy.deepcopy(valid.parameters or {}), dtype=valid.out_dtype or valid.dtype,
            tokenizer_source=tok, seed=valid.seed, max_shard_size=valid.max_shard_size, name=valid.name,
            chat_template=valid.chat_template, slices=slices,
            source_text=_dump(data),
        )

    def merge_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :func:`hf_taskarith.merge` (per-model params become lists).

        YAML values that vary by tensor become :mod:`.schedule` objects, with mergekit's
        meaning: a list is a :class:`~.schedule.Gradient` over the layers (under a model or under
        ``parameters:``, never one value per model), ``{filter, value}`` mappings a
        :class:`~.schedule.Conditional`. A model's conditional that matches no tensor falls back
        to the shared ``parameters:`` value, then to the method's default.

        Raises:
            MergeConfigError: a parameter the method does not take, a shared one under a model,
                a malformed gradient or filter (:func:`~.schedule.parse_setting`).
        """
        from .registry import get_merge_method
        from .schedule import parse_setting, with_fallback

        method = get_merge_method(self.merge_method)
        kwargs: dict[str, Any] = {k: parse_setting(v, where=f"parameters.{k}") for k, v in self.parameters.items()}
        per_model = {k for p in self.model_parameters for k in p}
        for key in sorted(per_model):
            spec = method.param_index.get(key)
            if spec is None:
                raise MergeConfigError(
                    f"merge method {self.merge_method!r} does not take per-model parameter {key!r}; "
                    f"valid: {sorted(s.name for s in method.params if s.per_model)}."
                )
            if not spec.per_model:
                raise MergeConfigError(f"{key!r} is a shared parameter of {self.merge_method!r}: put it under "
                                       "top-level parameters:, not under a model.")
            shared = kwargs.pop(key, None)
            kwargs[key] = [
                with_fallback(parse_setting(p[key], where=f"parameters.{key} of model {model!r}"), shared)
                if key in p else (shared if shared is not None else spec.default)
                for model, p in zip(self.models, self.model_parameters)]
        return kwargs


def merge_from_config(config: str | os.PathLike | MergeConfig | dict, output_dir: str | os.PathLike, *,
                      fast_path: bool = True, **overrides: Any):
    """Run a merge described by a YAML file / text, a dict, or a :class:`MergeConfig`.

    Args:
        config: the merge description.
        output_dir: where the merged checkpoint goes (written atomically).
        fast_path: first try the torch-free path (:mod:`.lite`), which runs weighted-sum
            merges (``task_arithmetic``, ``linear``) of local safetensors checkpoints with numpy and
            writes the same bytes as the torch engine; anything it does not cover runs on
            the torch engine. ``False`` always uses the torch engine.
        **overrides: keyword arguments of :func:`hf_taskarith.merge` that replace the
            config's (``dtype``, ``seed``, ``max_shard_size``, ``allow_mismatch``,
            ``overwrite``, ``progress``); ``None`` values are ignored.

    Returns:
        The output folder.

    Raises:
        MergeArgumentTypeError: ``config`` is of another type (a ``MergeConfigError`` and a
            ``TypeError``).
        MergeConfigError: the config is invalid (see :meth:`MergeConfig.from_dict`); and
            everything :func:`hf_taskarith.merge` raises.
    """
    if isinstance(config, dict):
        config = MergeConfig.from_dict(config)
    elif isinstance(config, (str, os.PathLike)):
        config = MergeConfig.from_yaml(config)
    elif not isinstance(config, MergeConfig):
        raise MergeArgumentTypeError(
            f"merge_from_config: config must be a YAML path or text, a dict or a MergeConfig; got "
            f"{type(config).__name__} ({config!r:.80}).")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if "seed" in overrides:  # the torch-free path only records it: check it here for both engines
        overrides["seed"] = parse_seed(overrides["seed"])
    if config.slices:  # layer ranges stacked into a new model (frankenmerges): hf_taskarith.merging.slices
        from .slices import merge_slices

        return merge_slices(config, output_dir, **overrides)
    if fast_path:
        from .lite import merge_config_lite

        out = merge_config_lite(config, output_dir, **overrides)
        if out is not None:
            return out
    from .api import merge

    kwargs = dict(method=config.merge_method, dtype=config.dtype, tokenizer_source=config.tokenizer_source,
                  seed=config.seed, max_shard_size=config.max_shard_size, output_dir=output_dir,
                  config_yaml=config.source_text, **config.merge_kwargs())
    kwargs.update(overrides)
    return merge(config.base_model, config.models, **kwargs)


def parse_seed(value: Any) -> int:
    """A seed: a non-negative integer (``7``, ``"7"``, a numpy integer); ``7.9``, ``7.0``,
    ``abc`` and ``True`` are refused rather than rounded or guessed.

    Raises:
        MergeConfigError: naming the value received and the fix.
    """
    seed = None
    if isinstance(value, str):
        seed = int(value.strip()) if value.strip().isdecimal() else None
    elif not isinstance(value, bool):
        try:
            seed = operator.index(value)
        except TypeError:
            pass
    if seed is None or seed < 0:
        raise MergeConfigError(f"seed must be a non-negative integer, got {value!r} ({type(value).__name__}); "
                               "write a whole number such as 0 or 7.")
    return seed


def _dump(data: dict[str, Any]) -> str | None:
    """A config mapping as YAML text (recorded next to the output, as mergekit does), or
    ``None`` if it holds values YAML cannot write."""
    try:
        return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    except yaml.YAMLError:
        return None


def _resolver(base_dir):
    def resolve(ref: Any) -> str:
        if not isinstance(ref, str):
            raise MergeConfigError(f"model reference must be a string path or Hub id, got {ref!r}.")
        if base_dir is not None and not os.path.isabs(ref):
            candidate = Path(base_dir) / ref
            if candidate.exists():
                return str(candidate)
        return ref

    return resolve
