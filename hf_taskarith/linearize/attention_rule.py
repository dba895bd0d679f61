"""The tangent rule for ``F.scaled_dot_product_attention`` (registered on import).

PyTorch's fused attention kernels have no forward-mode formula, so the ``"dual"`` engine
computes attention itself. With ``S = scale * Q K^T + mask``, ``P = softmax(S)`` and
``O = P V``, the tangent is

``S_t = scale (Q_t K^T + Q K_t^T)``, ``P_t = P * (S_t - rowsum(P * S_t))``,
``O_t = P_t V + P V_t``.

The primal (``S``, ``P``, ``O``) runs outside autograd, ``P`` once; the tangent is one
:class:`torch.autograd.Function` (:class:`_AttentionTangent`) whose backward is the adjoint
written out (four batched matmuls, like the backward of attention itself), saving only the
primal ``Q``, ``K``, ``V`` and ``P``. When a primal needs a graph (parameters trained
non-linearly, ``rest="train"``), everything is left to autograd instead.

Note:
    Cost: two batched matmuls for the primal, four for the tangent and four in the backward,
    against two and four for ordinary attention; the ``L x L`` probabilities are materialised
    (as with eager attention), not recomputed in tiles as by the fused kernels.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

from .tangent_rules import register_tangent_rule, split_dual

_SDPA_SIGNATURE = inspect.Signature([
    inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=d) for n, d in [
        ("query", inspect.Parameter.empty), ("key", inspect.Parameter.empty),
        ("value", inspect.Parameter.empty), ("attn_mask", None), ("dropout_p", 0.0),
        ("is_causal", False), ("scale", None), ("enable_gqa", False),
    ]
])


def _flat(t: torch.Tensor) -> torch.Tensor:
    """``(..., L, D)`` as a contiguous ``(batch, L, D)`` (a view when ``t`` is contiguous)."""
    return t.contiguous().view(-1, t.shape[-2], t.shape[-1])


class _AttentionTangent(torch.autograd.Function):
    """``O_t = P_t V + P V_t`` with ``P_t`` from ``Q_t``, ``K_t``; ``Q``, ``K``, ``V``, ``P`` constant.

    ``q``, ``k``, ``v``, ``p`` are 3-d and contiguous; tangents may be ``None`` (no tangent).
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: torch.Tensor, scale: float,
                q_t: torch.Tensor | None, k_t: torch.Tensor | None, v_t: torch.Tensor | None) -> torch.Tensor:
        out_shape = (q_t if q_t is not None else k_t if k_t is not None else v_t).shape[:-2] + (p.shape[-2], v.shape[-1])
        s_t = None
        if q_t is not None:
            s_t = torch.bmm(_flat(q_t), k.transpose(1, 2))
        if k_t is not None:
            kt = _flat(k_t).transpose(1, 2)
            s_t = torch.bmm(q, kt) if s_t is None else s_t.baddbmm_(q, kt)
        o_t = torch.bmm(p, _flat(v_t)) if v_t is not None else None
        if s_t is not None:
            ps = s_t.mul_(p)
            p_t = ps.addcmul_(p, ps.sum(-1, keepdim=True), value=-1)  # scale applied below
            o_t = torch.bmm(p_t, v).mul_(scale) if o_t is None else o_t.baddbmm_(p_t, v, alpha=scale)
        ctx.save_for_backward(q, k, v, p)
        ctx.scale = scale
        ctx.shapes = tuple(None if t is None else t.shape for t in (q_t, k_t, v_t))
        return o_t.view(out_shape)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        q, k, v, p = ctx.saved_tensors
        q_shape, k_shape, v_shape = ctx.shapes
        need_q = q_shape is not None and ctx.needs_input_grad[5]
        need_k = k_shape is not None and ctx.needs_input_grad[6]
        need_v = v_shape is not None and ctx.needs_input_grad[7]
        g = _flat(g)
        g_q = g_k = g_v = None
        if need_v:
            g_v = torch.bmm(p.transpose(1, 2), g).view(v_shape)
        if need_q or need_k:
            g_s = torch.bmm(g, v.transpose(1, 2)).mul_(p)
            g_s.addcmul_(p, g_s.sum(-1, keepdim=True), value=-1).mul_(ctx.scale)
            if need_q:
                g_q = torch.bmm(g_s, k).view(q_shape)
            if need_k:
                g_k = torch.bmm(g_s.transpose(1, 2), q).view(k_shape)
        return None, None, None, None, None, g_q, g_k, g_v


def _probabilities(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, is_causal: bool,
                   scale: float) -> torch.Tensor:
    """``softmax(scale Q K^T + mask)`` of 4-d (or n-d) ``q``, ``k``; fully masked rows give zeros."""
    s = torch.matmul(q, k.transpose(-2, -1)).mul_(scale)
    masked = False
    if is_causal:
        causal = torch.ones(s.shape[-2], s.shape[-1], dtype=torch.bool, device=s.device).tril()
        s.masked_fill_(~causal, float("-inf"))
        masked = True
    if mask is not None:
        if mask.dtype == torch.bool:
            s.masked_fill_(~mask, float("-inf"))
        else:
            s.add_(mask)
        masked = True
    p = torch.softmax(s, dim=-1)
    if masked:  # a fully masked row is NaN after softmax; the math backend gives zeros
        p.nan_to_num_(nan=0.0)
    return p


@register_tangent_rule(F.scaled_dot_product_attention)
def sdpa_rule(*args: Any, **kwargs: Any):
    """Tangent rule for ``F.scaled_dot_product_attention`` (see the module docstring).

    Raises:
        ValueError: ``dropout_p`` is non-zero (the linearization point must be deterministic).
    """
    a = _SDPA_SIGNATURE.bind(*args, **kwargs).arguments
    q, q_t = split_dual(a["query"])
    k, k_t = split_dual(a["key"])
    v, v_t = split_dual(a["value"])
    mask = a.get("attn_mask")
    if q_t is None and k_t is None and v_t is None:
        return NotImplemented
    if mask is not None and fwAD.unpack_dual(mask).tangent is not None:
        return NotImplemented
    if a.get("dropout_p", 0.0):
        raise ValueError(
            f"scaled_dot_product_attention was called with dropout_p={a['dropout_p']} inside a "
            "linearized model; the linearization point must be deterministic. Put the wrapped "
            "model in eval mode (LinearizedModel does this itself)."
        )
    if a.get("enable_gqa", False) and k.shape[-3] != q.shape[-3]:
        rep = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(rep, dim=-3), v.repeat_interleave(rep, dim=-3)
        k_t = None if k_t is None else k_t.repeat_interleave(rep, dim=-3)
        v_t = None if v_t is None else v_t.repeat_interleave(rep, dim=-3)
    scale = a.get("scale")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    is_causal = bool(a.get("is_causal", False))
    if q.requires_grad or k.requires_grad or v.requires_grad or (mask is not None and mask.requires_grad):
        # primals depend on parameters trained non-linearly (rest="train"): autograd sees everything
        return _sdpa_autograd(q, k, v, q_t, k_t, v_t, mask, is_causal, scale)
    batch = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2],
                                   () if mask is None else mask.shape[:-2])
    with torch.no_grad():
        q3, k3, v3 = (_flat(t.expand(*batch, *t.shape[-2:])) for t in (q, k, v))
        p = _probabilities(q3.view(*batch, *q3.shape[-2:]), k3.view(*batch, *k3.shape[-2:]), mask,
                           is_causal, scale)
        p3 = p.view(-1, p.shape[-2], p.shape[-1])
        out = torch.bmm(p3, v3).view(*p.shape[:-1], v.shape[-1])
    q_t, k_t, v_t = (None if t is None else t.expand(*batch, *t.shape[-2:]) for t in (q_t, k_t, v_t))
    out_t = _AttentionTangent.apply(q3, k3, v3, p3, scale, q_t, k_t, v_t)
    return fwAD.make_dual(out, out_t)


def _sdpa_autograd(q, k, v, q_t, k_t, v_t, mask, is_causal: bool, scale: float):
    """The same computation with every operation recorded by autograd (for ``rest="train"``)."""
    s = (q @ k.transpose(-2, -1)) * scale
    if is_causal:
        causal = torch.ones(s.shape[-2], s.shape[-1], dtype=torch.bool, device=s.device).tril()
        s = s.masked_fill(~causal, float("-inf"))
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask
    p = torch.softmax(s, dim=-1)
    p = torch.where(torch.isnan(p), torch.zeros((), dtype=p.dtype, device=p.device), p)
    out = p @ v
    s_t = None
    if q_t is not None:
        s_t = (q_t @ k.transpose(-2, -1)) * scale
    if k_t is not None:
        term = (q @ k_t.transpose(-2, -1)) * scale
        s_t = term if s_t is None else s_t + term
    out_t = None
    if s_t is not None:
        ps = p * s_t
        out_t = (ps - p * ps.sum(dim=-1, keepdim=True)) @ v
    if v_t is not None:
        term = p @ v_t
        out_t = term if out_t is None else out_t + term
    return fwAD.make_dual(out, out_t)
