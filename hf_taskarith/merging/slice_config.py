"""The ``slices:`` of a merge config as typed objects: which layers of which models, in order.

A slice lists sources, each a model and a ``layer_range: [start, end)`` (end excluded), all
spanning as many layers; optional ``parameters`` per source and per slice (see :mod:`.slices`
for what they mean). :func:`parse_slices` checks the structure again, so configs built by hand
(not through :mod:`.schema`) fail as clearly.

Note:
    Cost: a few checks per source; no model is opened here (ranges are checked against each
    model's layers by :mod:`.slices`).

Example:
    >>> [s.num_layers for s in parse_slices([{"sources": [{"model": "a", "layer_range": [0, 4]}]},
    ...                                        {"sources": [{"model": "b", "layer_range": [2, 4]}]}])]
    [4, 2]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import MergeConfigError


@dataclass(frozen=True)
class SliceSource:
    """One model's layers ``[start, end)`` in a slice, and its own parameters."""

    model: str
    start: int
    end: int
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class OutputSlice:
    """A run of output layers: its sources (merged layer by layer), parameters and base model."""

    sources: tuple[SliceSource, ...]
    parameters: dict[str, Any] = field(default_factory=dict)
    base_model: str | None = None

    @property
    def num_layers(self) -> int:
        return self.sources[0].end - self.sources[0].start


def parse_slices(raw: Any) -> list[OutputSlice]:
    """Check the structure of ``slices:`` (a list of ``{sources: [...], parameters?, base_model?}``).

    Raises:
        MergeConfigError: naming the slice and source, what was received and what is expected.
    """
    if not isinstance(raw, list) or not raw:
        raise MergeConfigError(f"slices must be a non-empty list of {{sources: [...]}}, got {raw!r:.80}.")
    out = []
    for i, entry in enumerate(raw):
        where = f"slices[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("sources"), list) or not entry["sources"]:
            raise MergeConfigError(f"{where} must be a mapping with a non-empty 'sources' list, got {entry!r:.80}.")
        extra = sorted(set(entry) - {"sources", "parameters", "base_model"})
        if extra:
            raise MergeConfigError(f"{where} has unsupported key(s) {extra}; valid: ['base_model', 'parameters', "
                                   "'sources'].")
        sources = tuple(_parse_source(src, f"{where}.sources[{j}]") for j, src in enumerate(entry["sources"]))
        counts = {s.end - s.start for s in sources}
        if len(counts) > 1:
            spans = [f"{s.model} [{s.start}, {s.end})" for s in sources]
            raise MergeConfigError(f"{where}: its sources span different numbers of layers ({spans}); every source "
                                   "of a slice gives the same layers, so give each the same length.")
        models = [s.model for s in sources]
        if len(set(models)) != len(models):
            raise MergeConfigError(f"{where}: a model is listed twice among its sources ({models}); list each model "
                                   "once per slice (use two slices to repeat layers).")
        out.append(OutputSlice(sources, _mapping(entry.get("parameters"), f"{where}.parameters"),
                               entry.get("base_model")))
    return out


def _parse_source(src: Any, where: str) -> SliceSource:
    if not isinstance(src, dict) or "model" not in src or "layer_range" not in src:
        raise MergeConfigError(f"{where} must be a mapping with 'model' and 'layer_range', got {src!r:.80}.")
    extra = sorted(set(src) - {"model", "layer_range", "parameters"})
    if extra:
        raise MergeConfigError(f"{where} has unknown key(s) {extra}; valid: ['layer_range', 'model', 'parameters'].")
    rng = src["layer_range"]
    if (not isinstance(rng, (list, tuple)) or len(rng) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in rng)):
        raise MergeConfigError(f"{where}.layer_range must be two whole numbers [start, end), got {rng!r}.")
    start, end = rng
    if not 0 <= start < end:
        raise MergeConfigError(f"{where}.layer_range [{start}, {end}) is empty or negative; write [start, end) "
                               "with 0 <= start < end (end is excluded).")
    if not isinstance(src["model"], str):
        raise MergeConfigError(f"{where}.model must be a path or Hub id, got {src['model']!r}.")
    return SliceSource(src["model"], start, end, _mapping(src.get("parameters"), f"{where}.parameters"))


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise MergeConfigError(f"{where} must be a mapping, got {value!r}.")
    return dict(value)
