"""Whole-model pre-passes: statistics a method needs from every tensor before merging any.

The engine merges one tensor at a time. A few methods decide per tensor from figures of a
whole task vector: TIES with ``trim_scope: global`` keeps the top ``density`` fraction of
each task vector flattened whole, which needs that vector's k-th largest magnitude. Such a
method declares ``prepass`` in its registry entry
(:class:`~hf_taskarith.merging.registry.MergeMethod`); the engine then streams every float
tensor's deltas through a :class:`ModelPrepass` (as many passes as it asks for) and adds
:meth:`ModelPrepass.tensor_params` to each tensor's parameters when it merges it.

A pre-pass that needs whole weights rather than blocks of deltas (head alignment in
:mod:`.methods.hierarchical` compares each input's attention heads with the base's) sets
``reads = "weights"``: the engine then hands it each selected tensor's whole float32 weights,
the base's included, through :meth:`ModelPrepass.collect_weights`. :meth:`ModelPrepass.begin`
gives it the base model first (for its ``config.json``), and :meth:`ModelPrepass.selects` lets
it skip the tensors it does not need, so they are not read twice.

The protocol is plain Python (no torch import here), so registry entries stay cheap to load.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch

    from .sources import TensorSource


class ModelPrepass:
    """Statistics over every tensor of each input, gathered before any tensor is merged.

    The engine calls, until :meth:`needs_pass` is False::

        for each float tensor with inputs, in merge order:
            for each group of consecutive blocks of the tensor's deltas:
                collect(name, inputs, [scan(block, inputs) for block in group])
        end_pass()

    then :meth:`tensor_params` once per tensor while merging. With ``reads = "weights"`` the
    inner loop is one ``collect_weights(name, inputs, base, weights)`` per tensor instead.
    :meth:`begin` comes before everything, and only tensors :meth:`selects` accepts are streamed.
    """

    #: shown on the progress bar of each pass
    description: str = "pre-pass"
    #: ``"delta_blocks"``: :meth:`scan` / :meth:`collect` over blocks of deltas; ``"weights"``:
    #: :meth:`collect_weights` with whole float32 weights
    reads: Literal["delta_blocks", "weights"] = "delta_blocks"

    def begin(self, base: TensorSource) -> None:
        """Called once before the first pass with the base model (``base.folder`` holds its
        ``config.json`` when it is a checkpoint); may raise ``MergeConfigError``. Default: nothing."""

    def selects(self, name: str) -> bool:
        """Whether float tensor ``name`` is streamed through the pre-pass (default: all)."""
        return True

    def collect_weights(self, name: str, inputs: list[int], base: torch.Tensor,
                        weights: list[torch.Tensor]) -> None:
        """``reads == "weights"`` only: tensor ``name``'s float32 base weights and each contributing
        input's float32 weights (``base + delta`` for a task vector), aligned with ``inputs``.
        Read them, do not keep or modify them."""
        raise NotImplementedError

    def needs_pass(self) -> bool:
        """Whether another pass over every tensor is needed."""
        raise NotImplementedError

    def scan(self, deltas: torch.Tensor, inputs: list[int]) -> Any:
        """A partial result for one block: ``deltas`` is ``(len(inputs), m)`` float32 (a
        scratch buffer: read it, do not keep it); ``inputs`` are the indices of the inputs
        that contribute to this tensor. Runs on worker threads: must not modify ``self``."""
        raise NotImplementedError

    def collect(self, name: str, inputs: list[int], partials: list[Any]) -> None:
        """Fold the partial results of some of one tensor's blocks (in block order) into the
        state. A tensor's blocks may come in several calls, one after another."""
        raise NotImplementedError

    def end_pass(self) -> None:
        """Called after each pass over all tensors."""
        raise NotImplementedError

    def tensor_params(self, name: str, inputs: list[int]) -> dict[str, Any]:
        """Extra parameters for merging tensor ``name``; per-input values are lists aligned
        with ``inputs`` (the tensor's contributing inputs)."""
        raise NotImplementedError
