"""A checkpoint's stack of numbered layers, and views that renumber them.

Decoder (and encoder) checkpoints name their per-layer tensors ``<prefix><index>.<rest>``
(``model.layers.3.mlp.up_proj.weight``: prefix ``model.layers.``, index 3, rest
``mlp.up_proj.weight``). :func:`layer_stack` finds that stack from the tensor names alone, so
it works for any architecture with one stack (Llama, Mistral, Qwen, Gemma, GPT-2's
``transformer.h.``, BERT's ``encoder.layer.``), and sorts the other tensors into those read
before the layers (input embeddings) and after them (final norm, LM head): mergekit takes the
first from the first slice's models and the second from the last slice's.

:class:`RenamedSource` shows some tensors of a :class:`~.sources.TensorSource` under other
names, reading nothing until a tensor is asked for: the streaming engine merges a slice of
layers through it as if it were a whole model.

Note:
    Cost: one regular-expression match per tensor name; views add no copies.

Example:
    >>> stack = layer_stack(["model.embed_tokens.weight", "model.layers.0.mlp.w", "model.layers.1.mlp.w",
    ...                      "model.norm.weight"])
    >>> stack.prefix, stack.num_layers, stack.before, stack.after
    ('model.layers.', 2, ['model.embed_tokens.weight'], ['model.norm.weight'])
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..errors import MergeConfigError
from ..io.fingerprint import fingerprint_state_dict
from .sources import Meta, TensorSource

#: ``<prefix><index>.<rest>``: the first dotted component that is a number is a layer index
_NUMBERED = re.compile(r"^(?P<prefix>.*?\.)(?P<index>\d+)\.(?P<rest>.+)$")
#: non-layer tensors read before the layers: input embeddings (any component named so)
_BEFORE_LAYERS = re.compile(
    r"(^|\.)(embed_tokens|embed_in|tok_embeddings|wte|wpe|word_embeddings|position_embeddings|"
    r"token_type_embeddings|embed_positions|embeddings)(\.|$)")


@dataclass(frozen=True)
class LayerStack:
    """How a checkpoint's tensor names split into numbered layers and the rest.

    Attributes:
        prefix: what precedes each layer index (``"model.layers."``).
        num_layers: layers ``0 .. num_layers - 1``.
        layers: for each layer index, the rest of its tensor names (``"mlp.up_proj.weight"``).
        before: non-layer tensors read before the layers (input embeddings).
        after: non-layer tensors read after them (final norm, LM head, anything else).
    """

    prefix: str
    num_layers: int
    layers: tuple[tuple[str, ...], ...]
    before: list[str]
    after: list[str]

    def name(self, index: int, rest: str) -> str:
        """The tensor name of ``rest`` in layer ``index``."""
        return f"{self.prefix}{index}.{rest}"


def layer_stack(names: list[str], *, label: str = "model") -> LayerStack:
    """Find the numbered layer stack among a checkpoint's tensor names.

    Args:
        names: every tensor name of the checkpoint.
        label: how the checkpoint is named in errors.

    Returns:
        The :class:`LayerStack`.

    Raises:
        MergeConfigError: no numbered layers; more than one stack (a vision tower beside the
            language model, an encoder and a decoder: mergekit's ``modules:`` case, not
            supported); layer indices with gaps.
    """
    stacks: dict[str, dict[int, list[str]]] = {}
    others: list[str] = []
    for name in names:
        m = _NUMBERED.match(name)
        if m is None:
            others.append(name)
            continue
        stacks.setdefault(m["prefix"], {}).setdefault(int(m["index"]), []).append(m["rest"])
    if not stacks:
        raise MergeConfigError(f"{label}: no numbered layers found among its tensors (expected names such as "
                               "'model.layers.0.mlp.up_proj.weight'); slices need a model with a layer stack.")
    if len(stacks) > 1:
        found = ", ".join(f"{p}0..{max(s)}" for p, s in sorted(stacks.items()))
        raise MergeConfigError(f"{label}: found several layer stacks ({found}); slices work on models with one "
                               "stack of layers (mergekit needs its 'modules:' syntax here, which is not supported).")
    prefix, by_index = next(iter(stacks.items()))
    count = max(by_index) + 1
    gaps = sorted(set(range(count)) - set(by_index))
    if gaps:
        raise MergeConfigError(f"{label}: layers {gaps} are missing from the stack {prefix}0..{count - 1}; the "
                               "checkpoint is incomplete.")
    before = [n for n in others if _BEFORE_LAYERS.search(n)]
    after = [n for n in others if not _BEFORE_LAYERS.search(n)]
    layers = tuple(tuple(by_index[i]) for i in range(count))
    return LayerStack(prefix, count, layers, before, after)


class RenamedSource(TensorSource):
    """Some tensors of ``source``, shown under new names (``{new name: name in source}``).

    Everything is read lazily from ``source``, by range where it supports that.

    Args:
        source: the checkpoint.
        names: new name -> name in ``source``, in the order the view lists them.
        label: how the view is named in reports and errors.
    """

    def __init__(self, source: TensorSource, names: Mapping[str, str], *, label: str | None = None):
        self.source, self._names = source, dict(names)
        self.label = label or source.label
        self.folder, self.fresh = source.folder, source.fresh

    def names(self) -> list[str]:
        return list(self._names)

    def original(self, name: str) -> str:
        """The name in the underlying checkpoint."""
        return self._names[name]

    def meta(self, name: str) -> Meta:
        return self.source.meta(self._names[name])

    def get(self, name: str) -> torch.Tensor:
        return self.source.get(self._names[name])

    def open_range(self, name: str):
        return self.source.open_range(self._names[name])

    def fingerprint(self) -> str:
        """The fingerprint of the view's float tensors under their new names (reads them all)."""
        return fingerprint_state_dict({n: self.get(n) for n in self._names if self.meta(n).dtype.is_floating_point})
