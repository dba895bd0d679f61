"""Making attention jvp-safe without user action.

Fused attention kernels (flash, memory-efficient, the CPU flash kernel behind
``F.scaled_dot_product_attention``) have no forward-mode AD formula, so a linearized model
cannot run through them. :func:`make_attention_jvp_safe` is called by
:class:`~hf_taskarith.linearize.LinearizedModel` on the model it wraps:

* ``attn_implementation="eager"``: kept (plain matmul + softmax, every op has a JVP).
* ``"sdpa"``: kept. The ``"dual"`` engine replaces ``F.scaled_dot_product_attention`` by its
  hand-written tangent rule (explicit math attention); the ``"jvp"`` engine replaces it by
  :func:`~hf_taskarith.linearize.math_attention.math_attention`.
* anything else (``flash_attention_2``, ``flex_attention``, kernels from the Hub): switched to
  ``"sdpa"`` with an INFO log line, since those kernels cannot be differentiated forward.

Note:
    Attention then costs what the math backend costs: the ``L x L`` score matrix is
    materialised, so memory grows quadratically with sequence length, as with ``eager``.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

JVP_SAFE_ATTENTION = ("eager", "sdpa")


def _attn_implementations(config) -> set[str]:
    found = set()
    impl = getattr(config, "_attn_implementation", None)
    if isinstance(impl, str):
        found.add(impl)
    for key in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, key, None)
        if sub is not None:
            found |= _attn_implementations(sub)
    return found


def make_attention_jvp_safe(model: torch.nn.Module) -> str | None:
    """Switch ``model`` (a transformers model) to an attention implementation forward-mode AD can run.

    Args:
        model: any module; only transformers models (with ``config._attn_implementation``) are
            changed, in place.

    Returns:
        The implementation in use afterwards (``"eager"`` or ``"sdpa"``), or ``None`` for a
        module without a transformers config.

    Raises:
        ValueError: the model uses an unsafe implementation and cannot be switched (it has no
            ``set_attn_implementation``); the message says which value to load it with.
    """
    config = getattr(model, "config", None)
    if config is None:
        return None
    impls = _attn_implementations(config)
    unsafe = sorted(i for i in impls if i not in JVP_SAFE_ATTENTION)
    if not unsafe:
        return "eager" if impls == {"eager"} else ("sdpa" if impls else None)
    setter = getattr(model, "set_attn_implementation", None)
    if setter is None:
        raise ValueError(
            f"attention implementation(s) {unsafe} have no forward-mode AD; load the model with "
            f"attn_implementation='sdpa' or 'eager' (supported: {list(JVP_SAFE_ATTENTION)})."
        )
    logger.info("linearized model: switching attention from %s to 'sdpa' (forward-mode AD is not "
                "implemented for fused attention kernels).", unsafe)
    setter("sdpa")
    return "sdpa"
