"""Activation (gradient) checkpointing of the linearized forward.

transformers checkpoints a model by re-running each ``GradientCheckpointingLayer`` in the
backward pass, but only in train mode -- and a linearized model's wrapped model always stays
in eval mode -- and through ``torch.utils.checkpoint``, whose replay would run outside the
forward-mode AD level and the tangent rules. So the linearized model checkpoints itself: while
enabled, each selected layer runs inside :class:`_CheckpointedLayer`, an autograd Function
whose forward computes the layer's primal and tangent outputs keeping nothing for the backward
but the layer's inputs, and whose backward recomputes the layer's tangent (primal and tangent,
under a fresh dual level with the same rules) and back-propagates through it.

Note:
    Cost: one more forward of each checkpointed layer in the backward pass (a step costs
    about 1.3x more); activation memory falls to the layers' inputs plus one layer's
    intermediates. Only the ``"dual"`` engine, and only when no parameter is trained
    non-linearly (``rest="train"`` parameters need the primal's own graph).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
import torch.utils._pytree as pytree
from torch import nn

from .functional import no_fused_fast_paths, swapped_parameters
from .tangent_rules import TangentRulesMode


def checkpoint_layers(model: nn.Module, every_n_layers: int = 1) -> list[nn.Module]:
    """The layers of ``model`` to checkpoint: transformers' ``GradientCheckpointingLayer`` blocks,
    every ``every_n_layers``-th of them.

    Raises:
        ValueError: ``every_n_layers < 1``, or ``model`` has no such layer (not a transformers
            model with checkpointable layers).
    """
    if not isinstance(every_n_layers, int) or every_n_layers < 1:
        raise ValueError(f"every_n_layers must be a positive integer, got {every_n_layers!r}.")
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # transformers < 4.52
        GradientCheckpointingLayer = ()  # type: ignore[assignment]
    layers = [m for m in model.modules() if GradientCheckpointingLayer and isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no transformers GradientCheckpointingLayer blocks to checkpoint; "
                         "gradient checkpointing of a linearized model works on transformers models whose layers "
                         "support it (supports_gradient_checkpointing=True).")
    return layers[::every_n_layers]


@contextlib.contextmanager
def checkpointed(layers: Sequence[nn.Module]) -> Iterator[None]:
    """Run each of ``layers`` through :class:`_CheckpointedLayer` for the duration (dual engine only)."""
    saved = []
    try:
        for layer in layers:
            saved.append((layer, layer.__dict__.get("forward")))
            layer.forward = _checkpointed_forward(layer)
        yield
    finally:
        for layer, previous in reversed(saved):
            if previous is None:
                layer.__dict__.pop("forward", None)
            else:
                layer.forward = previous


def _checkpointed_forward(layer: nn.Module):
    plain = type(layer).forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        leaves, spec = pytree.tree_flatten((args, kwargs))
        slots = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
        in_p, in_t = zip(*(fwAD.unpack_dual(leaves[i])[:2] for i in slots)) if slots else ((), ())
        names, p_p, p_t = [], [], []
        for name, value in layer.named_parameters(remove_duplicate=False):
            primal, tangent = fwAD.unpack_dual(value)[:2]
            if primal.requires_grad:
                raise ValueError(f"gradient checkpointing: {name!r} of {type(layer).__name__} is trained non-linearly "
                                 "(rest='train'); checkpointing needs every primal to be constant.")
            if tangent is not None:
                names.append(name)
                p_p.append(primal)
                p_t.append(tangent)
        run = _Run(layer, plain, leaves, spec, slots, names)
        has_in_t = tuple(t is not None for t in in_t)
        outputs = _CheckpointedLayer.apply(run, has_in_t, len(p_t), *in_p, *[t for t in in_t if t is not None],
                                           *p_p, *p_t)
        n_out = len(outputs) // 2
        prim, tang = outputs[:n_out], outputs[n_out:]
        duals = [fwAD.make_dual(p, t) if has else p for p, t, has in zip(prim, tang, run.has_out_t)]
        return pytree.tree_unflatten(duals, run.out_spec)

    return forward


class _Run:
    """What a checkpointed layer call needs to be replayed: the layer, its inputs' structure."""

    def __init__(self, layer, plain, leaves, spec, slots, names):
        self.layer, self.plain, self.leaves = layer, plain, leaves
        self.spec, self.slots, self.names = spec, slots, names
        self.out_spec = None
        self.has_out_t: list[bool] = []

    def call(self, in_p, in_t, p_p, p_t):
        """The layer on dual inputs and parameters; returns ``(output leaves' primals, tangents)``."""
        leaves = list(self.leaves)
        for i, p, t in zip(self.slots, in_p, in_t):
            leaves[i] = p if t is None else fwAD.make_dual(p, t)
        args, kwargs = pytree.tree_unflatten(leaves, self.spec)
        values = {n: fwAD.make_dual(p, t) for n, p, t in zip(self.names, p_p, p_t)}
        with swapped_parameters(self.layer, values):
            out = self.plain(self.layer, *args, **kwargs)
        leaves, spec = pytree.tree_flatten(out)
        self.out_spec = spec
        prim, tang = [], []
        for x in leaves:
            if isinstance(x, torch.Tensor):
                p, t = fwAD.unpack_dual(x)[:2]
                prim.append(p)
                tang.append(t)
        return prim, tang, leaves


class _CheckpointedLayer(torch.autograd.Function):
    """Forward: the layer's primal and tangent outputs, nothing saved but its inputs. Backward:
    recompute the tangent under a fresh dual level and back-propagate through it."""

    @staticmethod
    def forward(ctx, run: _Run, has_in_t: tuple[bool, ...], n_params: int, *tensors: torch.Tensor):
        n_in = len(has_in_t)
        n_in_t = sum(has_in_t)
        in_p = tensors[:n_in]
        it = iter(tensors[n_in:n_in + n_in_t])
        in_t = [next(it) if h else None for h in has_in_t]
        p_p = tensors[n_in + n_in_t:n_in + n_in_t + n_params]
        p_t = tensors[n_in + n_in_t + n_params:]
        # forward-mode AD is switched off inside an autograd Function's forward; this one needs it
        with torch.no_grad(), fwAD._set_fwd_grad_enabled(True):
            prim, tang, leaves = run.call(in_p, in_t, p_p, p_t)
        if any(not isinstance(x, torch.Tensor) for x in leaves):
            non_tensor = [x for x in leaves if not isinstance(x, torch.Tensor)]
            raise ValueError(f"gradient checkpointing: {type(run.layer).__name__} returned non-tensor outputs "
                             f"{[type(x).__name__ for x in non_tensor]}; only tensor outputs are supported.")
        ctx.run = run
        ctx.has_in_t = has_in_t
        ctx.n_params = n_params
        ctx.has_out_t = run.has_out_t = [t is not None for t in tang]
        ctx.save_for_backward(*tensors)
        empty = prim[0].new_empty(0) if prim else torch.empty(0)
        tang = [t if t is not None else empty for t in tang]
        ctx.mark_non_differentiable(*prim)
        return (*prim, *tang)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        tensors = ctx.saved_tensors
        has_in_t, n_params, run = ctx.has_in_t, ctx.n_params, ctx.run
        n_in, n_in_t = len(has_in_t), sum(has_in_t)
        in_p = [t.detach() for t in tensors[:n_in]]
        in_t_leaves = [t.detach().requires_grad_() for t in tensors[n_in:n_in + n_in_t]]
        p_p = [t.detach() for t in tensors[n_in + n_in_t:n_in + n_in_t + n_params]]
        p_t_leaves = [t.detach().requires_grad_() for t in tensors[n_in + n_in_t + n_params:]]
        it = iter(in_t_leaves)
        in_t = [next(it) if h else None for h in has_in_t]
        n_out = len(grads) // 2
        tang_grads = grads[n_out:]
        with torch.enable_grad(), fwAD.dual_level(), TangentRulesMode(), no_fused_fast_paths():
            _, tang, _ = run.call(in_p, in_t, p_p, p_t_leaves)
        outs = [t for t, h, g in zip(tang, ctx.has_out_t, tang_grads) if h and t is not None and g is not None]
        gs = [g for t, h, g in zip(tang, ctx.has_out_t, tang_grads) if h and t is not None and g is not None]
        leaves = in_t_leaves + p_t_leaves
        got = torch.autograd.grad(outs, leaves, gs, allow_unused=True) if outs else [None] * len(leaves)
        return (None, None, None, *([None] * n_in), *got[:n_in_t], *([None] * n_params), *got[n_in_t:])


class CheckpointingMixin:
    """The activation-checkpointing switches of :class:`~hf_taskarith.linearize.LinearizedModel`
    (the names ``Trainer`` and transformers call), kept beside the machinery they switch on."""

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None, *,
                                        every_n_layers: int = 1, offload: bool = False) -> None:
        """Recompute each layer's tangent in the backward pass instead of storing its activations.

        What ``Trainer`` calls for ``TrainingArguments(gradient_checkpointing=True)``. The wrapped
        model's own checkpointing cannot be used (it runs only in train mode, and replays outside
        the forward-mode AD level); see :mod:`~hf_taskarith.linearize.checkpointing`.

        Args:
            activation_checkpointing_kwargs: ``torch.utils.checkpoint`` options; accepted for
                compatibility and not used (the replay is ours, always non-reentrant).
            every_n_layers: checkpoint every n-th layer.
            offload: not supported (``ValueError``).

        Raises:
            ValueError: ``offload=True``; ``engine="jvp"``; parameters trained non-linearly
                (``rest="train"``); a model without transformers checkpointable layers.
        """
        if offload:
            raise ValueError("activation offloading is not supported for linearized models; use offload=False.")
        if self.engine != "dual":
            raise ValueError(f"gradient checkpointing needs engine='dual' (this model uses {self.engine!r}).")
        if self._nonlinear:
            raise ValueError("gradient checkpointing is not supported with rest='train' (parameters trained "
                             "non-linearly need the primal graph); use rest='frozen' or turn checkpointing off.")
        self._checkpoint_layers = checkpoint_layers(self.model, every_n_layers)
        self._gradient_checkpointing = True

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs: Any) -> None:
        """Alias of :meth:`activation_checkpointing_enable` (transformers' older name)."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def activation_checkpointing_disable(self) -> None:
        """Store activations again (the default)."""
        self._gradient_checkpointing = False
        self._checkpoint_layers = []

    gradient_checkpointing_disable = activation_checkpointing_disable

    @property
    def is_gradient_checkpointing(self) -> bool:
        """Whether activation checkpointing is on."""
        return self._gradient_checkpointing

    is_activation_checkpointing = is_gradient_checkpointing

    @property
    def supports_gradient_checkpointing(self) -> bool:
        """Whether the wrapped model has layers :meth:`activation_checkpointing_enable` can checkpoint."""
        return bool(getattr(self.model, "supports_gradient_checkpointing", False))
