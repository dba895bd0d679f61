"""Losses of linearized models, computed from the *linearized* outputs.

The wrapped model is called without ``labels`` (its own loss would be the loss of
``f(x; theta0)``, or a linearisation of the loss, neither of which is what we train). The
loss is then computed on ``f_lin = f(x; theta0) + J delta`` with the model's own loss
function (``model.loss_function``, transformers' ``LOSS_MAPPING``), chosen by its
``loss_type``. A registry maps loss types to small adapters that know each function's
arguments; :func:`register_linearized_loss` adds one.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch

LinearizedLoss = Callable[[torch.nn.Module, Any, torch.Tensor, Any], torch.Tensor]
"""``(wrapped_model, linearized_output, labels, num_items_in_batch) -> scalar loss``."""

_LOSSES: dict[str, LinearizedLoss] = {}


def register_linearized_loss(loss_type: str) -> Callable[[LinearizedLoss], LinearizedLoss]:
    """Decorator registering the loss adapter for a transformers ``loss_type``.

    Raises:
        ValueError: ``loss_type`` is already registered.
    """

    def decorate(fn: LinearizedLoss) -> LinearizedLoss:
        if loss_type in _LOSSES:
            raise ValueError(f"a linearized loss for loss_type={loss_type!r} is already registered; "
                             f"registered: {sorted(_LOSSES)}.")
        _LOSSES[loss_type] = fn
        return fn

    return decorate


def list_linearized_losses() -> list[str]:
    return sorted(_LOSSES)


def _loss_function(model: torch.nn.Module, default: str):
    fn = getattr(model, "loss_function", None)
    if fn is not None:
        return fn
    from transformers.loss.loss_utils import LOSS_MAPPING

    return LOSS_MAPPING[default]


def _kw(num_items_in_batch: Any) -> dict[str, Any]:
    return {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}


@register_linearized_loss("ForCausalLM")
def causal_lm_loss(model, output, labels, num_items_in_batch=None):
    vocab = model.config.get_text_config().vocab_size
    return _loss_function(model, "ForCausalLM")(logits=output.logits, labels=labels, vocab_size=vocab,
                                                **_kw(num_items_in_batch))


@register_linearized_loss("ForMaskedLM")
def masked_lm_loss(model, output, labels, num_items_in_batch=None):
    vocab = model.config.get_text_config().vocab_size
    return _loss_function(model, "ForMaskedLM")(logits=output.logits, labels=labels, vocab_size=vocab,
                                                **_kw(num_items_in_batch))


def _classification_loss(model, output, labels, num_items_in_batch=None):
    from transformers.loss.loss_utils import ForSequenceClassificationLoss

    return ForSequenceClassificationLoss(labels=labels, pooled_logits=output.logits, config=model.config,
                                         **_kw(num_items_in_batch))


for _t in ("ForSequenceClassification", "ForImageClassification", "ForAudioClassification",
           "ForVideoClassification"):
    register_linearized_loss(_t)(_classification_loss)


@register_linearized_loss("ForTokenClassification")
def token_classification_loss(model, output, labels, num_items_in_batch=None):
    from transformers.loss.loss_utils import ForTokenClassification

    return ForTokenClassification(logits=output.logits, labels=labels, config=model.config,
                                  **_kw(num_items_in_batch))


_NAME_HINTS = [(re.compile(r"(LMHead|ForCausalLM|ForConditionalGeneration)"), "ForCausalLM"),
               (re.compile(r"ForMaskedLM"), "ForMaskedLM")]


def infer_loss_type(model: torch.nn.Module) -> str | None:
    """The registered loss type of a transformers model, or ``None`` if unknown."""
    loss_type = getattr(model, "loss_type", None)
    if isinstance(loss_type, str) and loss_type in _LOSSES:
        return loss_type
    name = type(model).__name__
    for pattern, lt in _NAME_HINTS:
        if pattern.search(name):
            return lt
    return None


def get_linearized_loss(loss_type: str) -> LinearizedLoss:
    """Raises ``ValueError`` naming the registered types when ``loss_type`` is unknown."""
    if loss_type not in _LOSSES:
        raise ValueError(f"no linearized loss for loss_type={loss_type!r}; registered: "
                         f"{list_linearized_losses()}. Pass loss_fn= to LinearizedModel.")
    return _LOSSES[loss_type]
