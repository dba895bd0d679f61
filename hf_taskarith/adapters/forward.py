"""The linearized forward of the adapter tuners, installed as forward hooks on the base model.

peft reaches the base model by several roads: ``PeftModel.forward`` calls the base model
directly, the task-specific ``PeftModelFor...`` classes call the tuner, and the Trainer may
call either. So the linearization is attached to the base model itself, with a pre-hook and
a post-hook (:class:`LinearizedForwardHooks`):

* pre-hook: takes ``labels`` (and ``num_items_in_batch``) out of the inputs (a transformers
  model would otherwise compute its loss on the primal logits ``f(x; theta0)``), sets
  ``use_cache=False``, enters a forward-mode AD level with the hand-written tangent rules of
  :mod:`hf_taskarith.linearize.tangent_rules`, and lets the tuner put its tangents in place
  (dual parameters for the tangent adapter; the L-LoRA layers add theirs themselves);
* post-hook: splits every output leaf into primal and tangent, leaves the level, returns
  ``primal + tangent`` (the linearized output) with the loss computed on it by the model's own
  loss function (:mod:`hf_taskarith.linearize.losses`). It runs even when the forward raises,
  so the AD level is always closed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

from ..linearize.functional import add_tangent, forward_params, unpack_output
from ..linearize.losses import get_linearized_loss, infer_loss_type
from ..linearize.tangent_rules import TangentRulesMode
from .layer import linearized_forward


class LinearizedForwardHooks:
    """Forward hooks that make ``model``'s forward linearized whenever ``active()`` is true.

    Args:
        model: the base (transformers) model; hooked in place.
        active: called at each forward; ``False`` runs the model unchanged (adapters disabled).
        tangents: returns a context manager that puts the tangents in place inside the AD level
            (e.g. swaps in dual parameters); ``None`` for none.
    """

    def __init__(self, model: nn.Module, active: Callable[[], bool],
                 tangents: Callable[[], contextlib.AbstractContextManager] | None = None) -> None:
        self.model, self.active, self.tangents = model, active, tangents
        self._stack: list[dict[str, Any] | None] = []
        self._accepts_use_cache = "use_cache" in forward_params(model)
        self.handles = [model.register_forward_pre_hook(self._pre, with_kwargs=True),
                        model.register_forward_hook(self._post, with_kwargs=True, always_call=True)]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]):
        if self._stack and self._stack[-1] is not None or not self.active():  # nested call, or adapters off
            self._stack.append(None)
            return None
        state = {"labels": kwargs.pop("labels", None), "num_items_in_batch": kwargs.pop("num_items_in_batch", None)}
        if self._accepts_use_cache:
            kwargs["use_cache"] = False
        stack = contextlib.ExitStack()
        try:
            stack.enter_context(fwAD.dual_level())
            stack.enter_context(TangentRulesMode())
            stack.enter_context(linearized_forward())
            if self.tangents is not None:
                stack.enter_context(self.tangents())
        except BaseException:
            stack.close()
            raise
        state["stack"] = stack
        self._stack.append(state)
        return args, kwargs

    def _post(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any):
        state = self._stack.pop() if self._stack else None
        if state is None:
            return None
        try:
            if output is None:  # the forward raised; just close the level
                return None
            primal, tangent = split_dual(output)
        finally:
            state["stack"].close()
        out = add_tangent(primal, tangent)
        if state["labels"] is None:
            return out
        loss_type = infer_loss_type(self.model)
        if loss_type is None:
            raise ValueError(f"don't know the loss of {type(self.model).__name__}; call without labels and compute "
                             "the loss from the returned logits yourself.")
        loss = get_linearized_loss(loss_type)(self.model, out, state["labels"], state["num_items_in_batch"])
        return attach_loss(out, loss)


split_dual = unpack_output  # (primal, tangent) pytrees of an output holding dual tensors


def attach_loss(out: Any, loss: torch.Tensor) -> Any:
    """``out`` with ``loss`` set (a ``ModelOutput`` of the same class, or a dict)."""
    if isinstance(out, torch.Tensor):
        return {"loss": loss, "logits": out}
    if hasattr(out, "keys") and "loss" in getattr(type(out), "__dataclass_fields__", {}):
        return type(out)(**{"loss": loss, **{k: v for k, v in out.items() if k != "loss"}})
    if isinstance(out, Mapping):
        return {"loss": loss, **out}
    raise TypeError(f"cannot attach a loss to a {type(out).__name__} output; call without labels and compute the "
                    "loss yourself.")
