"""Scaled dot-product attention written with differentiable operations only.

``F.scaled_dot_product_attention`` dispatches to fused kernels that have no forward-mode AD
formula, and even its math backend gives NaN gradients for a query row whose every key is
masked (left padding in a causal LM: the softmax of a row of ``-inf`` is NaN; PyTorch's
forward replaces it by zeros, its derivatives do not). :func:`math_attention` computes the
same function from plain operations whose forward- and reverse-mode formulas exist, and gives
fully masked rows zero output *and* zero derivatives. It is used

* by the ``"jvp"`` engine, through :class:`MathAttentionMode`, in place of every SDPA call;
* by the ``"dual"`` engine's attention rule when a primal needs a graph (``rest="train"``);
* by the tests, as the reference the hand-written rule is compared with.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .reentrant import call_reentrant


def attention_scale(query: torch.Tensor, scale: float | None) -> float:
    """SDPA's default scale ``1 / sqrt(head_dim)`` unless ``scale`` is given."""
    return 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)


def repeat_kv(key: torch.Tensor, value: torch.Tensor, query_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Grouped-query attention: repeat each key/value head ``query_heads // kv_heads`` times."""
    if key.dim() < 3 or key.shape[-3] == query_heads:
        return key, value
    if query_heads % key.shape[-3]:
        raise ValueError(f"enable_gqa: {query_heads} query heads are not a multiple of {key.shape[-3]} key heads.")
    rep = query_heads // key.shape[-3]
    return key.repeat_interleave(rep, dim=-3), value.repeat_interleave(rep, dim=-3)


def masked_scores(scores: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool) -> torch.Tensor:
    """``scores`` with the causal and the boolean (``False`` = masked) or additive mask applied."""
    if is_causal:
        causal = torch.ones(scores.shape[-2], scores.shape[-1], dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    return scores


def safe_softmax(scores: torch.Tensor) -> torch.Tensor:
    """``softmax(scores, -1)``, with zeros (and zero derivatives) on rows that are all ``-inf``."""
    live = (scores > float("-inf")).any(dim=-1, keepdim=True)
    scores = torch.where(live, scores, torch.zeros((), dtype=scores.dtype, device=scores.device))
    # written out: torch.softmax on this input failed autograd's in-place check in a reverse pass
    # through its forward-mode formula (rest="train", PyTorch 2.13)
    exp = torch.exp(scores - scores.detach().amax(dim=-1, keepdim=True))
    return exp / exp.sum(dim=-1, keepdim=True) * live


def math_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0, is_causal: bool = False,
                   scale: float | None = None, enable_gqa: bool = False) -> torch.Tensor:
    """``softmax(scale Q K^T + mask) V`` with SDPA's signature, from differentiable operations.

    Scores and softmax are computed in float32 for half-precision inputs (as the fused
    kernels accumulate); the output has the inputs' dtype.

    Raises:
        ValueError: ``dropout_p`` is non-zero (a linearization point must be deterministic).
    """
    if dropout_p:
        raise ValueError(f"scaled_dot_product_attention was called with dropout_p={dropout_p} inside a linearized "
                         "model; the linearization point must be deterministic. Put the wrapped model in eval mode "
                         "(LinearizedModel does this itself).")
    if enable_gqa:
        key, value = repeat_kv(key, value, query.shape[-3])
    work = torch.float32 if query.dtype in (torch.float16, torch.bfloat16) else query.dtype
    scores = (query @ key.transpose(-2, -1)).to(work) * attention_scale(query, scale)
    mask = attn_mask if attn_mask is None or attn_mask.dtype == torch.bool else attn_mask.to(work)
    probs = safe_softmax(masked_scores(scores, mask, is_causal))
    return probs.to(value.dtype) @ value


class MathAttentionMode(TorchFunctionMode):
    """Routes ``F.scaled_dot_product_attention`` to :func:`math_attention` (the ``"jvp"`` engine).

    Functions written in Python (``F.multi_head_attention_forward``, ...) run with the mode
    still active (:func:`call_reentrant`), so SDPA calls nested in them are routed too.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return math_attention(*args, **kwargs)
        return call_reentrant(self, func, types, args, kwargs)
