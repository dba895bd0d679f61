"""Keeping Hub kernels out of the linearized forward.

Since transformers 5.x, ``from_pretrained`` *kernelizes* models when the ``kernels`` package is
installed (``use_kernels`` defaults to on): layers decorated with ``use_kernel_forward_from_hub``
(RMSNorm, activations, MLPs, ...) may have their ``forward`` replaced by a compiled kernel for
the model's device, and ``model.train()`` / ``model.eval()`` re-kernelize for the new mode.
Such kernels have no forward-mode AD formula and no tangent rule here, so a linearized model
must not run through them. :func:`disable_hub_kernels` puts every layer back on its PyTorch
implementation (transformers' own ``reset_kernels``) and marks the model as not kernelized,
so later mode switches do not kernelize it again.

Note:
    This touches no network: resetting maps every layer to its PyTorch fallback. Ordinary
    (non-linearized) fine-tuning keeps whatever kernels the user loaded.
"""

from __future__ import annotations

import logging

from torch import nn

logger = logging.getLogger(__name__)


def kernelized_models(model: nn.Module) -> list[nn.Module]:
    """The transformers models inside ``model`` (itself included) that are kernelized now."""
    return [m for m in model.modules() if getattr(type(m), "use_kernels", None) is not None
            and bool(getattr(m, "use_kernels", False))]


def disable_hub_kernels(model: nn.Module) -> bool:
    """Return every Hub-kernelized layer of ``model`` to its PyTorch forward and keep it there.

    Args:
        model: any module; transformers models with ``use_kernels`` on are reset in place.

    Returns:
        Whether anything was kernelized before.

    Raises:
        RuntimeError: a model stays kernelized after the reset (a transformers version whose
            ``reset_kernels`` does not clear ``use_kernels``); the message says how to load it
            without kernels.
    """
    found = kernelized_models(model)
    for m in found:
        m.reset_kernels()
    left = kernelized_models(model)
    if left:
        raise RuntimeError(
            f"{type(left[0]).__name__} is still kernelized after reset_kernels(); Hub kernels have no tangent rule. "
            "Load the model with from_pretrained(..., use_kernels=False) or set USE_HUB_KERNELS=0.")
    if found:
        logger.info("linearized model: Hub kernels turned off (%d model(s)); layers run their PyTorch forward, "
                    "which forward-mode AD can differentiate.", len(found))
    return bool(found)
