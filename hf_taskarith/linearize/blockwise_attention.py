"""The attention tangent in key blocks: memory linear in sequence length (no ``L x L`` tensor).

With ``S = scale Q K^T + mask``, ``P = softmax(S)`` (rows normalised by ``lse``, the row-wise
log-sum-exp), ``O = P V`` and ``S_t = scale (Q_t K^T + Q K_t^T)``, the tangent of attention is

``O_t = (P * S_t) V - r * O + P V_t``, with ``r = rowsum(P * S_t)``,

a sum over keys, so it accumulates block by block: each key block recomputes its slice
``P_b = exp(S_b - lse)`` and adds its share of ``(P * S_t) V``, ``r`` and ``P V_t``. The
adjoint has the same shape as flash attention's backward: with ``g = dL/dO_t`` and
``delta = rowsum(g * O)``, ``dS_t = P * (g V^T - delta)``, so ``dQ_t = scale dS_t K``,
``dK_t = scale dS_t^T Q`` and ``dV_t = P^T g``, again block by block. Only ``Q``, ``K``, ``V``,
``O`` and ``lse`` are kept for the backward pass.

Note:
    Cost: the primal ``O`` comes from PyTorch's fused SDPA kernel and ``lse`` from one more pass
    (one matmul per block); the tangent costs five matmuls per block and its backward five,
    against four and four for the materialised rule
    (:mod:`~hf_taskarith.linearize.attention_rule`), which is faster for short sequences; the
    rule switches to this path when ``L_q x L_k`` exceeds :data:`BLOCKWISE_MIN_SCORES` scores
    per head. Peak extra memory is ``L_q x block`` scores per head instead of ``L_q x L_k``.
"""

from __future__ import annotations

import torch

#: the materialised rule is used up to this many scores per head (``L_q * L_k``); beyond, this module
BLOCKWISE_MIN_SCORES = 1024 * 1024
#: keys per block
BLOCK_SIZE = 512


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype


def _masked_block(s: torch.Tensor, mask: torch.Tensor | None, is_causal: bool, start: int) -> torch.Tensor:
    """Scores of keys ``start : start + s.shape[-1]`` with the causal and the attention mask applied."""
    stop = start + s.shape[-1]
    if is_causal:
        rows = torch.arange(s.shape[-2], device=s.device)[:, None]
        cols = torch.arange(start, stop, device=s.device)[None, :]
        s = s.masked_fill(cols > rows, float("-inf"))
    if mask is not None:
        m = mask[..., start:stop] if mask.shape[-1] != 1 else mask
        s = s.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else s + m.to(s.dtype)
    return s


def _blocks(n: int, block: int):
    for start in range(0, n, block):
        yield start, min(start + block, n)


def _probabilities(q, k, mask, is_causal, scale, lse, start, stop):
    """``P`` for keys ``start:stop`` (work dtype), zero where masked and on fully masked rows."""
    s = torch.matmul(q, k[..., start:stop, :].transpose(-2, -1)).to(lse.dtype).mul_(scale)
    s = _masked_block(s, mask, is_causal, start)
    return torch.exp(s - lse)  # lse = +inf on fully masked rows: exp(-inf) = 0


@torch.no_grad()
def attention_lse(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, is_causal: bool, scale: float,
                  block: int = BLOCK_SIZE) -> torch.Tensor:
    """Row-wise log-sum-exp of the masked scores, ``(..., L_q, 1)``, in key blocks (online).

    Work dtype (float32 for half inputs); ``+inf`` on rows whose every key is masked, so that
    their probabilities ``exp(S - lse)`` are zero.
    """
    work = _work_dtype(q)
    shape = (*torch.broadcast_shapes(q.shape[:-2], k.shape[:-2]), q.shape[-2], 1)
    m = torch.full(shape, float("-inf"), dtype=work, device=q.device)
    total = torch.zeros(shape, dtype=work, device=q.device)
    for start, stop in _blocks(k.shape[-2], block):
        s = torch.matmul(q, k[..., start:stop, :].transpose(-2, -1)).to(work).mul_(scale)
        s = _masked_block(s, mask, is_causal, start)
        m_new = torch.maximum(m, s.amax(-1, keepdim=True))
        safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)  # all masked so far: nothing to rescale
        total = total * torch.exp(m - safe) + torch.exp(s - safe).sum(-1, keepdim=True)
        m = m_new
    live = total > 0
    safe_m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    return torch.where(live, safe_m + torch.log(torch.where(live, total, torch.ones_like(total))),
                       torch.full_like(m, float("inf")))


class BlockwiseAttentionTangent(torch.autograd.Function):
    """``O_t`` from ``Q_t``, ``K_t``, ``V_t`` (any may be ``None``); ``Q``, ``K``, ``V``, ``O``, ``lse`` constant.

    Inputs are ``(..., L, D)`` in one dtype, ``K``/``V`` already repeated for grouped queries.
    """

    @staticmethod
    def forward(ctx, q, k, v, o, lse, mask, is_causal: bool, scale: float, block: int, q_t, k_t, v_t):
        work = lse.dtype
        lead = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2])
        acc = torch.zeros((*lead, q.shape[-2], v.shape[-1]), dtype=work, device=q.device)
        r = torch.zeros((*lead, q.shape[-2], 1), dtype=work, device=q.device)
        for start, stop in _blocks(k.shape[-2], block):
            p = _probabilities(q, k, mask, is_causal, scale, lse, start, stop)
            s_t = None
            if q_t is not None:
                s_t = torch.matmul(q_t, k[..., start:stop, :].transpose(-2, -1))
            if k_t is not None:
                term = torch.matmul(q, k_t[..., start:stop, :].transpose(-2, -1))
                s_t = term if s_t is None else s_t + term
            if s_t is not None:
                ps = p * s_t.to(work).mul_(scale)
                r += ps.sum(-1, keepdim=True)
                acc += torch.matmul(ps.to(v.dtype), v[..., start:stop, :]).to(work)
            if v_t is not None:
                acc += torch.matmul(p.to(v_t.dtype), v_t[..., start:stop, :]).to(work)
        out_t = acc - r * o.to(work)
        ctx.save_for_backward(q, k, v, o, lse, mask)
        ctx.is_causal, ctx.scale, ctx.block = is_causal, scale, block
        ctx.has = (q_t is not None, k_t is not None, v_t is not None)
        return out_t.to(q.dtype)

    @staticmethod
    def backward(ctx, g):
        q, k, v, o, lse, mask = ctx.saved_tensors
        has_q, has_k, has_v = ctx.has
        need_q = has_q and ctx.needs_input_grad[9]
        need_k = has_k and ctx.needs_input_grad[10]
        need_v = has_v and ctx.needs_input_grad[11]
        work = lse.dtype
        delta = (g.to(work) * o.to(work)).sum(-1, keepdim=True)
        g_q = torch.zeros(q.shape, dtype=work, device=q.device) if need_q else None
        g_k = torch.zeros(k.shape, dtype=work, device=k.device) if need_k else None
        g_v = torch.zeros(v.shape, dtype=work, device=v.device) if need_v else None
        for start, stop in _blocks(k.shape[-2], ctx.block):
            p = _probabilities(q, k, mask, ctx.is_causal, ctx.scale, lse, start, stop)
            if need_v:
                g_v[..., start:stop, :] += _sum_to(torch.matmul(p.transpose(-2, -1).to(g.dtype), g).to(work),
                                                   g_v.shape[:-2])
            if need_q or need_k:
                gv = torch.matmul(g, v[..., start:stop, :].transpose(-2, -1)).to(work)
                ds = (p * (gv - delta)).mul_(ctx.scale).to(q.dtype)
                if need_q:
                    g_q += torch.matmul(ds, k[..., start:stop, :]).to(work)
                if need_k:
                    g_k[..., start:stop, :] += _sum_to(torch.matmul(ds.transpose(-2, -1), q).to(work), g_k.shape[:-2])
        cast = lambda t, like: None if t is None else t.to(like.dtype)  # noqa: E731
        return (None, None, None, None, None, None, None, None, None, cast(g_q, q), cast(g_k, k), cast(g_v, v))


def _sum_to(t: torch.Tensor, lead: torch.Size) -> torch.Tensor:
    """Sum broadcast leading dimensions of ``t`` back to ``lead`` (keys shared across a broadcast batch)."""
    while t.dim() - 2 > len(lead):
        t = t.sum(0)
    for i, n in enumerate(lead):
        if n == 1 and t.shape[i] != 1:
            t = t.sum(i, keepdim=True)
    return t
