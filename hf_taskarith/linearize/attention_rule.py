"""The tangent rule for ``F.scaled_dot_product_attention`` (registered on import).

PyTorch's fused attention kernels have no forward-mode formula, so the ``"dual"`` engine
computes attention itself. With ``S = scale * Q K^T + mask``, ``P = softmax(S)`` and
``O = P V``, the tangent is

``S_t = scale (Q_t K^T + Q K_t^T)``, ``P_t = P * (S_t - rowsum(P * S_t))``,
``O_t = P_t V + P V_t``.

The primal (``S``, ``P``, ``O``) runs outside autograd, ``P`` once; the tangent is one
:class:`torch.autograd.Function` (:class:`_AttentionTangent`) whose backward is the adjoint
written out (four batched matmuls, like the backward of attention itself), saving only the
primal ``Q``, ``K``, ``V`` and ``P``, all in one dtype (autocast's, under autocast). When a
primal needs a graph (parameters trained non-linearly, ``rest="train"``), the computation is
:func:`~hf_taskarith.linearize.math_attention.math_attention`, left to autograd and PyTorch's
forward-mode formulas.

Note:
    Cost: two batched matmuls for the primal, four for the tangent and four in the backward,
    against two and four for ordinary attention; the ``L x L`` probabilities are materialised
    (as with eager attention), not recomputed in tiles as by the fused kernels.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

from . import blockwise_attention as blockwise
from .math_attention import attention_scale, math_attention, repeat_kv
from .tangent_rules import autocast_dtype, cast, no_autocast, register_tangent_rule, split_dual

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
        some_t = q_t if q_t is not None else k_t if k_t is not None else v_t
        out_shape = some_t.shape[:-2] + (p.shape[-2], v.shape[-1])
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
    """``softmax(scale Q K^T + mask)`` of 4-d (or n-d) ``q``, ``k`` in their dtype; fully masked rows give zeros.

    Scores and softmax are computed in float32 for half-precision inputs (as fused kernels
    accumulate), then rounded to the inputs' dtype, the dtype the tangent is computed in.
    """
    work = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    s = torch.matmul(q, k.transpose(-2, -1)).to(work).mul_(scale)
    masked = False
    if is_causal:
        causal = torch.ones(s.shape[-2], s.shape[-1], dtype=torch.bool, device=s.device).tril()
        s.masked_fill_(~causal, float("-inf"))
        masked = True
    if mask is not None:
        if mask.dtype == torch.bool:
            s.masked_fill_(~mask, float("-inf"))
        else:
            s.add_(mask.to(work))
        masked = True
    p = torch.softmax(s, dim=-1)
    if masked:  # a fully masked row is NaN after softmax; the math backend gives zeros
        p.nan_to_num_(nan=0.0)
    return p.to(q.dtype)


@register_tangent_rule(F.scaled_dot_product_attention)
def sdpa_rule(*args: Any, **kwargs: Any):
    """Tangent rule for ``F.scaled_dot_product_attention`` (see the module docstring).

    Under autocast, queries, keys, values and their tangents are cast to autocast's dtype
    first (as autocast casts SDPA's inputs); the computation then runs in that one dtype.

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
    if q.requires_grad or k.requires_grad or v.requires_grad or (mask is not None and mask.requires_grad):
        # primals depend on parameters trained non-linearly (rest="train"): autograd and PyTorch's
        # forward-mode formulas see every operation of the math computation
        return math_attention(*args, **kwargs)
    if a.get("dropout_p", 0.0):
        math_attention(q, k, v, dropout_p=a["dropout_p"])  # raises the explanatory error
    device = q.device.type
    dtype = autocast_dtype(device) or q.dtype
    q, k, v, q_t, k_t, v_t = (cast(t, dtype) for t in (q, k, v, q_t, k_t, v_t))
    if a.get("enable_gqa", False) and k.shape[-3] != q.shape[-3]:
        k, v = repeat_kv(k, v, q.shape[-3])
        k_t, v_t = (None if t is None else repeat_kv(t, t, q.shape[-3])[0] for t in (k_t, v_t))
    scale = attention_scale(q, a.get("scale"))
    is_causal = bool(a.get("is_causal", False))
    batch = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2],
                                   () if mask is None else mask.shape[:-2])
    if q.shape[-2] * k.shape[-2] > blockwise.BLOCKWISE_MIN_SCORES:
        return _blockwise(q, k, v, q_t, k_t, v_t, mask, is_causal, scale, device)
    with no_autocast(device):
        with torch.no_grad():
            q3, k3, v3 = (_flat(t.expand(*batch, *t.shape[-2:])) for t in (q, k, v))
            p = _probabilities(q3.view(*batch, *q3.shape[-2:]), k3.view(*batch, *k3.shape[-2:]), mask,
                               is_causal, scale)
            p3 = p.view(-1, p.shape[-2], p.shape[-1])
            out = torch.bmm(p3, v3).view(*p.shape[:-1], v.shape[-1])
        q_t, k_t, v_t = (None if t is None else t.expand(*batch, *t.shape[-2:]) for t in (q_t, k_t, v_t))
        out_t = _AttentionTangent.apply(q3, k3, v3, p3, scale, q_t, k_t, v_t)
    return fwAD.make_dual(out, out_t)


def _blockwise(q, k, v, q_t, k_t, v_t, mask, is_causal: bool, scale: float, device: str):
    """Long sequences: the primal through PyTorch's fused kernel, the tangent in key blocks
    (:mod:`~hf_taskarith.linearize.blockwise_attention`); no ``L x L`` tensor is kept."""
    with no_autocast(device):
        with torch.no_grad():
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale)
            lse = blockwise.attention_lse(q, k, mask, is_causal, scale, blockwise.BLOCK_SIZE)
            out = out.masked_fill(torch.isinf(lse), 0.0)  # fully masked rows: zeros, as the math backend
        out_t = blockwise.BlockwiseAttentionTangent.apply(q, k, v, out, lse, mask, is_causal, scale,
                                                          blockwise.BLOCK_SIZE, q_t, k_t, v_t)
    return fwAD.make_dual(out, out_t)
