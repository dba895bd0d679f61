"""Merge configuration files (YAML), compatible with mergekit's format.

Accepted keys (mergekit's meaning)::

    merge_method: ties              # any registered method
    base_model: path/or/hub-id
    models:
      - model: path/or/hub-id/or/saved-task-vector
        parameters: {weight: 1.0, density: 0.5}
    parameters: {normalize: true, lambda: 1.0, int8_mask: true}   # shared
    dtype: bfloat16                 # output dtype (out_dtype also accepted)
    tokenizer_source: base          # or one of the models
    # hf_taskarith extensions:
    seed: 0
    max_shard_size: 5GB

Not supported (a clear error says so): ``slices`` / layer ranges, parameter gradients
(lists) and ``filter`` overrides, ``tokenizer_source: union``, ``tokenizer:`` blocks.
A model listed under ``models`` that equals ``base_model`` is the base (as in mergekit);
for ``linear`` (which averages whole models) it is averaged with its weight.
"""

from __future__ import annotations

import operator
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import MergeArgumentTypeError, MergeConfigError

TOP_LEVEL = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source",
             "seed", "max_shard_size", "name", "chat_template"}
#: how a one-line string that is YAML text (not a file name) starts
YAML_STARTS = ("merge_method", "{", "#")
UNSUPPORTED = {"slices": "layer slicing is not supported; merge whole models",
               "tokenizer": "tokenizer blocks are not supported; use tokenizer_source",
               "modules": "per-module configs are not supported"}


@dataclass
class MergeConfig:
    """A parsed, validated merge configuration."""

    merge_method: str
    base_model: str | None
    models: list[str]
    model_parameters: list[dict[str, Any]]
    parameters: dict[str, Any] = field(default_factory=dict)
    dtype: str | None = None
    tokenizer_source: str | None = "base"
    seed: int = 0
    max_shard_size: str | int = "5GB"
    source_text: str | None = None

    @classmethod
    def from_yaml(cls, path_or_text: str | os.PathLike, *, base_dir: str | os.PathLike | None = None) -> "MergeConfig":
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
    def from_dict(cls, data: Any, *, base_dir: str | os.PathLike | None = None) -> "MergeConfig":
        if not isinstance(data, dict):
            raise MergeConfigError(f"merge config must be a mapping, got {type(data).__name__}.")
        for key, why in UNSUPPORTED.items():
            if key in data:
                raise MergeConfigError(f"config key {key!r}: {why}.")
        unknown = sorted(set(data) - TOP_LEVEL)
        if unknown:
            raise MergeConfigError(f"unknown config key(s) {unknown}; valid keys: {sorted(TOP_LEVEL)}.")
        if "merge_method" not in data:
            raise MergeConfigError("config needs merge_method (e.g. task_arithmetic, ties, dare_ties).")
        from .registry import get_merge_method

        method = get_merge_method(str(data["merge_method"]))
        resolve = _resolver(base_dir)
        base = data.get("base_model")
        base = resolve(base) if base is not None else None
        entries = data.get("models") or []
        if not isinstance(entries, list) or not entries:
            raise MergeConfigError("config needs a non-empty models: list of {model: ..., parameters: {...}}.")
        models, params = [], []
        for i, entry in enumerate(entries):
            if isinstance(entry, str):
                entry = {"model": entry}
            if not isinstance(entry, dict) or "model" not in entry:
                raise MergeConfigError(f"models[{i}] must be a mapping with a 'model' key, got {entry!r}.")
            extra = sorted(set(entry) - {"model", "parameters"})
            if extra:
                raise MergeConfigError(f"models[{i}] has unknown key(s) {extra}; valid: ['model', 'parameters'].")
            model = resolve(entry["model"])
            if base is not None and model == base and method.needs_base:
                continue  # the base of a task-vector method is the reference, not an input (as in mergekit)
            p = entry.get("parameters") or {}
            if not isinstance(p, dict):
                raise MergeConfigError(f"models[{i}].parameters must be a mapping, got {p!r}.")
            models.append(model)
            params.append(dict(p))
        if not models:
            raise MergeConfigError("config lists no models besides the base model.")
        shared = data.get("parameters") or {}
        if not isinstance(shared, dict):
            raise MergeConfigError(f"parameters must be a mapping, got {shared!r}.")
        tok = data.get("tokenizer_source", "base")
        if tok is not None and not isinstance(tok, str):
            raise MergeConfigError(f"tokenizer_source must be 'base', a model of the config, or null; got {tok!r}.")
        if tok not in (None, "base"):
            tok = resolve(tok)
        return cls(
            merge_method=str(data["merge_method"]), base_model=base, models=models, model_parameters=params,
            parameters=dict(shared), dtype=data.get("out_dtype") or data.get("dtype"),
            tokenizer_source=tok, seed=parse_seed(data.get("seed", 0)),
            max_shard_size=data.get("max_shard_size", "5GB"),
        )

    def merge_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :func:`hf_taskarith.merge` (per-model params become lists)."""
        from .registry import get_merge_method

        method = get_merge_method(self.merge_method)
        kwargs: dict[str, Any] = dict(self.parameters)
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
            shared_default = kwargs.pop(key, spec.default)
            kwargs[key] = [p.get(key, shared_default) for p in self.model_parameters]
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
